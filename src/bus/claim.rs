//! Claims: a principal taking, for good, an address nobody holds (`kind: "claim"`).
//!
//! - `runtime`: the runtime URL a socket names at its handshake (`Bus::bind`).
//! - `runtime_address`: a `from` under a runtime scheme of the node's domain, used for the
//!   first time (the reference stubs connect as `runtime://D/1` and send from
//!   `hyperty-runtime://D/protostub/1/sm`).
//! - `hyperty`: a hyperty address of the node's domain used as a `from` before anybody held
//!   it (runtimes that make up their addresses), where the policy allows it.
//! - `identity`: a `user://` identity a registration names without the connection having
//!   verified it (the registry files the entry under it only when allowed).
//!
//! A claimed address is bound to the claiming runtime and recorded in its record
//! (`claimed`); it counts among its principal's addresses, stays the runtime's through a
//! release (like the runtime URL), and no other principal can take it, an address over it
//! or one under it ([`super::owners::Claims`]). The node's backstops hold whatever the
//! policy says: [`MAX_CLAIMS_PER_RUNTIME`] and `[bus.limits] addresses_per_principal`.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::connection::{Connection, Principal};
use super::Bus;
use crate::policy::input::{Claim, ClaimInput, Input, Subject};
use crate::rethink::address;
use crate::rethink::{BusError, Message};

/// A claim on first use placed in line to be stored: completes once it is (else it is
/// taken back).
pub(super) type ClaimStored = BoxFuture<'static, Result<(), BusError>>;

/// Most addresses one runtime may claim on first use, whatever the policy allows.
pub const MAX_CLAIMS_PER_RUNTIME: usize = 1000;

/// A claim the decision did not allow.
struct ClaimRefused {
    /// No policy decided (the decision failed closed): not the policy's answer.
    unavailable: bool,
    /// What the sender is told.
    error: BusError,
}

/// The subject of a principal for an address it does not hold yet.
fn principal_subject(principal: &Principal, runtime: &str) -> Subject {
    let mut subject = Subject {
        runtime: runtime.to_string(),
        authenticated: true,
        ..Subject::default()
    };
    match principal {
        Principal::User(user) => subject.user = Some(user.clone()),
        Principal::NetworkServer(name) => subject.network_server = Some(name.clone()),
        Principal::Peer(domain) => subject.peer = Some(domain.clone()),
    }
    subject
}

impl Bus {
    /// Decides whether `principal` may take `url` of `kind` for the runtime `runtime`
    /// (`kind: "claim"`), with what the principal holds for the limits.
    ///
    /// # Errors
    /// 403 with the policy's reasons; [`ClaimRefused::unavailable`] tells a refusal because
    /// no policy decided (a timeout, a PDP down) from the policy's own no.
    async fn decide_claim(
        &self,
        url: &str,
        kind: &'static str,
        principal: &Principal,
        runtime: &str,
    ) -> Result<(), ClaimRefused> {
        let mut subject = principal_subject(principal, runtime);
        subject.principal = Some(self.totals(&principal.owner(), false));
        let input = Input::Claim(ClaimInput {
            claim: Claim {
                address: url.to_string(),
                kind,
                domain: address::domain(url),
            },
            subject,
            context: self.context(),
        });
        let decision = self.decision(&input).await;
        match decision.allow {
            true => Ok(()),
            false => Err(ClaimRefused {
                unavailable: decision.failed,
                error: BusError::Forbidden(crate::policy::refusal(&decision)),
            }),
        }
    }

    /// Decides whether `principal` may take the runtime URL `url`, which nobody owns yet:
    /// within the per-principal limits of live and of released runtimes and as the policy
    /// says (the shipped one
    /// allows runtime URLs of this node's domain).
    ///
    /// # Errors
    /// 403 past the limit or when the policy refuses.
    pub(super) async fn claim_runtime(
        &self,
        url: &str,
        principal: &Principal,
        owner: &str,
    ) -> Result<(), BusError> {
        let runtimes = self.totals(owner, false).runtimes;
        let limits = &self.inner.config.limits;
        let limit = limits.runtimes_per_principal;
        if runtimes >= limit {
            self.inner.metrics.limited("runtimes");
            return Err(BusError::Forbidden(format!(
                "this user already owns {runtimes} runtimes (the limit is {limit})"
            )));
        }
        // Released runtimes stay their principal's for good: counted apart, so that short
        // sessions on fresh runtime URLs do not lock a user out, but not without bound.
        let released = self.inner.table.owner(owner).map_or(0, |h| h.released());
        let limit = limits.tombstones_per_principal;
        if released >= limit {
            self.inner.metrics.limited("tombstones");
            return Err(BusError::Forbidden(format!(
                "this user has released {released} runtime URLs, which stay its own (the limit \
                 is {limit}); reconnect one of them instead of a new runtime URL"
            )));
        }
        self.decide_claim(url, "runtime", principal, url)
            .await
            .map_err(|refused| refused.error)
    }

    /// Claim on first use: a `from` of the node's domain that nobody holds — under a
    /// runtime scheme, or a hyperty address — is taken for the sending runtime when the
    /// policy allows it. Anything else (held, foreign, not canonical, over or under another
    /// principal's address, refused) is left to the message's own decision and the
    /// anti-spoofing rule, which refuse it as spoofed.
    ///
    /// A claim made is placed in line to be stored, in the caller's turn; the returned
    /// future stores it (taking it back if that fails), and must have completed before
    /// anything uses the claim — the caller may wait for it after giving its turn back.
    ///
    /// # Errors
    /// 403 past the node's backstops, or "policy unavailable" when the claim's decision
    /// could not be made (told as such, not as the spoof the message's own decision would
    /// then find); 408 when the claim cannot be stored.
    pub(super) async fn claim_from(
        &self,
        conn: &Connection,
        message: &Message,
    ) -> Result<Option<ClaimStored>, BusError> {
        let from = message.from.as_str();
        let nodes = &self.inner.nodes;
        let table = &self.inner.table;
        if matches!(conn.principal, Principal::Peer(_))
            || !nodes.is_local(from)
            || table.holder_of(from).is_some()
        {
            return Ok(None);
        }
        let kind = match address::scheme(from).as_deref() {
            Some("runtime" | "hyperty-runtime") if nodes.runtime_url_problem(from).is_none() => {
                "runtime_address"
            }
            Some("hyperty") if nodes.hyperty_url_problem(from).is_none() => "hyperty",
            _ => return Ok(None),
        };
        if address::domain(from).as_deref() != Some(nodes.domain()) {
            return Ok(None); // a component's subdomain (msg-node.D, registry.D …)
        }
        let owner = conn.principal.owner();
        // The caps first: they cost nothing, the conflict check reads the claims' index.
        let runtime = &conn.runtime;
        let claimed = runtime.with_record(|r| r.claimed.len());
        if claimed >= MAX_CLAIMS_PER_RUNTIME {
            return Err(BusError::Forbidden(format!(
                "this runtime already claimed {MAX_CLAIMS_PER_RUNTIME} addresses"
            )));
        }
        let held = self.totals(&owner, false).addresses;
        let limit = self.inner.config.limits.addresses_per_principal;
        if held >= limit {
            self.inner.metrics.limited("addresses");
            return Err(BusError::Forbidden(format!(
                "this user holds {held} addresses (the limit is {limit})"
            )));
        }
        if table.claims.conflict(from, &owner).is_some() {
            return Ok(None);
        }
        if let Err(refused) = self
            .decide_claim(from, kind, &conn.principal, &runtime.url)
            .await
        {
            if refused.unavailable {
                return Err(refused.error);
            }
            tracing::debug!(%from, refused = %refused.error, "claim on first use refused");
            return Ok(None);
        }
        if table.claims.take(from, &owner).is_err() {
            return Ok(None); // another principal was quicker
        }
        if !table.bind_if_free(from, runtime) {
            table.claims.forget(from);
            return Ok(None);
        }
        let record = runtime.update(|r| r.claimed.push(from.to_string()));
        let undo = {
            let (bus, runtime, from) = (self.clone(), Arc::clone(runtime), from.to_string());
            move || {
                runtime.update(|r| r.claimed.retain(|a| *a != from));
                bus.inner.table.unbind(&from, &runtime);
                bus.inner.table.claims.forget(&from);
            }
        };
        let stored = match self.persist_queued(&runtime.url, &record) {
            Ok(stored) => stored,
            Err(e) => {
                undo();
                return Err(e);
            }
        };
        self.inner.metrics.claims.inc();
        tracing::debug!(%from, kind, runtime = %runtime.url, "address claimed on first use");
        Ok(Some(Box::pin(async move {
            stored.await.map_err(|e| {
                undo();
                super::store_error(e)
            })
        })))
    }

    /// Whether a registration by `conn` may be filed under `identity`, which the connection
    /// did not verify (`kind: "claim"`, `identity`: the shipped policy says no unless
    /// `data.config.claims.identities`).
    pub(super) async fn accepts_identity(&self, conn: &Connection, identity: &str) -> bool {
        self.decide_claim(identity, "identity", &conn.principal, &conn.runtime.url)
            .await
            .is_ok()
    }
}

//! Asking the policy about a message: the identity a message asserts (verified by the IdM
//! and remembered for the connection), the `subject` and `context` of every input the bus
//! builds, and the decision itself — a deny is a 403 with the policy's reasons.

use super::connection::{Connection, Principal};
use super::Bus;
use crate::connectors::idm::Idm;
use crate::pdp::Decision;
use crate::policy::input::{Allocation, Context, Input, MessageInput, Subject, Totals};
use crate::policy::EnforcementPoint;
use crate::rethink::address;
use crate::rethink::{BusError, Message};

impl Bus {
    /// The policy input for `message` from `conn` (with `allocation` for a request to an
    /// allocation component, and what the principal holds when the message can add to it).
    pub(super) fn message_input<'a>(
        &self,
        conn: &Connection,
        message: &'a Message,
        allocation: Option<Allocation>,
        principal: Option<Totals>,
    ) -> Input<'a> {
        let mut subject = self.subject(conn);
        subject.principal = principal;
        subject.holds_from = Some(self.holds_from(conn, message));
        Input::Message(MessageInput {
            message: &message.value,
            subject,
            context: self.context(),
            targets: self.targets(conn, message),
            allocation,
        })
    }

    /// Whether `conn` holds `message.from` (or the address it is a sub-resource of); a peer
    /// node authenticated for its domain vouches for its own addresses.
    pub(super) fn holds_from(&self, conn: &Connection, message: &Message) -> bool {
        if let Principal::Peer(domain) = &conn.principal {
            if address::domain(&message.from).as_deref() == Some(domain.as_str()) {
                return true;
            }
        }
        self.holds(conn, &message.from)
    }

    /// Who `conn` is, as the policy sees it: its runtime's subject, the identity it asserted,
    /// and which network server or peer node it is.
    pub(super) fn subject(&self, conn: &Connection) -> Subject {
        let mut subject = (*conn.runtime.subject()).clone();
        subject.identity = conn.identity();
        match &conn.principal {
            Principal::User(_) => {}
            Principal::NetworkServer(name) => subject.network_server = Some(name.clone()),
            Principal::Peer(domain) => subject.peer = Some(domain.clone()),
        }
        subject
    }

    /// What the principal `owner` holds across its runtimes; with `registry`, also how many
    /// entries they registered in the built-in registry.
    pub(super) fn totals(&self, owner: &str, registry: bool) -> Totals {
        let holdings = self.inner.table.owner(owner);
        let registry_entries = match (&self.inner.connectors.builtin_registry, registry) {
            (Some(builtin), true) => Some(
                holdings
                    .as_ref()
                    .map_or(0, |h| h.with_urls(|urls| builtin.registered_by(urls))),
            ),
            _ => None,
        };
        match holdings {
            None => Totals {
                registry_entries,
                ..Totals::default()
            },
            Some(h) => Totals {
                runtimes: h.runtimes(),
                addresses: h.addresses(),
                foreign_routes: h.foreign(),
                registry_entries,
                subscriptions: None,
            },
        }
    }

    /// Now, at this node.
    pub(super) fn context(&self) -> Context {
        Context::now(self.inner.nodes.domain())
    }

    /// Asks the PDP, as the bus.
    pub(super) async fn decision(&self, input: &Input<'_>) -> Decision {
        let decider = &self.inner.policy.decider;
        decider.decide(input, EnforcementPoint::Bus).await
    }

    /// Asks the PDP; a deny is a 403 carrying the policy's reasons.
    pub(super) async fn allowed(&self, input: &Input<'_>) -> Result<Decision, BusError> {
        let decision = self.decision(input).await;
        if decision.allow {
            return Ok(decision);
        }
        Err(BusError::Forbidden(crate::policy::refusal(&decision)))
    }

    /// Verifies `body.identity`, when asserted, and remembers it for the connection.
    pub(super) async fn verify_identity(
        &self,
        conn: &Connection,
        message: &Message,
    ) -> Result<(), BusError> {
        let Some(claimed) = Idm::claimed(message.body()) else {
            return Ok(());
        };
        if conn.identity().as_deref() == Some(claimed) {
            return Ok(());
        }
        let body = message.body();
        // The assertion: an explicit token, else the identity object runtimes send (it
        // carries the IdP's assertion).
        let assertion = body
            .get("idToken")
            .or_else(|| body.get("assertion"))
            .or_else(|| body.get("identity"));
        let verified = self
            .inner
            .connectors
            .idm
            .verify(conn.user(), claimed, assertion)
            .await?;
        conn.set_identity(verified);
        Ok(())
    }
}

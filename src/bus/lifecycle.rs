//! A runtime's life on the bus: a socket authenticates, binds its runtime URL (first
//! principal for good), attaches (takes over an earlier socket, drains the inbox, goes
//! online), detaches (away: bindings kept, messages wait in the inbox) and finally releases
//! everything (`disconnect`, `close`, or away too long). Also restoring runtimes from the
//! store at start and replacing one's record with another replica's.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;

use super::connection::{Connection, Principal};
use super::outbound::Outbound;
use super::runtimes::Runtime;
use super::Bus;
use crate::matrix::HomeserverError;
use crate::persist::store::RuntimeRecord;
use crate::rethink::address;
use crate::rethink::BusError;
use tokio_util::sync::CancellationToken;

/// Rounds of a resume that each found new pushes before its hand-over is held: its
/// flow-controlled senders then wait for it to go online (bounded) instead of adding to the
/// inbox, so a steady sender cannot keep a resuming runtime off-line.
const HOLD_AFTER_ROUNDS: u32 = 3;
/// Rounds a held hand-over may still find new pushes (of what cannot wait) before it is let
/// go (senders add to the inbox again) and held again later.
const HELD_ROUNDS: u32 = 8;

impl Bus {
    /// Checks a token: a Network Server's, else a Matrix access token.
    ///
    /// # Errors
    /// 401 when there is none or it is not valid; 408 when the homeserver cannot answer.
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Principal, BusError> {
        let token = token.ok_or_else(|| {
            BusError::Unauthorized(
                "no access token (Authorization: Bearer, or ?access_token=)".into(),
            )
        })?;
        if let Some(ns) = self
            .inner
            .config
            .network_servers
            .iter()
            .find(|ns| crate::http_auth::token_matches(token, &ns.token))
        {
            return Ok(Principal::NetworkServer(ns.name.clone()));
        }
        let Some(homeserver) = &self.inner.persistence.homeserver else {
            return Err(BusError::Unauthorized("unknown token".into()));
        };
        match homeserver.whoami(token, None).await {
            Ok(user) => Ok(Principal::User(user)),
            Err(HomeserverError::Refused { status, .. }) if (400..500).contains(&status) => Err(
                BusError::Unauthorized("the homeserver does not know this access token".into()),
            ),
            Err(_) => Err(BusError::Unavailable(
                "homeserver unavailable; retry".into(),
            )),
        }
    }

    /// The runtime `runtime_url` for a socket authenticated as `principal`: created on first
    /// use (owned by that principal from then on, stored).
    ///
    /// # Errors
    /// 400 for a runtime URL that is not a URL; 403 when the runtime belongs to another
    /// principal; 408 when the store cannot record a new owner.
    pub async fn bind(
        &self,
        runtime_url: &str,
        principal: &Principal,
    ) -> Result<Arc<Runtime>, BusError> {
        if let Some(problem) = self.inner.nodes.runtime_url_problem(runtime_url) {
            return Err(BusError::BadRequest(problem));
        }
        if let Some(domain) = address::domain(runtime_url) {
            if self.inner.connectors.foreign.peer(&domain).is_some() {
                return Err(BusError::Forbidden(format!(
                    "runtimes of '{domain}' connect to that domain's node"
                )));
            }
        }
        let owner = principal.owner();
        // Nobody else's address, nor under one (a return route of another principal's
        // runtime), nor over one (a runtime URL or claimed address lies under it).
        let table = &self.inner.table;
        let taken = table
            .holder(runtime_url)
            .is_some_and(|holder| holder.url != runtime_url)
            || table.holder_of(runtime_url).is_some_and(|holder| {
                holder.url != runtime_url && holder.user().as_deref() != Some(owner.as_str())
            })
            || table.claims.conflict(runtime_url, &owner).is_some();
        if taken {
            return Err(BusError::Forbidden(format!(
                "'{runtime_url}' is, or lies under or over, an address of another principal's"
            )));
        }
        if let Some(runtime) = table.get_runtime(runtime_url) {
            match runtime.user() {
                Some(existing) if existing != owner => {
                    return Err(BusError::Forbidden(format!(
                        "runtime '{runtime_url}' belongs to another user"
                    )))
                }
                Some(_) if runtime.with_record(|r| r.released) => {
                    return self.revive(runtime, &owner).await;
                }
                Some(_) => return Ok(runtime),
                None => {}
            }
        }
        // Counted and claimed in the principal's turn (see `Turns`) — waited for no longer
        // than a handshake may take, since the socket holds a handshake place meanwhile.
        let turn = self
            .turn(&owner, self.inner.config.handshake_timeout)
            .await?;
        if let Some(runtime) = table.get_runtime(runtime_url) {
            match runtime.user() {
                Some(existing) if existing != owner => {
                    return Err(BusError::Forbidden(format!(
                        "runtime '{runtime_url}' belongs to another user"
                    )))
                }
                Some(_) => return Ok(runtime), // bound meanwhile by another of this principal's
                None => {}
            }
        }
        self.claim_runtime(runtime_url, principal, &owner).await?;
        // First come, for good: of principals racing for it (or for an address over or
        // under it), one takes it — before the runtime is made, and with no wait between
        // the two: a claim refused or given up (the handshake dropped while deciding)
        // leaves nothing behind, and no principal's bind ever holds a runtime another's
        // may remove (review bus-4 M7).
        if let Err(other) = table.claims.take(runtime_url, &owner) {
            return Err(BusError::Forbidden(format!(
                "'{runtime_url}' overlaps '{other}', another principal's"
            )));
        }
        let runtime = table.runtime(runtime_url, || RuntimeRecord {
            user: Some(owner.clone()),
            ..RuntimeRecord::default()
        });
        // An ownerless runtime left by an older record is owned now, once.
        let record = runtime.update(|r| {
            r.user.get_or_insert_with(|| owner.clone());
        });
        if record.user.as_deref() != Some(owner.as_str()) {
            return Err(BusError::Forbidden(format!(
                "runtime '{runtime_url}' belongs to another user"
            )));
        }
        table.own(&runtime);
        if self.inner.config.replica.is_none() {
            // Nobody else can have written to its inbox: no room until one is needed.
            self.inner.persistence.inbox.is_new(runtime_url);
        }
        // Placed in line in the turn (a later change of the runtime is stored after it),
        // then given back: the claim is counted, and the principal's other runtimes need
        // not wait for this write — their records go out with it.
        let stored = self.persist_queued(&runtime.url, &record)?;
        drop(turn);
        stored.await.map_err(super::store_error)?;
        Ok(runtime)
    }

    /// `runtime`, a tombstone of `owner`'s, bound again: it is live again once attached, so
    /// it counts against `runtimes_per_principal` like a new one — checked in the turn.
    ///
    /// # Errors
    /// 403 past the limit; 408 when the turn is not had in time.
    async fn revive(&self, runtime: Arc<Runtime>, owner: &str) -> Result<Arc<Runtime>, BusError> {
        let _turn = self
            .turn(owner, self.inner.config.handshake_timeout)
            .await?;
        if !runtime.with_record(|r| r.released) {
            return Ok(runtime); // revived meanwhile
        }
        let live = self.totals(owner, false).runtimes;
        let limit = self.inner.config.limits.runtimes_per_principal;
        if live >= limit {
            self.inner.metrics.limited("runtimes");
            return Err(BusError::Forbidden(format!(
                "this user has {live} live runtimes (the limit is {limit}); close one first"
            )));
        }
        // Counted as live from now on (under the turn), so the next revival sees it.
        runtime.update(|r| r.released = false);
        Ok(runtime)
    }

    /// Attaches a socket (its outbound queue `tx`) to `runtime`, taking over an earlier socket
    /// of the same runtime, hands it everything its inbox holds, then goes online.
    ///
    /// # Errors
    /// 408 when the inbox cannot be read or the socket went away meanwhile.
    pub async fn attach(
        &self,
        runtime: Arc<Runtime>,
        principal: Principal,
        tx: Outbound,
    ) -> Result<Arc<Connection>, BusError> {
        let conn = Arc::new(Connection::new(
            self.inner.next_conn.fetch_add(1, Ordering::Relaxed),
            Arc::clone(&runtime),
            principal,
            tx,
        ));
        // A socket still holding the runtime (or stuck handing its inbox over) is told to
        // close first: its hand-over ends, and this one gets the turn.
        runtime.close_socket();
        // After a release under way (a `close` just before this reconnect) has finished.
        let turn = tokio::select! {
            turn = runtime.handover() => turn,
            () = conn.close.cancelled() => {
                return Err(BusError::Unavailable("taken over meanwhile; reconnect".into()));
            }
        };
        // Released meanwhile (a `close` just before this reconnect, whose `bind` found it
        // live): in use again — and so live again only within `runtimes_per_principal`,
        // checked in the principal's turn as any revival, or a release racing a second
        // socket would free a place for another revival and then take it back unchecked
        // (review bus-4 M6). The reaper may release it once more when it is away too long.
        if let Some(owner) = runtime
            .user()
            .filter(|_| runtime.with_record(|r| r.released))
        {
            self.revive(Arc::clone(&runtime), &owner).await?;
        }
        runtime.begin_attach(conn.id, conn.close.clone());
        // Every wait below ends with the socket's close (a take-over, a too slow resume) or
        // the node's shutdown; whatever was not acknowledged is handed over again next time.
        let resumed = tokio::select! {
            resumed = self.resume(&runtime, &conn) => resumed,
            () = conn.close.cancelled() => Err(BusError::Unavailable(
                "another socket took the runtime over, or this one was too slow; reconnect".into(),
            )),
            () = self.inner.shutdown.cancelled() => {
                Err(BusError::Unavailable("the node is shutting down".into()))
            }
        };
        let resumed = match resumed {
            Ok(resumed) => resumed,
            Err(e) => {
                // What was not acknowledged is handed over again next time.
                runtime.detach(conn.id);
                return Err(e);
            }
        };
        drop(turn);
        self.inner.metrics.connections.inc();
        tracing::info!(runtime = %runtime.url, conn = conn.id, resumed, "runtime connected");
        Ok(conn)
    }

    /// Hands `runtime`'s inbox to `conn` in pages of at most its socket's budget (each
    /// acknowledged once queued) — also what arrives meanwhile, which goes to the inbox too —
    /// and goes online once a take found nothing new; how many messages came from the inbox.
    async fn resume(&self, runtime: &Arc<Runtime>, conn: &Connection) -> Result<u64, BusError> {
        let current = self.inner.table.get_runtime(&runtime.url);
        if !current.is_some_and(|current| Arc::ptr_eq(&current, runtime)) {
            return Err(BusError::Unavailable(
                "the runtime was released meanwhile; reconnect".into(),
            ));
        }
        if let Some(me) = &self.inner.config.replica {
            // Tell the other replicas the runtime is here now (one closes its socket).
            let record = runtime.update(|r| {
                r.node = Some(me.clone());
                r.attached_ms = crate::clock::now_ms();
            });
            self.persist(&runtime.url, &record).await?;
        }
        self.hand_inbox(runtime, conn.id, &conn.tx, &conn.close)
            .await
    }

    /// Hands `runtime`'s inbox to the socket `conn` (its queue `tx`, its `close`) in pages of
    /// at most its socket's budget (each acknowledged once queued) — also what arrives
    /// meanwhile, which goes to the inbox too — and goes online once a take found nothing
    /// new; how many messages came from the inbox. Called with the runtime's hand-over turn
    /// held and the runtime draining to `conn`.
    async fn hand_inbox(
        &self,
        runtime: &Arc<Runtime>,
        conn: u64,
        tx: &Outbound,
        close: &CancellationToken,
    ) -> Result<u64, BusError> {
        let inbox = &self.inner.persistence.inbox;
        let page_bytes = self.config().outbound_queue_bytes;
        let mut resumed = 0u64;
        // Rounds that found new pushes: past `HOLD_AFTER_ROUNDS` the hand-over is held (its
        // senders wait behind it); a hold that still finds new ones (what cannot wait: a
        // fan-out, a notification) for `HELD_ROUNDS` is let go and tried again later.
        let mut rounds = 0u32;
        loop {
            let pushed = inbox.pushed(&runtime.url);
            let page = inbox.take(&runtime.url, page_bytes).await.map_err(|e| {
                BusError::Unavailable(format!("cannot read the runtime's inbox: {e}"))
            })?;
            for text in &page.messages {
                if !self
                    .send_within(tx, close, &runtime.url, Utf8Bytes::from(text.clone()))
                    .await
                {
                    return Err(BusError::Unavailable(
                        "socket closed, or too slow, while resuming".into(),
                    ));
                }
            }
            if !page.messages.is_empty() {
                resumed += page.messages.len() as u64;
                self.inner
                    .metrics
                    .delivered("resumed", page.messages.len() as u64);
                if let Err(e) = inbox.ack(&runtime.url, &page).await {
                    // Delivered but not recorded as such: a later resume may repeat them.
                    tracing::warn!(%e, runtime = %runtime.url, "cannot record the inbox cursor");
                }
            }
            if page.more {
                continue;
            }
            // Nothing new since this take began: online. Else take what came meanwhile.
            match runtime.go_online(conn, tx, pushed, inbox) {
                Some(true) => break,
                Some(false) => {
                    rounds += 1;
                    if rounds == HOLD_AFTER_ROUNDS {
                        runtime.hold(conn);
                    } else if rounds == HOLD_AFTER_ROUNDS + HELD_ROUNDS {
                        runtime.unhold(conn);
                        rounds = 0;
                    }
                    continue;
                }
                None => {
                    return Err(BusError::Unavailable(
                        "another socket took the runtime over; reconnect".into(),
                    ))
                }
            }
        }
        Ok(resumed)
    }

    /// After [`Runtime::overflow`]: hands `runtime`'s inbox to the socket `conn` that still
    /// holds it (its queue `tx`), in the background, then online again. A socket that takes
    /// none of it for `[bus] slow_receiver_close_after` is closed, as any too slow
    /// receiver, and resumes from the inbox on reconnect; a reconnect meanwhile ends this.
    pub(super) fn catch_up(
        &self,
        runtime: Arc<Runtime>,
        conn: u64,
        tx: Outbound,
        close: CancellationToken,
    ) {
        let bus = self.clone();
        self.inner.tracker.spawn(async move {
            let _turn = tokio::select! {
                turn = runtime.handover() => turn,
                () = close.cancelled() => return,
            };
            let handed = tokio::select! {
                handed = bus.hand_inbox(&runtime, conn, &tx, &close) => handed,
                () = close.cancelled() => return,
                () = bus.inner.shutdown.cancelled() => return,
            };
            if let Err(e) = handed {
                tracing::info!(runtime = %runtime.url, %e, "a socket behind did not catch up: closed");
                close.cancel();
                runtime.detach(conn);
            }
        });
    }

    /// The socket of `conn` is gone: its runtime is away (bindings kept; messages go to the
    /// inbox) until it reconnects or disconnects.
    pub fn detach(&self, conn: &Connection) {
        conn.runtime.detach(conn.id);
        self.inner.metrics.connections.dec();
        tracing::info!(runtime = %conn.runtime.url, conn = conn.id, "runtime socket closed");
    }

    /// The runtime said goodbye (`disconnect`/`close`): releases everything bound to it.
    ///
    /// # Errors
    /// 408 when the store cannot record the release.
    pub async fn release(&self, conn: &Connection) -> Result<(), BusError> {
        self.release_runtime(&conn.runtime).await?;
        tracing::info!(runtime = %conn.runtime.url, "runtime released its addresses");
        Ok(())
    }

    /// Releases `runtime`: everything bound to it (addresses, subscriptions, return routes)
    /// and what its inbox still holds are gone; its URL and claimed addresses stay its
    /// owner's for good (the record becomes a tombstone, stored first), so nobody else can
    /// take them over with what was addressed to them. Its registry entries stay the
    /// runtime's (the reference clients register on one socket and look the entry up from
    /// the next): the reaper deletes them, a few per step, once it has been away for `[bus]
    /// away_release_after` (`housekeeping`).
    ///
    /// A release holds the runtime's hand-over turn from start to end: a socket attaching
    /// meanwhile (a reconnect right after `close`) waits, then finds the runtime released
    /// and takes it up again (within the principal's live runtimes, as a revival), empty —
    /// never half released, never released under it.
    pub(super) async fn release_runtime(&self, runtime: &Arc<Runtime>) -> Result<(), BusError> {
        let _turn = runtime.handover().await;
        let Some(owner) = runtime.user() else {
            // Never owned, so never stored by this node (a record is first written with its
            // owner): nothing to write over — no empty head for a key never written.
            self.inner.subscriptions.remove_runtime(&runtime.url);
            self.inner.table.remove_runtime(&runtime.url);
            return Ok(());
        };
        let tombstone = RuntimeRecord {
            user: Some(owner),
            released: true,
            claimed: runtime.with_record(|r| r.claimed.clone()),
            ..RuntimeRecord::default()
        };
        self.persist(&runtime.url, &tombstone).await?;
        self.inner.subscriptions.remove_runtime(&runtime.url);
        self.inner.table.unbind_record(runtime, true);
        runtime.update(|r| *r = tombstone);
        match self.inner.persistence.inbox.discard(&runtime.url).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(runtime = %runtime.url, messages = n, "released runtime: its inbox was discarded")
            }
            Err(e) => {
                tracing::warn!(%e, runtime = %runtime.url, "released runtime: its inbox could not be discarded now")
            }
        }
        Ok(())
    }

    /// Puts a stored runtime into the table (away), with its bindings and subscriptions.
    pub(super) fn restore(&self, url: &str, record: RuntimeRecord) {
        if self.is_stand_in(url) {
            self.restore_stand_in(url, record);
            return;
        }
        if let Some(problem) = self.inner.nodes.runtime_url_problem(url) {
            tracing::warn!(runtime = %url, %problem, "stored runtime not restored");
            return;
        }
        let runtime = self.inner.table.runtime(url, || record);
        self.subscribe_stored(&runtime);
    }

    /// Replaces `runtime`'s record (written by another replica), its bindings and
    /// subscriptions with it; the runtime itself stays (a socket may be attaching to it).
    pub(super) fn rebind(&self, runtime: &Arc<Runtime>, mut record: RuntimeRecord) {
        if self.is_stand_in(&runtime.url) {
            record = super::peers::stand_in_holdings(&record);
        }
        self.inner.table.unbind_record(runtime, false);
        self.inner.subscriptions.remove_runtime(&runtime.url);
        runtime.update(|r| *r = record);
        self.inner.table.bind_record(runtime);
        self.subscribe_stored(runtime);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;

    /// A node with a memory bus, handshakes given `handshake` for their turn.
    async fn node(handshake: Duration) -> crate::cmd::run::Running {
        node_with(handshake, |_| {}).await
    }

    /// [`node`], its bus configuration changed by `change` first.
    pub(in crate::bus) async fn node_with(
        handshake: Duration,
        change: impl FnOnce(&mut crate::config::BusConfig),
    ) -> crate::cmd::run::Running {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut config = crate::config::Config::default();
        config.pdp.listen = ([127, 0, 0, 1], 0).into();
        config.pdp.policies = repo.join("policies");
        config.pdp.schema_dir = repo.join("schemas");
        config.pdp.decision_log.enabled = false;
        config.bus.enabled = true;
        config.bus.listen = ([127, 0, 0, 1], 0).into();
        config.bus.domain = Some("localhost".into());
        config.bus.handshake_timeout = handshake;
        change(&mut config.bus);
        crate::cmd::run::start(config).await.expect("start")
    }

    /// Review bus-4 M6: a second socket's `bind` found the runtime live, its first socket's
    /// `disconnect` then released it (a place free under `runtimes_per_principal`), another
    /// tombstone was revived into that place, and the second socket's `attach` took the
    /// released runtime up again unchecked: one live runtime over the limit per round.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_release_racing_a_second_socket_frees_no_place_over_the_limit() {
        let running = node_with(Duration::from_secs(5), |bus| {
            bus.limits.runtimes_per_principal = 2;
        })
        .await;
        let bus = running.bus.clone().expect("bus");
        let eve = Principal::NetworkServer("eve".into());
        let (t, l, u) = (
            "runtime://localhost/t",
            "runtime://localhost/l",
            "runtime://localhost/u",
        );
        let tombstone = bus.bind(u, &eve).await.expect("u");
        bus.release_runtime(&tombstone).await.expect("u released");
        let first = bus.bind(t, &eve).await.expect("t");
        bus.bind(l, &eve).await.expect("l");
        let (tx, _rx) = super::super::outbound::channel(16, 1 << 20);
        let s1 = bus
            .attach(first, eve.clone(), tx)
            .await
            .expect("t's first socket");
        // The second socket's handshake binds T while it is live; T's first socket says
        // `disconnect` before the second attaches, and U is revived meanwhile.
        let second = bus.bind(t, &eve).await.expect("t live");
        bus.release(&s1).await.expect("t released");
        bus.bind(u, &eve)
            .await
            .expect("u revived into the free place");
        let (tx, _rx) = super::super::outbound::channel(16, 1 << 20);
        let attached = bus.attach(second, eve.clone(), tx).await;
        let live = bus.totals(&eve.owner(), false).runtimes;
        assert!(live <= 2, "{live} live runtimes, the limit is 2");
        let refused = attached.err().expect("t is not live again past the limit");
        assert_eq!(refused.code(), 403, "{refused}");
        running.stop().await;
    }

    /// The same race within the limit: the second socket takes the released runtime up
    /// again (a reconnect right after `close`), empty.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_socket_after_a_release_takes_the_runtime_up_again() {
        let running = node(Duration::from_secs(5)).await;
        let bus = running.bus.clone().expect("bus");
        let eve = Principal::NetworkServer("eve".into());
        let t = "runtime://localhost/t";
        let first = bus.bind(t, &eve).await.expect("t");
        let (tx, _rx) = super::super::outbound::channel(16, 1 << 20);
        let s1 = bus
            .attach(first, eve.clone(), tx)
            .await
            .expect("first socket");
        let second = bus.bind(t, &eve).await.expect("t live");
        bus.release(&s1).await.expect("t released");
        let (tx, _rx) = super::super::outbound::channel(16, 1 << 20);
        let s2 = bus
            .attach(second, eve.clone(), tx)
            .await
            .expect("taken up again");
        assert!(!s2.runtime.with_record(|r| r.released));
        assert_eq!(bus.totals(&eve.owner(), false).runtimes, 1);
        running.stop().await;
    }

    /// Review bus-4 M3: during a held hand-over (the last rounds of a resume) a peer node's
    /// message went into the inbox at once, so each one found a new push and a remote
    /// sender could keep a runtime resuming. It waits behind the hold now (as a local
    /// sender's, `PEER_WAIT` at most): the hand-over goes online, and it is delivered direct.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peers_message_waits_behind_a_held_hand_over() {
        use futures_util::FutureExt;
        let running = node(Duration::from_secs(5)).await;
        let bus = running.bus.clone().expect("bus");
        let eve = Principal::NetworkServer("eve".into());
        let runtime = bus.bind("runtime://localhost/r", &eve).await.expect("r");
        let inbox = &bus.inner.persistence.inbox;
        runtime.begin_attach(1, CancellationToken::new());
        assert!(runtime.hold(1), "held");
        let pushed = inbox.pushed(&runtime.url);
        let charge = crate::persist::shares::Charge::from("peer");
        let mut slot = super::super::runtimes::Slot::new(&charge, None);
        let text = Utf8Bytes::from_static("{\"id\":1}");
        let until = tokio::time::Instant::now() + super::super::flow::PEER_WAIT;
        let mut delivery = Box::pin(bus.deliver(&runtime, &text, &mut slot, Some(until)));
        assert!(
            (&mut delivery).now_or_never().is_none(),
            "it waits behind the hold"
        );
        let (tx, mut rx) = super::super::outbound::channel(16, 1 << 20);
        assert_eq!(
            runtime.go_online(1, &tx, pushed, inbox),
            Some(true),
            "nothing new in the inbox: online"
        );
        assert_eq!(delivery.await, super::super::runtimes::Delivered::Direct);
        assert_eq!(rx.try_recv().map(|t| t.to_string()), Some(text.to_string()));
        running.stop().await;
    }

    /// Review bus-4 M7: two principals bound one fresh URL at once and both held the same
    /// ownerless runtime; the one refused removed it from the table, and the other then
    /// owned a runtime the table no longer knew (its first attach failed, its holdings could
    /// be counted twice). The runtime is made only once a claim is taken now.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_bind_removes_no_runtime_another_principal_binds() {
        use futures_util::FutureExt;
        let running = node_with(Duration::from_secs(5), |bus| {
            bus.limits.runtimes_per_principal = 1;
        })
        .await;
        let bus = running.bus.clone().expect("bus");
        let (alice, bob) = (
            Principal::NetworkServer("alice".into()),
            Principal::NetworkServer("bob".into()),
        );
        let url = "runtime://localhost/contested";
        bus.bind("runtime://localhost/alices", &alice)
            .await
            .expect("alice at her limit");
        // Bob's bind goes as far as its claim's decision (which a pool thread answers)...
        let mut bobs = Box::pin(bus.bind(url, &bob));
        let early = (&mut bobs).now_or_never();
        // ... then Alice's is refused (her limit) meanwhile.
        let refused = bus.bind(url, &alice).await.err().expect("alice refused");
        assert_eq!(refused.code(), 403, "{refused}");
        let runtime = match early {
            Some(bound) => bound,
            None => bobs.await,
        }
        .expect("bob binds it");
        let table = &bus.inner.table;
        let listed = table
            .get_runtime(url)
            .expect("the table knows bob's runtime");
        assert!(
            Arc::ptr_eq(&listed, &runtime),
            "the table's runtime is bob's"
        );
        let holder = table.holder(url).expect("the URL is held");
        assert!(Arc::ptr_eq(&holder, &runtime), "held by bob's runtime");
        assert_eq!(runtime.user().as_deref(), Some(bob.owner().as_str()));
        let (tx, _rx) = super::super::outbound::channel(16, 1 << 20);
        bus.attach(runtime, bob.clone(), tx)
            .await
            .expect("bob's first socket attaches");
        running.stop().await;
    }

    /// Review N8: `bind` made the runtime before waiting for the turn, so a handshake that
    /// did not get it in time left an ownerless runtime holding its URL (for every other
    /// principal too) until the reaper wrote an empty record for it. Nothing is left now.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handshake_that_times_out_on_its_turn_leaves_nothing() {
        let running = node(Duration::from_millis(200)).await;
        let bus = running.bus.clone().expect("bus");
        let eve = Principal::NetworkServer("eve".into());
        let url = "runtime://localhost/fresh";
        let held = bus
            .inner
            .table
            .turns
            .take(&eve.owner(), Duration::from_secs(5))
            .await
            .expect("eve's turn");
        let refused = bus.bind(url, &eve).await.err().expect("no turn in time");
        assert_eq!(refused.code(), 408, "{refused}");
        assert!(
            bus.inner.table.get_runtime(url).is_none(),
            "no runtime left"
        );
        assert!(
            bus.inner.table.holder_of(url).is_none(),
            "nothing holds the URL"
        );
        // Another principal may take it; so may eve once her turn is free.
        drop(held);
        let mallory = Principal::NetworkServer("mallory".into());
        let runtime = bus.bind(url, &mallory).await.expect("free for mallory");
        assert_eq!(runtime.user().as_deref(), Some(mallory.owner().as_str()));
        running.stop().await;
    }
}

//! What other domains' nodes send: messages posted to `/bus/v1/messages` (the endpoint is in
//! `session`) and, over the Matrix transport of `[[bus.peers]]`, the events their nodes'
//! users send in rooms shared with this node (pushed to the appservice, which hands them
//! here). Both are handled as messages of a `Principal::Peer` connection, which may send
//! only from its own domain; each is decided like any message.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use backon::Retryable;
use serde_json::Value;

use super::outbound::Outbound;
use super::request::Request;
use super::{Bus, Connection, Principal};
use crate::connectors::foreign::AnswerTo;
use crate::connectors::foreign::PEER_EVENT_TYPE;
use crate::matrix::Actor;
use crate::persist::store::RuntimeRecord;
use crate::rethink::address;
use crate::rethink::message::response;
use crate::rethink::{BusError, Message};

/// How many peer message events are remembered to skip a retried transaction's repeats.
const PEER_EVENTS_REMEMBERED: usize = 4096;

/// The ids of the peer message events handled lately, oldest first.
#[derive(Default)]
pub(super) struct SeenEvents(Mutex<(HashSet<String>, VecDeque<String>)>);

impl SeenEvents {
    /// Whether `event_id` is new (remembers the latest few thousand).
    fn first_time(&self, event_id: &str) -> bool {
        let mut seen = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (ids, order) = &mut *seen;
        if !ids.insert(event_id.to_string()) {
            return false;
        }
        order.push_back(event_id.to_string());
        if order.len() > PEER_EVENTS_REMEMBERED {
            if let Some(oldest) = order.pop_front() {
                ids.remove(&oldest);
            }
        }
        true
    }
}

/// Joins this node's user to the room a peer node invited it to, retrying for about ten
/// minutes while the peer's homeserver cannot be reached.
async fn join_peer_room(actor: Arc<Actor>, domain: String, room: String) {
    let policy = crate::retry::policy(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(120),
    );
    let joined = (|| actor.join(actor.sender(), &room))
        .retry(policy.with_max_times(11))
        .notify(|error, delay| {
            tracing::warn!(%domain, %room, %error, retry_in = ?delay, "cannot join the room of a peer node yet");
        })
        .await;
    match joined {
        Ok(()) => tracing::info!(%domain, %room, "joined the room of a peer node"),
        Err(_) => {
            tracing::error!(%domain, %room, "gave up joining the room of a peer node; its messages do not arrive until it invites again")
        }
    }
}

impl Bus {
    /// Handles `text`, a message from the node of `domain` (over HTTP or Matrix): the
    /// response to send back, if any.
    pub async fn handle_from_peer(
        &self,
        domain: &str,
        text: &str,
        started: tokio::time::Instant,
    ) -> Option<String> {
        match Message::parse(text) {
            Err((error, id)) => Some(response(
                &id,
                &self.nodes().node,
                "",
                error.code(),
                &error.to_string(),
                None,
            )),
            Ok(message) => {
                if address::domain(&message.from).as_deref() != Some(domain) {
                    let error = BusError::Forbidden(format!(
                        "peer '{domain}' may only send from its own domain"
                    ));
                    Some(message.error_response(&error))
                } else {
                    self.handle(&self.peer_connection(domain, started), message)
                        .await
                }
            }
        }
    }

    /// Takes an event the homeserver pushed to the appservice if it belongs to the Matrix
    /// transport of `[[bus.peers]]`: an invitation of this node's user by a peer node's user
    /// is accepted (retried in the background); a message a peer node sent is handled like
    /// one posted by that peer over HTTP (once per event, also when the transaction is
    /// retried), and the node's answer (e.g. 404) goes back to that peer the same way. A
    /// peer node leaving a room makes the next message to it check its room again. Whether
    /// the event was the bus's (else the appservice decides it as any event — also a peer
    /// message event from a user that is no configured peer node).
    pub async fn matrix_peer_event(&self, event: &Value, started: tokio::time::Instant) -> bool {
        let sender = event["sender"].as_str().unwrap_or_default();
        let kind = event["type"].as_str().unwrap_or_default();
        let Some(peer) = self.inner.connectors.foreign.matrix_peer(sender) else {
            if kind == PEER_EVENT_TYPE {
                // Not the bus's: an event like any other, which the appservice decides.
                tracing::info!(%sender, "a reTHINK message event from a user that is no configured peer node: decided as any event");
            }
            return false;
        };
        let domain = peer.domain.to_ascii_lowercase();
        let room = event["room_id"].as_str().unwrap_or_default().to_string();
        let Some(actor) = self.inner.persistence.actor.clone() else {
            return false;
        };
        if kind == "m.room.member" {
            let membership = event["content"]["membership"].as_str().unwrap_or_default();
            let target = event["state_key"].as_str().unwrap_or_default();
            if membership == "invite" && target == actor.sender() {
                self.inner
                    .tracker
                    .spawn(join_peer_room(actor, domain, room));
                return true;
            }
            if target == sender && matches!(membership, "leave" | "ban") {
                self.inner.connectors.foreign.forget_room(&domain);
            }
            return false;
        }
        if kind != PEER_EVENT_TYPE {
            return false;
        }
        if let Some(event_id) = event["event_id"].as_str() {
            if !self.inner.peer_events.first_time(event_id) {
                return true; // a retried transaction: handled already
            }
        }
        let Some(text) = event["content"]["message"].as_str() else {
            tracing::warn!(%domain, event_id = %event["event_id"], "a peer's message event without a message: ignored");
            return true;
        };
        let Some(answer) = self.handle_from_peer(&domain, text, started).await else {
            return true;
        };
        let answer = match Message::parse(&answer) {
            Ok(answer) => answer,
            Err((error, _)) => {
                tracing::warn!(%domain, %error, "an answer to a peer node that cannot be sent: dropped");
                return true;
            }
        };
        // Only to the peer that sent the message: an answer never goes to a third domain.
        let to_peer =
            |to: &String| address::domain(to).is_some_and(|d| d.eq_ignore_ascii_case(&domain));
        if answer.to.is_empty() || !answer.to.iter().all(to_peer) {
            tracing::warn!(%domain, to = ?answer.to, "an answer addressed outside the peer's domain: dropped");
            return true;
        }
        // Failures are logged; nobody waits for an answer to an answer.
        let Some(room) = self
            .inner
            .connectors
            .foreign
            .reserve(&answer.to, answer.text.len())
        else {
            self.inner
                .metrics
                .refuse(super::metrics::refused::PEER_QUEUE_FULL);
            tracing::warn!(%domain, "the peer node's queue is full: an answer to it is dropped");
            return true;
        };
        let from = answer.from.clone();
        self.to_peers(
            &answer,
            &from,
            &answer.to,
            &AnswerTo::new(&answer, None),
            room,
        );
        true
    }

    /// The domain of the peer presenting `token`.
    pub fn peer_domain(&self, token: &str) -> Option<String> {
        self.inner
            .connectors
            .foreign
            .peer_by_token(token)
            .map(|p| p.domain.to_ascii_lowercase())
    }

    /// The connection standing for a peer node: its runtime `domain://msg-node.<peer>`, one
    /// per peer, owned by `peer:<domain>` (see [`super::runtimes::Table::stand_in`]): what
    /// the peer allocates or registers is its own, counted against the per-principal limits
    /// as any principal's, and released once the peer has sent nothing for
    /// `away_release_after`. Its URL is outside the routing table (what is addressed to the
    /// peer's domain goes to the peer).
    fn peer_connection(&self, domain: &str, started: tokio::time::Instant) -> Arc<Connection> {
        let principal = Principal::Peer(domain.to_string());
        let owner = principal.owner();
        let runtime = self
            .inner
            .table
            .stand_in(&stand_in_url(domain), || RuntimeRecord {
                user: Some(owner),
                ..RuntimeRecord::default()
            });
        runtime.touch();
        if runtime.with_record(|r| r.released) {
            // In use again: released once more when unused for long.
            runtime.update(|r| r.released = false);
        }
        // Nothing reads this queue: a peer's answers travel back as HTTP responses (or
        // Matrix events), and a peer only routes (`only_routes`), so nothing waits in it.
        let mut conn = Connection::new(0, runtime, principal, Outbound::detached());
        conn.wait_until = Some(started + super::flow::PEER_WAIT);
        Arc::new(conn)
    }

    /// Puts the stand-in `url` into the table from its stored record, without what a
    /// stand-in may not hold ([`stand_in_holdings`]: a record stored before peers only
    /// routed may have addresses, subscriptions or return routes, which would take messages
    /// into an inbox nobody reads); a record that had any is stored again once, without.
    pub(super) fn restore_stand_in(&self, url: &str, record: RuntimeRecord) {
        let held = stand_in_holdings(&record);
        let stripped = held != record;
        let runtime = self.inner.table.stand_in(url, || held);
        if stripped {
            tracing::info!(runtime = %url, "a peer's stand-in restored without the addresses, subscriptions and return routes it may not hold");
            let bus = self.clone();
            self.inner.tracker.spawn(async move {
                let record = runtime.record();
                if let Err(error) = bus.persist(&runtime.url, &record).await {
                    tracing::warn!(%error, runtime = %runtime.url, "cannot store a peer's stand-in without its old holdings");
                }
            });
        }
    }

    /// Whether the stored runtime `url` is the stand-in of a configured peer node.
    pub(super) fn is_stand_in(&self, url: &str) -> bool {
        url.strip_prefix("domain://msg-node.")
            .is_some_and(|domain| {
                self.inner.connectors.foreign.peer(domain).is_some() && stand_in_url(domain) == url
            })
    }
}

/// What a peer's stand-in may hold of `record`: its owner, its claims (an owner's for good)
/// and its state — no allocations, subscriptions or return routes (a peer only routes).
pub(super) fn stand_in_holdings(record: &RuntimeRecord) -> RuntimeRecord {
    RuntimeRecord {
        allocations: Default::default(),
        subscriptions: Default::default(),
        foreign: Vec::new(),
        ..record.clone()
    }
}

/// A peer node only routes (its messages to this domain's addresses, and answers): it
/// holds nothing here, so it may not allocate addresses, subscribe or write to the registry
/// (403); it may read the registry. It has no session either: it may not close one (which
/// released its stand-in); an `open` or `ping` is answered.
pub(super) fn only_routes(
    domain: &str,
    request: &Request,
    message: &Message,
) -> Result<(), BusError> {
    let asks = match request {
        Request::Session(super::session::SessionOp::Close) => "close a session (it has none)",
        Request::Allocation(_) => "allocate addresses",
        Request::Subscribe => "subscribe",
        Request::Registry if !message.kind_is("read") => "write to the registry",
        _ => return Ok(()),
    };
    Err(BusError::Forbidden(format!(
        "the node of '{domain}' only routes messages here: it may not {asks}"
    )))
}

/// The runtime URL standing for the peer node of `domain`.
fn stand_in_url(domain: &str) -> String {
    format!("domain://msg-node.{domain}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Peer;

    const PEER: &str = "msgnode.test";
    const ADDRESS: &str = "hyperty://localhost/held-by-the-stand-in";

    /// A node with a memory bus and the peer node `PEER`.
    async fn node() -> crate::cmd::run::Running {
        let handshake = std::time::Duration::from_secs(5); // the default
        super::super::lifecycle::tests::node_with(handshake, |bus| {
            bus.peers = vec![Peer {
                domain: PEER.into(),
                url: "http://127.0.0.1:9".into(),
                token: "peer-token".into(),
                matrix_user: None,
            }];
        })
        .await
    }

    /// Review bus-4 M8: a stand-in restored from a record stored before peers only routed
    /// kept its allocations (what was sent to them went into an inbox nobody reads, for as
    /// long as the peer talked), subscriptions and return routes. Restored without them, and
    /// stored so once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stand_in_restored_from_an_old_record_holds_nothing() {
        let running = node().await;
        let bus = running.bus.clone().expect("bus");
        let url = stand_in_url(PEER);
        let mut old = RuntimeRecord {
            user: Some(Principal::Peer(PEER.into()).owner()),
            foreign: vec!["hyperty://hybroker.example/route".into()],
            ..RuntimeRecord::default()
        };
        old.allocations.insert("k".into(), vec![ADDRESS.into()]);
        old.subscriptions
            .insert("comm://localhost/o/changes".into(), ADDRESS.into());
        // What a start (or another replica's record) does with the stored record.
        bus.restore(&url, old.clone());
        assert!(
            bus.inner.table.holder_of(ADDRESS).is_none(),
            "the address is not bound"
        );
        assert!(bus
            .inner
            .table
            .holder_of("hyperty://hybroker.example/route")
            .is_none());
        let stand_in = bus.inner.table.get_runtime(&url).expect("the stand-in");
        assert_eq!(stand_in.record(), stand_in_holdings(&old));
        assert_eq!(stand_in.user(), old.user, "still the peer's");

        // A local message to the address it held: 404, not into the stand-in's inbox.
        let alice = Principal::NetworkServer("alice".into());
        let runtime = bus
            .bind("runtime://localhost/alice-rt", &alice)
            .await
            .expect("bind");
        let conn = Connection::new(1, runtime, alice, Outbound::detached());
        let message = Message::parse(
            serde_json::json!({"id": 1, "type": "create",
                "from": "runtime://localhost/alice-rt", "to": ADDRESS})
            .to_string(),
        )
        .expect("message");
        let answer = bus.handle(&conn, message).await.expect("an answer");
        let answer: Value = serde_json::from_str(&answer).expect("json");
        assert_eq!(answer["body"]["code"], 404, "{answer}");

        // Stored without them.
        let store = bus.inner.persistence.store.clone();
        let mut stored = None;
        for _ in 0..500 {
            stored = store
                .load()
                .await
                .expect("load")
                .runtimes
                .get(&url)
                .cloned();
            if stored.as_ref() == Some(&stand_in_holdings(&old)) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(stored, Some(stand_in_holdings(&old)));
        running.stop().await;
    }

    /// Fifth review P2: each of a peer's messages waited up to `PEER_WAIT` on its
    /// addressees, and the appservice handles a transaction's events one after another, so
    /// a local user keeping her runtimes held or full made every transaction take 250 ms per
    /// message — holding back the homeserver's next one, everyone's events. The messages of
    /// one transaction (or post) share one wait now.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transactions_messages_share_one_wait() {
        let running = node().await;
        let bus = running.bus.clone().expect("bus");
        let alice = Principal::NetworkServer("alice".into());
        let url = "runtime://localhost/alice-rt";
        let runtime = bus.bind(url, &alice).await.expect("bind");
        // A hand-over held: every delivery to the runtime waits for it, as long as it may.
        runtime.begin_attach(1, tokio_util::sync::CancellationToken::new());
        assert!(runtime.hold(1), "held");
        let started = tokio::time::Instant::now();
        let n: u32 = 16;
        for i in 0..n {
            let text = serde_json::json!({"id": i, "type": "create",
                "from": format!("hyperty://{PEER}/x"), "to": url, "body": {"value": i}})
            .to_string();
            let answer = bus.handle_from_peer(PEER, &text, started).await;
            assert!(answer.is_none(), "routed: {answer:?}");
        }
        // One wait for all (each its own: n of them, 4 s).
        let took = started.elapsed();
        assert!(
            took < super::super::flow::PEER_WAIT * (n / 2),
            "{n} messages of one transaction took {took:?}"
        );
        running.stop().await;
    }
}

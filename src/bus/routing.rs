//! Where an allowed message goes, and who may send it.
//!
//! Anti-spoofing ([`Bus::check_from`]) is the node's own rule, whatever the policy says:
//! `from` must be held by the sending connection (or be a sub-resource of what it holds);
//! a foreign `from` the policy allowed becomes a return route of the connection. Routing
//! ([`Bus::route`]) sends each `to` to its [`Destination`]: a topic reaches its
//! subscribers; any other address reaches the runtime holding it (or its nearest parent),
//! never subscribers; else a peer node (another domain); else nobody (404). Each target
//! runtime gets the received frame once (shared, not copied), directly or in its inbox, and
//! the journal records it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use serde_json::{json, Value};

use super::connection::{Connection, Principal};
use super::metrics::refused;
use super::pubsub::{self, Topic};
use super::runtimes::{Delivered, Runtime, Slot, Table};
use super::Bus;
use crate::config::Durability;
use crate::connectors::foreign::{AnswerTo, LineRoom};
use crate::persist::inbox::NoRoom;
use crate::persist::journal::HistoryFull;
use crate::persist::shares::{Charge, NODE};
use crate::policy::input::Target;
use crate::rethink::address;
use crate::rethink::{BusError, Message};

/// Most foreign addresses one runtime may use as return routes.
const MAX_FOREIGN_PER_RUNTIME: usize = 1000;

/// Where one `to` of a message goes.
enum Destination {
    /// The runtime holding the address (or the nearest address it is a sub-resource of): a
    /// direct addressee.
    Holder(Arc<Runtime>),
    /// A topic: its subscribers (a fan-out), the object's holder for a children topic (a
    /// direct addressee), and whether the object's peer node gets it too (a foreign
    /// object's children topic with local subscribers: its node gets it whatever is
    /// subscribed here).
    Topic {
        subscribers: Vec<Arc<Runtime>>,
        holder: Option<Arc<Runtime>>,
        foreign: bool,
    },
    /// A peer node.
    Foreign,
    /// Nothing holds it.
    Unknown,
}

/// The refusal of a peer node's message to `to`, another domain's address.
fn not_relayed(to: &str) -> BusError {
    BusError::Forbidden(format!(
        "'{to}' is another domain's: a peer node's message is not forwarded to a third domain"
    ))
}

impl Bus {
    /// Anti-spoofing, enforced by the node whatever the policy says: `from` must be held by
    /// the connection (or be a sub-resource of what it holds). A `from` of another domain,
    /// once the policy allowed it, becomes a return route of the connection.
    pub(super) async fn check_from(
        &self,
        conn: &Connection,
        message: &Message,
    ) -> Result<(), BusError> {
        let from = message.from.as_str();
        let spoofed = || {
            BusError::Forbidden(format!(
                "sender '{from}' is not an address of this connection (spoofed 'from')"
            ))
        };
        if let Principal::Peer(domain) = &conn.principal {
            if address::domain(from).as_deref() == Some(domain.as_str()) {
                return Ok(());
            }
        }
        match self.inner.table.holder_of(from) {
            Some(holder) if Arc::ptr_eq(&holder, &conn.runtime) => return Ok(()),
            // Held (or a sub-resource of what is held) by another runtime.
            Some(_) => return Err(spoofed()),
            None => {}
        }
        if self.inner.nodes.is_local(from) {
            return Err(spoofed());
        }
        // A domain with a configured peer node is reached through that node; nobody here may
        // stand in for its addresses.
        if let Some(domain) = address::domain(from) {
            if self.inner.connectors.foreign.peer(&domain).is_some() {
                return Err(BusError::Forbidden(format!(
                    "addresses of '{domain}' are reached through its node, not used as 'from' here"
                )));
            }
        }
        // A return route for the foreign hyperty: bound to this connection.
        if conn.runtime.with_record(|r| r.foreign.len()) >= MAX_FOREIGN_PER_RUNTIME {
            return Err(BusError::Forbidden(format!(
                "this runtime already uses {MAX_FOREIGN_PER_RUNTIME} foreign addresses"
            )));
        }
        // And within its principal's limit, whatever the request (a subscribe's `from` too);
        // counted in the principal's turn (see `owners::Turns`).
        let routes = self.totals(&conn.principal.owner(), false).foreign_routes;
        let limit = self.inner.config.limits.foreign_routes_per_principal;
        if routes >= limit {
            self.inner.metrics.limited("foreign_routes");
            return Err(BusError::Forbidden(format!(
                "this user holds {routes} foreign return routes (the limit is {limit})"
            )));
        }
        if !self.inner.table.bind_if_free(from, &conn.runtime) {
            return Err(spoofed());
        }
        let record = conn.runtime.update(|r| r.foreign.push(from.to_string()));
        if let Err(e) = self.persist(&conn.runtime.url, &record).await {
            conn.runtime.update(|r| r.foreign.retain(|a| a != from));
            self.inner.table.unbind(from, &conn.runtime);
            return Err(e);
        }
        Ok(())
    }

    /// Who `to` reaches. A topic (see `pubsub::topic`) reaches its subscribers — and a
    /// children topic always its object's route too (its local holder, else its peer node);
    /// with no subscribers, a foreign topic goes to the peer node, a changes or registration topic to nobody. Any other address reaches the
    /// runtime holding it (or the nearest address it is a sub-resource of) — never
    /// subscribers — else a peer node (another domain), else nobody (unknown).
    fn destination(&self, to: &str) -> Destination {
        let local = self.inner.nodes.is_local(to);
        // A released runtime (a tombstone) keeps its URL and claimed addresses, but nothing
        // is parked for it any more: its inbox went with the release, and it may never
        // come back to read what would wait.
        let live = |runtime: &Arc<Runtime>| !runtime.with_record(|r| r.released);
        if let Some(topic) = pubsub::topic(to) {
            let subscribers: Vec<Arc<Runtime>> = self
                .inner
                .subscriptions
                .subscribers(to)
                .into_iter()
                .map(|s| s.runtime)
                .collect();
            // A children topic always reaches its object's route — the local holder, else
            // the object's node — subscribers in addition, never instead.
            let holder = match topic {
                Topic::Children => self.inner.table.holder_of(to).filter(live),
                _ => None,
            };
            if subscribers.is_empty() && holder.is_none() && !local {
                return Destination::Foreign;
            }
            let foreign = topic == Topic::Children && holder.is_none() && !local;
            return Destination::Topic {
                subscribers,
                holder,
                foreign,
            };
        }
        if let Some(runtime) = self.inner.table.holder_of(to) {
            match live(&runtime) {
                true => Destination::Holder(runtime),
                false => Destination::Unknown,
            }
        } else if !local {
            Destination::Foreign
        } else {
            Destination::Unknown
        }
    }

    /// What the policy sees of each `to` of `message` from `conn`: the topic it is, and
    /// whether the sender holds it (for a topic: holds its object).
    pub(super) fn targets(&self, conn: &Connection, message: &Message) -> Vec<Target> {
        message
            .to
            .iter()
            .map(|to| {
                let (topic, held) = match pubsub::topic_of(to) {
                    Some((topic, object)) => (Some(topic.as_str()), object),
                    None => (None, to.as_str()),
                };
                Target {
                    address: to.clone(),
                    topic,
                    held_by_sender: self.publishes_for(conn, held),
                }
            })
            .collect()
    }

    /// Whether `conn` speaks for `object`: its runtime holds it, or it is the peer node of
    /// the object's domain (a peer holds its own domain's objects).
    fn publishes_for(&self, conn: &Connection, object: &str) -> bool {
        match &conn.principal {
            Principal::Peer(domain) if address::domain(object).as_deref() == Some(domain) => true,
            _ => self.holds(conn, object),
        }
    }

    /// Whether `conn`'s runtime holds `address` (or the address it is a sub-resource of).
    pub(super) fn holds(&self, conn: &Connection, address: &str) -> bool {
        self.inner
            .table
            .holder_of(address)
            .is_some_and(|holder| Arc::ptr_eq(&holder, &conn.runtime))
    }

    /// Routes an allowed message to every destination ([`Bus::destination`]): runtimes (direct
    /// or inbox, recorded in the journal) or a peer node. Unknown local addresses are a 404.
    ///
    /// A direct addressee (an address's holder) that cannot take the message makes it wait
    /// (flow control) or refuses it (408, its inbox full); a topic's subscriber never does:
    /// the fan-out is handed out without waiting ([`Bus::hand_out`]), so one subscriber's
    /// full queue or inbox is its own loss, never the publisher's nor the other subscribers'.
    pub(super) async fn route(
        &self,
        conn: &Connection,
        message: &Message,
    ) -> Result<Option<String>, BusError> {
        let mut direct: Vec<Arc<Runtime>> = Vec::new();
        let mut subscribers: Vec<Arc<Runtime>> = Vec::new();
        let mut foreign: Vec<String> = Vec::new();
        let mut unknown: Vec<&str> = Vec::new();
        // A peer's message never goes back to that peer's own domain (it came from there).
        let from_there = |to: &str| match &conn.principal {
            Principal::Peer(domain) => address::domain(to).as_deref() == Some(domain.as_str()),
            _ => false,
        };
        let peer = matches!(conn.principal, Principal::Peer(_));
        for to in &message.to {
            if self.inner.nodes.component(to).is_some() {
                return Err(BusError::BadRequest(format!(
                    "node component '{to}' takes a message of its own (a single 'to')"
                )));
            }
            // Only an object's holder publishes its changes (and status), local or foreign:
            // nobody else may reach its subscribers as if it were the object.
            if let Some((topic, object)) = pubsub::topic_of(to) {
                if topic.holder_publishes() && !self.publishes_for(conn, object) {
                    return Err(BusError::Forbidden(format!(
                        "only the holder of '{object}' publishes to '{to}'"
                    )));
                }
            }
            match self.destination(to) {
                Destination::Holder(runtime) => direct.push(runtime),
                Destination::Topic {
                    subscribers: subscribed,
                    holder,
                    foreign: to_peer,
                } => {
                    subscribers.extend(subscribed);
                    direct.extend(holder);
                    if to_peer && !from_there(to) {
                        if peer {
                            return Err(not_relayed(to));
                        }
                        foreign.push(to.clone());
                    }
                }
                Destination::Foreign if from_there(to) => unknown.push(to),
                // A peer's message is for this domain: the node is no relay between others.
                Destination::Foreign if peer => return Err(not_relayed(to)),
                Destination::Foreign => foreign.push(to.clone()),
                Destination::Unknown => unknown.push(to),
            }
        }
        let direct = Table::distinct(direct);
        // Once per runtime: an addressee that also subscribed gets it as an addressee.
        let subscribers: Vec<Arc<Runtime>> = Table::distinct(subscribers)
            .into_iter()
            .filter(|s| !direct.iter().any(|d| Arc::ptr_eq(d, s)))
            .collect();
        let persistence = &self.inner.persistence;
        let len = message.text.len();
        // What waits in memory for the homeserver (history, inboxes) is charged to the
        // sender's principal, within its share of each budget: one principal filling its
        // share is refused, the others' messages are not.
        let charge: Charge = Arc::from(conn.principal.owner());
        let reached = !direct.is_empty() || !subscribers.is_empty();
        // Every budget the message will take room in is reserved now, before anything waits
        // (the history's, an away addressee's inbox, a peer's line): senders racing for the
        // last room never take a budget past its limit, and room not taken up (a refusal
        // below, an addressee online again) is given back when its reservation drops.
        let history = match reached {
            false => None,
            true => {
                if self.inner.history_behind.load(Ordering::Relaxed) {
                    return Err(history_behind());
                }
                let reserved =
                    persistence
                        .journal
                        .reserve(&charge, len, self.inner.config.max_history_bytes);
                Some(reserved.map_err(|full| match full {
                    HistoryFull::Node => history_behind(),
                    HistoryFull::Share => {
                        self.inner.metrics.refuse(refused::PRINCIPAL_HISTORY_FULL);
                        BusError::Unavailable(
                            "your messages not yet in the node's history fill your share ([bus] max_history_bytes_per_principal, max_history_backlog_per_principal); retry shortly".into(),
                        )
                    }
                })?)
            }
        };
        // Only a direct addressee's full inbox refuses the message.
        if let Some(big) = direct
            .iter()
            .filter(|r| !r.is_online())
            .find(|r| !persistence.inbox.fits(&r.url, message.text.as_str()))
        {
            return Err(BusError::TooLarge(format!(
                "'{}' is away and this message is too big for its inbox in the homeserver (one event, {} bytes compressed at most); send it in parts",
                big.url,
                crate::persist::batch::MAX_EVENT_CONTENT
            )));
        }
        let mut slots = Vec::with_capacity(direct.len());
        for runtime in &direct {
            let reserved = match runtime.is_online() {
                true => None,
                false => Some(
                    persistence
                        .inbox
                        .reserve(&runtime.url, &charge, len)
                        .map_err(|full| self.inbox_full(full, &runtime.url))?,
                ),
            };
            slots.push(Slot::new(&charge, reserved));
        }
        let peer_room = match foreign.is_empty() {
            true => None,
            false => Some(
                self.inner
                    .connectors
                    .foreign
                    .reserve(&foreign, len)
                    .ok_or_else(|| {
                        self.inner.metrics.refuse(refused::PEER_QUEUE_FULL);
                        BusError::Unavailable(
                            "the peer node is behind ([bus] peer_queue, peer_queue_bytes); retry shortly"
                                .into(),
                        )
                    })?,
            ),
        };
        let journal = &self.inner.persistence.journal;
        let mut missed = None;
        if let Some(history) = history {
            let to: Vec<String> = direct
                .iter()
                .chain(&subscribers)
                .map(|r| r.url.clone())
                .collect();
            let persisted = self.inner.config.durability == Durability::Persisted;
            let pending = if persisted {
                journal
                    .record_persisted(message.text.as_str(), to, history)
                    .await
                    .map_err(|e| BusError::Unavailable(format!("history unavailable: {e}")))?;
                None
            } else {
                Some((to, history))
            };
            // The subscribers first: they never wait, and a slow addressee must not hold
            // back what they get.
            self.hand_out(&subscribers, &message.text, Payer::Sender(&charge));
            let metrics = &self.inner.metrics;
            // A peer's message is a whole domain's traffic: it waits on its local addressees'
            // flow control no longer than `PEER_WAIT` after its post or transaction began,
            // with every other message of that post or transaction (they do not add up).
            let until = conn.wait_until;
            for (runtime, slot) in direct.iter().zip(&mut slots) {
                let delivered = self.deliver(runtime, &message.text, slot, until).await;
                match delivered {
                    Delivered::Direct => metrics.direct.inc(),
                    Delivered::Queued => metrics.queued.inc(),
                    Delivered::Missed => {
                        // It went away meanwhile and its inbox is full now.
                        metrics.refuse(refused::RUNTIME_INBOX_FULL);
                        missed.get_or_insert(runtime.url.clone());
                        0
                    }
                };
            }
            if let Some((to, history)) = pending {
                journal.record_reserved(message.text.as_str(), to, history);
            }
        }
        drop(slots); // what was reserved for addressees that took it directly
        self.inner.metrics.routed.inc();
        if let Some(room) = peer_room {
            // Queued for the peer in the room reserved above; the socket keeps reading
            // meanwhile.
            let answer = AnswerTo::new(message, Some(conn.tx.clone()));
            self.to_peers(message, &conn.runtime.url, &foreign, &answer, room);
        }
        if let Some(missed) = missed {
            return Err(BusError::Unavailable(format!(
                "'{missed}' went away meanwhile and its inbox is full; retry later"
            )));
        }
        if let Some(first) = unknown.first() {
            return Err(BusError::NotFound(format!(
                "no route to '{first}': nothing holds this address"
            )));
        }
        Ok(None)
    }

    /// The refusal of a message to `runtime`, away, whose inbox budget `full` has no room.
    fn inbox_full(&self, full: NoRoom, runtime: &str) -> BusError {
        match full {
            NoRoom::Inboxes => BusError::Unavailable(
                "the receiver is away and the inboxes are full; retry shortly".into(),
            ),
            NoRoom::Share => {
                self.inner.metrics.refuse(refused::PRINCIPAL_INBOX_FULL);
                BusError::Unavailable(
                    "your messages waiting for away runtimes fill your share of the inboxes ([bus] inbox_max_bytes_per_principal); retry once they are delivered".into(),
                )
            }
            NoRoom::Runtime => {
                self.inner.metrics.refuse(refused::RUNTIME_INBOX_FULL);
                BusError::Unavailable(format!(
                    "the inbox of '{runtime}' is full ([bus] inbox_max_bytes_per_runtime); retry later"
                ))
            }
        }
    }

    /// Hands `text` to each of `runtimes` without waiting for any (a topic's fan-out, a
    /// node-originated notification): into its socket queue, else its inbox (room reserved
    /// then, within its budgets). A runtime whose queue is full is closed (1013: it resumes
    /// from its inbox, where `text` waits); one that can take it neither way (its inbox full
    /// too) misses it, counted (`bus_refused{reason="subscriber_missed"}`) — its own loss,
    /// not anyone else's.
    fn hand_out(&self, runtimes: &[Arc<Runtime>], text: &Utf8Bytes, payer: Payer<'_>) {
        let metrics = &self.inner.metrics;
        for runtime in runtimes {
            let mut slot = match payer {
                Payer::Sender(charge) => Slot::new(charge, None),
                Payer::Subscriber(charge) => match runtime.user() {
                    Some(user) => Slot::new(&Charge::from(user), None),
                    None => Slot::new(charge, None),
                },
            };
            let delivered = self.deliver_now(runtime, text, &mut slot, || {
                metrics.refuse(refused::SLOW_SUBSCRIBER);
            });
            match delivered {
                Delivered::Direct => {
                    metrics.direct.inc();
                }
                Delivered::Queued => {
                    metrics.queued.inc();
                }
                Delivered::Missed => {
                    metrics.refuse(refused::SUBSCRIBER_MISSED);
                    tracing::info!(runtime = %runtime.url, "a subscriber's queue and inbox are full: it misses a publish");
                }
            }
        }
    }

    /// Queues `message`, which `sender` sent, for the peer nodes of `targets` in the `room`
    /// reserved for it; their first answer goes to `answer`.
    pub(super) fn to_peers(
        &self,
        message: &Message,
        sender: &str,
        targets: &[String],
        answer: &Arc<AnswerTo>,
        room: LineRoom,
    ) {
        let foreign = &self.inner.connectors.foreign;
        for line in foreign.enqueue(message, sender, targets, answer, room) {
            let bus = self.clone();
            self.inner.tracker.spawn(async move {
                let metrics = &bus.inner.metrics;
                bus.inner
                    .connectors
                    .foreign
                    .run_line(line, || metrics.refuse(refused::PEER_ANSWER_DROPPED))
                    .await;
            });
        }
    }

    /// Sends a node-originated message (a notification) to whoever `to` reaches, waiting
    /// for nobody ([`Bus::hand_out`]): whoever asked for it is not held up by receivers.
    /// `charge` is the principal whose request caused it (a registry status update), or the
    /// node ([`NODE`]) for what the node itself says (a revocation). A copy that waits for an
    /// away receiver is charged to that receiver's principal, within its shares (the node's
    /// own notices: to the node); the journal's record to `charge`.
    pub(super) async fn publish(&self, mut notification: Value, charge: &Charge) {
        notification["id"] = json!(self.next_message_id());
        let Ok(message) = Message::from_value(notification, None) else {
            return;
        };
        let mut targets = Vec::new();
        for to in &message.to {
            match self.destination(to) {
                Destination::Holder(runtime) => targets.push(runtime),
                Destination::Topic {
                    subscribers,
                    holder,
                    ..
                } => {
                    targets.extend(subscribers);
                    targets.extend(holder);
                }
                Destination::Foreign | Destination::Unknown => {}
            }
        }
        let targets = Table::distinct(targets);
        // A principal's notification reaches whoever subscribed to it, which is not its
        // choice (anyone may follow a hyperty's `…/registration`): what waits of it for an
        // away subscriber is charged to that subscriber's principal, so others' subscriptions
        // cannot fill the updater's share. The node's own notices stay the node's.
        let payer = match &**charge == NODE {
            true => Payer::Sender(charge),
            false => Payer::Subscriber(charge),
        };
        self.hand_out(&targets, &message.text, payer);
        self.inner.persistence.journal.record(
            message.text.as_str(),
            targets.iter().map(|r| r.url.clone()).collect(),
            charge,
        );
    }
}

/// Whose share pays for a fan-out copy that has to wait in an inbox.
#[derive(Clone, Copy)]
enum Payer<'a> {
    /// The sender's: a publish (its subscribers are ones the policy let follow it).
    Sender(&'a Charge),
    /// Each subscriber's own principal's (this charge for a runtime with no owner yet).
    Subscriber(&'a Charge),
}

/// The refusal of a message while the history is behind the homeserver (or holds
/// `max_history_bytes` not stored yet).
fn history_behind() -> BusError {
    BusError::Unavailable("the node's history is behind the homeserver; retry shortly".into())
}

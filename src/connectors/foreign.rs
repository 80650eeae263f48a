//! The foreign-domain connector: messages to addresses of another domain go to that domain's
//! node (`[[bus.peers]]`), by one of two transports chosen per peer:
//! - **HTTP(S)** (`url`, `token`): posted to the peer's `/bus/v1/messages` with the shared
//!   token; the peer routes them and may answer with a response message (e.g. 404), which is
//!   relayed to the sender. Inbound, a peer presenting its token may post messages from
//!   addresses of its own domain (see `bus::listener`).
//! - **Matrix federation** (`matrix_user`): sent as `org.msgnode.rethink.message` events
//!   (`{"message": "<the message's JSON text>"}`) into this node's room for that peer
//!   (`#_msgnode_peer.<hash16 of its domain>:<server>`), which the peer node's appservice
//!   user is invited to and has joined before the first message goes. The peer's homeserver
//!   pushes them to its appservice; answers come back the same way, in the peer's own room
//!   for this node (see `bus::Bus::matrix_peer_event`) — the IRC-bridge pattern.
//!
//! Messages for one peer wait in its line, in routing order, bounded by `[bus] peer_queue`
//! messages and `peer_queue_bytes` bytes (a sender past it gets a 408 and nothing of its
//! message goes anywhere); each waiting message is the shared frame the node received, not
//! a copy. One task per peer sends them, a few at once but one at a time per sender and per
//! target address (so each sender's messages leave in the order it sent them, each
//! addressee gets them in order, and one slow post holds up only what is for its target or
//! sent after it by its sender; 5 s per HTTP attempt); an HTTP peer's answer is read up to
//! `[bus] max_frame_bytes`.

use crate::sync::lock;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde_json::{json, Value};
use tokio::sync::OnceCell;

use crate::bus::outbound::{Outbound, Refused};

use crate::config::Peer;
use crate::matrix::{hash16, Actor};
use crate::rethink::address::domain;
use crate::rethink::message::response;
use crate::rethink::{BusError, Message};
use crate::retry::Backoff;

/// Event type of a reTHINK message carried over Matrix between nodes.
pub const PEER_EVENT_TYPE: &str = "org.msgnode.rethink.message";
/// How many messages one peer's line has in flight at once (one per sender and per target).
const IN_FLIGHT: usize = 4;
/// How long the first message to a Matrix peer waits for it to join this node's room.
const JOIN_WAIT: Duration = Duration::from_secs(30);

/// Route to other domains' nodes.
pub struct Foreign {
    peers: Vec<Peer>,
    http: reqwest::Client,
    /// Acts in Matrix (the Matrix transport); `None` without a homeserver.
    actor: Option<Arc<Actor>>,
    /// Per Matrix peer's domain: this node's room for it, once the peer joined.
    rooms: Mutex<HashMap<String, Arc<OnceCell<String>>>>,
    /// Makes event transaction ids unique per process run.
    run: String,
    next_txn: AtomicU64,
    /// Per peer domain: the line messages to it wait in, to keep their order.
    lines: Mutex<HashMap<String, Arc<Line>>>,
    limits: Limits,
}

/// What may wait for one peer node (`[bus] peer_queue`, `peer_queue_bytes`), and the
/// largest answer read back from one (longer: refused as the peer's failure).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Messages waiting per peer.
    pub messages: usize,
    /// Bytes waiting per peer.
    pub bytes: usize,
    /// Largest answer of an HTTP peer.
    pub answer_bytes: usize,
}

/// Messages waiting for one peer domain, in routing order; one task at a time sends them.
#[derive(Default)]
pub struct Line {
    state: Mutex<LineState>,
    /// Told when a message is queued while the line is being sent.
    queued: tokio::sync::Notify,
}

#[derive(Default)]
struct LineState {
    jobs: VecDeque<Job>,
    /// What `jobs` hold (the shared frames, counted once per job).
    bytes: usize,
    /// Jobs whose room is reserved ([`Foreign::reserve`]) and not queued yet, and their
    /// bytes: counted as if they waited.
    reserved: usize,
    reserved_bytes: usize,
    /// A task is sending this line's jobs.
    running: bool,
}

impl LineState {
    /// Whether one more message of `bytes` fits beside what waits and what is reserved: an
    /// empty line takes any one message.
    fn has_room(&self, limits: &Limits, bytes: usize) -> bool {
        let waiting = self.jobs.len() + self.reserved;
        waiting == 0
            || (waiting < limits.messages
                && self.bytes + self.reserved_bytes + bytes <= limits.bytes)
    }
}

/// Room reserved in the lines of a message's peer targets ([`Foreign::reserve`]), one place
/// per target: [`Foreign::enqueue`] takes it up; dropped, what was not taken up is given
/// back.
#[must_use = "room not queued into is given back when dropped"]
pub struct LineRoom {
    lines: Vec<Arc<Line>>,
    bytes: usize,
}

impl LineRoom {
    /// Takes up one place reserved in `line` (under its lock), if one is.
    fn take(&mut self, line: &Arc<Line>, state: &mut LineState) -> bool {
        let Some(at) = self.lines.iter().position(|l| Arc::ptr_eq(l, line)) else {
            return false;
        };
        self.lines.swap_remove(at);
        state.reserved -= 1;
        state.reserved_bytes -= self.bytes;
        true
    }
}

impl Drop for LineRoom {
    fn drop(&mut self) {
        for line in self.lines.drain(..) {
            let mut state = lock(&line.state);
            state.reserved -= 1;
            state.reserved_bytes -= self.bytes;
        }
    }
}

/// One message for one target of a peer's domain: the frame as received (shared, never
/// copied) and where its answer goes.
struct Job {
    text: Utf8Bytes,
    to: String,
    /// The runtime that sent it (or the node): its messages leave in the order it sent them.
    sender: Arc<str>,
    answer: Arc<AnswerTo>,
}

/// The first of `jobs` that may leave now: no job in flight (`busy`) or before it in the line
/// has its sender or its target.
fn next_free(jobs: &VecDeque<Job>, busy: &[(Arc<str>, String)]) -> Option<usize> {
    let mut senders: HashSet<&str> = busy.iter().map(|(sender, _)| &**sender).collect();
    let mut targets: HashSet<&str> = busy.iter().map(|(_, to)| to.as_str()).collect();
    jobs.iter().position(|job| {
        let free = !senders.contains(&*job.sender) && !targets.contains(job.to.as_str());
        if !free {
            senders.insert(&job.sender);
            targets.insert(&job.to);
        }
        free
    })
}

/// Where the answers to one message go (the sender's socket queue, or nowhere: an answer to
/// a peer's answer), and what its error responses need.
pub struct AnswerTo {
    tx: Option<Outbound>,
    answered: AtomicBool,
    id: Value,
    from: String,
    first_to: String,
}

impl AnswerTo {
    /// Answers of `message` go to `tx` (`None`: only logged).
    pub fn new(message: &Message, tx: Option<Outbound>) -> Arc<AnswerTo> {
        Arc::new(AnswerTo {
            tx,
            answered: AtomicBool::new(false),
            id: message.id.clone(),
            from: message.from.clone(),
            first_to: message.to.first().cloned().unwrap_or_default(),
        })
    }

    /// The first answer of a message's targets goes back (later answers are dropped: the
    /// sender matches answers by id), and so does every failure, each naming its target — a
    /// target that failed after another answered is not hidden from the sender. False when
    /// the sender's queue had no room for it (dropped).
    fn settle(&self, to: &str, sent: Result<Option<String>, BusError>) -> bool {
        let (answer, failed) = match sent {
            Ok(None) => return true,
            Ok(Some(answer)) => (answer, false),
            Err(e) => {
                if self.tx.is_none() {
                    tracing::warn!(%e, to, "foreign delivery failed");
                }
                let description = format!("'{to}': {e}");
                let answer = response(
                    &self.id,
                    &self.first_to,
                    &self.from,
                    e.code(),
                    &description,
                    None,
                );
                (answer, true)
            }
        };
        let Some(tx) = &self.tx else {
            return true;
        };
        if self.answered.swap(true, Ordering::Relaxed) && !failed {
            return true;
        }
        // Never waits: a sender that does not read its answers loses them, not the line.
        !matches!(tx.try_send(Utf8Bytes::from(answer)), Err(Refused::Full(_)))
    }
}

impl Foreign {
    /// The connector for `peers`; `actor` carries the Matrix transport.
    ///
    /// # Errors
    /// A peer has neither `url` and `token` nor `matrix_user`, or wants the Matrix transport
    /// on a node without a homeserver.
    pub fn new(
        peers: Vec<Peer>,
        actor: Option<Arc<Actor>>,
        limits: Limits,
    ) -> Result<Self, String> {
        for peer in &peers {
            match &peer.matrix_user {
                Some(user) if ruma::UserId::parse(user.as_str()).is_err() => {
                    return Err(format!(
                        "[[bus.peers]] {}: matrix_user '{user}' is not a Matrix user id",
                        peer.domain
                    ));
                }
                Some(_) if actor.is_none() => {
                    return Err(format!(
                        "[[bus.peers]] {}: matrix_user needs [pep] registration (a homeserver)",
                        peer.domain
                    ));
                }
                Some(_) => {}
                None if peer.url.is_empty() || peer.token.is_empty() => {
                    return Err(format!(
                        "[[bus.peers]] {}: give url and token (HTTP), or matrix_user (Matrix federation)",
                        peer.domain
                    ));
                }
                None => {}
            }
        }
        Ok(Self {
            peers,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
            actor,
            rooms: Mutex::new(HashMap::new()),
            run: uuid::Uuid::new_v4().simple().to_string(),
            next_txn: AtomicU64::new(1),
            lines: Mutex::new(HashMap::new()),
            limits,
        })
    }

    /// The Matrix peer whose node user is `user_id`.
    pub fn matrix_peer(&self, user_id: &str) -> Option<&Peer> {
        self.peers
            .iter()
            .find(|p| p.matrix_user.as_deref() == Some(user_id))
    }

    /// The peer of `domain`.
    pub fn peer(&self, domain: &str) -> Option<&Peer> {
        self.peers
            .iter()
            .find(|p| p.domain.eq_ignore_ascii_case(domain))
    }

    /// The HTTP peer presenting `token` (compared in constant time).
    pub fn peer_by_token(&self, token: &str) -> Option<&Peer> {
        self.peers
            .iter()
            .filter(|p| !p.token.is_empty())
            .find(|p| crate::http_auth::token_matches(token, &p.token))
    }

    /// The line of `to`'s domain, when it is a peer's.
    fn line(&self, to: &str) -> Option<Arc<Line>> {
        let key = domain(to).unwrap_or_default().to_ascii_lowercase();
        self.peer(&key)?;
        Some(Arc::clone(
            self.lines
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(key)
                .or_default(),
        ))
    }

    /// Reserves room for one message of `bytes` in the line of every target (in order: two
    /// targets of one peer take two places), or none: a 408 to the sender when not — nothing
    /// of the message goes anywhere then. Each line's check and count are one step, so
    /// senders racing for its last room never take it past `peer_queue`/`peer_queue_bytes`.
    /// Targets of no peer's domain need no room.
    pub fn reserve(&self, targets: &[String], bytes: usize) -> Option<LineRoom> {
        let mut room = LineRoom {
            lines: Vec::new(),
            bytes,
        };
        for line in targets.iter().filter_map(|to| self.line(to)) {
            let mut state = lock(&line.state);
            if !state.has_room(&self.limits, bytes) {
                return None; // `room` gives back what it holds
            }
            state.reserved += 1;
            state.reserved_bytes += bytes;
            drop(state);
            room.lines.push(line);
        }
        Some(room)
    }

    /// Queues `message`, which `sender` (a runtime URL, or the node's) sent, for each
    /// target's peer in the `room` reserved for it (call in routing order: each peer gets
    /// each sender's messages in that order); the first answer goes to `answer`. The lines
    /// that need a task to send them now ([`Foreign::run_line`]). A target of no peer's
    /// domain is answered 404 at once.
    pub fn enqueue(
        &self,
        message: &Message,
        sender: &str,
        targets: &[String],
        answer: &Arc<AnswerTo>,
        mut room: LineRoom,
    ) -> Vec<Arc<Line>> {
        let sender: Arc<str> = Arc::from(sender);
        let mut start = Vec::new();
        for to in targets {
            let Some(line) = self.line(to) else {
                let target = domain(to).unwrap_or_default();
                let missing = BusError::NotFound(format!("no route to domain '{target}'"));
                answer.settle(to, Err(missing));
                continue;
            };
            let mut state = lock(&line.state);
            if !room.take(&line, &mut state) {
                // Not reserved (for another size, or beyond the room reserved): queued anyway,
                // as what the caller could not refuse.
                tracing::debug!(%to, "a peer message queued without reserved room");
            }
            state.bytes += message.text.len();
            state.jobs.push_back(Job {
                text: message.text.clone(),
                to: to.clone(),
                sender: Arc::clone(&sender),
                answer: Arc::clone(answer),
            });
            if !std::mem::replace(&mut state.running, true) {
                drop(state);
                start.push(line);
            } else {
                drop(state);
                line.queued.notify_one();
            }
        }
        start
    }

    /// Sends what waits in `line` until it is empty, up to [`IN_FLIGHT`] messages at once but
    /// never one before an earlier one of the same sender or to the same target address: each
    /// sender's messages leave in the order it sent them, whatever their targets (reTHINK
    /// flows follow a `create` with messages to other addresses — review bus-4 M4), and each
    /// addressee gets its messages in routing order, while a slow addressee (or a slow
    /// answer) holds up only what is for it or sent after by the same senders. `dropped` is
    /// told of each answer the sender had no room for.
    pub async fn run_line(&self, line: Arc<Line>, dropped: impl Fn()) {
        let mut sending = FuturesUnordered::new();
        // The senders and targets of what is in flight.
        let mut busy: Vec<(Arc<str>, String)> = Vec::new();
        loop {
            {
                let mut state = lock(&line.state);
                while sending.len() < IN_FLIGHT {
                    let Some(at) = next_free(&state.jobs, &busy) else {
                        break;
                    };
                    let Some(job) = state.jobs.remove(at) else {
                        break;
                    };
                    state.bytes -= job.text.len();
                    busy.push((Arc::clone(&job.sender), job.to.clone()));
                    sending.push(async move {
                        let sent = self.send(job.text.as_str(), &job.to).await;
                        (job, sent)
                    });
                }
                if sending.is_empty() {
                    // Nothing in flight, so nothing is busy: the line is empty.
                    state.running = false;
                    return;
                }
            }
            tokio::select! {
                Some((job, sent)) = sending.next() => {
                    if let Some(at) = busy
                        .iter()
                        .position(|(sender, to)| *sender == job.sender && *to == job.to)
                    {
                        busy.swap_remove(at);
                    }
                    if !job.answer.settle(&job.to, sent) {
                        dropped();
                    }
                }
                () = line.queued.notified() => {}
            }
        }
    }

    async fn send(&self, text: &str, to: &str) -> Result<Option<String>, BusError> {
        let target = domain(to).unwrap_or_default();
        let peer = self
            .peer(&target)
            .ok_or_else(|| BusError::NotFound(format!("no route to domain '{target}'")))?;
        if let Some(user) = &peer.matrix_user {
            self.send_matrix(&peer.domain, user, text).await?;
            return Ok(None);
        }
        let answer = self
            .http
            .post(format!(
                "{}/bus/v1/messages",
                peer.url.trim_end_matches('/')
            ))
            .bearer_auth(&peer.token)
            .header("content-type", "application/json")
            .body(text.to_owned())
            .send()
            .await
            .map_err(|e| BusError::Unavailable(format!("node of '{target}' unavailable: {e}")))?;
        let status = answer.status();
        let text = super::read_capped(answer, self.limits.answer_bytes)
            .await
            .map_err(|e| BusError::Unavailable(format!("node of '{target}': {e}")))?;
        if status.is_success() {
            Ok((!text.trim().is_empty()).then_some(text))
        } else {
            Err(BusError::Unavailable(format!(
                "node of '{target}' refused the message ({status}): {text}"
            )))
        }
    }

    /// Sends `message` as an event into this node's room for the peer of `domain`.
    async fn send_matrix(&self, domain: &str, peer_user: &str, text: &str) -> Result<(), BusError> {
        let actor = self.actor.as_ref().ok_or_else(|| {
            BusError::Unavailable("the Matrix transport needs a homeserver".into())
        })?;
        let room = self.room_for(actor, domain, peer_user).await?;
        // The peer may have left meanwhile (`forget_room`): then the next message asks again.
        let txn = format!(
            "peer.{}.{}",
            self.run,
            self.next_txn.fetch_add(1, Ordering::Relaxed)
        );
        actor
            .send_event(
                actor.sender(),
                &room,
                PEER_EVENT_TYPE,
                &txn,
                &json!({ "message": text }),
            )
            .await
            .map(drop)
            .map_err(|e| {
                BusError::Unavailable(format!(
                    "cannot hand the message for '{domain}' to the homeserver: {e}"
                ))
            })
    }

    /// The peer node of `domain` left (or was removed from) this node's room for it: the next
    /// message invites it again and waits for it to join.
    pub fn forget_room(&self, domain: &str) {
        self.rooms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&domain.to_ascii_lowercase());
    }

    /// This node's room for the peer of `domain`, once its node user joined it (what is sent
    /// before its homeserver joins would not be pushed to it).
    async fn room_for(
        &self,
        actor: &Actor,
        domain: &str,
        peer_user: &str,
    ) -> Result<String, BusError> {
        let cell = self
            .rooms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(domain.to_ascii_lowercase())
            .or_default()
            .clone();
        let unavailable =
            |e| BusError::Unavailable(format!("no room shared with the node of '{domain}': {e}"));
        cell.get_or_try_init(|| async {
            let sender = actor.sender().to_string();
            let alias = format!("_msgnode_peer.{}", hash16(&domain.to_ascii_lowercase()));
            let room = actor
                .ensure_room(&alias, &sender, &format!("msgnode peer {domain}"))
                .await
                .map_err(unavailable)?;
            actor
                .invite(&sender, &room, peer_user)
                .await
                .map_err(unavailable)?;
            let started = tokio::time::Instant::now();
            let (deadline, reinvite_at) = (started + JOIN_WAIT, started + JOIN_WAIT / 2);
            let mut reinvited = false;
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
            loop {
                let member = actor
                    .state_event(&sender, &room, "m.room.member", peer_user)
                    .await
                    .map_err(unavailable)?;
                let membership = member.as_ref().and_then(|m| m["membership"].as_str());
                if membership == Some("join") {
                    tracing::info!(%domain, %room, "peer node joined its room");
                    return Ok(room);
                }
                // An invitation the peer node took but could not accept (its joins gave up)
                // is not pushed again: withdraw it and invite anew.
                if membership == Some("invite")
                    && !reinvited
                    && tokio::time::Instant::now() >= reinvite_at
                {
                    reinvited = true;
                    tracing::info!(%domain, %room, "peer node has not answered its invitation; inviting again");
                    actor
                        .withdraw_invite(&sender, &room, peer_user)
                        .await
                        .map_err(unavailable)?;
                    actor
                        .invite(&sender, &room, peer_user)
                        .await
                        .map_err(unavailable)?;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(BusError::Unavailable(format!(
                        "the node of '{domain}' ({peer_user}) has not joined its room yet; retry"
                    )));
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        })
        .await
        .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        messages: 2,
        bytes: 1000,
        answer_bytes: 1000,
    };

    fn foreign() -> Foreign {
        let peer = Peer {
            domain: "p.example".into(),
            url: "http://127.0.0.1:9".into(),
            token: "t".into(),
            matrix_user: None,
        };
        Foreign::new(vec![peer], None, LIMITS).expect("valid peers")
    }

    #[test]
    fn a_peer_line_is_bounded_in_messages_and_bytes_and_holds_the_shared_frame() {
        let foreign = foreign();
        let to = vec!["hyperty://p.example/x".to_string()];
        let message = Message::parse(
            r#"{"id":1,"type":"create","from":"hyperty://localhost/a","to":"hyperty://p.example/x"}"#,
        )
        .expect("message");
        let (tx, mut rx) = crate::bus::outbound::channel(4, 1 << 20);
        let answer = AnswerTo::new(&message, Some(tx));
        let len = message.text.len();
        let room = foreign.reserve(&to, len).expect("room");
        assert_eq!(
            foreign
                .enqueue(&message, "runtime://msgnode.test/s", &to, &answer, room)
                .len(),
            1,
            "a task to start"
        );
        let reserved = foreign.reserve(&to, len).expect("room for a second");
        assert!(
            foreign.reserve(&to, 1).is_none(),
            "1 waits and 1 is reserved: full before the second is queued"
        );
        assert!(
            foreign
                .enqueue(&message, "runtime://msgnode.test/s", &to, &answer, reserved)
                .is_empty(),
            "already running"
        );
        assert!(foreign.reserve(&to, 1).is_none(), "2 messages wait: full");
        let line = foreign.line(&to[0]).expect("a peer's line");
        let state = lock(&line.state);
        assert!(
            state
                .jobs
                .iter()
                .all(|j| j.text.as_str().as_ptr() == message.text.as_str().as_ptr()),
            "shared, not copied"
        );
        assert_eq!((state.reserved, state.reserved_bytes), (0, 0));
        drop(state);
        assert!(
            foreign
                .reserve(&["hyperty://p.example/y".into()], 10)
                .is_none(),
            "per domain"
        );
        assert!(
            foreign
                .reserve(&["hyperty://q.example/y".into()], 10)
                .is_some(),
            "no peer: no line"
        );
        // A target of no peer's domain is answered at once.
        let other = vec!["hyperty://q.example/y".to_string()];
        let room = foreign.reserve(&other, len).expect("no line");
        assert!(foreign
            .enqueue(&message, "runtime://msgnode.test/s", &other, &answer, room)
            .is_empty());
        let missing: Value =
            serde_json::from_str(rx.try_recv().expect("404").as_str()).expect("json");
        assert_eq!(missing["body"]["code"], 404);
        let big = Foreign::new(
            foreign.peers.clone(),
            None,
            Limits {
                messages: 10,
                ..LIMITS
            },
        )
        .expect("valid");
        let message_big = Message::parse(format!(
            r#"{{"id":1,"type":"create","from":"hyperty://localhost/a","to":"hyperty://p.example/x","body":{{"pad":"{}"}}}}"#,
            "x".repeat(600)
        ))
        .expect("message");
        let room = big.reserve(&to, message_big.text.len()).expect("empty");
        assert!(
            big.reserve(&to, message_big.text.len()).is_none(),
            "reserved over 1000 bytes: full"
        );
        drop(room);
        let room = big
            .reserve(&to, message_big.text.len())
            .expect("given back");
        big.enqueue(&message_big, "runtime://msgnode.test/s", &to, &answer, room);
        assert!(
            big.reserve(&to, message_big.text.len()).is_none(),
            "over 1000 bytes: full"
        );
    }

    #[test]
    fn peers_need_a_transport() {
        let peer = |url: &str, token: &str, matrix_user: Option<&str>| Peer {
            domain: "p.example".into(),
            url: url.into(),
            token: token.into(),
            matrix_user: matrix_user.map(str::to_string),
        };
        assert!(Foreign::new(vec![peer("", "", None)], None, LIMITS).is_err());
        assert!(Foreign::new(vec![peer("http://x", "", None)], None, LIMITS).is_err());
        assert!(Foreign::new(vec![peer("", "", Some("not a user"))], None, LIMITS).is_err());
        let err = Foreign::new(
            vec![peer("", "", Some("@_msgnode:b.example"))],
            None,
            LIMITS,
        )
        .err()
        .expect("no homeserver");
        assert!(err.contains("[pep] registration"), "{err}");
        let foreign = Foreign::new(vec![peer("http://x", "t", None)], None, LIMITS).expect("valid");
        assert!(foreign.peer_by_token("t").is_some());
        assert!(foreign.peer_by_token("").is_none());
    }
}

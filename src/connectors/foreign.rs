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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::OnceCell;

use crate::config::Peer;
use crate::matrix::{hash16, Actor};
use crate::rethink::address::domain;
use crate::rethink::{BusError, Message};
use crate::retry::Backoff;

/// Event type of a reTHINK message carried over Matrix between nodes.
pub const PEER_EVENT_TYPE: &str = "org.msgnode.rethink.message";
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
}

/// Messages to one peer domain, in routing order.
struct Line {
    next: AtomicU64,
    serving: tokio::sync::watch::Sender<u64>,
    /// Tickets given up before their turn (their task ended early): skipped when reached.
    abandoned: Mutex<std::collections::BTreeSet<u64>>,
}

impl Default for Line {
    fn default() -> Self {
        Self {
            next: AtomicU64::new(0),
            serving: tokio::sync::watch::Sender::new(0),
            abandoned: Mutex::new(std::collections::BTreeSet::new()),
        }
    }
}

/// A place in a peer's line (see [`Foreign::tickets`]); leaving it (drop) — served or not —
/// lets the next go. A target that is no peer's stands in no line.
pub struct Ticket {
    line: Option<Arc<Line>>,
    number: u64,
    to: String,
}

impl Ticket {
    async fn turn(&self) {
        if let Some(line) = &self.line {
            let mut serving = line.serving.subscribe();
            // The sender lives in `line`, which this ticket holds: the wait cannot fail.
            let _ = serving.wait_for(|s| *s >= self.number).await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let Some(line) = &self.line else {
            return;
        };
        let number = self.number;
        let mut abandoned = line
            .abandoned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        line.serving.send_modify(|s| {
            if *s == number {
                *s += 1;
                while abandoned.remove(s) {
                    *s += 1;
                }
            } else if *s < number {
                abandoned.insert(number);
            }
        });
    }
}

impl Foreign {
    /// The connector for `peers`; `actor` carries the Matrix transport.
    ///
    /// # Errors
    /// A peer has neither `url` and `token` nor `matrix_user`, or wants the Matrix transport
    /// on a node without a homeserver.
    pub fn new(peers: Vec<Peer>, actor: Option<Arc<Actor>>) -> Result<Self, String> {
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

    /// Places in line for `targets` (call in routing order): messages to one peer domain go
    /// out in the order their tickets were taken, whatever order their tasks run in.
    pub fn tickets(&self, targets: &[String]) -> Vec<Ticket> {
        targets
            .iter()
            .map(|to| {
                let key = domain(to).unwrap_or_default().to_ascii_lowercase();
                let line = self.peer(&key).map(|_| {
                    Arc::clone(
                        self.lines
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .entry(key)
                            .or_default(),
                    )
                });
                let number = line
                    .as_ref()
                    .map_or(0, |line| line.next.fetch_add(1, Ordering::Relaxed));
                Ticket {
                    line,
                    number,
                    to: to.clone(),
                }
            })
            .collect()
    }

    /// Sends `message` to the peer of each ticket's target, in its turn; the first response
    /// (or error response) for the sender.
    pub async fn deliver(&self, message: &Message, tickets: Vec<Ticket>) -> Option<String> {
        let mut response = None;
        for ticket in tickets {
            ticket.turn().await;
            let to = ticket.to.clone();
            let sent = self.send(message, &to).await;
            drop(ticket); // the next in line may go
            match sent {
                Ok(Some(answer)) if response.is_none() => response = Some(answer),
                Ok(_) => {}
                Err(e) if response.is_none() => response = Some(message.error_response(&e)),
                Err(e) => tracing::warn!(%e, to, "foreign delivery failed"),
            }
        }
        response
    }

    async fn send(&self, message: &Message, to: &str) -> Result<Option<String>, BusError> {
        let target = domain(to).unwrap_or_default();
        let peer = self
            .peer(&target)
            .ok_or_else(|| BusError::NotFound(format!("no route to domain '{target}'")))?;
        if let Some(user) = &peer.matrix_user {
            self.send_matrix(&peer.domain, user, message).await?;
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
            .body(message.text.as_str().to_owned())
            .send()
            .await
            .map_err(|e| BusError::Unavailable(format!("node of '{target}' unavailable: {e}")))?;
        let status = answer.status();
        let text = answer.text().await.unwrap_or_default();
        if status.is_success() {
            Ok((!text.trim().is_empty()).then_some(text))
        } else {
            Err(BusError::Unavailable(format!(
                "node of '{target}' refused the message ({status}): {text}"
            )))
        }
    }

    /// Sends `message` as an event into this node's room for the peer of `domain`.
    async fn send_matrix(
        &self,
        domain: &str,
        peer_user: &str,
        message: &Message,
    ) -> Result<(), BusError> {
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
                &json!({ "message": message.text.as_str() }),
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

    fn foreign() -> Foreign {
        let peer = Peer {
            domain: "p.example".into(),
            url: "http://127.0.0.1:9".into(),
            token: "t".into(),
            matrix_user: None,
        };
        Foreign::new(vec![peer], None).expect("valid peers")
    }

    #[tokio::test]
    async fn a_peer_line_keeps_routing_order_and_skips_abandoned_tickets() {
        let foreign = foreign();
        let to = vec!["hyperty://p.example/x".to_string()];
        let first = foreign.tickets(&to).remove(0);
        let abandoned = foreign.tickets(&to).remove(0);
        let third = foreign.tickets(&to).remove(0);
        drop(abandoned); // its task ended before its turn
        let waiting = tokio::spawn(async move { third.turn().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "waits for the first");
        first.turn().await;
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("served after the first, past the abandoned one")
            .expect("task");
        // A domain that is no peer's stands in no line.
        let stranger = foreign.tickets(&["hyperty://q.example/y".to_string()]);
        assert!(stranger[0].line.is_none());
    }

    #[test]
    fn peers_need_a_transport() {
        let peer = |url: &str, token: &str, matrix_user: Option<&str>| Peer {
            domain: "p.example".into(),
            url: url.into(),
            token: token.into(),
            matrix_user: matrix_user.map(str::to_string),
        };
        assert!(Foreign::new(vec![peer("", "", None)], None).is_err());
        assert!(Foreign::new(vec![peer("http://x", "", None)], None).is_err());
        assert!(Foreign::new(vec![peer("", "", Some("not a user"))], None).is_err());
        let err = Foreign::new(vec![peer("", "", Some("@_msgnode:b.example"))], None)
            .err()
            .expect("no homeserver");
        assert!(err.contains("[pep] registration"), "{err}");
        let foreign = Foreign::new(vec![peer("http://x", "t", None)], None).expect("valid");
        assert!(foreign.peer_by_token("t").is_some());
        assert!(foreign.peer_by_token("").is_none());
    }
}

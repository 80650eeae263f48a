//! Several replicas of the node in front of one homeserver: each follows the others through
//! Matrix, so a runtime connected to any replica is reachable from all of them.
//!
//! Owns the follower task — one `/sync` long-poll as the follower, a virtual user that is a
//! member of the state room and of every inbox room (Synapse does not let the appservice's
//! own user sync), filtered to the store's state events and to inbox batches — and what a
//! replica does with what it sees:
//! - a runtime record another replica wrote replaces this replica's view of that runtime
//!   (its addresses and subscriptions); when that replica's socket attached later than the
//!   one here, the one here is closed: the runtime moved;
//! - a registry entry another replica wrote updates the built-in registry;
//! - an inbox batch another replica wrote for a runtime connected here is handed to its
//!   socket — take, send, ack: the same hand-over as a reconnect, so nothing is handed over
//!   twice.
//!
//! Every event names the replica that wrote it; a replica skips its own.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::inbox::INBOX_EVENT_TYPE;
use super::store::{RuntimeRecord, Stored, REGISTRY_EVENT_TYPE, RUNTIME_EVENT_TYPE};
use super::Bus;
use crate::pep::actor::{Actor, ActorError};

/// How long one `/sync` waits for something new.
const POLL: Duration = Duration::from_secs(20);
/// Longest pause between `/sync` attempts while the homeserver is unavailable.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Follows what the other replicas write.
pub struct Follower {
    actor: Arc<Actor>,
    user: String,
    node: String,
    since: String,
}

/// The virtual user all replicas sync as (each with its own position).
pub fn follower_user(actor: &Actor) -> String {
    actor.virtual_user("replicas", "follower")
}

impl Follower {
    /// Joins the follower to `state_room` and takes the position to follow from: call it
    /// before loading the state, so that nothing written after the load is missed.
    ///
    /// # Errors
    /// The homeserver is unavailable or refused.
    pub async fn begin(
        actor: Arc<Actor>,
        node: &str,
        state_room: &str,
    ) -> Result<Follower, ActorError> {
        let user = follower_user(&actor);
        actor.join(&user, state_room).await?;
        // A sync that returns no rooms: only the position.
        let nothing = json!({
            "room": {"rooms": []},
            "presence": {"types": []},
            "account_data": {"types": []},
        });
        let answer = actor.sync(&user, None, &nothing, Duration::ZERO).await?;
        let since = next_batch(&answer)?;
        Ok(Follower {
            actor,
            user,
            node: node.to_string(),
            since,
        })
    }

    /// Follows until `shutdown`, retrying while the homeserver is unavailable.
    pub async fn run(mut self, bus: Bus, shutdown: CancellationToken) {
        let filter = json!({
            "room": {
                "timeline": {
                    "types": [INBOX_EVENT_TYPE, RUNTIME_EVENT_TYPE, REGISTRY_EVENT_TYPE],
                    "limit": 100,
                },
                "state": {"types": [RUNTIME_EVENT_TYPE, REGISTRY_EVENT_TYPE]},
                "ephemeral": {"types": []},
                "account_data": {"types": []},
            },
            "presence": {"types": []},
            "account_data": {"types": []},
        });
        let mut backoff = Duration::from_millis(100);
        loop {
            let answer = tokio::select! {
                () = shutdown.cancelled() => return,
                answer = self.actor.sync(&self.user, Some(&self.since), &filter, POLL) => answer,
            };
            match answer.and_then(|answer| next_batch(&answer).map(|next| (answer, next))) {
                Ok((answer, next)) => {
                    backoff = Duration::from_millis(100);
                    self.apply(&bus, &answer);
                    self.since = next;
                }
                Err(error) => {
                    tracing::warn!(%error, "replicas: cannot follow the homeserver; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Applies one sync answer: state first, then the timeline, room by room.
    fn apply(&self, bus: &Bus, answer: &Value) {
        let Some(rooms) = answer["rooms"]["join"].as_object() else {
            return;
        };
        let mut woken = BTreeSet::new();
        for room in rooms.values() {
            let state = room["state"]["events"].as_array().into_iter().flatten();
            let timeline = room["timeline"]["events"].as_array().into_iter().flatten();
            for event in state.chain(timeline) {
                if event["type"] == INBOX_EVENT_TYPE {
                    let content = &event["content"];
                    if content["writer"].as_str() == Some(self.node.as_str()) {
                        continue;
                    }
                    if let Some(runtime) = content["runtime"].as_str() {
                        woken.insert(runtime.to_string());
                    }
                    continue;
                }
                if event.get("state_key").is_none() {
                    continue;
                }
                match Stored::read(event) {
                    Some((_, Some(writer))) if writer == self.node => {}
                    Some((Stored::Runtime { url, record }, _)) => bus.adopt(&url, record),
                    Some((Stored::Registry { url, entry }, _)) => {
                        if let Some(registry) = &bus.inner.builtin_registry {
                            registry.apply(&url, entry);
                        }
                    }
                    None => {}
                }
            }
        }
        for runtime in woken {
            let bus_for_task = bus.clone();
            bus.inner
                .tracker
                .spawn(async move { bus_for_task.hand_over(&runtime).await });
        }
    }
}

fn next_batch(answer: &Value) -> Result<String, ActorError> {
    answer["next_batch"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| ActorError::Malformed("/sync gave no next_batch".to_string()))
}

impl Bus {
    /// Takes another replica's record of runtime `url` as the truth about it.
    pub(crate) fn adopt(&self, url: &str, record: RuntimeRecord) {
        let Some(runtime) = self.inner.table.get_runtime(url) else {
            if !record.is_empty() {
                self.restore(url, record);
            }
            return;
        };
        if runtime.is_attached() {
            let here = runtime.with_record(|r| (r.attached_ms, r.node.clone()));
            if (record.attached_ms, record.node.clone()) <= here {
                // Written by a socket that has left (or a stale writer): the store must
                // say where the runtime is now.
                let bus = self.clone();
                self.inner.tracker.spawn(async move {
                    let record = runtime.record();
                    if let Err(error) = bus.persist(&runtime.url, &record).await {
                        tracing::warn!(%error, runtime = %runtime.url, "cannot restate where the runtime is");
                    }
                });
                return;
            }
            tracing::info!(runtime = %url, node = ?record.node, "runtime connected to another replica: closing its socket here");
            runtime.close_socket();
        }
        if record.is_empty() {
            self.inner.subscriptions.remove_runtime(url);
            self.inner.table.remove_runtime(url);
        } else {
            self.rebind(&runtime, record);
        }
    }

    /// Whether another replica holds (or last held) the runtime's socket: that replica
    /// releases it when away too long and re-decides its subscriptions.
    pub(crate) fn held_elsewhere(&self, runtime: &super::router::Runtime) -> bool {
        let Some(me) = &self.inner.config.replica else {
            return false;
        };
        runtime.with_record(|r| r.node.as_ref().is_some_and(|node| node != me))
    }

    /// Hands what the inbox of `url` holds to its socket, when the runtime is online here.
    /// Retried for about a minute while the homeserver cannot be read; after that the
    /// runtime's next reconnect (or the next batch) hands it over.
    pub(crate) async fn hand_over(&self, url: &str) {
        let mut backoff = Duration::from_millis(500);
        for attempt in 1..=7 {
            match self.try_hand_over(url).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, runtime = %url, attempt, "cannot read the inbox of a connected runtime; retrying");
                    tokio::select! {
                        () = self.inner.shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(16));
                }
            }
        }
        tracing::warn!(runtime = %url, "gave up handing over the inbox of a connected runtime; its next reconnect does");
    }

    async fn try_hand_over(&self, url: &str) -> Result<(), ActorError> {
        let Some(runtime) = self.inner.table.get_runtime(url) else {
            return Ok(());
        };
        let _turn = runtime.handover().await;
        if !runtime.is_online() {
            return Ok(()); // away: its reconnect takes the inbox
        }
        let inbox = &self.inner.persistence.inbox;
        let taken = inbox.take(url).await?;
        if taken.messages.is_empty() {
            return Ok(());
        }
        for text in &taken.messages {
            // A socket too slow for it sends the rest back to the inbox, under a new number.
            runtime.deliver(&Utf8Bytes::from(text.clone()), inbox);
        }
        self.inner
            .metrics
            .deliveries
            .get_or_create(&super::OutcomeLabel { outcome: "relayed" })
            .inc_by(taken.messages.len() as u64);
        if let Err(error) = inbox.ack(url, &taken).await {
            tracing::warn!(%error, runtime = %url, "cannot record the inbox cursor; a reconnect may repeat messages");
        }
        Ok(())
    }
}

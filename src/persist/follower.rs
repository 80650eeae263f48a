//! Following what the other replicas write to the shared homeserver.
//!
//! Owns the follower task: one `/sync` long-poll as the follower, a virtual user that is a
//! member of the state room and of every inbox room (Synapse does not let the appservice's
//! own user sync), filtered to the store's state events and to inbox batches. Every event
//! names the replica that wrote it; this replica's own are skipped. What is seen is handed,
//! typed ([`Followed`]), to the caller (the bus, in `bus::replicas`): runtime records and
//! registry entries in the order they were written, then the runtimes whose inboxes got a
//! batch from another replica.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::inbox::INBOX_EVENT_TYPE;
use super::store::{Stored, REGISTRY_EVENT_TYPE, RUNTIME_EVENT_TYPE};
use crate::matrix::{Actor, ActorError};
use crate::retry::Backoff;

/// How long one `/sync` waits for something new.
const POLL: Duration = Duration::from_secs(20);
/// Longest pause between `/sync` attempts while the homeserver is unavailable.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One thing another replica wrote.
#[derive(Debug, Clone, PartialEq)]
pub enum Followed {
    /// A state event of the store (a runtime record or a registry entry).
    Stored(Stored),
    /// A batch in the inbox of this runtime.
    Inbox {
        /// The runtime URL.
        runtime: String,
    },
}

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

    /// Follows until `shutdown`, retrying while the homeserver is unavailable; hands what
    /// each `/sync` answer holds to `seen`.
    pub async fn run(
        mut self,
        seen: impl Fn(Vec<Followed>) + Send + 'static,
        shutdown: CancellationToken,
    ) {
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
        let mut backoff = Backoff::new(Duration::from_millis(100), MAX_BACKOFF);
        loop {
            let answer = tokio::select! {
                () = shutdown.cancelled() => return,
                answer = self.actor.sync(&self.user, Some(&self.since), &filter, POLL) => answer,
            };
            match answer.and_then(|answer| next_batch(&answer).map(|next| (answer, next))) {
                Ok((answer, next)) => {
                    backoff.reset();
                    seen(self.read(&answer));
                    self.since = next;
                }
                Err(error) => {
                    tracing::warn!(%error, "replicas: cannot follow the homeserver; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }

    /// What one sync answer holds from other replicas: state first, then the timeline, room
    /// by room; the runtimes whose inboxes got batches last, each once.
    fn read(&self, answer: &Value) -> Vec<Followed> {
        let mut followed = Vec::new();
        let Some(rooms) = answer["rooms"]["join"].as_object() else {
            return followed;
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
                    Some((stored, _)) => followed.push(Followed::Stored(stored)),
                    None => {}
                }
            }
        }
        followed.extend(woken.into_iter().map(|runtime| Followed::Inbox { runtime }));
        followed
    }
}

fn next_batch(answer: &Value) -> Result<String, ActorError> {
    answer["next_batch"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| ActorError::Malformed("/sync gave no next_batch".to_string()))
}

//! Putting the policy server into rooms: the node's appservice user joins the room, invites
//! the policy server's user, which joins over federation through the homeserver
//! (`make_join`, then `send_join` with the event hashed and signed by the federation key),
//! and the node's user writes `m.room.policy` (`via` = the policy server's name, its policy
//! key). From then on the homeserver asks the policy server about every event of the room.
//! Each step is idempotent; the sweep repeats it for `[policy_server] rooms` every
//! `sweep_interval` (a new joined room, a removed `m.room.policy`, a kicked policy user).
//!
//! An invitation of the policy server's user by a user of the homeserver is accepted and
//! followed by a join; the node's user then writes `m.room.policy` if it can join the room,
//! else the room's admins write it themselves (the key is on
//! `/.well-known/matrix/policy_server`).

use std::collections::HashSet;

use ruma::api::federation::membership::{create_join_event, prepare_join_event};
use ruma::canonical_json::CanonicalJsonObject;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomVersionId};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::client::ClientError;
use super::PolicyServer;
use crate::matrix::ActorError;

/// The room versions the policy server joins (canonical JSON as ruma has it: 6 and later).
const ROOM_VERSIONS: [RoomVersionId; 7] = [
    RoomVersionId::V12,
    RoomVersionId::V11,
    RoomVersionId::V10,
    RoomVersionId::V9,
    RoomVersionId::V8,
    RoomVersionId::V7,
    RoomVersionId::V6,
];

/// Why a room could not be protected.
#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    /// Protecting rooms needs the node's appservice user (`[pep] registration`).
    #[error("protecting rooms needs [pep] registration (the node's appservice user writes m.room.policy)")]
    NoAppservice,
    /// The alias names no room.
    #[error("no room has the alias {0}")]
    UnknownAlias(String),
    /// The homeserver refused a client-server call (join, invite, state).
    #[error("homeserver: {0}")]
    Homeserver(#[from] ActorError),
    /// A federation call failed (make_join, send_join).
    #[error("federation: {0}")]
    Federation(#[from] ClientError),
    /// The join could not be made.
    #[error("join: {0}")]
    Join(String),
}

impl PolicyServer {
    /// Protects `room` (an id or an alias): see the module doc. Its room id.
    ///
    /// # Errors
    /// No appservice, an unknown alias, or a step the homeserver refused.
    pub async fn protect(&self, room: &str) -> Result<String, ProtectError> {
        let actor = self
            .inner
            .actor
            .as_ref()
            .ok_or(ProtectError::NoAppservice)?;
        let room_id = match room.starts_with('#') {
            true => actor
                .resolve_alias(room)
                .await?
                .ok_or_else(|| ProtectError::UnknownAlias(room.to_string()))?,
            false => room.to_string(),
        };
        let me = actor.sender();
        actor.join(me, &room_id).await?;
        let user = self.inner.user_id.as_str();
        let joined = actor
            .state_event(me, &room_id, "m.room.member", user)
            .await?
            .is_some_and(|member| member["membership"] == "join");
        if !joined {
            actor.invite(me, &room_id, user).await?;
            self.join_over_federation(&room_id).await?;
        }
        let content = self.policy_content();
        let current = actor.state_event(me, &room_id, "m.room.policy", "").await?;
        if current.as_ref() != Some(&content) {
            actor
                .put_state(me, &room_id, "m.room.policy", "", &content)
                .await?;
            tracing::info!(room = %room_id, via = %self.inner.name, "room protected by the policy server");
        }
        self.inner.metrics.protected("ok");
        Ok(room_id)
    }

    /// The `m.room.policy` content naming this policy server.
    pub fn policy_content(&self) -> Value {
        json!({"via": self.inner.name.as_str(), "public_keys": {"ed25519": self.inner.keys.policy_public_key()}})
    }

    /// Joins the policy server's user to `room_id` through the homeserver.
    ///
    /// # Errors
    /// The homeserver refused the join or gave an unusable template.
    pub async fn join_over_federation(&self, room_id: &str) -> Result<(), ProtectError> {
        let join = |e: String| ProtectError::Join(e);
        let room = OwnedRoomId::try_from(room_id).map_err(|e| join(e.to_string()))?;
        let user =
            OwnedUserId::try_from(self.inner.user_id.as_str()).map_err(|e| join(e.to_string()))?;
        let mut request = prepare_join_event::v1::Request::new(room.clone(), user);
        request.ver = ROOM_VERSIONS.to_vec();
        let homeserver = &self.inner.homeserver;
        let template = self.inner.client.send(homeserver, request).await?;
        let version = template.room_version.unwrap_or(RoomVersionId::V1);
        let rules = version
            .rules()
            .filter(|_| ROOM_VERSIONS.contains(&version))
            .ok_or_else(|| join(format!("room version {version} is not supported")))?;
        let mut event: CanonicalJsonObject = serde_json::from_str(template.event.get())
            .map_err(|e| join(format!("template: {e}")))?;
        ruma::signatures::hash_and_sign_event(
            self.inner.name.as_str(),
            &self.inner.keys.federation,
            &mut event,
            &rules.redaction,
        )
        .map_err(|e| join(e.to_string()))?;
        let event_id = ruma::signatures::reference_hash(&event, &rules)
            .map_err(|e| join(e.to_string()))
            .and_then(|hash| {
                OwnedEventId::try_from(format!("${hash}")).map_err(|e| join(e.to_string()))
            })?;
        let pdu = serde_json::value::to_raw_value(&event).map_err(|e| join(e.to_string()))?;
        let mut request = create_join_event::v2::Request::new(room, event_id.clone(), pdu);
        request.omit_members = true;
        self.inner.client.send(homeserver, request).await?;
        self.inner.rooms.note(room_id, version);
        tracing::info!(room = %room_id, %event_id, "policy server joined the room");
        Ok(())
    }

    /// One pass over `[policy_server] rooms` and the rooms the policy server was invited to.
    pub async fn sweep(&self) {
        let mut rooms: Vec<String> = Vec::new();
        for entry in &self.inner.config.rooms {
            match entry.as_str() {
                "*" => rooms.extend(self.watched_rooms().await),
                room => rooms.push(room.to_string()),
            }
        }
        let invited: Vec<String> = self
            .inner
            .invited
            .iter()
            .map(|(room, _)| (*room).clone())
            .collect();
        let mut seen = HashSet::new();
        for room in rooms {
            if seen.insert(room.clone()) {
                if let Err(error) = self.protect(&room).await {
                    self.inner.metrics.protected("failed");
                    tracing::warn!(%room, %error, "policy server: room not protected (retried next sweep)");
                }
            }
        }
        for room in invited {
            self.inner.invited.invalidate(&room);
            if seen.contains(&room) {
                continue;
            }
            if let Err(error) = self.join_over_federation(&room).await {
                tracing::warn!(%room, %error, "policy server: invited, but the join failed");
                continue;
            }
            if let Err(error) = self.protect(&room).await {
                tracing::info!(%room, %error, "policy server joined; m.room.policy is for the room's admins to write");
            }
        }
    }

    /// The rooms the node's appservice user is joined to, but for those the node's own users
    /// created (the bus's storage) or that another homeserver's user created.
    async fn watched_rooms(&self) -> Vec<String> {
        let Some(actor) = &self.inner.actor else {
            return Vec::new();
        };
        let joined = match actor.joined_rooms().await {
            Ok(rooms) => rooms,
            Err(error) => {
                tracing::warn!(%error, "policy server: cannot list the node's rooms");
                return Vec::new();
            }
        };
        let mut watched = Vec::new();
        for room in joined {
            if self.inner.not_watched.contains_key(&room) {
                continue;
            }
            let creator = match actor.room_state(actor.sender(), &room).await {
                Ok(state) => state
                    .iter()
                    .find(|e| e["type"] == "m.room.create")
                    .and_then(|e| e["sender"].as_str().map(str::to_string)),
                Err(error) => {
                    tracing::debug!(%room, %error, "policy server: room state not read");
                    continue;
                }
            };
            let ours = creator.as_deref().is_none_or(|creator| {
                creator == actor.sender()
                    || actor.owns_user(creator)
                    || !creator.ends_with(&format!(":{}", self.inner.homeserver))
            });
            match ours {
                true => self.inner.not_watched.insert(room, ()),
                false => watched.push(room),
            }
        }
        watched
    }
}

/// Sweeps every `sweep_interval` (the first right away) until `stop`.
pub async fn sweep_loop(server: PolicyServer, stop: CancellationToken) {
    let mut tick = tokio::time::interval(
        server
            .inner
            .config
            .sweep_interval
            .max(std::time::Duration::from_millis(100)),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = server.sweep() => {}
        }
    }
}

//! Room versions: the PDU does not say its room's version, and its event id, redaction and
//! signature rules depend on it. Learnt when the policy server is invited or joins, else
//! from the room's create event, fetched over federation from the homeserver the policy
//! server protects rooms of (for room version 12 the create event's id is the room id; for
//! older rooms it is among the PDU's `auth_events`). Bounded; a room that is not found is
//! not looked up again for a few seconds.

use std::sync::Arc;
use std::time::Duration;

use ruma::api::federation::event::get_event;
use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::{OwnedEventId, OwnedServerName, RoomVersionId};

use super::client::{ClientError, FederationClient};

/// Most `auth_events` looked at for an old room's create event.
const MAX_AUTH_EVENTS: usize = 10;

/// Rooms and their versions.
pub struct Rooms {
    client: Arc<FederationClient>,
    /// The homeserver asked for create events.
    homeserver: OwnedServerName,
    versions: moka::sync::Cache<String, RoomVersionId>,
    unknown: moka::sync::Cache<String, ()>,
}

impl Rooms {
    /// Rooms looked up at `homeserver` through `client`.
    pub fn new(client: Arc<FederationClient>, homeserver: OwnedServerName) -> Self {
        Self {
            client,
            homeserver,
            versions: moka::sync::Cache::builder().max_capacity(100_000).build(),
            unknown: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(5))
                .build(),
        }
    }

    /// Remembers that `room_id` has `version`.
    pub fn note(&self, room_id: &str, version: RoomVersionId) {
        self.versions.insert(room_id.to_string(), version);
    }

    /// The version of `room_id`, whose event `pdu` is; `None` when the homeserver does not
    /// know the room (or will not tell the policy server).
    pub async fn version(&self, room_id: &str, pdu: &CanonicalJsonObject) -> Option<RoomVersionId> {
        if let Some(version) = self.versions.get(room_id) {
            return Some(version);
        }
        if self.unknown.contains_key(room_id) {
            return None;
        }
        let version = self.look_up(room_id, pdu).await;
        match &version {
            Some(version) => self.note(room_id, version.clone()),
            None => self.unknown.insert(room_id.to_string(), ()),
        }
        version
    }

    /// The event `event_id` as the homeserver has it (signatures included).
    ///
    /// # Errors
    /// The homeserver does not answer, or does not give the event.
    pub async fn fetch(&self, event_id: OwnedEventId) -> Result<CanonicalJsonObject, ClientError> {
        let answer = self
            .client
            .send(&self.homeserver, get_event::v1::Request::new(event_id))
            .await?;
        serde_json::from_str(answer.pdu.get()).map_err(|e| ClientError::Answer {
            server: self.homeserver.to_string(),
            why: format!("not an event: {e}"),
        })
    }

    async fn look_up(&self, room_id: &str, pdu: &CanonicalJsonObject) -> Option<RoomVersionId> {
        let candidates: Vec<String> = match room_id.split_once(':') {
            // Room version 12+: the room id is the create event's reference hash.
            None => vec![format!("${}", room_id.strip_prefix('!')?)],
            Some(_) => match pdu.get("auth_events") {
                Some(CanonicalJsonValue::Array(ids)) => ids
                    .iter()
                    .take(MAX_AUTH_EVENTS)
                    .filter_map(|id| id.as_str().map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            },
        };
        for candidate in candidates {
            let Ok(event_id) = OwnedEventId::try_from(candidate) else {
                continue;
            };
            let event = match self.fetch(event_id).await {
                Ok(event) => event,
                Err(error) => {
                    tracing::debug!(%room_id, %error, "policy server: create event not fetched");
                    continue;
                }
            };
            let is_create =
                event.get("type").and_then(CanonicalJsonValue::as_str) == Some("m.room.create");
            let in_room = room_id.split_once(':').is_none()
                || event.get("room_id").and_then(CanonicalJsonValue::as_str) == Some(room_id);
            if !(is_create && in_room) {
                continue;
            }
            let version = event
                .get("content")
                .and_then(CanonicalJsonValue::as_object)
                .and_then(|c| c.get("room_version"))
                .and_then(CanonicalJsonValue::as_str)
                .unwrap_or("1");
            return RoomVersionId::try_from(version).ok();
        }
        None
    }
}

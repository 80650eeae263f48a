//! What a `createRoom` request puts into its new room, event by event, as the room's state
//! will show it — so that every one of them is decided, not only the fields a client spelled
//! out. Derived as Synapse 1.163.2 derives them (`handlers/room.py`: `create_room`,
//! `_send_events_for_new_room`): the create event (`creation_content`, the room version,
//! `additional_creators` for a trusted private chat), the creator's join, the power levels
//! (defaults for the room version, the preset's override, then `power_level_content_override`;
//! or the `initial_state` power levels), `m.room.canonical_alias` for `room_alias_name`, the
//! preset's join rules, history visibility and guest access, every `initial_state` event,
//! name, topic, and one invite per invitee (`is_direct` marks them).
//!
//! What is forwarded is [`canonical`]: the request rebuilt from the fields derived here, with
//! the preset, visibility and room version spelled out — so Synapse creates exactly the room
//! that was decided (a field it reads and msgnode does not is never sent; a visibility other
//! than `public`/`private`, which Synapse would read as public, is refused).
//!
//! Not derived, because they depend on the homeserver's configuration rather than the
//! request: `default_power_level_content_override` and the encryption some deployments force
//! per preset. `invite_3pid` is refused: its `m.room.third_party_invite` event carries what the
//! identity server answers, which cannot be decided before it is asked.

use serde_json::{json, Map, Value};

/// One state event of the new room.
#[derive(Debug, Clone, PartialEq)]
pub struct StateEvent {
    /// Its type.
    pub event_type: String,
    /// Its state key.
    pub state_key: String,
    /// Its content.
    pub content: Value,
}

/// Everything a `createRoom` request creates.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRoom {
    /// The state events other than memberships, in the order Synapse sends them (the create
    /// event first; the creator's join comes right after it).
    pub events: Vec<StateEvent>,
    /// The users invited.
    pub invites: Vec<String>,
}

/// Why a `createRoom` request cannot be decided as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreateRoomError {
    /// A field whose events msgnode cannot decide (403).
    #[error("{0}")]
    Undecidable(String),
    /// A field Synapse would refuse anyway (400).
    #[error("{0}")]
    Invalid(String),
}

/// A preset's settings (Synapse's `_presets_dict`).
struct Preset {
    join_rule: &'static str,
    guest_can_join: bool,
    original_invitees_have_ops: bool,
    power_level_override: Value,
}

fn preset(name: &str) -> Option<Preset> {
    Some(match name {
        "private_chat" => Preset {
            join_rule: "invite",
            guest_can_join: true,
            original_invitees_have_ops: false,
            power_level_override: json!({"invite": 0}),
        },
        "trusted_private_chat" => Preset {
            join_rule: "invite",
            guest_can_join: true,
            original_invitees_have_ops: true,
            power_level_override: json!({"invite": 0}),
        },
        "public_chat" => Preset {
            join_rule: "public",
            guest_can_join: false,
            original_invitees_have_ops: false,
            power_level_override: json!({"events": {"m.call.invite": 50}}),
        },
        _ => return None,
    })
}

/// What a room version changes in a new room's events.
struct Version {
    /// No `creator` in the create event (room versions 11 and later, MSC2175).
    implicit_creator: bool,
    /// Creators hold power by the create event, not in `users` (room versions 12 and later,
    /// MSC4289).
    creator_power: bool,
}

fn version(id: &str) -> Version {
    match id.parse::<u32>() {
        Ok(n) => Version {
            implicit_creator: n >= 11,
            creator_power: n >= 12,
        },
        // Unstable identifiers are previews of the newest rules.
        Err(_) => Version {
            implicit_creator: true,
            creator_power: true,
        },
    }
}

/// The fields of a `createRoom` body msgnode derives events from; nothing else is forwarded.
const FIELDS: [&str; 11] = [
    "creation_content",
    "initial_state",
    "invite",
    "is_direct",
    "name",
    "power_level_content_override",
    "preset",
    "room_alias_name",
    "room_version",
    "topic",
    "visibility",
];

/// The `createRoom` body forwarded for `body`: only [`FIELDS`], with `preset`, `visibility`
/// and `room_version` (else `default_version`) explicit and `initial_state` entries as
/// `{type, state_key, content}`.
///
/// # Errors
/// As [`new_room`], and a `visibility` other than `public` or `private`.
pub fn canonical(body: &Value, default_version: &str) -> Result<Value, CreateRoomError> {
    let field = |name: &str| body.get(name).filter(|v| !v.is_null());
    let visibility = match field("visibility") {
        None => "private",
        Some(Value::String(v)) if v == "public" || v == "private" => v.as_str(),
        Some(other) => {
            return Err(CreateRoomError::Invalid(format!(
                "visibility must be \"public\" or \"private\", not {other}"
            )))
        }
    };
    // Every field checked (invite_3pid refused) as the client sent it, before any is dropped.
    new_room(body, "@check:invalid", "invalid", default_version)?;
    let mut canonical = Map::new();
    for name in FIELDS {
        if let Some(value) = field(name) {
            canonical.insert(name.to_string(), value.clone());
        }
    }
    canonical.insert("visibility".into(), json!(visibility));
    if !canonical.contains_key("preset") {
        let preset = match visibility {
            "public" => "public_chat",
            _ => "private_chat",
        };
        canonical.insert("preset".into(), json!(preset));
    }
    if !canonical.contains_key("room_version") {
        canonical.insert("room_version".into(), json!(default_version));
    }
    let mut canonical = Value::Object(canonical);
    if let Some(entries) = field("initial_state").and_then(Value::as_array) {
        canonical["initial_state"] = Value::Array(
            initial_state(entries)?
                .into_iter()
                .map(|e| json!({"type": e.event_type, "state_key": e.state_key, "content": e.content}))
                .collect(),
        );
    }
    Ok(canonical)
}

/// `initial_state` entries as events, in order, a later entry for the same type and state
/// key replacing an earlier one.
fn initial_state(entries: &[Value]) -> Result<Vec<StateEvent>, CreateRoomError> {
    let mut initial: Vec<StateEvent> = Vec::new();
    for entry in entries {
        let (Some(event_type), Some(content @ Value::Object(_))) = (
            entry.get("type").and_then(Value::as_str),
            entry.get("content"),
        ) else {
            return Err(CreateRoomError::Invalid(
                "every initial_state event needs a type and an object content".into(),
            ));
        };
        let state_key = match entry.get("state_key") {
            None => "",
            Some(Value::String(key)) => key.as_str(),
            Some(_) => {
                return Err(CreateRoomError::Invalid(
                    "an initial_state state_key must be a string".into(),
                ))
            }
        };
        initial.retain(|e| !(e.event_type == event_type && e.state_key == state_key));
        initial.push(state(event_type, state_key, content.clone()));
    }
    Ok(initial)
}

/// The events `body` creates for `creator` on the homeserver `server_name`, whose default
/// room version is `default_version`.
///
/// # Errors
/// `invite_3pid` entries (undecidable), an unknown preset or malformed fields (invalid).
pub fn new_room(
    body: &Value,
    creator: &str,
    server_name: &str,
    default_version: &str,
) -> Result<NewRoom, CreateRoomError> {
    let field = |name: &str| body.get(name).filter(|v| !v.is_null());
    if field("invite_3pid")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
    {
        return Err(CreateRoomError::Undecidable(
            "invite_3pid is not supported through msgnode: the third-party invite event depends on the identity server's answer, which cannot be decided beforehand".into(),
        ));
    }
    let invites: Vec<String> = match field("invite") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| CreateRoomError::Invalid("invite must be a list of user ids".into()))?,
        Some(_) => {
            return Err(CreateRoomError::Invalid(
                "invite must be a list of user ids".into(),
            ))
        }
    };
    let room_version = match field("room_version") {
        Some(Value::String(v)) => v.clone(),
        Some(_) => {
            return Err(CreateRoomError::Invalid(
                "room_version must be a string".into(),
            ))
        }
        None => default_version.to_string(),
    };
    let rules = version(&room_version);
    let preset_name = match field("preset") {
        Some(Value::String(name)) => name.clone(),
        Some(_) => return Err(CreateRoomError::Invalid("preset must be a string".into())),
        None if field("visibility").and_then(Value::as_str) == Some("public") => {
            "public_chat".to_string()
        }
        None => "private_chat".to_string(),
    };
    let preset = preset(&preset_name)
        .ok_or_else(|| CreateRoomError::Invalid(format!("unknown preset {preset_name:?}")))?;
    let object = |name: &str| -> Result<Option<Map<String, Value>>, CreateRoomError> {
        match field(name) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(map.clone())),
            Some(_) => Err(CreateRoomError::Invalid(format!(
                "{name} must be an object"
            ))),
        }
    };

    // m.room.create
    let mut creation = object("creation_content")?.unwrap_or_default();
    creation.insert("room_version".into(), json!(room_version));
    if rules.creator_power && preset_name == "trusted_private_chat" && !invites.is_empty() {
        let mut creators: Vec<String> = creation
            .get("additional_creators")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_string))
            .chain(invites.iter().cloned())
            .collect();
        creators.sort();
        creators.dedup();
        creation.insert("additional_creators".into(), json!(creators));
    }
    if !rules.implicit_creator {
        creation.insert("creator".into(), json!(creator));
    }
    let mut events = vec![state("m.room.create", "", Value::Object(creation))];

    // initial_state, keyed by (type, state key); a later entry replaces an earlier one.
    let mut initial = match field("initial_state") {
        None => Vec::new(),
        Some(Value::Array(entries)) => initial_state(entries)?,
        Some(_) => {
            return Err(CreateRoomError::Invalid(
                "initial_state must be a list of events".into(),
            ))
        }
    };

    // m.room.power_levels: from initial_state, else computed.
    match initial
        .iter()
        .position(|e| e.event_type == "m.room.power_levels" && e.state_key.is_empty())
    {
        Some(i) => events.push(initial.remove(i)),
        None => {
            let mut users = Map::new();
            if !rules.creator_power {
                users.insert(creator.to_string(), json!(100));
                if preset.original_invitees_have_ops {
                    for invitee in &invites {
                        users.insert(invitee.clone(), json!(100));
                    }
                }
            }
            let mut levels = json!({
                "users": users,
                "users_default": 0,
                "events": {
                    "m.room.name": 50,
                    "m.room.power_levels": 100,
                    "m.room.history_visibility": 100,
                    "m.room.canonical_alias": 50,
                    "m.room.avatar": 50,
                    "m.room.tombstone": if rules.creator_power { 150 } else { 100 },
                    "m.room.server_acl": 100,
                    "m.room.encryption": 100,
                },
                "events_default": 0,
                "state_default": 50,
                "ban": 50,
                "kick": 50,
                "redact": 50,
                "invite": 50,
                "historical": 100,
            });
            deep_merge(&mut levels, &preset.power_level_override);
            if let (Some(levels), Some(overrides)) = (
                levels.as_object_mut(),
                object("power_level_content_override")?,
            ) {
                levels.extend(overrides);
            }
            events.push(state("m.room.power_levels", "", levels));
        }
    }
    let given = |event_type: &str| {
        initial
            .iter()
            .any(|e| e.event_type == event_type && e.state_key.is_empty())
    };
    if let Some(alias) = field("room_alias_name").and_then(Value::as_str) {
        if !given("m.room.canonical_alias") {
            events.push(state(
                "m.room.canonical_alias",
                "",
                json!({"alias": format!("#{alias}:{server_name}")}),
            ));
        }
    }
    if !given("m.room.join_rules") {
        events.push(state(
            "m.room.join_rules",
            "",
            json!({"join_rule": preset.join_rule}),
        ));
    }
    if !given("m.room.history_visibility") {
        events.push(state(
            "m.room.history_visibility",
            "",
            json!({"history_visibility": "shared"}),
        ));
    }
    if preset.guest_can_join && !given("m.room.guest_access") {
        events.push(state(
            "m.room.guest_access",
            "",
            json!({"guest_access": "can_join"}),
        ));
    }
    events.extend(initial);
    if let Some(name) = field("name") {
        events.push(state("m.room.name", "", json!({ "name": name })));
    }
    if let Some(topic) = field("topic") {
        events.push(state(
            "m.room.topic",
            "",
            json!({"topic": topic, "m.topic": {"m.text": [{"body": topic}]}}),
        ));
    }
    Ok(NewRoom { events, invites })
}

fn state(event_type: &str, state_key: &str, content: Value) -> StateEvent {
    StateEvent {
        event_type: event_type.to_string(),
        state_key: state_key.to_string(),
        content,
    }
}

/// Merges `overrides` into `base`, object by object (Synapse's
/// `_deepmerge_power_level_content`).
fn deep_merge(base: &mut Value, overrides: &Value) {
    let (Some(base), Some(overrides)) = (base.as_object_mut(), overrides.as_object()) else {
        return;
    };
    for (key, value) in overrides {
        match (base.get_mut(key), value) {
            (Some(existing @ Value::Object(_)), Value::Object(_)) => deep_merge(existing, value),
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types(room: &NewRoom) -> Vec<&str> {
        room.events.iter().map(|e| e.event_type.as_str()).collect()
    }

    fn content<'a>(room: &'a NewRoom, event_type: &str) -> &'a Value {
        &room
            .events
            .iter()
            .find(|e| e.event_type == event_type)
            .unwrap_or_else(|| panic!("no {event_type}"))
            .content
    }

    #[test]
    fn a_bare_request_creates_the_private_preset_in_synapse_order() {
        let room = new_room(&json!({}), "@a:l", "l", "12").expect("room");
        assert_eq!(
            types(&room),
            [
                "m.room.create",
                "m.room.power_levels",
                "m.room.join_rules",
                "m.room.history_visibility",
                "m.room.guest_access"
            ]
        );
        assert_eq!(
            content(&room, "m.room.create"),
            &json!({"room_version": "12"})
        );
        let levels = content(&room, "m.room.power_levels");
        assert_eq!(
            levels["users"],
            json!({}),
            "v12: creators by the create event"
        );
        assert_eq!(
            levels["invite"], 0,
            "the private preset lets members invite"
        );
        assert_eq!(levels["events"]["m.room.tombstone"], 150);
        assert_eq!(
            content(&room, "m.room.join_rules"),
            &json!({"join_rule": "invite"})
        );
    }

    #[test]
    fn every_field_becomes_the_event_it_makes() {
        let room = new_room(
            &json!({
                "preset": "public_chat", "room_alias_name": "lobby", "name": "Lobby", "topic": "hi",
                "creation_content": {"m.federate": false}, "room_version": "10",
                "power_level_content_override": {"events_default": 50, "users": {"@a:l": 100, "@eve:l": 100}},
                "initial_state": [{"type": "m.room.history_visibility", "content": {"history_visibility": "world_readable"}},
                                  {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}],
                "invite": ["@b:l"], "is_direct": true,
            }),
            "@a:l",
            "l",
            "12",
        )
        .expect("room");
        assert_eq!(
            types(&room),
            [
                "m.room.create",
                "m.room.power_levels",
                "m.room.canonical_alias",
                "m.room.join_rules",
                "m.room.history_visibility",
                "m.room.encryption",
                "m.room.name",
                "m.room.topic"
            ]
        );
        assert_eq!(
            content(&room, "m.room.create"),
            &json!({"m.federate": false, "room_version": "10", "creator": "@a:l"})
        );
        let levels = content(&room, "m.room.power_levels");
        assert_eq!(
            levels["users"],
            json!({"@a:l": 100, "@eve:l": 100}),
            "the override replaces users"
        );
        assert_eq!(levels["events_default"], 50);
        assert_eq!(
            levels["events"]["m.call.invite"], 50,
            "public preset, merged"
        );
        assert_eq!(
            content(&room, "m.room.canonical_alias"),
            &json!({"alias": "#lobby:l"})
        );
        assert_eq!(
            content(&room, "m.room.join_rules"),
            &json!({"join_rule": "public"})
        );
        assert_eq!(
            content(&room, "m.room.history_visibility"),
            &json!({"history_visibility": "world_readable"}),
            "initial_state replaces the preset's"
        );
        assert_eq!(
            content(&room, "m.room.topic")["m.topic"]["m.text"][0]["body"],
            "hi"
        );
        assert_eq!(room.invites, ["@b:l"]);
    }

    #[test]
    fn trusted_private_chats_make_invitees_creators_or_admins() {
        let body = json!({"preset": "trusted_private_chat", "invite": ["@b:l"]});
        let v12 = new_room(&body, "@a:l", "l", "12").expect("room");
        assert_eq!(
            content(&v12, "m.room.create")["additional_creators"],
            json!(["@b:l"])
        );
        let v11 = new_room(&body, "@a:l", "l", "11").expect("room");
        assert_eq!(
            content(&v11, "m.room.power_levels")["users"],
            json!({"@a:l": 100, "@b:l": 100})
        );
        assert!(
            content(&v11, "m.room.create").get("creator").is_none(),
            "v11: implicit creator"
        );
    }

    #[test]
    fn undecidable_and_invalid_fields_are_refused() {
        let third_party = json!({"invite_3pid": [{"id_server": "is.example", "id_access_token": "t", "medium": "email", "address": "a@b"}]});
        assert!(matches!(
            new_room(&third_party, "@a:l", "l", "12"),
            Err(CreateRoomError::Undecidable(_))
        ));
        for bad in [
            json!({"preset": "secret_chat"}),
            json!({"invite": "@b:l"}),
            json!({"initial_state": [{"content": {}}]}),
            json!({"power_level_content_override": []}),
        ] {
            assert!(
                matches!(
                    new_room(&bad, "@a:l", "l", "12"),
                    Err(CreateRoomError::Invalid(_))
                ),
                "{bad}"
            );
        }
        assert!(new_room(&json!({"invite_3pid": []}), "@a:l", "l", "12").is_ok());
    }
}

//! The endpoints the proxy decides, read from a classified path: their identifiers checked
//! with ruma's types ([`Intercepted::validate`]; ruma 0.17 accepts room ids without a server
//! part, room version 12) and the canonical path they are forwarded with
//! ([`Intercepted::canonical_path`]), rebuilt from the decoded parameters so the homeserver
//! executes exactly what the policy decided on.

use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};

use super::table::Kind;
use ruma::{EventId, RoomAliasId, RoomId, RoomOrAliasId, UserId};

/// A membership change through `/rooms/{roomId}/{action}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipAction {
    /// `invite`
    Invite,
    /// `join`
    Join,
    /// `leave`
    Leave,
    /// `kick`
    Kick,
    /// `ban`
    Ban,
    /// `unban`
    Unban,
}

impl MembershipAction {
    /// The action a path segment names.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "invite" => Self::Invite,
            "join" => Self::Join,
            "leave" => Self::Leave,
            "kick" => Self::Kick,
            "ban" => Self::Ban,
            "unban" => Self::Unban,
            _ => return None,
        })
    }

    /// The path segment.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invite => "invite",
            Self::Join => "join",
            Self::Leave => "leave",
            Self::Kick => "kick",
            Self::Ban => "ban",
            Self::Unban => "unban",
        }
    }
}

/// An endpoint that creates traffic or changes who hears it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intercepted {
    /// `PUT /rooms/{roomId}/send/{eventType}/{txnId}` or `POST /rooms/{roomId}/send/{eventType}`
    Send {
        /// Room.
        room_id: String,
        /// Event type.
        event_type: String,
        /// Transaction id (`None`: the POST form).
        txn_id: Option<String>,
    },
    /// `PUT /rooms/{roomId}/state/{eventType}[/{stateKey}]`
    State {
        /// Room.
        room_id: String,
        /// Event type.
        event_type: String,
        /// State key (empty when absent).
        state_key: String,
    },
    /// `PUT /rooms/{roomId}/redact/{eventId}/{txnId}` or `POST /rooms/{roomId}/redact/{eventId}`
    Redact {
        /// Room.
        room_id: String,
        /// Redacted event.
        event_id: String,
        /// Transaction id (`None`: the POST form).
        txn_id: Option<String>,
    },
    /// `POST /rooms/{roomId}/{action}` or `PUT /rooms/{roomId}/{action}/{txnId}`
    Membership {
        /// Room.
        room_id: String,
        /// invite, join, leave, kick, ban, unban.
        action: MembershipAction,
        /// Transaction id (`None`: the POST form).
        txn_id: Option<String>,
    },
    /// `POST /join/{roomIdOrAlias}` or `PUT /join/{roomIdOrAlias}/{txnId}`
    Join {
        /// Room id or alias, as given.
        room: String,
        /// Transaction id (`None`: the POST form).
        txn_id: Option<String>,
    },
    /// `POST /knock/{roomIdOrAlias}`
    Knock {
        /// Room id or alias, as given.
        room: String,
    },
    /// `POST /createRoom` or `PUT /createRoom/{txnId}`
    CreateRoom {
        /// Transaction id (`None`: the POST form).
        txn_id: Option<String>,
    },
    /// `PUT /sendToDevice/{eventType}/{txnId}`
    SendToDevice {
        /// Event type.
        event_type: String,
        /// Transaction id.
        txn_id: String,
    },
    /// `PUT` or `DELETE /profile/{userId}/{field}`: the homeserver turns it into an
    /// `m.room.member` event in every room the user is in.
    Profile {
        /// Whose profile.
        user_id: String,
        /// `displayname`, `avatar_url`, or another field.
        field: String,
        /// `DELETE`: the field is removed.
        remove: bool,
    },
    /// `DELETE /directory/room/{roomAlias}`: may update the room's `m.room.canonical_alias`.
    DeleteAlias {
        /// The alias.
        alias: String,
    },
    /// `POST /account/deactivate`: the account leaves every room.
    Deactivate,
}

/// An identifier in an intercepted path that is not one (answered 400 `M_INVALID_PARAM`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {why}")]
pub struct InvalidIdentifier {
    /// Which parameter (`room id`, `user id`, …).
    pub what: &'static str,
    /// What was given.
    pub value: String,
    /// Why it is not one.
    pub why: String,
}

fn check<'a, T: ?Sized + 'a>(what: &'static str, value: &'a str) -> Result<(), InvalidIdentifier>
where
    &'a T: TryFrom<&'a str, Error = ruma::IdParseError>,
{
    <&T>::try_from(value)
        .map(|_| ())
        .map_err(|e| InvalidIdentifier {
            what,
            value: value.to_string(),
            why: e.to_string(),
        })
}

fn check_event_type(value: &str) -> Result<(), InvalidIdentifier> {
    if value.is_empty() {
        return Err(InvalidIdentifier {
            what: "event type",
            value: String::new(),
            why: "it is empty".to_string(),
        });
    }
    Ok(())
}

/// Characters escaped in a rebuilt path segment: everything but unreserved characters and the
/// sigils Matrix identifiers start with.
pub(super) const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'\\')
    .add(b'^')
    .add(b'|');

impl Intercepted {
    /// The endpoint of `kind` with the path parameters `params` (decoded); `None` when one it
    /// needs is missing (a pattern of the table that does not capture it).
    pub fn from_route(kind: Kind, params: &[(&'static str, String)]) -> Option<Intercepted> {
        let get = |name: &str| {
            params
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        };
        let need = |name: &str| get(name);
        Some(match kind {
            Kind::State => Intercepted::State {
                room_id: need("room_id")?,
                event_type: need("event_type")?,
                state_key: get("state_key").unwrap_or_default(),
            },
            Kind::Join => Intercepted::Join {
                room: need("room_identifier")?,
                txn_id: get("txn_id"),
            },
            Kind::Membership => Intercepted::Membership {
                room_id: need("room_id")?,
                action: MembershipAction::parse(&need("membership_action")?)?,
                txn_id: get("txn_id"),
            },
            Kind::Send => Intercepted::Send {
                room_id: need("room_id")?,
                event_type: need("event_type")?,
                txn_id: get("txn_id"),
            },
            Kind::Redact => Intercepted::Redact {
                room_id: need("room_id")?,
                event_id: need("event_id")?,
                txn_id: get("txn_id"),
            },
            Kind::CreateRoom => Intercepted::CreateRoom {
                txn_id: get("txn_id"),
            },
            Kind::ProfileSet | Kind::ProfileDelete => Intercepted::Profile {
                user_id: need("user_id")?,
                field: need("field_name")?,
                remove: kind == Kind::ProfileDelete,
            },
            Kind::DeleteAlias => Intercepted::DeleteAlias {
                alias: need("room_alias")?,
            },
            Kind::Deactivate => Intercepted::Deactivate,
            Kind::Knock => Intercepted::Knock {
                room: need("room_identifier")?,
            },
            Kind::SendToDevice => Intercepted::SendToDevice {
                event_type: need("message_type")?,
                txn_id: need("txn_id")?,
            },
        })
    }

    /// Checks the identifiers in the path: room ids, room ids or aliases, user ids (also the
    /// state key of `m.room.member`), event ids, non-empty event types. Transaction ids,
    /// state keys and profile fields are opaque strings.
    ///
    /// # Errors
    /// The first parameter that is not a valid identifier of its kind.
    pub fn validate(&self) -> Result<(), InvalidIdentifier> {
        match self {
            Intercepted::Send {
                room_id,
                event_type,
                ..
            } => {
                check::<RoomId>("room id", room_id)?;
                check_event_type(event_type)
            }
            Intercepted::State {
                room_id,
                event_type,
                state_key,
            } => {
                check::<RoomId>("room id", room_id)?;
                check_event_type(event_type)?;
                if event_type == "m.room.member" {
                    check::<UserId>("state key of m.room.member (a user id)", state_key)?;
                }
                Ok(())
            }
            Intercepted::Redact {
                room_id, event_id, ..
            } => {
                check::<RoomId>("room id", room_id)?;
                check::<EventId>("event id", event_id)
            }
            Intercepted::Membership { room_id, .. } => check::<RoomId>("room id", room_id),
            Intercepted::Join { room, .. } | Intercepted::Knock { room } => {
                check::<RoomOrAliasId>("room id or alias", room)
            }
            Intercepted::Profile { user_id, .. } => check::<UserId>("user id", user_id),
            Intercepted::SendToDevice { event_type, .. } => check_event_type(event_type),
            Intercepted::DeleteAlias { alias } => check::<RoomAliasId>("room alias", alias),
            Intercepted::CreateRoom { .. } | Intercepted::Deactivate => Ok(()),
        }
    }

    /// The path the homeserver receives: `/_matrix/client/v3/…` from the decoded segments.
    pub fn canonical_path(&self) -> String {
        let enc = |s: &str| utf8_percent_encode(s, SEGMENT).to_string();
        let with_txn = |base: String, txn: &Option<String>| match txn {
            Some(id) => format!("{base}/{}", enc(id)),
            None => base,
        };
        let tail = match self {
            Intercepted::Send {
                room_id,
                event_type,
                txn_id,
            } => with_txn(
                format!("rooms/{}/send/{}", enc(room_id), enc(event_type)),
                txn_id,
            ),
            Intercepted::State {
                room_id,
                event_type,
                state_key,
            } => format!(
                "rooms/{}/state/{}/{}",
                enc(room_id),
                enc(event_type),
                enc(state_key)
            ),
            Intercepted::Redact {
                room_id,
                event_id,
                txn_id,
            } => with_txn(
                format!("rooms/{}/redact/{}", enc(room_id), enc(event_id)),
                txn_id,
            ),
            Intercepted::Membership {
                room_id,
                action,
                txn_id,
            } => with_txn(
                format!("rooms/{}/{}", enc(room_id), action.as_str()),
                txn_id,
            ),
            Intercepted::Join { room, txn_id } => with_txn(format!("join/{}", enc(room)), txn_id),
            Intercepted::Knock { room } => format!("knock/{}", enc(room)),
            Intercepted::CreateRoom { txn_id } => with_txn("createRoom".to_string(), txn_id),
            Intercepted::Profile { user_id, field, .. } => {
                format!("profile/{}/{}", enc(user_id), enc(field))
            }
            Intercepted::DeleteAlias { alias } => format!("directory/room/{}", enc(alias)),
            Intercepted::Deactivate => "account/deactivate".to_string(),
            Intercepted::SendToDevice { event_type, txn_id } => {
                format!("sendToDevice/{}/{}", enc(event_type), enc(txn_id))
            }
        };
        format!("/_matrix/client/v3/{tail}")
    }
}

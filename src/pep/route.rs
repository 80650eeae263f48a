//! Which client-server requests the proxy must decide, recognised from the path.
//! (One concern: the file is past 600 lines only with its tests.)
//!
//! The path is split into segments, empty segments (double and trailing slashes) dropped and
//! each segment percent-decoded; any API version (`r0`, `v3`, `unstable`, and the legacy
//! two-segment `api/v1`) is accepted. So every spelling of one endpoint classifies the same.
//! Both of Synapse's forms of transactional endpoints are recognised (`PUT …/{txnId}` and
//! `POST …` without one). An intercepted request is forwarded with the canonical path
//! rebuilt from the decoded segments ([`Intercepted::canonical_path`]), so the homeserver
//! executes exactly what the policy decided on.
//!
//! Fail closed: a write (`PUT`/`POST`/`DELETE`) under `/rooms/{roomId}/` that is neither
//! decided here nor known to create no room event (typing, receipts, read markers, reports,
//! forget) is [`Intercepted::Unsupported`] and refused.
//!
//! [`Intercepted::validate`] checks the identifiers in the path with ruma's identifier types
//! (room id, room id or alias, user id, event id) before anything is decided or forwarded.
//! ruma 0.17 accepts room ids without a server part (`!4UsW2lhkAbCdEf`, room version 12).

use axum::http::Method;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use ruma::{EventId, RoomId, RoomOrAliasId, UserId};

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
    fn parse(s: &str) -> Option<Self> {
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
    /// `POST /createRoom`
    CreateRoom,
    /// `PUT /sendToDevice/{eventType}/{txnId}`
    SendToDevice {
        /// Event type.
        event_type: String,
        /// Transaction id.
        txn_id: String,
    },
    /// `PUT /profile/{userId}/{field}`: the homeserver turns it into an `m.room.member`
    /// event in every room the user is in.
    Profile {
        /// Whose profile.
        user_id: String,
        /// `displayname`, `avatar_url`, or another field.
        field: String,
    },
    /// A write under `/rooms/{roomId}/` msgnode does not decide yet (e.g. `upgrade`): refused.
    Unsupported {
        /// What it is, for the error message.
        what: String,
    },
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
const SEGMENT: &AsciiSet = &CONTROLS
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

/// Room endpoints that write but create no room event: passed through.
const ROOM_WRITES_WITHOUT_EVENTS: [&str; 5] =
    ["typing", "receipt", "read_markers", "report", "forget"];

/// Classifies a client-server path; `None` means pass through untouched.
///
/// Two readings are tried: the homeserver's own (segments as they are, so an empty segment
/// is an empty parameter such as a txnId `""`), then the collapsed one (empty segments
/// dropped, so `//` and trailing slashes decide like the plain path). The request is
/// intercepted if either reading names an intercepted endpoint.
pub fn classify(method: &Method, raw_path: &str) -> Option<Intercepted> {
    let decoded: Vec<String> = raw_path
        .split('/')
        .skip(1)
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    let exact: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let collapsed: Vec<&str> = exact.iter().copied().filter(|s| !s.is_empty()).collect();
    let specific = |c: &Option<Intercepted>| matches!(c, Some(e) if !matches!(e, Intercepted::Unsupported { .. }));
    let as_read = classify_segments(method, &exact);
    if specific(&as_read) {
        return as_read;
    }
    let as_collapsed = classify_segments(method, &collapsed);
    if specific(&as_collapsed) {
        return as_collapsed;
    }
    as_read.or(as_collapsed)
}

fn classify_segments(method: &Method, strs: &[&str]) -> Option<Intercepted> {
    let rest = match strs {
        ["_matrix", "client", "api", "v1", rest @ ..] => rest,
        ["_matrix", "client", _version, rest @ ..] => rest,
        _ => return None,
    };
    let put = method == Method::PUT;
    let post = method == Method::POST;
    let write = put || post || method == Method::DELETE;
    let owned = |s: &str| s.to_string();
    let txn = |s: &str| Some(s.to_string());
    Some(match rest {
        ["rooms", room, "send", event_type, id] if put => Intercepted::Send {
            room_id: owned(room),
            event_type: owned(event_type),
            txn_id: txn(id),
        },
        ["rooms", room, "send", event_type] if post => Intercepted::Send {
            room_id: owned(room),
            event_type: owned(event_type),
            txn_id: None,
        },
        ["rooms", room, "state", event_type] if put => Intercepted::State {
            room_id: owned(room),
            event_type: owned(event_type),
            state_key: String::new(),
        },
        ["rooms", room, "state", event_type, state_key] if put => Intercepted::State {
            room_id: owned(room),
            event_type: owned(event_type),
            state_key: owned(state_key),
        },
        ["rooms", room, "redact", event_id, id] if put => Intercepted::Redact {
            room_id: owned(room),
            event_id: owned(event_id),
            txn_id: txn(id),
        },
        ["rooms", room, "redact", event_id] if post => Intercepted::Redact {
            room_id: owned(room),
            event_id: owned(event_id),
            txn_id: None,
        },
        ["rooms", room, action] if post && MembershipAction::parse(action).is_some() => {
            Intercepted::Membership {
                room_id: owned(room),
                action: MembershipAction::parse(action)?,
                txn_id: None,
            }
        }
        ["rooms", room, action, id] if put && MembershipAction::parse(action).is_some() => {
            Intercepted::Membership {
                room_id: owned(room),
                action: MembershipAction::parse(action)?,
                txn_id: txn(id),
            }
        }
        ["join", room] if post => Intercepted::Join {
            room: owned(room),
            txn_id: None,
        },
        ["join", room, id] if put => Intercepted::Join {
            room: owned(room),
            txn_id: txn(id),
        },
        ["knock", room] if post => Intercepted::Knock { room: owned(room) },
        ["createRoom"] if post => Intercepted::CreateRoom,
        ["profile", user, field] if put => Intercepted::Profile {
            user_id: owned(user),
            field: owned(field),
        },
        ["sendToDevice", event_type, id] if put => Intercepted::SendToDevice {
            event_type: owned(event_type),
            txn_id: owned(id),
        },
        ["rooms", _room, endpoint, ..]
            if write && !ROOM_WRITES_WITHOUT_EVENTS.contains(endpoint) =>
        {
            Intercepted::Unsupported {
                what: format!("{method} /rooms/…/{endpoint}"),
            }
        }
        _ => return None,
    })
}

impl Intercepted {
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
            Intercepted::CreateRoom | Intercepted::Unsupported { .. } => Ok(()),
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
            Intercepted::CreateRoom => "createRoom".to_string(),
            Intercepted::Profile { user_id, field } => {
                format!("profile/{}/{}", enc(user_id), enc(field))
            }
            Intercepted::SendToDevice { event_type, txn_id } => {
                format!("sendToDevice/{}/{}", enc(event_type), enc(txn_id))
            }
            // Never forwarded; a path that cannot route anywhere, for completeness.
            Intercepted::Unsupported { .. } => "unsupported".to_string(),
        };
        format!("/_matrix/client/v3/{tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send() -> Intercepted {
        Intercepted::Send {
            room_id: "!r:localhost".into(),
            event_type: "m.room.message".into(),
            txn_id: Some("t1".into()),
        }
    }

    #[test]
    fn every_spelling_of_an_endpoint_classifies_the_same() {
        for path in [
            "/_matrix/client/v3/rooms/!r:localhost/send/m.room.message/t1",
            "/_matrix/client/r0/rooms/!r:localhost/send/m.room.message/t1",
            "/_matrix/client/unstable/rooms/!r:localhost/send/m.room.message/t1",
            "/_matrix/client/api/v1/rooms/!r:localhost/send/m.room.message/t1",
            "/_matrix/client/v3/rooms/%21r%3Alocalhost/send/m.room.message/t1",
            "/_matrix/client/v3/rooms/!r:localhost/send/m%2Eroom%2Emessage/t1",
            "//_matrix//client/v3/rooms/!r:localhost/send/m.room.message/t1/",
            "/_matrix/client/v3/rooms/!r:localhost//send/m.room.message/t1",
        ] {
            assert_eq!(classify(&Method::PUT, path), Some(send()), "{path}");
        }
    }

    #[test]
    fn empty_segments_are_empty_parameters_as_the_homeserver_reads_them() {
        let empty_txn = Intercepted::Send {
            room_id: "!r:l".into(),
            event_type: "m.room.message".into(),
            txn_id: Some(String::new()),
        };
        assert_eq!(
            classify(
                &Method::PUT,
                "/_matrix/client/v3/rooms/!r:l/send/m.room.message/"
            ),
            Some(empty_txn)
        );
        let empty_type = Intercepted::Send {
            room_id: "!r:l".into(),
            event_type: String::new(),
            txn_id: Some("t".into()),
        };
        assert_eq!(
            classify(&Method::PUT, "/_matrix/client/v3/rooms/!r:l/send//t"),
            Some(empty_type)
        );
        let to_device = Intercepted::SendToDevice {
            event_type: "m.room.encrypted".into(),
            txn_id: String::new(),
        };
        assert_eq!(
            classify(
                &Method::PUT,
                "/_matrix/client/v3/sendToDevice/m.room.encrypted/"
            ),
            Some(to_device)
        );
    }

    #[test]
    fn reads_and_event_free_writes_pass_through() {
        for (method, path) in [
            (
                Method::GET,
                "/_matrix/client/v3/rooms/!r:localhost/send/m.room.message/t1",
            ),
            (Method::GET, "/_matrix/client/v3/sync"),
            (Method::POST, "/_matrix/client/v3/login"),
            (
                Method::GET,
                "/_matrix/client/v3/rooms/!r:localhost/messages",
            ),
            (Method::PUT, "/_matrix/client/v3/rooms/!r:l/typing/@a:l"),
            (
                Method::POST,
                "/_matrix/client/v3/rooms/!r:l/receipt/m.read/$e",
            ),
            (Method::POST, "/_matrix/client/v3/rooms/!r:l/read_markers"),
            (Method::POST, "/_matrix/client/v3/rooms/!r:l/forget"),
            (Method::POST, "/_matrix/media/v3/upload"),
            (Method::GET, "/.well-known/matrix/client"),
        ] {
            assert_eq!(classify(&method, path), None, "{method} {path}");
        }
    }

    #[test]
    fn both_forms_of_transactional_endpoints_are_recognised() {
        let membership = |action, txn_id: Option<&str>| Intercepted::Membership {
            room_id: "!r:l".into(),
            action,
            txn_id: txn_id.map(str::to_string),
        };
        let cases = [
            (
                Method::POST,
                "/_matrix/client/v3/rooms/!r:l/send/m.room.message",
                Intercepted::Send {
                    room_id: "!r:l".into(),
                    event_type: "m.room.message".into(),
                    txn_id: None,
                },
            ),
            (
                Method::PUT,
                "/_matrix/client/v3/rooms/!r:l/state/m.room.topic",
                Intercepted::State {
                    room_id: "!r:l".into(),
                    event_type: "m.room.topic".into(),
                    state_key: String::new(),
                },
            ),
            (
                Method::PUT,
                "/_matrix/client/v3/rooms/!r:l/state/m.room.member/@a:l",
                Intercepted::State {
                    room_id: "!r:l".into(),
                    event_type: "m.room.member".into(),
                    state_key: "@a:l".into(),
                },
            ),
            (
                Method::PUT,
                "/_matrix/client/v3/rooms/!r:l/redact/$e/t",
                Intercepted::Redact {
                    room_id: "!r:l".into(),
                    event_id: "$e".into(),
                    txn_id: Some("t".into()),
                },
            ),
            (
                Method::POST,
                "/_matrix/client/v3/rooms/!r:l/redact/$e",
                Intercepted::Redact {
                    room_id: "!r:l".into(),
                    event_id: "$e".into(),
                    txn_id: None,
                },
            ),
            (
                Method::POST,
                "/_matrix/client/v3/rooms/!r:l/invite",
                membership(MembershipAction::Invite, None),
            ),
            (
                Method::PUT,
                "/_matrix/client/v3/rooms/!r:l/invite/t",
                membership(MembershipAction::Invite, Some("t")),
            ),
            (
                Method::POST,
                "/_matrix/client/v3/rooms/!r:l/join",
                membership(MembershipAction::Join, None),
            ),
            (
                Method::POST,
                "/_matrix/client/v3/rooms/!r:l/ban",
                membership(MembershipAction::Ban, None),
            ),
            (
                Method::PUT,
                "/_matrix/client/v3/rooms/!r:l/kick/t",
                membership(MembershipAction::Kick, Some("t")),
            ),
            (
                Method::POST,
                "/_matrix/client/v3/rooms/!r:l/unban",
                membership(MembershipAction::Unban, None),
            ),
            (
                Method::POST,
                "/_matrix/client/v3/rooms/!r:l/leave",
                membership(MembershipAction::Leave, None),
            ),
            (
                Method::POST,
                "/_matrix/client/v3/join/%23a:l",
                Intercepted::Join {
                    room: "#a:l".into(),
                    txn_id: None,
                },
            ),
            (
                Method::PUT,
                "/_matrix/client/v3/join/%23a:l/t",
                Intercepted::Join {
                    room: "#a:l".into(),
                    txn_id: Some("t".into()),
                },
            ),
            (
                Method::POST,
                "/_matrix/client/v3/knock/!r:l",
                Intercepted::Knock {
                    room: "!r:l".into(),
                },
            ),
            (
                Method::POST,
                "/_matrix/client/r0/createRoom/",
                Intercepted::CreateRoom,
            ),
            (
                Method::PUT,
                "/_matrix/client/v3/sendToDevice/m.room_key_request/t",
                Intercepted::SendToDevice {
                    event_type: "m.room_key_request".into(),
                    txn_id: "t".into(),
                },
            ),
            (
                Method::POST,
                "/_matrix/client/v3/rooms/!r:l/upgrade",
                Intercepted::Unsupported {
                    what: "POST /rooms/…/upgrade".into(),
                },
            ),
            (
                Method::PUT,
                "/_matrix/client/v3/rooms/!r:l/something_new/x",
                Intercepted::Unsupported {
                    what: "PUT /rooms/…/something_new".into(),
                },
            ),
        ];
        for (method, path, expected) in cases {
            assert_eq!(classify(&method, path), Some(expected), "{method} {path}");
        }
    }

    #[test]
    fn profile_changes_are_intercepted() {
        let expected = Intercepted::Profile {
            user_id: "@a:l".into(),
            field: "displayname".into(),
        };
        assert_eq!(
            classify(&Method::PUT, "/_matrix/client/v3/profile/@a:l/displayname"),
            Some(expected.clone())
        );
        assert_eq!(
            expected.canonical_path(),
            "/_matrix/client/v3/profile/@a:l/displayname"
        );
        assert_eq!(
            classify(&Method::GET, "/_matrix/client/v3/profile/@a:l/displayname"),
            None
        );
    }

    #[test]
    fn identifiers_are_validated_with_ruma() {
        let put = |path: &str| {
            classify(&Method::PUT, &format!("/_matrix/client/v3/{path}")).expect("intercepted")
        };
        let post = |path: &str| {
            classify(&Method::POST, &format!("/_matrix/client/v3/{path}")).expect("intercepted")
        };
        // Room version 12 room ids have no server part; ruma 0.17 takes them.
        for ok in [
            put("rooms/!4UsW2lhkAbCdEf/send/m.room.message/t"),
            put("rooms/!r:localhost/send/m.room.message/t"),
            put("rooms/!r:l/state/m.room.member/@a:l"),
            put("rooms/!r:l/state/m.room.topic"),
            put("rooms/!r:l/redact/$e/t"),
            put("rooms/!r:l/redact/$e:l/t"),
            post("rooms/!4UsW2lhkAbCdEf/invite"),
            post("join/%23a:l"),
            post("join/!4UsW2lhkAbCdEf"),
            post("knock/!r:l"),
            put("profile/@a:l/displayname"),
            put("sendToDevice/m.room.encrypted/t"),
            post("createRoom"),
        ] {
            assert_eq!(ok.validate(), Ok(()), "{ok:?}");
        }
        for (bad, what) in [
            (put("rooms/r:l/send/m.room.message/t"), "room id"),
            (put("rooms/%23a:l/send/m.room.message/t"), "room id"),
            (put("rooms/!r:l/send//t"), "event type"),
            (
                put("rooms/!r:l/state/m.room.member/alice"),
                "state key of m.room.member (a user id)",
            ),
            (put("rooms/!r:l/redact/e1/t"), "event id"),
            (post("rooms/@a:l/invite"), "room id"),
            (post("join/a:l"), "room id or alias"),
            (post("join/%23a"), "room id or alias"),
            (post("knock/!r%00x"), "room id or alias"),
            (put("profile/alice/displayname"), "user id"),
            (put("profile/@a/displayname"), "user id"),
            (put("sendToDevice//t"), "event type"),
        ] {
            let err = bad.validate().expect_err("invalid");
            assert_eq!(err.what, what, "{bad:?}");
        }
    }

    #[test]
    fn canonical_paths_re_encode_what_was_decided() {
        assert_eq!(
            send().canonical_path(),
            "/_matrix/client/v3/rooms/!r:localhost/send/m.room.message/t1"
        );
        let odd = Intercepted::Send {
            room_id: "!r/x:l".into(),
            event_type: "a b".into(),
            txn_id: Some("t?1".into()),
        };
        assert_eq!(
            odd.canonical_path(),
            "/_matrix/client/v3/rooms/!r%2Fx:l/send/a%20b/t%3F1"
        );
        let post_send = Intercepted::Send {
            room_id: "!r:l".into(),
            event_type: "m.room.message".into(),
            txn_id: None,
        };
        assert_eq!(
            post_send.canonical_path(),
            "/_matrix/client/v3/rooms/!r:l/send/m.room.message"
        );
        let alias = Intercepted::Join {
            room: "#a:l".into(),
            txn_id: None,
        };
        assert_eq!(alias.canonical_path(), "/_matrix/client/v3/join/%23a:l");
        let kick = Intercepted::Membership {
            room_id: "!r:l".into(),
            action: MembershipAction::Kick,
            txn_id: Some("t".into()),
        };
        assert_eq!(
            kick.canonical_path(),
            "/_matrix/client/v3/rooms/!r:l/kick/t"
        );
    }
}

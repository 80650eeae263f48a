//! Which client-server requests the proxy must decide, recognised from the path.
//!
//! The path is split into segments, empty segments (double and trailing slashes) dropped and
//! each segment percent-decoded; any API version (`r0`, `v3`, `unstable`, …) is accepted.
//! So every spelling of one endpoint classifies the same. An intercepted request is forwarded
//! with the canonical path rebuilt from the decoded segments ([`Intercepted::canonical_path`]),
//! so the homeserver executes exactly what the policy decided on.

use axum::http::Method;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};

/// An endpoint that creates traffic or changes who hears it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intercepted {
    /// `PUT /rooms/{roomId}/send/{eventType}/{txnId}`
    Send {
        /// Room.
        room_id: String,
        /// Event type.
        event_type: String,
        /// Transaction id.
        txn_id: String,
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
    /// `PUT /rooms/{roomId}/redact/{eventId}/{txnId}`
    Redact {
        /// Room.
        room_id: String,
        /// Redacted event.
        event_id: String,
        /// Transaction id.
        txn_id: String,
    },
    /// `POST /rooms/{roomId}/invite`
    Invite {
        /// Room.
        room_id: String,
    },
    /// `POST /join/{roomIdOrAlias}` or `POST /rooms/{roomId}/join`
    Join {
        /// Room id or alias, as given.
        room: String,
        /// Which spelling was used (`/join/…` or `/rooms/…/join`).
        via_rooms: bool,
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

/// Classifies a client-server path; `None` means pass through untouched.
pub fn classify(method: &Method, raw_path: &str) -> Option<Intercepted> {
    let segments: Vec<String> = raw_path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    let rest = match segments.as_slice() {
        [m, c, _version, rest @ ..] if m == "_matrix" && c == "client" => rest,
        _ => return None,
    };
    let strs: Vec<&str> = rest.iter().map(String::as_str).collect();
    let put = method == Method::PUT;
    let post = method == Method::POST;
    let owned = |s: &str| s.to_string();
    match strs.as_slice() {
        ["rooms", room, "send", event_type, txn] if put => Some(Intercepted::Send {
            room_id: owned(room),
            event_type: owned(event_type),
            txn_id: owned(txn),
        }),
        ["rooms", room, "state", event_type] if put => Some(Intercepted::State {
            room_id: owned(room),
            event_type: owned(event_type),
            state_key: String::new(),
        }),
        ["rooms", room, "state", event_type, state_key] if put => Some(Intercepted::State {
            room_id: owned(room),
            event_type: owned(event_type),
            state_key: owned(state_key),
        }),
        ["rooms", room, "redact", event_id, txn] if put => Some(Intercepted::Redact {
            room_id: owned(room),
            event_id: owned(event_id),
            txn_id: owned(txn),
        }),
        ["rooms", room, "invite"] if post => Some(Intercepted::Invite {
            room_id: owned(room),
        }),
        ["rooms", room, "join"] if post => Some(Intercepted::Join {
            room: owned(room),
            via_rooms: true,
        }),
        ["join", room] if post => Some(Intercepted::Join {
            room: owned(room),
            via_rooms: false,
        }),
        ["createRoom"] if post => Some(Intercepted::CreateRoom),
        ["sendToDevice", event_type, txn] if put => Some(Intercepted::SendToDevice {
            event_type: owned(event_type),
            txn_id: owned(txn),
        }),
        _ => None,
    }
}

impl Intercepted {
    /// The path the homeserver receives: `/_matrix/client/v3/…` from the decoded segments.
    pub fn canonical_path(&self) -> String {
        let enc = |s: &str| utf8_percent_encode(s, SEGMENT).to_string();
        let tail = match self {
            Intercepted::Send {
                room_id,
                event_type,
                txn_id,
            } => {
                format!(
                    "rooms/{}/send/{}/{}",
                    enc(room_id),
                    enc(event_type),
                    enc(txn_id)
                )
            }
            Intercepted::State {
                room_id,
                event_type,
                state_key,
            } => {
                format!(
                    "rooms/{}/state/{}/{}",
                    enc(room_id),
                    enc(event_type),
                    enc(state_key)
                )
            }
            Intercepted::Redact {
                room_id,
                event_id,
                txn_id,
            } => {
                format!(
                    "rooms/{}/redact/{}/{}",
                    enc(room_id),
                    enc(event_id),
                    enc(txn_id)
                )
            }
            Intercepted::Invite { room_id } => format!("rooms/{}/invite", enc(room_id)),
            Intercepted::Join {
                room,
                via_rooms: true,
            } => format!("rooms/{}/join", enc(room)),
            Intercepted::Join {
                room,
                via_rooms: false,
            } => format!("join/{}", enc(room)),
            Intercepted::CreateRoom => "createRoom".to_string(),
            Intercepted::SendToDevice { event_type, txn_id } => {
                format!("sendToDevice/{}/{}", enc(event_type), enc(txn_id))
            }
        };
        format!("/_matrix/client/v3/{tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Method;

    fn send() -> Intercepted {
        Intercepted::Send {
            room_id: "!r:localhost".into(),
            event_type: "m.room.message".into(),
            txn_id: "t1".into(),
        }
    }

    #[test]
    fn every_spelling_of_an_endpoint_classifies_the_same() {
        for path in [
            "/_matrix/client/v3/rooms/!r:localhost/send/m.room.message/t1",
            "/_matrix/client/r0/rooms/!r:localhost/send/m.room.message/t1",
            "/_matrix/client/unstable/rooms/!r:localhost/send/m.room.message/t1",
            "/_matrix/client/v3/rooms/%21r%3Alocalhost/send/m.room.message/t1",
            "/_matrix/client/v3/rooms/!r:localhost/send/m%2Eroom%2Emessage/t1",
            "//_matrix//client/v3/rooms/!r:localhost/send/m.room.message/t1/",
            "/_matrix/client/v3/rooms/!r:localhost//send/m.room.message/t1",
        ] {
            assert_eq!(classify(&Method::PUT, path), Some(send()), "{path}");
        }
    }

    #[test]
    fn other_endpoints_and_methods_pass_through() {
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
            (Method::POST, "/_matrix/media/v3/upload"),
            (Method::GET, "/.well-known/matrix/client"),
        ] {
            assert_eq!(classify(&method, path), None, "{method} {path}");
        }
    }

    #[test]
    fn intercepted_endpoints_are_recognised() {
        let cases = [
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
                    txn_id: "t".into(),
                },
            ),
            (
                Method::POST,
                "/_matrix/client/v3/rooms/!r:l/invite",
                Intercepted::Invite {
                    room_id: "!r:l".into(),
                },
            ),
            (
                Method::POST,
                "/_matrix/client/v3/rooms/!r:l/join",
                Intercepted::Join {
                    room: "!r:l".into(),
                    via_rooms: true,
                },
            ),
            (
                Method::POST,
                "/_matrix/client/v3/join/%23a:l",
                Intercepted::Join {
                    room: "#a:l".into(),
                    via_rooms: false,
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
        ];
        for (method, path, expected) in cases {
            assert_eq!(classify(&method, path), Some(expected), "{method} {path}");
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
            txn_id: "t?1".into(),
        };
        assert_eq!(
            odd.canonical_path(),
            "/_matrix/client/v3/rooms/!r%2Fx:l/send/a%20b/t%3F1"
        );
        let alias = Intercepted::Join {
            room: "#a:l".into(),
            via_rooms: false,
        };
        assert_eq!(alias.canonical_path(), "/_matrix/client/v3/join/%23a:l");
    }
}

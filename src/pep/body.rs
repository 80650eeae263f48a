//! Intercepted request bodies read through ruma's client-server API types, so that what the
//! policy decides on is well-formed before anything is decided or forwarded.
//!
//! `createRoom`, the membership endpoints (`invite`, `kick`, `ban`, `unban`, `join`,
//! `leave`, `knock`, `join/{roomIdOrAlias}`) and `m.room.member` state events are
//! deserialized as ruma's request bodies or event content: user ids (invitee, kick/ban
//! target, `createRoom.invite`), room versions and the shapes of the fields are checked.
//! Event content of other sends is opaque to the homeserver and left to the policy. The
//! body is only read here; the bytes forwarded are the ones that were decided on.

use ruma::api::client::knock::knock_room;
use ruma::api::client::membership::{
    ban_user, invite_user, join_room_by_id, join_room_by_id_or_alias, kick_user, leave_room,
    unban_user,
};
use ruma::api::client::room::create_room;
use ruma::api::IncomingRequest;
use ruma::events::room::member::RoomMemberEventContent;

use super::route::{Intercepted, MembershipAction};

/// A body that is JSON but not what the endpoint takes (answered 400 `M_INVALID_PARAM`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} body: {why}")]
pub struct InvalidBody {
    /// Which endpoint's body.
    pub what: &'static str,
    /// ruma's (serde's) reason.
    pub why: String,
}

/// Reads `body` (JSON bytes; empty means `{}`) as the request body `endpoint` takes.
/// Endpoints with no typed body here are accepted as they are.
///
/// # Errors
/// The body does not deserialize as the endpoint's ruma type.
pub fn validate(endpoint: &Intercepted, body: &[u8]) -> Result<(), InvalidBody> {
    let body: &[u8] = if body.is_empty() { b"{}" } else { body };
    match endpoint {
        Intercepted::CreateRoom { .. } => {
            parse::<create_room::v3::Request>("createRoom", body, &[])
        }
        Intercepted::Membership {
            room_id, action, ..
        } => {
            let args = [room_id.as_str()];
            match action {
                MembershipAction::Invite => {
                    parse::<invite_user::v3::Request>("invite", body, &args)
                }
                MembershipAction::Kick => parse::<kick_user::v3::Request>("kick", body, &args),
                MembershipAction::Ban => parse::<ban_user::v3::Request>("ban", body, &args),
                MembershipAction::Unban => parse::<unban_user::v3::Request>("unban", body, &args),
                MembershipAction::Join => {
                    parse::<join_room_by_id::v3::Request>("join", body, &args)
                }
                MembershipAction::Leave => parse::<leave_room::v3::Request>("leave", body, &args),
            }
        }
        Intercepted::Join { room, .. } => {
            parse::<join_room_by_id_or_alias::v3::Request>("join", body, &[room])
        }
        Intercepted::Knock { room } => parse::<knock_room::v3::Request>("knock", body, &[room]),
        Intercepted::State { event_type, .. } if event_type == "m.room.member" => {
            serde_json::from_slice::<RoomMemberEventContent>(body)
                .map(|_| ())
                .map_err(|e| InvalidBody {
                    what: "m.room.member",
                    why: e.to_string(),
                })
        }
        _ => Ok(()),
    }
}

/// Deserializes the path arguments and body of `R` (method, query and headers are not
/// looked at: the proxy forwards its own canonical path and re-encoded query).
fn parse<R: IncomingRequest>(
    what: &'static str,
    body: &[u8],
    path_args: &[&str],
) -> Result<(), InvalidBody> {
    R::try_from_http_request_inner(axum::http::Request::new(body), path_args)
        .map(|_| ())
        .map_err(|e| InvalidBody {
            what,
            why: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;
    use serde_json::json;

    fn endpoint(method: Method, path: &str) -> Intercepted {
        match super::super::route::classify(&method, &format!("/_matrix/client/v3/{path}")) {
            super::super::route::Route::Decide(endpoint) => endpoint,
            other => panic!("{path} is not decided: {other:?}"),
        }
    }

    fn check(method: Method, path: &str, body: serde_json::Value) -> Result<(), InvalidBody> {
        validate(
            &endpoint(method, path),
            &serde_json::to_vec(&body).expect("json"),
        )
    }

    #[test]
    fn well_formed_bodies_pass() {
        let room = "rooms/!4UsW2lhkAbCdEf";
        for (method, path, body) in [
            (Method::POST, "createRoom".to_string(), json!({})),
            (
                Method::POST,
                "createRoom".to_string(),
                json!({"preset": "private_chat", "name": "n", "invite": ["@bob:l"], "room_version": "12",
                       "initial_state": [{"type": "m.room.topic", "state_key": "", "content": {"topic": "t"}}],
                       "org.example.unknown": 1}),
            ),
            (
                Method::POST,
                format!("{room}/invite"),
                json!({"user_id": "@bob:l", "reason": "hi"}),
            ),
            (
                Method::POST,
                format!("{room}/invite"),
                json!({"id_server": "id.example", "id_access_token": "t", "medium": "email", "address": "a@b.c"}),
            ),
            (
                Method::PUT,
                format!("{room}/kick/t"),
                json!({"user_id": "@bob:l"}),
            ),
            (
                Method::POST,
                format!("{room}/ban"),
                json!({"user_id": "@bob:l"}),
            ),
            (
                Method::POST,
                format!("{room}/unban"),
                json!({"user_id": "@bob:l"}),
            ),
            (Method::POST, format!("{room}/join"), json!({})),
            (
                Method::POST,
                format!("{room}/leave"),
                json!({"reason": "bye"}),
            ),
            (Method::POST, "join/%23a:l".to_string(), json!({})),
            (
                Method::POST,
                "knock/!r:l".to_string(),
                json!({"reason": "let me in"}),
            ),
            (
                Method::PUT,
                format!("{room}/state/m.room.member/@bob:l"),
                json!({"membership": "join", "displayname": "Bob"}),
            ),
            (
                Method::PUT,
                format!("{room}/send/m.room.message/t"),
                json!({"anything": ["goes"]}),
            ),
        ] {
            assert_eq!(
                check(method.clone(), &path, body.clone()),
                Ok(()),
                "{method} {path} {body}"
            );
        }
        assert_eq!(validate(&endpoint(Method::POST, "createRoom"), b""), Ok(()));
    }

    #[test]
    fn malformed_identifiers_and_shapes_are_refused() {
        let room = "rooms/!r:l";
        for (method, path, body) in [
            (
                Method::POST,
                "createRoom".to_string(),
                json!({"invite": ["bob"]}),
            ),
            (
                Method::POST,
                "createRoom".to_string(),
                json!({"invite": "@bob:l"}),
            ),
            (Method::POST, "createRoom".to_string(), json!({"name": 7})),
            (
                Method::POST,
                format!("{room}/invite"),
                json!({"user_id": "bob"}),
            ),
            (Method::POST, format!("{room}/invite"), json!({})),
            (
                Method::POST,
                format!("{room}/kick"),
                json!({"user_id": "@bob"}),
            ),
            (Method::POST, format!("{room}/ban"), json!({})),
            (Method::POST, format!("{room}/unban"), json!({"user_id": 1})),
            (
                Method::PUT,
                format!("{room}/state/m.room.member/@bob:l"),
                json!({"displayname": "no membership"}),
            ),
        ] {
            assert!(
                check(method.clone(), &path, body.clone()).is_err(),
                "{method} {path} {body}"
            );
        }
    }
}

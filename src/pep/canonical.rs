//! What the proxy forwards for a decided request: rebuilt from what is decided, never the
//! client's bytes — as paths already are (`route`), so bodies and queries.
//!
//! - **Body**: only the fields the decisions describe. Event content (send, state, redact,
//!   to-device) is decided whole and forwarded whole; a membership change keeps `user_id`,
//!   `reason` (and a join's `third_party_signed`); `createRoom` is
//!   [`create_room::canonical`](super::create_room::canonical); a profile change its one field;
//!   a deactivation `auth`, `erase` and `id_server`. A field Synapse reads that msgnode does
//!   not model is therefore never sent (e.g. an invite's `medium`/`address`, which Synapse would
//!   execute as a third-party invite of whoever the identity server names: refused outright).
//! - **Query**: the parameters these endpoints take from an application service (`user_id`,
//!   `ts`, `device_id`) and a join's or knock's `via`/`server_name`; others are dropped. A
//!   delayed event (`org.matrix.msc4140.delay`) is refused: it would be committed when it
//!   fires, after its decision, whatever the policy says by then.
//! - **Aliases**: a join or knock by alias is resolved first and forwarded by room id, with the
//!   directory's servers as `via`, so the room decided on is the room joined.

use serde_json::{Map, Value};

use super::create_room;
use super::error::RequestError;
use super::route::{Intercepted, MembershipAction};
use crate::matrix::Homeserver;

/// Query parameters every decided endpoint keeps (an application service's).
const KEPT: [&str; 4] = ["user_id", "ts", "device_id", "org.matrix.msc3202.device_id"];

/// Query parameters a join or knock by room id keeps: where to join through.
const ROUTING: [&str; 2] = ["via", "server_name"];

/// The query parameter that schedules a send for later (MSC4140).
const DELAY: &str = "org.matrix.msc4140.delay";

/// A decided request as it is forwarded.
#[derive(Debug, Clone, PartialEq)]
pub struct Forwarded {
    /// The endpoint (an alias resolved to its room).
    pub endpoint: Intercepted,
    /// The body.
    pub body: Value,
    /// The query, decoded (re-encoded when forwarded).
    pub query: Vec<(String, String)>,
}

/// What is forwarded for `endpoint` with the client's `content` and `query`, as the caller
/// holding `token` (aliases and the default room version are asked for with it).
///
/// # Errors
/// A delayed send, a third-party invite, a `createRoom` whose events cannot be decided, a
/// missing field, an alias the directory does not know, or a homeserver that cannot answer.
pub async fn forwarded(
    homeserver: &Homeserver,
    endpoint: &Intercepted,
    content: &Value,
    query: &[(String, String)],
    token: &str,
) -> Result<Forwarded, RequestError> {
    if query.iter().any(|(k, _)| k == DELAY) {
        return Err(RequestError::Undecidable(
            "delayed events are not supported through msgnode: a delayed event is committed when it fires, after its decision".into(),
        ));
    }
    let routing = matches!(
        endpoint,
        Intercepted::Join { .. } | Intercepted::Knock { .. }
    );
    let mut kept: Vec<(String, String)> = query
        .iter()
        .filter(|(k, _)| KEPT.contains(&k.as_str()) || (routing && ROUTING.contains(&k.as_str())))
        .cloned()
        .collect();
    let endpoint = match endpoint {
        Intercepted::Join { room, txn_id } if room.starts_with('#') => {
            let room_id = resolve(homeserver, room, token, &mut kept).await?;
            Intercepted::Join {
                room: room_id,
                txn_id: txn_id.clone(),
            }
        }
        Intercepted::Knock { room } if room.starts_with('#') => Intercepted::Knock {
            room: resolve(homeserver, room, token, &mut kept).await?,
        },
        other => other.clone(),
    };
    let body = body(homeserver, &endpoint, content, token).await?;
    Ok(Forwarded {
        endpoint,
        body,
        query: kept,
    })
}

/// The room `alias` names; `query`'s routing parameters become the directory's servers.
async fn resolve(
    homeserver: &Homeserver,
    alias: &str,
    token: &str,
    query: &mut Vec<(String, String)>,
) -> Result<String, RequestError> {
    let (room_id, servers) = homeserver
        .resolve_alias(alias, token)
        .await?
        .ok_or_else(|| RequestError::NotFound(format!("room alias {alias} not found")))?;
    query.retain(|(k, _)| !ROUTING.contains(&k.as_str()));
    query.extend(servers.into_iter().map(|s| ("via".to_string(), s)));
    Ok(room_id)
}

async fn body(
    homeserver: &Homeserver,
    endpoint: &Intercepted,
    content: &Value,
    token: &str,
) -> Result<Value, RequestError> {
    Ok(match endpoint {
        Intercepted::Send { .. }
        | Intercepted::State { .. }
        | Intercepted::Redact { .. }
        | Intercepted::SendToDevice { .. } => content.clone(),
        Intercepted::Membership { action, .. } => {
            if *action == MembershipAction::Invite
                && content.get("medium").is_some()
                && content.get("address").is_some()
            {
                return Err(RequestError::Undecidable(
                    "third-party invites are not supported through msgnode: their event depends on the identity server's answer".into(),
                ));
            }
            match action {
                MembershipAction::Join => pick(content, &["reason", "third_party_signed"]),
                MembershipAction::Leave => pick(content, &["reason"]),
                _ => {
                    if !content.get("user_id").is_some_and(Value::is_string) {
                        return Err(RequestError::Invalid(format!(
                            "{} needs a user_id",
                            action.as_str()
                        )));
                    }
                    pick(content, &["user_id", "reason"])
                }
            }
        }
        Intercepted::Join { .. } => pick(content, &["reason", "third_party_signed"]),
        Intercepted::Knock { .. } => pick(content, &["reason"]),
        Intercepted::CreateRoom { .. } => {
            let version = match content.get("room_version").and_then(Value::as_str) {
                Some(version) => version.to_string(),
                None => homeserver.default_room_version(token).await?,
            };
            create_room::canonical(content, &version)?
        }
        Intercepted::Profile {
            field,
            remove: false,
            ..
        } => {
            if content.get(field.as_str()).is_none() {
                return Err(RequestError::Invalid(format!("missing {field}")));
            }
            pick(content, &[field.as_str()])
        }
        Intercepted::Profile { remove: true, .. } | Intercepted::DeleteAlias { .. } => {
            Value::Object(Map::new())
        }
        Intercepted::Deactivate => pick(content, &["auth", "erase", "id_server"]),
    })
}

/// `content`'s `fields` that are present.
fn pick(content: &Value, fields: &[&str]) -> Value {
    Value::Object(
        fields
            .iter()
            .filter_map(|f| content.get(*f).map(|v| ((*f).to_string(), v.clone())))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn homeserver() -> Homeserver {
        // Never reached by these cases (no alias, explicit room versions).
        Homeserver::new("http://127.0.0.1:9", std::time::Duration::from_secs(1)).expect("client")
    }

    fn membership(action: MembershipAction) -> Intercepted {
        Intercepted::Membership {
            room_id: "!r:l".into(),
            action,
            txn_id: None,
        }
    }

    async fn forward(
        endpoint: &Intercepted,
        content: Value,
        query: &[(&str, &str)],
    ) -> Result<Forwarded, RequestError> {
        let query: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        forwarded(&homeserver(), endpoint, &content, &query, "t").await
    }

    #[tokio::test]
    async fn a_membership_change_keeps_only_what_was_decided() {
        let out = forward(
            &membership(MembershipAction::Kick),
            json!({"user_id": "@b:l", "reason": "spam", "org.matrix.msc4293.redact_events": true}),
            &[],
        )
        .await
        .expect("forwarded");
        assert_eq!(out.body, json!({"user_id": "@b:l", "reason": "spam"}));
        let invite = forward(
            &membership(MembershipAction::Invite),
            json!({"user_id": "@ok:l", "medium": "email", "address": "v@x", "id_server": "is.example", "id_access_token": "t"}),
            &[],
        )
        .await;
        assert!(
            matches!(invite, Err(RequestError::Undecidable(_))),
            "a user_id beside 3PID fields is still a third-party invite to Synapse"
        );
        assert!(matches!(
            forward(&membership(MembershipAction::Ban), json!({}), &[]).await,
            Err(RequestError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn the_query_keeps_what_the_endpoint_takes_and_refuses_delays() {
        let send = Intercepted::Send {
            room_id: "!r:l".into(),
            event_type: "m.room.message".into(),
            txn_id: Some("1".into()),
        };
        let out = forward(
            &send,
            json!({"body": "hi"}),
            &[
                ("user_id", "@as:l"),
                ("ts", "5"),
                ("via", "evil"),
                ("x", "y"),
            ],
        )
        .await
        .expect("forwarded");
        assert_eq!(
            out.query,
            [
                ("user_id".to_string(), "@as:l".to_string()),
                ("ts".into(), "5".into())
            ]
        );
        assert_eq!(out.body, json!({"body": "hi"}));
        assert!(matches!(
            forward(&send, json!({}), &[(DELAY, "60000")]).await,
            Err(RequestError::Undecidable(_))
        ));
        let join = Intercepted::Join {
            room: "!r:l".into(),
            txn_id: None,
        };
        let out = forward(
            &join,
            json!({"reason": "hi", "displayname": "spoof"}),
            &[("via", "l")],
        )
        .await
        .expect("forwarded");
        assert_eq!(out.query, [("via".to_string(), "l".to_string())]);
        assert_eq!(out.body, json!({"reason": "hi"}));
    }

    #[tokio::test]
    async fn create_room_is_forwarded_with_its_decided_preset_and_version() {
        let create = Intercepted::CreateRoom { txn_id: None };
        let out = forward(
            &create,
            json!({"room_version": "11", "name": "n", "org.example.unknown": 1,
                   "initial_state": [{"type": "m.room.topic", "content": {"topic": "t"}}]}),
            &[],
        )
        .await
        .expect("forwarded");
        assert_eq!(
            out.body,
            json!({"room_version": "11", "name": "n", "visibility": "private", "preset": "private_chat",
                   "initial_state": [{"type": "m.room.topic", "state_key": "", "content": {"topic": "t"}}]})
        );
        let third_party = json!({"room_version": "11", "invite_3pid": [{"id_server": "is.example",
            "id_access_token": "t", "medium": "email", "address": "a@b"}]});
        assert!(
            matches!(
                forward(&create, third_party, &[]).await,
                Err(RequestError::Undecidable(_))
            ),
            "refused, not dropped"
        );
        for bad in [
            json!({"room_version": "11", "visibility": "shared"}),
            json!({"room_version": "11", "visibility": "Public"}),
            json!({"room_version": "11", "initial_state": [{"type": "m.room.topic", "state_key": 5, "content": {}}]}),
        ] {
            assert!(
                matches!(
                    forward(&create, bad.clone(), &[]).await,
                    Err(RequestError::Invalid(_))
                ),
                "{bad}"
            );
        }
    }
}

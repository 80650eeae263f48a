//! The policy inputs of an intercepted request: one per event or membership change the
//! request would make (`kind: matrix_event | membership`), as the room will record it.

use serde_json::{json, Value};

use super::route::{Intercepted, MembershipAction};
use crate::matrix::Homeserver;
use crate::policy::input::{
    Context, Input, MatrixEvent, MatrixEventInput, Membership, MembershipInput,
};

/// Who sent the request: the user its access token acts as, the token and, for an
/// appservice, the user it masquerades as (to look up room members as that user).
pub struct Caller<'a> {
    /// The user the request acts as.
    pub sender: &'a str,
    /// Its access token.
    pub token: &'a str,
    /// The `user_id` an appservice masquerades as.
    pub user_id: Option<&'a str>,
}

/// One PDP input per thing the request to `endpoint` with body `content` would do at the
/// node `node`; room members are looked up in `homeserver` as the caller.
pub async fn inputs_for(
    homeserver: &Homeserver,
    node: &str,
    endpoint: &Intercepted,
    content: &Value,
    caller: &Caller<'_>,
) -> Vec<Input<'static>> {
    let sender = caller.sender;
    let context = Context::now(node);
    let event = |room_id: &str, event_type: &str, state_key: Option<&str>, content: &Value| {
        Input::MatrixEvent(MatrixEventInput {
            matrix: MatrixEvent {
                room_id: room_id.to_string(),
                event_type: event_type.to_string(),
                sender: sender.to_string(),
                content: content.clone(),
                state_key: state_key.map(str::to_string),
            },
            context: context.clone(),
        })
    };
    let membership = |room_id: &str, membership: &str, target: &str, members: Vec<String>| {
        Input::Membership(MembershipInput {
            matrix: Membership::new(room_id, sender, membership, target, members),
            context: context.clone(),
        })
    };
    match endpoint {
        Intercepted::Send {
            room_id,
            event_type,
            ..
        } => vec![event(room_id, event_type, None, content)],
        Intercepted::State {
            room_id,
            event_type,
            state_key,
        } => {
            let mut inputs = vec![event(room_id, event_type, Some(state_key), content)];
            if event_type == "m.room.member" {
                if let Some(change) = content.get("membership").and_then(Value::as_str) {
                    let members = homeserver
                        .joined_members(room_id, caller.token, caller.user_id)
                        .await;
                    inputs.push(membership(room_id, change, state_key, members));
                }
            }
            inputs
        }
        Intercepted::Redact {
            room_id, event_id, ..
        } => {
            let mut content = content.clone();
            content["redacts"] = json!(event_id);
            vec![event(room_id, "m.room.redaction", None, &content)]
        }
        Intercepted::Membership {
            room_id, action, ..
        } => {
            let target = content.get("user_id").and_then(Value::as_str).unwrap_or("");
            // As the membership the room will record: a kick and an unban make the target
            // `leave`; policies tell a kick from a leave by sender != target.
            let (change, target) = match action {
                MembershipAction::Invite => ("invite", target),
                MembershipAction::Join => ("join", sender),
                MembershipAction::Leave => ("leave", sender),
                MembershipAction::Kick | MembershipAction::Unban => ("leave", target),
                MembershipAction::Ban => ("ban", target),
            };
            let members = match action {
                MembershipAction::Join | MembershipAction::Leave => Vec::new(),
                _ => {
                    homeserver
                        .joined_members(room_id, caller.token, caller.user_id)
                        .await
                }
            };
            vec![membership(room_id, change, target, members)]
        }
        Intercepted::Join { room, .. } => vec![membership(room, "join", sender, Vec::new())],
        Intercepted::Knock { room } => vec![membership(room, "knock", sender, Vec::new())],
        // Decided once as the member event it becomes in each of the user's rooms (room "").
        Intercepted::Profile { user_id, .. } => {
            vec![event("", "m.room.member", Some(user_id), content)]
        }
        // Refused before inputs are built (see `decide`).
        Intercepted::Unsupported { .. } => Vec::new(),
        Intercepted::CreateRoom => {
            let creator = vec![sender.to_string()];
            let mut derived = vec![membership("", "join", sender, Vec::new())];
            for (field, event_type, key) in [
                ("name", "m.room.name", "name"),
                ("topic", "m.room.topic", "topic"),
            ] {
                if let Some(value) = content.get(field) {
                    derived.push(event("", event_type, Some(""), &json!({ key: value })));
                }
            }
            let mut inputs: Vec<Input> = content
                .get("initial_state")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|ev| {
                    let event_type = ev.get("type").and_then(Value::as_str).unwrap_or("");
                    let key = ev.get("state_key").and_then(Value::as_str).unwrap_or("");
                    event(
                        "",
                        event_type,
                        Some(key),
                        ev.get("content").unwrap_or(&Value::Null),
                    )
                })
                .collect();
            inputs.extend(
                content
                    .get("invite")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(|invitee| membership("", "invite", invitee, creator.clone())),
            );
            derived.extend(inputs);
            derived
        }
        Intercepted::SendToDevice { event_type, .. } => vec![event("", event_type, None, content)],
    }
}

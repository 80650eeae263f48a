//! The policy inputs of an intercepted request: one per event or membership change the
//! request would make (`kind: matrix_event | membership`), as the room will record it — for
//! `createRoom` every event of the new room (`create_room`), a membership change also for an
//! `m.room.member` event in `initial_state`; for a profile change the member event it becomes
//! in each of the caller's rooms; for an alias deletion the canonical alias event it updates;
//! for a deactivation the account leaving each of its rooms. Inputs are made from the request
//! as it is forwarded (`canonical`), so what is decided is what the homeserver executes.

use serde_json::{json, Value};

use super::create_room::new_room;
use super::error::RequestError;
use super::route::{Intercepted, MembershipAction};
use crate::matrix::Homeserver;
use crate::policy::input::{
    Context, Input, MatrixEvent, MatrixEventInput, Membership, MembershipInput,
};

/// Profile fields the homeserver copies into the member event of every room the user is in.
const PROPAGATED: [&str; 2] = ["displayname", "avatar_url"];

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

/// One PDP input per thing the request to `endpoint` with body `content` (as forwarded)
/// would do at the node `node` (the homeserver's server name); room members, rooms, room
/// versions and aliases are looked up in `homeserver` as the caller.
///
/// # Errors
/// A request whose events cannot be decided (`invite_3pid`), malformed fields, or a
/// homeserver that cannot answer what is needed.
pub async fn inputs_for(
    homeserver: &Homeserver,
    node: &str,
    endpoint: &Intercepted,
    content: &Value,
    caller: &Caller<'_>,
) -> Result<Vec<Input<'static>>, RequestError> {
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
                door: Default::default(),
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
    Ok(match endpoint {
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
            if let Some(change) = member_change(event_type, content) {
                let members = homeserver
                    .joined_members(room_id, caller.token, caller.user_id)
                    .await;
                inputs.push(membership(room_id, change, state_key, members));
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
            // Third-party invites and missing targets were refused by `canonical`.
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
        // Decided as a whole (room "") and as the member event it becomes in each of the
        // user's rooms (a removed field is `null`), as the homeserver will send them.
        Intercepted::Profile {
            user_id,
            field,
            remove,
        } => {
            let change = match remove {
                true => json!({ field.as_str(): Value::Null }),
                false => content.clone(),
            };
            let mut inputs = vec![event("", "m.room.member", Some(user_id), &change)];
            if PROPAGATED.contains(&field.as_str()) {
                let mut joined = change.clone();
                joined["membership"] = json!("join");
                // The user is joined already: the events change no membership.
                for room in homeserver
                    .joined_rooms(caller.token, caller.user_id)
                    .await?
                {
                    inputs.push(event(&room, "m.room.member", Some(user_id), &joined));
                }
            }
            inputs
        }
        // The account leaves every room it is in.
        Intercepted::Deactivate => {
            let mut inputs = vec![membership("", "leave", sender, Vec::new())];
            for room in homeserver
                .joined_rooms(caller.token, caller.user_id)
                .await?
            {
                inputs.push(membership(&room, "leave", sender, Vec::new()));
            }
            inputs
        }
        Intercepted::DeleteAlias { alias } => {
            let (room_id, canonical) = canonical_alias_after(homeserver, alias, caller).await?;
            vec![event(
                &room_id,
                "m.room.canonical_alias",
                Some(""),
                &canonical,
            )]
        }
        Intercepted::CreateRoom { .. } => {
            let version = match content.get("room_version").and_then(Value::as_str) {
                Some(version) => version.to_string(),
                None => homeserver.default_room_version(caller.token).await?,
            };
            let room = new_room(content, sender, node, &version)?;
            let creator = vec![sender.to_string()];
            let mut events = room.events.into_iter();
            let mut inputs = Vec::new();
            // The create event, then the creator's join, then the rest in Synapse's order.
            if let Some(create) = events.next() {
                inputs.push(event("", &create.event_type, Some(""), &create.content));
            }
            inputs.push(membership("", "join", sender, Vec::new()));
            for e in events {
                inputs.push(event("", &e.event_type, Some(&e.state_key), &e.content));
                if let Some(change) = member_change(&e.event_type, &e.content) {
                    inputs.push(membership("", change, &e.state_key, creator.clone()));
                }
            }
            inputs.extend(
                room.invites
                    .iter()
                    .map(|invitee| membership("", "invite", invitee, creator.clone())),
            );
            inputs
        }
        Intercepted::SendToDevice { event_type, .. } => vec![event("", event_type, None, content)],
    })
}

/// The room `alias` names and its `m.room.canonical_alias` content once the alias is
/// removed from it, as the caller can see them (`""` and `{}` when the alias names no room:
/// the homeserver will refuse the deletion anyway).
async fn canonical_alias_after(
    homeserver: &Homeserver,
    alias: &str,
    caller: &Caller<'_>,
) -> Result<(String, Value), RequestError> {
    let Some((room_id, _)) = homeserver.resolve_alias(alias, caller.token).await? else {
        return Ok((String::new(), json!({})));
    };
    let path = crate::matrix::with_user_id(
        format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.canonical_alias/",
            crate::matrix::encode(&room_id)
        ),
        caller.user_id,
    );
    let (status, mut canonical) = homeserver
        .request_json(axum::http::Method::GET, &path, caller.token, None)
        .await?;
    if status != 200 || !canonical.is_object() {
        canonical = json!({});
    }
    if canonical.get("alias").and_then(Value::as_str) == Some(alias) {
        if let Some(object) = canonical.as_object_mut() {
            object.remove("alias");
        }
    }
    if let Some(alt) = canonical
        .get_mut("alt_aliases")
        .and_then(Value::as_array_mut)
    {
        alt.retain(|a| a.as_str() != Some(alias));
    }
    Ok((room_id, canonical))
}

/// The membership an `m.room.member` event with `content` makes, for any other event `None`.
fn member_change<'a>(event_type: &str, content: &'a Value) -> Option<&'a str> {
    (event_type == "m.room.member")
        .then(|| content.get("membership").and_then(Value::as_str))
        .flatten()
}

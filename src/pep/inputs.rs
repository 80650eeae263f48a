//! The policy inputs of an intercepted request: one per event or membership change the
//! request would make (`kind: matrix_event | membership`), as the room will record it — for
//! `createRoom` every event of the new room (`create_room`), for an alias deletion the
//! canonical alias event it updates, for a deactivation the account leaving its rooms.

use serde_json::{json, Value};

use super::create_room::{new_room, CreateRoomError};
use super::route::{Intercepted, MembershipAction};
use crate::matrix::{Homeserver, HomeserverError};
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

/// Why a request's inputs cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum InputsError {
    /// It would create events no input can describe beforehand (403).
    #[error("{0}")]
    Undecidable(String),
    /// A field the homeserver would refuse anyway (400).
    #[error("{0}")]
    Invalid(String),
    /// The homeserver cannot tell what the request needs (its room version, an alias).
    #[error(transparent)]
    Homeserver(#[from] HomeserverError),
}

impl From<CreateRoomError> for InputsError {
    fn from(error: CreateRoomError) -> Self {
        match error {
            CreateRoomError::Undecidable(why) => Self::Undecidable(why),
            CreateRoomError::Invalid(why) => Self::Invalid(why),
        }
    }
}

/// One PDP input per thing the request to `endpoint` with body `content` would do at the
/// node `node` (the homeserver's server name); room members, room versions and aliases are
/// looked up in `homeserver` as the caller.
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
) -> Result<Vec<Input<'static>>, InputsError> {
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
            if *action == MembershipAction::Invite && content.get("user_id").is_none() {
                return Err(InputsError::Undecidable(
                    "third-party invites are not supported through msgnode: their event depends on the identity server's answer".into(),
                ));
            }
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
        // Decided once as the member event it becomes in each of the user's rooms (room "");
        // a removed field is `null`.
        Intercepted::Profile {
            user_id,
            field,
            remove,
        } => {
            let change = match remove {
                true => json!({ field.as_str(): Value::Null }),
                false => content.clone(),
            };
            vec![event("", "m.room.member", Some(user_id), &change)]
        }
        // The account leaves every room it is in.
        Intercepted::Deactivate => vec![membership("", "leave", sender, Vec::new())],
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
            let version = homeserver.default_room_version(caller.token).await?;
            let room = new_room(content, sender, node, &version)?;
            let creator = vec![sender.to_string()];
            let mut events = room.events.into_iter();
            let mut inputs = Vec::new();
            // The create event, then the creator's join, then the rest in Synapse's order.
            if let Some(create) = events.next() {
                inputs.push(event("", &create.event_type, Some(""), &create.content));
            }
            inputs.push(membership("", "join", sender, Vec::new()));
            inputs.extend(events.map(|e| event("", &e.event_type, Some(&e.state_key), &e.content)));
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
) -> Result<(String, Value), InputsError> {
    let path = format!(
        "/_matrix/client/v3/directory/room/{}",
        crate::matrix::encode(alias)
    );
    let (status, answer) = homeserver
        .request_json(axum::http::Method::GET, &path, caller.token, None)
        .await?;
    let Some(room_id) = answer
        .get("room_id")
        .and_then(Value::as_str)
        .filter(|_| status == 200)
    else {
        return Ok((String::new(), json!({})));
    };
    let path = crate::matrix::with_user_id(
        format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.canonical_alias/",
            crate::matrix::encode(room_id)
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
    Ok((room_id.to_string(), canonical))
}

//! Acting as the appservice's users: msgnode's own writes to the homeserver.
//! (One concern: the file is past 600 lines only with its tests.)
//!
//! Owns the client-server calls the node makes on its own behalf with the `as_token`
//! (masquerading with `user_id=`): lazily registering namespace users, creating or resolving
//! aliased rooms, joining, sending events, writing and reading room state and paging room
//! history. The bus's persistence (`persist::journal`, `persist::inbox`, `persist::store`) is
//! built on it; nothing here knows about reTHINK.
//!
//! Every call is bounded by [`REQUEST_TIMEOUT`]; an unreachable or silent homeserver is
//! [`ActorError::Unavailable`], an answer other than 2xx is [`ActorError::Refused`] with the
//! homeserver's `errcode`. Callers decide whether to retry (sends are idempotent by
//! transaction id, state writes by nature).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::Method;
use serde_json::{json, Value};

use super::client::{encode, Homeserver};
use super::hash16;

/// Longest a single homeserver request may take before it counts as unavailable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Localpart prefix of the virtual users msgnode creates (the registration's namespace).
const USER_PREFIX: &str = "_msgnode_";

/// Why a homeserver call failed.
#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    /// The homeserver could not be reached or did not answer in time.
    #[error("homeserver unavailable")]
    Unavailable,
    /// The homeserver answered with an error.
    #[error("homeserver refused ({status}): {errcode}: {error}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Matrix `errcode` (`M_UNKNOWN` when the body had none).
        errcode: String,
        /// Matrix `error` text.
        error: String,
    },
    /// The homeserver answered 2xx with a body lacking what the call needs.
    #[error("unexpected homeserver answer: {0}")]
    Malformed(String),
    /// The user is not in the appservice's exclusive namespace, so msgnode cannot act as it.
    #[error("{0} is not in msgnode's user namespace")]
    NotOurs(String),
}

impl ActorError {
    /// The Matrix `errcode` when the homeserver refused.
    pub fn errcode(&self) -> Option<&str> {
        match self {
            Self::Refused { errcode, .. } => Some(errcode),
            _ => None,
        }
    }

    /// Whether a retry may succeed without anything changing on our side.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unavailable => true,
            Self::Refused {
                status, errcode, ..
            } => *status >= 500 || *status == 429 || errcode == "M_LIMIT_EXCEEDED",
            _ => false,
        }
    }
}

/// The appservice acting on the homeserver as itself and its namespace users.
pub struct Actor {
    homeserver: Arc<Homeserver>,
    as_token: String,
    server_name: String,
    sender: String,
    users: regex::RegexSet,
    /// Users known to exist (registered by us or found taken).
    registered: Mutex<HashSet<String>>,
    /// Resolved room aliases (full alias → room id).
    rooms: Mutex<HashMap<String, String>>,
}

impl Actor {
    /// An actor for the appservice `registration` on the homeserver named `server_name`.
    ///
    /// # Errors
    /// A namespace regex of the registration does not compile.
    pub fn new(
        registration: &ruma::api::appservice::Registration,
        server_name: &str,
        homeserver: Arc<Homeserver>,
    ) -> anyhow::Result<Self> {
        let users = super::registration::user_namespace(registration)?;
        let sender = format!("@{}:{}", registration.sender_localpart, server_name);
        Ok(Self {
            homeserver,
            as_token: registration.as_token.clone(),
            server_name: server_name.to_string(),
            sender,
            users,
            registered: Mutex::new(HashSet::new()),
            rooms: Mutex::new(HashMap::new()),
        })
    }

    /// The homeserver's server name (the part after `:` in ids).
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// The appservice's own user, `@<sender_localpart>:<server>`.
    pub fn sender(&self) -> &str {
        &self.sender
    }

    /// Whether `user_id` is in the appservice's user namespace.
    pub fn owns_user(&self, user_id: &str) -> bool {
        self.users.is_match(user_id)
    }

    /// The virtual user standing for `key` of `kind` (e.g. `rt` for a runtime URL, `addr`
    /// for an address): `@_msgnode_<kind>.<first 16 hex digits of sha256(key)>:<server>`.
    /// Deterministic, so every node and every restart agrees on it. `kind` is lowercased and
    /// stripped of characters a localpart may not hold.
    pub fn virtual_user(&self, kind: &str, key: &str) -> String {
        let kind: String = kind
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-=/".contains(*c))
            .collect();
        format!("@{USER_PREFIX}{kind}.{}:{}", hash16(key), self.server_name)
    }

    /// Makes sure `user_id` exists: registers it as an appservice user
    /// (`m.login.application_service`); a name already taken counts as done. Remembered, so
    /// later calls cost nothing. The appservice's own user always exists.
    ///
    /// # Errors
    /// The user is outside the namespace, or the homeserver refused or is unavailable.
    pub async fn ensure_user(&self, user_id: &str) -> Result<(), ActorError> {
        if user_id == self.sender || self.lock_registered().contains(user_id) {
            return Ok(());
        }
        if !self.owns_user(user_id) {
            return Err(ActorError::NotOurs(user_id.to_string()));
        }
        let localpart = user_id
            .strip_prefix('@')
            .and_then(|rest| rest.split(':').next())
            .unwrap_or_default();
        let body = json!({"type": "m.login.application_service", "username": localpart});
        match self
            .call(
                Method::POST,
                "/_matrix/client/v3/register",
                &[],
                Some(&body),
            )
            .await
        {
            Ok(_) => {}
            Err(e) if e.errcode() == Some("M_USER_IN_USE") => {}
            Err(e) => return Err(e),
        }
        tracing::debug!(user = %user_id, "appservice user registered");
        self.lock_registered().insert(user_id.to_string());
        Ok(())
    }

    /// The room with alias `#<alias_localpart>:<server>`: resolved, or else created (private,
    /// with that alias and `name`) by `creator`. Losing a creation race to another node
    /// (`M_ROOM_IN_USE`) resolves the alias again. Resolved ids are remembered.
    ///
    /// # Errors
    /// The homeserver refused or is unavailable.
    pub async fn ensure_room(
        &self,
        alias_localpart: &str,
        creator: &str,
        name: &str,
    ) -> Result<String, ActorError> {
        let alias = format!("#{alias_localpart}:{}", self.server_name);
        if let Some(room) = self.lock_rooms().get(&alias) {
            return Ok(room.clone());
        }
        let room_id = match self.resolve_alias(&alias).await? {
            Some(room_id) => room_id,
            None => {
                self.ensure_user(creator).await?;
                let body = json!({
                    "preset": "private_chat",
                    "visibility": "private",
                    "room_alias_name": alias_localpart,
                    "name": name,
                });
                match self
                    .call(
                        Method::POST,
                        "/_matrix/client/v3/createRoom",
                        &[("user_id", creator)],
                        Some(&body),
                    )
                    .await
                {
                    Ok(answer) => {
                        let room_id = string_field(&answer, "room_id")?;
                        tracing::info!(%alias, %room_id, "room created");
                        room_id
                    }
                    Err(e) if e.errcode() == Some("M_ROOM_IN_USE") => {
                        self.resolve_alias(&alias).await?.ok_or_else(|| {
                            ActorError::Malformed(format!("{alias} is in use but does not resolve"))
                        })?
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        self.lock_rooms().insert(alias, room_id.clone());
        Ok(room_id)
    }

    /// The room `#<alias_localpart>:<server>` names, if it exists (never created here).
    ///
    /// # Errors
    /// The homeserver refused or is unavailable.
    pub async fn find_room(&self, alias_localpart: &str) -> Result<Option<String>, ActorError> {
        let alias = format!("#{alias_localpart}:{}", self.server_name);
        if let Some(room) = self.lock_rooms().get(&alias) {
            return Ok(Some(room.clone()));
        }
        self.resolve_alias(&alias).await
    }

    /// The room `alias` names, `None` when it names none.
    ///
    /// # Errors
    /// The homeserver refused or is unavailable.
    pub async fn resolve_alias(&self, alias: &str) -> Result<Option<String>, ActorError> {
        let path = format!("/_matrix/client/v3/directory/room/{}", encode(alias));
        match self.call(Method::GET, &path, &[], None).await {
            Ok(answer) => Ok(Some(string_field(&answer, "room_id")?)),
            Err(ActorError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Joins `user_id` to `room_id` (registering the user if needed). A private room the
    /// user is not invited to is joined after an invitation by the appservice's own user
    /// (which created msgnode's rooms).
    ///
    /// # Errors
    /// The homeserver refused or is unavailable.
    pub async fn join(&self, user_id: &str, room_id: &str) -> Result<(), ActorError> {
        self.ensure_user(user_id).await?;
        let path = format!("/_matrix/client/v3/rooms/{}/join", encode(room_id));
        let query = [("user_id", user_id)];
        match self
            .call(Method::POST, &path, &query, Some(&json!({})))
            .await
        {
            Ok(_) => Ok(()),
            Err(ActorError::Refused { status: 403, .. }) if user_id != self.sender => {
                // Already invited (or joined meanwhile): the join below tells.
                self.invite(&self.sender, room_id, user_id).await?;
                self.call(Method::POST, &path, &query, Some(&json!({})))
                    .await
                    .map(drop)
            }
            Err(e) => Err(e),
        }
    }

    /// The rooms the appservice's own user is joined to.
    ///
    /// # Errors
    /// The homeserver refused or is unavailable.
    pub async fn joined_rooms(&self) -> Result<Vec<String>, ActorError> {
        let answer = self
            .call(Method::GET, "/_matrix/client/v3/joined_rooms", &[], None)
            .await?;
        Ok(answer["joined_rooms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect())
    }

    /// The users joined to `room_id`, as the appservice's own user sees them.
    ///
    /// # Errors
    /// The homeserver refused (e.g. the user is not in the room) or is unavailable.
    pub async fn joined_members(&self, room_id: &str) -> Result<Vec<String>, ActorError> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/joined_members",
            encode(room_id)
        );
        let answer = self.call(Method::GET, &path, &[], None).await?;
        let joined = answer
            .get("joined")
            .and_then(Value::as_object)
            .ok_or_else(|| ActorError::Malformed("joined_members gave no \"joined\"".into()))?;
        Ok(joined.keys().cloned().collect())
    }

    /// `by` withdraws the invitation of `user_id` to `room_id` (a kick of an invited user).
    ///
    /// # Errors
    /// The homeserver refused or is unavailable.
    pub async fn withdraw_invite(
        &self,
        by: &str,
        room_id: &str,
        user_id: &str,
    ) -> Result<(), ActorError> {
        let kick = format!("/_matrix/client/v3/rooms/{}/kick", encode(room_id));
        self.call(
            Method::POST,
            &kick,
            &[("user_id", by)],
            Some(&json!({"user_id": user_id, "reason": "invitation not answered; inviting again"})),
        )
        .await
        .map(drop)
    }

    /// `inviter` invites `user_id` (of any server) to `room_id`; a user already invited or
    /// joined counts as done.
    ///
    /// # Errors
    /// The homeserver refused otherwise or is unavailable.
    pub async fn invite(
        &self,
        inviter: &str,
        room_id: &str,
        user_id: &str,
    ) -> Result<(), ActorError> {
        let invite = format!("/_matrix/client/v3/rooms/{}/invite", encode(room_id));
        match self
            .call(
                Method::POST,
                &invite,
                &[("user_id", inviter)],
                Some(&json!({"user_id": user_id})),
            )
            .await
        {
            Ok(_) | Err(ActorError::Refused { status: 403, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Sends one event as `user_id`; its event id. Idempotent by `txn_id` (the homeserver
    /// answers a repeated transaction with the first event's id).
    ///
    /// # Errors
    /// The homeserver refused or is unavailable.
    pub async fn send_event(
        &self,
        user_id: &str,
        room_id: &str,
        event_type: &str,
        txn_id: &str,
        content: &Value,
    ) -> Result<String, ActorError> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/{}/{}",
            encode(room_id),
            encode(event_type),
            encode(txn_id)
        );
        let answer = self
            .call(Method::PUT, &path, &[("user_id", user_id)], Some(content))
            .await?;
        string_field(&answer, "event_id")
    }

    /// Writes the state event (`event_type`, `state_key`) as `user_id`; its event id.
    ///
    /// # Errors
    /// The homeserver refused or is unavailable.
    pub async fn put_state(
        &self,
        user_id: &str,
        room_id: &str,
        event_type: &str,
        state_key: &str,
        content: &Value,
    ) -> Result<String, ActorError> {
        let path = state_path(room_id, event_type, state_key);
        let answer = self
            .call(Method::PUT, &path, &[("user_id", user_id)], Some(content))
            .await?;
        string_field(&answer, "event_id")
    }

    /// The content of one state event, `None` when there is none.
    ///
    /// # Errors
    /// The homeserver refused (other than "not found") or is unavailable.
    pub async fn state_event(
        &self,
        user_id: &str,
        room_id: &str,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<Value>, ActorError> {
        let path = state_path(room_id, event_type, state_key);
        match self
            .call(Method::GET, &path, &[("user_id", user_id)], None)
            .await
        {
            Ok(content) => Ok(Some(content)),
            Err(ActorError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The room's current state events (full events, as `GET /state` gives them).
    ///
    /// # Errors
    /// The homeserver refused or is unavailable.
    pub async fn room_state(&self, user_id: &str, room_id: &str) -> Result<Vec<Value>, ActorError> {
        let path = format!("/_matrix/client/v3/rooms/{}/state", encode(room_id));
        match self
            .call(Method::GET, &path, &[("user_id", user_id)], None)
            .await?
        {
            Value::Array(events) => Ok(events),
            other => Err(ActorError::Malformed(format!(
                "GET /state gave {}",
                kind_of(&other)
            ))),
        }
    }

    /// One page of the room's timeline (`/messages`): its events and the token of the next
    /// page (`None` at the end). `from: None` starts at the newest event when going
    /// `backwards`, else at the room's beginning.
    ///
    /// # Errors
    /// The homeserver refused or is unavailable.
    pub async fn messages(
        &self,
        user_id: &str,
        room_id: &str,
        from: Option<&str>,
        backwards: bool,
        limit: u32,
    ) -> Result<(Vec<Value>, Option<String>), ActorError> {
        self.messages_filtered(user_id, room_id, from, backwards, limit, None)
            .await
    }

    /// [`Actor::messages`] with a room event filter (e.g. `{"types": [...]}`).
    ///
    /// # Errors
    /// The homeserver refused or is unavailable.
    pub async fn messages_filtered(
        &self,
        user_id: &str,
        room_id: &str,
        from: Option<&str>,
        backwards: bool,
        limit: u32,
        filter: Option<&Value>,
    ) -> Result<(Vec<Value>, Option<String>), ActorError> {
        let path = format!("/_matrix/client/v3/rooms/{}/messages", encode(room_id));
        let limit = limit.to_string();
        let filter = filter.map(Value::to_string);
        let mut query = vec![
            ("user_id", user_id),
            ("dir", if backwards { "b" } else { "f" }),
            ("limit", limit.as_str()),
        ];
        if let Some(from) = from {
            query.push(("from", from));
        }
        if let Some(filter) = &filter {
            query.push(("filter", filter.as_str()));
        }
        let mut answer = self.call(Method::GET, &path, &query, None).await?;
        let chunk = match answer.get_mut("chunk").map(Value::take) {
            Some(Value::Array(events)) => events,
            _ => return Err(ActorError::Malformed("/messages gave no chunk".to_string())),
        };
        let end = answer
            .get("end")
            .and_then(Value::as_str)
            .map(str::to_string);
        // No token ends the timeline; so does an empty page that would not move on.
        let end = end.filter(|end| !chunk.is_empty() || Some(end.as_str()) != from);
        Ok((chunk, end))
    }

    /// One `/sync` as `user_id` (a virtual user: Synapse does not let the appservice's own
    /// user sync) with `filter` (a JSON filter definition), waiting up to `timeout` for
    /// something new after `since` (`None`: the first sync). `timeout` must stay well under
    /// [`REQUEST_TIMEOUT`].
    ///
    /// # Errors
    /// The homeserver refused or is unavailable.
    pub async fn sync(
        &self,
        user_id: &str,
        since: Option<&str>,
        filter: &Value,
        timeout: Duration,
    ) -> Result<Value, ActorError> {
        let filter = filter.to_string();
        let timeout = timeout.as_millis().to_string();
        let mut query = vec![
            ("user_id", user_id),
            ("filter", filter.as_str()),
            ("timeout", timeout.as_str()),
        ];
        if let Some(since) = since {
            query.push(("since", since));
        }
        self.call(Method::GET, "/_matrix/client/v3/sync", &query, None)
            .await
    }

    /// One request as the appservice: the JSON answer of a 2xx, else the error.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Value, ActorError> {
        let mut path_and_query = path.to_string();
        for (i, (name, value)) in query.iter().enumerate() {
            path_and_query.push(if i == 0 { '?' } else { '&' });
            path_and_query.push_str(name);
            path_and_query.push('=');
            path_and_query.push_str(&encode(value));
        }
        let request =
            self.homeserver
                .request_json(method.clone(), &path_and_query, &self.as_token, body);
        let (status, answer) = match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => return Err(ActorError::Unavailable),
            Err(_) => {
                tracing::warn!(%method, %path, "homeserver did not answer in time");
                return Err(ActorError::Unavailable);
            }
        };
        if (200..300).contains(&status) {
            return Ok(answer);
        }
        let errcode = answer
            .get("errcode")
            .and_then(Value::as_str)
            .unwrap_or("M_UNKNOWN")
            .to_string();
        let error = answer
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or_else(|| {
                axum::http::StatusCode::from_u16(status)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("")
            })
            .to_string();
        Err(ActorError::Refused {
            status,
            errcode,
            error,
        })
    }

    fn lock_registered(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.registered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_rooms(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.rooms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn state_path(room_id: &str, event_type: &str, state_key: &str) -> String {
    format!(
        "/_matrix/client/v3/rooms/{}/state/{}/{}",
        encode(room_id),
        encode(event_type),
        encode(state_key)
    )
}

fn string_field(answer: &Value, field: &str) -> Result<String, ActorError> {
    answer
        .get(field)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| ActorError::Malformed(format!("answer without {field}")))
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::registration::{generate, RegistrationSpec};

    fn actor() -> Actor {
        let registration = generate(&RegistrationSpec::default());
        let homeserver =
            Arc::new(Homeserver::new("http://127.0.0.1:9", Duration::from_secs(1)).expect("hs"));
        Actor::new(&registration, "localhost", homeserver).expect("actor")
    }

    #[test]
    fn virtual_users_are_deterministic_and_in_the_namespace() {
        let actor = actor();
        let user = actor.virtual_user("rt", "hyperty-runtime://example.com/1");
        assert_eq!(
            user,
            actor.virtual_user("rt", "hyperty-runtime://example.com/1")
        );
        assert_ne!(
            user,
            actor.virtual_user("rt", "hyperty-runtime://example.com/2")
        );
        assert!(user.starts_with("@_msgnode_rt."), "{user}");
        assert!(user.ends_with(":localhost"), "{user}");
        assert_eq!(user.len(), "@_msgnode_rt.".len() + 16 + ":localhost".len());
        assert!(actor.owns_user(&user));
        assert_eq!(
            actor.virtual_user("A d!r", "x"),
            format!("@_msgnode_adr.{}:localhost", hash16("x"))
        );
        assert_eq!(actor.sender(), "@_msgnode:localhost");
        assert!(!actor.owns_user("@alice:localhost"));
    }

    #[tokio::test]
    async fn users_outside_the_namespace_are_refused_and_unreachable_is_unavailable() {
        let actor = actor();
        let err = actor
            .ensure_user("@alice:localhost")
            .await
            .expect_err("not ours");
        assert!(matches!(err, ActorError::NotOurs(_)), "{err}");
        // The appservice's own user needs no registration.
        actor
            .ensure_user("@_msgnode:localhost")
            .await
            .expect("sender");
        let err = actor
            .ensure_user(&actor.virtual_user("rt", "x"))
            .await
            .expect_err("nothing listens on port 9");
        assert!(matches!(err, ActorError::Unavailable), "{err}");
        assert!(err.is_transient());
    }
}

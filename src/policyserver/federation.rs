//! The federation surface a policy server needs besides `/sign`: its key server, the
//! discovery document clients use to fill in `m.room.policy`, its version, accepting
//! invitations of its user, and acknowledging the transactions homeservers send it once it
//! is in a room. Anything else is 404 `M_UNRECOGNIZED`.
//!
//! Routes: `GET /_matrix/key/v2/server`, `GET /.well-known/matrix/policy_server`,
//! `GET /_matrix/federation/v1/version`, `PUT /_matrix/federation/v2/invite/{roomId}/{eventId}`,
//! `PUT /_matrix/federation/v1/send/{txnId}`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::extract::{Path, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use ruma::api::client::discovery::discover_policy_server;
use ruma::api::federation::discovery::{ServerSigningKeys, VerifyKey};
use ruma::api::federation::membership::create_invite;
use ruma::api::federation::transactions::send_transaction_message;
use ruma::api::{IncomingRequestExt, OutgoingResponseExt};
use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::serde::Base64;
use ruma::{MilliSecondsSinceUnixEpoch, OwnedServerSigningKeyId, UInt};

use super::error::PolicyServerError;
use super::PolicyServer;

/// How long homeservers may keep the federation key without asking again.
const KEY_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// A ruma response as HTTP (`Content-Type: application/json`).
pub fn respond(response: impl OutgoingResponseExt) -> Response {
    match response.try_into_http_response::<Vec<u8>>() {
        Ok(response) => response.map(axum::body::Body::from).into_response(),
        Err(e) => PolicyServerError::Internal(e.to_string()).into_response(),
    }
}

/// `GET /_matrix/key/v2/server`: the federation key, self-signed. (The policy key is not
/// published here: MSC4284.)
pub async fn keys_route(State(server): State<PolicyServer>) -> Response {
    server.inner.metrics.federation("keys", "ok");
    match server.key_document() {
        Ok(object) => axum::Json(object).into_response(),
        Err(error) => error.into_response(),
    }
}

/// `GET /.well-known/matrix/policy_server`: the policy key, for clients writing
/// `m.room.policy` (any origin may read it).
pub async fn well_known_route(State(server): State<PolicyServer>) -> Response {
    server.inner.metrics.federation("well_known", "ok");
    let key = Base64::new(server.inner.keys.policy.public_key().to_vec());
    let mut response = respond(discover_policy_server::Response::new(key));
    response.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::HeaderValue::from_static("*"),
    );
    response
}

/// `GET /_matrix/federation/v1/version`.
pub async fn version_route() -> Response {
    axum::Json(
        serde_json::json!({"server": {"name": "msgnode", "version": env!("CARGO_PKG_VERSION")}}),
    )
    .into_response()
}

/// Every other path.
pub async fn unrecognized_route(State(server): State<PolicyServer>) -> Response {
    server.inner.metrics.federation("other", "unrecognized");
    PolicyServerError::Unrecognized.into_response()
}

/// `PUT /_matrix/federation/v2/invite/{roomId}/{eventId}`.
pub async fn invite_route(
    State(server): State<PolicyServer>,
    Path((room_id, event_id)): Path<(String, String)>,
    request: Request,
) -> Response {
    let answered = server.on_invite(&room_id, &event_id, request).await;
    server.inner.metrics.federation(
        "invite",
        answered.as_ref().map_or_else(|e| e.label(), |_| "ok"),
    );
    match answered {
        Ok(response) => response,
        Err(error) => {
            tracing::info!(%room_id, %error, "policy server: invitation refused");
            error.into_response()
        }
    }
}

/// `PUT /_matrix/federation/v1/send/{txnId}`: acknowledged (the policy server keeps no room
/// state; its own membership changes are logged).
pub async fn send_route(
    State(server): State<PolicyServer>,
    Path(txn_id): Path<String>,
    request: Request,
) -> Response {
    let answered = server.on_send(&txn_id, request).await;
    server.inner.metrics.federation(
        "send",
        answered.as_ref().map_or_else(|e| e.label(), |_| "ok"),
    );
    answered.unwrap_or_else(IntoResponse::into_response)
}

impl PolicyServer {
    /// The signed key server document.
    ///
    /// # Errors
    /// The key id or the document cannot be made (a bug).
    pub fn key_document(&self) -> Result<CanonicalJsonObject, PolicyServerError> {
        let internal = |e: String| PolicyServerError::Internal(e);
        let keys = &self.inner.keys;
        let valid_until = crate::clock::now_ms() + KEY_VALIDITY.as_millis() as u64;
        let mut document = ServerSigningKeys::new(
            self.inner.name.clone(),
            MilliSecondsSinceUnixEpoch(UInt::new_saturating(valid_until)),
        );
        let key_id = OwnedServerSigningKeyId::try_from(keys.federation_key_id())
            .map_err(|e| internal(e.to_string()))?;
        document.verify_keys.insert(
            key_id,
            VerifyKey::new(Base64::new(keys.federation.public_key().to_vec())),
        );
        let CanonicalJsonValue::Object(mut object) =
            ruma::canonical_json::to_canonical_value(&document)
                .map_err(|e| internal(e.to_string()))?
        else {
            return Err(internal("key document is not an object".to_string()));
        };
        ruma::signatures::sign_json(self.inner.name.as_str(), &keys.federation, &mut object)
            .map_err(|e| internal(e.to_string()))?;
        Ok(object)
    }

    async fn on_invite(
        &self,
        room_id: &str,
        event_id: &str,
        request: Request,
    ) -> Result<Response, PolicyServerError> {
        let (parts, body) = request.into_parts();
        let signed = Request::from_parts(parts.clone(), body);
        let authenticated = self.authenticate(signed).await?;
        let origin = authenticated.origin;
        if origin != self.inner.homeserver {
            return Err(PolicyServerError::Forbidden(format!(
                "the policy server accepts invitations from {} only",
                self.inner.homeserver
            )));
        }
        let http = axum::http::Request::from_parts(parts, authenticated.body.as_ref());
        let invite = create_invite::v2::Request::try_from_http_request(http, &[room_id, event_id])
            .map_err(|e| PolicyServerError::BadJson(format!("not an invitation: {e}")))?;
        let rules = invite.room_version.rules().ok_or_else(|| {
            PolicyServerError::BadJson(format!("unsupported room version {}", invite.room_version))
        })?;
        let mut event: CanonicalJsonObject = serde_json::from_str(invite.event.get())
            .map_err(|e| PolicyServerError::BadJson(format!("the invite event: {e}")))?;
        let field = |name: &str| {
            event
                .get(name)
                .and_then(CanonicalJsonValue::as_str)
                .map(str::to_string)
        };
        let membership = event
            .get("content")
            .and_then(CanonicalJsonValue::as_object)
            .and_then(|c| c.get("membership"))
            .and_then(CanonicalJsonValue::as_str);
        let is_our_invite = field("type").as_deref() == Some("m.room.member")
            && field("state_key").as_deref() == Some(self.inner.user_id.as_str())
            && membership == Some("invite")
            && field("room_id").as_deref() == Some(invite.room_id.as_str());
        if !is_our_invite {
            return Err(PolicyServerError::BadJson(
                "not an invitation of the policy server's user to this room".to_string(),
            ));
        }
        let sender = field("sender").unwrap_or_default();
        if sender.rsplit_once(':').is_none()
            || ruma::UserId::parse(&sender)
                .map(|u| u.server_name() != origin)
                .unwrap_or(true)
        {
            return Err(PolicyServerError::Forbidden(
                "the inviter is not of the origin server".to_string(),
            ));
        }
        let computed = ruma::signatures::reference_hash(&event, &rules)
            .map(|hash| format!("${hash}"))
            .map_err(|e| PolicyServerError::BadJson(e.to_string()))?;
        if computed != invite.event_id.as_str() {
            return Err(PolicyServerError::BadJson(format!(
                "event id {} is not the event's ({computed})",
                invite.event_id
            )));
        }
        self.verify_origin_signatures(&event, &rules)
            .await
            .map_err(|e| PolicyServerError::Forbidden(e.to_string()))?;
        ruma::signatures::sign_event(
            self.inner.name.as_str(),
            &self.inner.keys.federation,
            &mut event,
            &rules.redaction,
        )
        .map_err(|e| PolicyServerError::Internal(e.to_string()))?;
        self.inner
            .rooms
            .note(invite.room_id.as_str(), invite.room_version.clone());
        self.inner.invited.insert(invite.room_id.to_string(), ());
        tracing::info!(room = %invite.room_id, %sender, "policy server invited; accepted");
        let raw = serde_json::value::to_raw_value(&event)
            .map_err(|e| PolicyServerError::Internal(e.to_string()))?;
        Ok(respond(create_invite::v2::Response::new(raw)))
    }

    async fn on_send(&self, txn_id: &str, request: Request) -> Result<Response, PolicyServerError> {
        let start = Instant::now();
        let (parts, body) = request.into_parts();
        let signed = Request::from_parts(parts.clone(), body);
        let authenticated = self.authenticate(signed).await?;
        let http = axum::http::Request::from_parts(parts, authenticated.body.as_ref());
        let transaction =
            send_transaction_message::v1::Request::try_from_http_request(http, &[txn_id])
                .map_err(|e| PolicyServerError::BadJson(format!("not a transaction: {e}")))?;
        for pdu in &transaction.pdus {
            let Ok(event) = serde_json::from_str::<serde_json::Value>(pdu.get()) else {
                continue;
            };
            if event["type"] == "m.room.member" && event["state_key"] == self.inner.user_id.as_str()
            {
                let membership = event["content"]["membership"].as_str().unwrap_or("");
                if membership != "join" && membership != "invite" {
                    tracing::warn!(room = %event["room_id"], %membership, "policy server's user left the room: it no longer protects it");
                }
            }
        }
        tracing::debug!(origin = %authenticated.origin, %txn_id, pdus = transaction.pdus.len(),
            edus = transaction.edus.len(), took = ?start.elapsed(), "policy server: transaction acknowledged");
        Ok(respond(send_transaction_message::v1::Response::new(
            BTreeMap::new(),
        )))
    }
}

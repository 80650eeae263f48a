//! `POST /_matrix/policy/v1/sign` (and Synapse's fallback,
//! `/_matrix/policy/unstable/org.matrix.msc4284/sign`): a homeserver asks whether to accept
//! an event, sending the whole PDU.
//!
//! In order: the `X-Matrix` signature of the asking server; the PDU as canonical JSON
//! (`M_NOT_JSON`, `M_BAD_JSON`); its room's version (404 `M_NOT_FOUND` for a room the
//! homeserver does not know); its content hash; then, unless this event id was answered
//! already under the same policy revision, the signature of its sender's server (and of the
//! `join_authorised_via_users_server`'s, as the room version requires) — so only an intact
//! event is judged — and the decision: `kind: matrix_event` (plus `kind: membership` for a
//! member event, as the proxy decides a member state event, with the room's joined members
//! for an invite, ban or kick, read as the node's appservice user), with `matrix.via =
//! "policy_server"`, `matrix.origin` and `matrix.event_id`. Every input allowed → 200
//! `{"<server name>": {"ed25519:policy_server": <signature over the redacted event>}}`;
//! otherwise 400 `M_FORBIDDEN` with the reasons.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use ruma::api::federation::policy::sign_event;
use ruma::api::OutgoingResponseExt;
use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::room_version_rules::RoomVersionRules;
use ruma::serde::Base64;
use ruma::signatures::Verified;
use serde_json::Value;

use super::error::PolicyServerError;
use super::keys::POLICY_KEY_VERSION;
use super::PolicyServer;
use crate::policy::input::{
    Context, Door, Input, MatrixEvent, MatrixEventInput, Membership, MembershipInput, Via,
};
use crate::policy::{refusal, EnforcementPoint};

/// The memberships the input contract names (others are decided as the event only).
const MEMBERSHIPS: [&str; 5] = ["invite", "join", "leave", "ban", "knock"];

/// What the policy server answered about one event (kept by event id).
#[derive(Debug, Clone)]
pub enum Answer {
    /// Allowed: the policy key's signature.
    Signed(String),
    /// Refused, with the reasons.
    Refused(String),
}

/// The route.
pub async fn sign_route(State(server): State<PolicyServer>, request: Request) -> Response {
    let start = Instant::now();
    let (outcome, response) = match server.on_sign(request).await {
        Ok((answer, cached)) => {
            let outcome = match (&answer, cached) {
                (_, true) => "cached",
                (Answer::Signed(_), false) => "allowed",
                (Answer::Refused(_), false) => "denied",
            };
            (outcome, server.answer_response(answer))
        }
        Err(error) => {
            tracing::debug!(%error, "policy server: sign request not served");
            (error.label(), error.into_response())
        }
    };
    server.inner.metrics.signed(outcome, start.elapsed());
    response
}

impl PolicyServer {
    /// The answer about the event `request` carries, and whether it came from the cache.
    async fn on_sign(&self, request: Request) -> Result<(Answer, bool), PolicyServerError> {
        let request = self.authenticate(request).await?;
        let pdu = parse_pdu(&request.body)?;
        let event = EventFields::of(&pdu)?;
        let version = self
            .inner
            .rooms
            .version(event.room_id, &pdu)
            .await
            .ok_or_else(|| {
                PolicyServerError::NotFound(format!("unknown room {}", event.room_id))
            })?;
        let rules = version.rules().ok_or_else(|| {
            PolicyServerError::BadJson(format!("unsupported room version {version}"))
        })?;
        check_content_hash(&pdu)?;
        let event_id = ruma::signatures::reference_hash(&pdu, &rules)
            .map(|hash| format!("${hash}"))
            .map_err(|e| PolicyServerError::BadJson(format!("not an event: {e}")))?;
        let key = (event_id.clone(), self.generation());
        if let Some(answer) = self.inner.answers.get(&key) {
            return Ok((answer, true));
        }
        self.verify_origin_signatures(&pdu, &rules).await?;
        let mut refused = Vec::new();
        let mut failed = false;
        let members = match needs_members(&event) {
            false => Vec::new(),
            true => match self.room_members(event.room_id).await {
                Ok(members) => members,
                Err(e) => {
                    // Undecidable: refused, and not remembered (asked again next time).
                    failed = true;
                    refused.push(format!("cannot read the room's members: {e}"));
                    Vec::new()
                }
            },
        };
        let inputs = match refused.is_empty() {
            true => inputs(
                &event,
                &event_id,
                request.origin.as_str(),
                &self.inner.node,
                members,
            ),
            false => Vec::new(),
        };
        for input in &inputs {
            let decision = self
                .inner
                .decider
                .decide(input, EnforcementPoint::PolicyServer)
                .await;
            if !decision.allow {
                failed |= decision.failed;
                refused.push(refusal(&decision));
            }
        }
        let answer = match refused.is_empty() {
            true => Answer::Signed(self.policy_signature(&pdu, &rules)?),
            false => Answer::Refused(refused.join("; ")),
        };
        tracing::debug!(%event_id, origin = %request.origin, room = %event.room_id, event_type = %event.event_type,
            allowed = matches!(answer, Answer::Signed(_)), "policy server decided");
        if !failed {
            self.inner.answers.insert(key, answer.clone());
        }
        Ok((answer, false))
    }

    /// The users joined to `room_id` now — the state the event is judged against, as the
    /// node's appservice user (a member of every room it protects) sees it.
    async fn room_members(&self, room_id: &str) -> Result<Vec<String>, crate::matrix::ActorError> {
        match &self.inner.actor {
            Some(actor) => actor.joined_members(room_id).await,
            None => Err(crate::matrix::ActorError::Malformed(
                "no appservice user to read them with".into(),
            )),
        }
    }

    fn answer_response(&self, answer: Answer) -> Response {
        match answer {
            Answer::Refused(reasons) => PolicyServerError::Refused(reasons).into_response(),
            Answer::Signed(signature) => {
                match sign_event::v1::Response::new(self.inner.name.clone(), signature)
                    .try_into_http_response::<Vec<u8>>()
                {
                    Ok(response) => response.map(axum::body::Body::from).into_response(),
                    Err(e) => PolicyServerError::Internal(e.to_string()).into_response(),
                }
            }
        }
    }

    /// The policy revision answers are valid for (0 with a remote PDP: then only the cache's
    /// time to live bounds them).
    fn generation(&self) -> u64 {
        match &self.inner.decider {
            crate::policy::Decider::Local(pdp) => pdp.active().map_or(0, |a| a.generation),
            crate::policy::Decider::Remote(_) => 0,
        }
    }

    /// Checks the signatures the room version requires on `pdu` (its sender's server, …)
    /// and its content hash.
    ///
    /// # Errors
    /// 400 `M_FORBIDDEN` (the caller of an invitation maps it to 403): a signature missing
    /// or not verifying, keys that cannot be fetched, a content hash that differs.
    pub(super) async fn verify_origin_signatures(
        &self,
        pdu: &CanonicalJsonObject,
        rules: &RoomVersionRules,
    ) -> Result<(), PolicyServerError> {
        let refused = |why: String| PolicyServerError::Refused(why);
        let servers =
            ruma::signatures::required_server_signatures_to_verify_event(pdu, &rules.signatures)
                .map_err(|e| refused(format!("event signatures: {e}")))?;
        let keys = self
            .inner
            .keyring
            .key_map(
                &servers
                    .iter()
                    .map(|s| (s.as_str(), None))
                    .collect::<Vec<_>>(),
            )
            .await
            .map_err(|e| refused(format!("cannot check the event's signatures: {e}")))?;
        match ruma::signatures::verify_event(&keys, pdu, rules) {
            Ok(Verified::All) => Ok(()),
            Ok(Verified::Signatures) => Err(refused("content hash does not match".to_string())),
            Err(e) => Err(refused(format!("event signature does not verify: {e}"))),
        }
    }

    /// The policy key's signature over the redacted `pdu`.
    fn policy_signature(
        &self,
        pdu: &CanonicalJsonObject,
        rules: &RoomVersionRules,
    ) -> Result<String, PolicyServerError> {
        let mut signed = pdu.clone();
        let name = self.inner.name.as_str();
        ruma::signatures::sign_event(name, &self.inner.keys.policy, &mut signed, &rules.redaction)
            .map_err(|e| PolicyServerError::Internal(format!("cannot sign: {e}")))?;
        signed
            .get("signatures")
            .and_then(CanonicalJsonValue::as_object)
            .and_then(|s| s.get(name))
            .and_then(CanonicalJsonValue::as_object)
            .and_then(|s| s.get(&format!("ed25519:{POLICY_KEY_VERSION}")))
            .and_then(CanonicalJsonValue::as_str)
            .map(str::to_string)
            .ok_or_else(|| {
                PolicyServerError::Internal("signature missing after signing".to_string())
            })
    }
}

/// `body` as a canonical JSON object.
///
/// # Errors
/// `M_NOT_JSON` when it is not JSON, `M_BAD_JSON` when it is not an object or not canonical
/// (floats, integers beyond ±2⁵³).
pub fn parse_pdu(body: &[u8]) -> Result<CanonicalJsonObject, PolicyServerError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| PolicyServerError::NotJson(format!("body is not JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(PolicyServerError::BadJson(
            "the PDU must be a JSON object".to_string(),
        ));
    };
    ruma::canonical_json::try_from_json_map(map)
        .map_err(|e| PolicyServerError::BadJson(format!("the PDU is not canonical JSON: {e}")))
}

/// What the policy reads of an event.
pub struct EventFields<'a> {
    /// `room_id`.
    pub room_id: &'a str,
    /// `type`.
    pub event_type: &'a str,
    /// `sender`.
    pub sender: &'a str,
    /// `state_key`, for state events.
    pub state_key: Option<&'a str>,
    /// `content`.
    pub content: &'a CanonicalJsonObject,
}

impl<'a> EventFields<'a> {
    /// The fields of `pdu`.
    ///
    /// # Errors
    /// `M_BAD_JSON` when one is missing or of the wrong type, or an id is malformed.
    pub fn of(pdu: &'a CanonicalJsonObject) -> Result<Self, PolicyServerError> {
        let string = |field: &str| {
            pdu.get(field)
                .and_then(CanonicalJsonValue::as_str)
                .ok_or_else(|| PolicyServerError::BadJson(format!("the PDU has no string {field}")))
        };
        let room_id = string("room_id")?;
        let sender = string("sender")?;
        ruma::RoomId::parse(room_id)
            .map_err(|e| PolicyServerError::BadJson(format!("room_id: {e}")))?;
        ruma::UserId::parse(sender)
            .map_err(|e| PolicyServerError::BadJson(format!("sender: {e}")))?;
        let state_key = match pdu.get("state_key") {
            None => None,
            Some(CanonicalJsonValue::String(key)) => Some(key.as_str()),
            Some(_) => {
                return Err(PolicyServerError::BadJson(
                    "state_key must be a string".to_string(),
                ))
            }
        };
        Ok(Self {
            room_id,
            event_type: string("type")?,
            sender,
            state_key,
            content: pdu
                .get("content")
                .and_then(CanonicalJsonValue::as_object)
                .ok_or_else(|| {
                    PolicyServerError::BadJson("the PDU has no content object".to_string())
                })?,
        })
    }
}

/// The event's `hashes.sha256` is the hash of its content.
///
/// # Errors
/// `M_BAD_JSON` without a hash (or over the size limit); 400 `M_FORBIDDEN` when it differs.
pub fn check_content_hash(pdu: &CanonicalJsonObject) -> Result<(), PolicyServerError> {
    let claimed = pdu
        .get("hashes")
        .and_then(CanonicalJsonValue::as_object)
        .and_then(|h| h.get("sha256"))
        .and_then(CanonicalJsonValue::as_str)
        .ok_or_else(|| PolicyServerError::BadJson("the PDU has no hashes.sha256".to_string()))?;
    let actual = ruma::signatures::content_hash(pdu)
        .map_err(|e| PolicyServerError::BadJson(format!("cannot hash the PDU: {e}")))?;
    match Base64::<ruma::serde::base64::Standard>::parse(claimed) {
        Ok(claimed) if claimed.as_bytes() == actual.as_bytes() => Ok(()),
        _ => Err(PolicyServerError::Refused(
            "content hash does not match the event".to_string(),
        )),
    }
}

/// Whether deciding `event` needs the room's members: an invite, a ban or a kick (the
/// shipped policy asks whether the sender is a member), as the proxy looks them up.
fn needs_members(event: &EventFields<'_>) -> bool {
    let membership = event
        .content
        .get("membership")
        .and_then(CanonicalJsonValue::as_str);
    event.event_type == "m.room.member"
        && match membership {
            Some("invite" | "ban") => true,
            Some("leave") => event.state_key != Some(event.sender),
            _ => false,
        }
}

/// The policy inputs of `event` (id `event_id`), asked about by `origin`, at node `node`;
/// `members`, the room's joined members, for a membership change that needs them.
pub fn inputs(
    event: &EventFields<'_>,
    event_id: &str,
    origin: &str,
    node: &str,
    members: Vec<String>,
) -> Vec<Input<'static>> {
    let door = Door {
        via: Some(Via::PolicyServer),
        origin: Some(origin.to_string()),
        event_id: Some(event_id.to_string()),
    };
    let context = Context::now(node);
    let content = serde_json::to_value(event.content).unwrap_or(Value::Null);
    let mut inputs = vec![Input::MatrixEvent(MatrixEventInput {
        matrix: MatrixEvent {
            room_id: event.room_id.to_string(),
            event_type: event.event_type.to_string(),
            sender: event.sender.to_string(),
            content,
            state_key: event.state_key.map(str::to_string),
            door: door.clone(),
        },
        context: context.clone(),
    })];
    let membership = event
        .content
        .get("membership")
        .and_then(CanonicalJsonValue::as_str)
        .filter(|m| MEMBERSHIPS.contains(m));
    if let (Some(target), Some(membership), "m.room.member") =
        (event.state_key, membership, event.event_type)
    {
        inputs.push(Input::Membership(MembershipInput {
            matrix: Membership {
                door,
                ..Membership::new(event.room_id, event.sender, membership, target, members)
            },
            context,
        }));
    }
    inputs
}

//! The policy server's `/sign` endpoint at the wire (TLS on loopback, no homeserver): a
//! stand-in origin server's signed requests and events, and every way a request can be
//! forged or broken — each answered with a Matrix error, never signed.

use std::path::Path;
use std::time::Duration;

use msgnode::policyserver::testing::{Loopback, Origin};
use serde_json::{json, Value};

/// A room version 12 room id (no server part).
const ROOM: &str = "!4UsW2lhkAbCdEfGh";
const ORIGIN: &str = "localhost";

struct Wire {
    loopback: Loopback,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn wire() -> Wire {
    let dir = tempfile::tempdir().expect("tempdir");
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let loopback = Loopback::start(&policies, &dir.path().join("ps"), ORIGIN, ROOM, |config| {
        config.server_name = "localhost:18448".to_string();
        config.max_body_bytes = 256 * 1024;
    })
    .await
    .expect("start");
    Wire {
        loopback,
        http: reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client"),
        _dir: dir,
    }
}

impl Wire {
    fn message(&self, body: &str) -> Value {
        let event = self
            .loopback
            .origin
            .event(
                json!({"room_id": ROOM, "sender": "@alice:localhost", "type": "m.room.message",
                          "content": {"msgtype": "m.text", "body": body}}),
            )
            .expect("event");
        serde_json::to_value(event).expect("json")
    }

    /// Posts `body` signed by `signer` (default: the origin) for `destination`.
    async fn post_signed(&self, signer: &Origin, destination: &str, body: &[u8]) -> (u16, Value) {
        let request = signer
            .sign_request(&self.loopback.base, destination, body)
            .expect("request");
        self.send(request).await
    }

    async fn post(&self, body: &Value) -> (u16, Value) {
        let body = serde_json::to_vec(body).expect("json");
        self.post_signed(
            &self.loopback.origin,
            self.loopback.server.server_name(),
            &body,
        )
        .await
    }

    async fn send(&self, request: axum::http::Request<Vec<u8>>) -> (u16, Value) {
        let request = reqwest::Request::try_from(request).expect("reqwest request");
        let response = self.http.execute(request).await.expect("send");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let text = response.text().await.expect("text");
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}: {text}"
        );
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

fn assert_error(answer: &(u16, Value), status: u16, errcode: &str, what: &str) {
    assert_eq!(answer.0, status, "{what}: {}", answer.1);
    assert_eq!(answer.1["errcode"], errcode, "{what}: {}", answer.1);
}

#[tokio::test]
async fn sign_answers_allowed_events_with_a_policy_signature_and_refuses_the_rest() {
    let wire = wire().await;
    let name = wire.loopback.server.server_name().to_string();

    // Allowed: the policy key's signature over the redacted event, as Synapse checks it.
    let event = wire.message("hello");
    let (status, answer) = wire.post(&event).await;
    assert_eq!(status, 200, "{answer}");
    let signature = answer[&name]["ed25519:policy_server"]
        .as_str()
        .expect("signature");
    let mut signed: ruma::CanonicalJsonObject = serde_json::from_value(event.clone()).expect("pdu");
    let mut with = signed
        .get("signatures")
        .cloned()
        .and_then(|s| s.as_object().cloned())
        .expect("sigs");
    with.insert(
        name.clone(),
        ruma::CanonicalJsonValue::Object(
            [(
                "ed25519:policy_server".to_string(),
                ruma::CanonicalJsonValue::String(signature.to_string()),
            )]
            .into(),
        ),
    );
    signed.insert(
        "signatures".to_string(),
        ruma::CanonicalJsonValue::Object(with),
    );
    let content: ruma::events::room::policy::RoomPolicyEventContent =
        serde_json::from_value(wire.loopback.server.policy_content()).expect("content");
    let rules = ruma::RoomVersionId::V12.rules().expect("rules");
    ruma::signatures::verify_policy_server_signature(&content, &signed, &rules)
        .expect("a valid policy signature");
    // The same event again: the same answer (from the cache).
    assert_eq!(wire.post(&event).await, (200, answer));

    // Denied by the policy: 400 M_FORBIDDEN with its reason.
    let denied = wire
        .loopback
        .origin
        .event(
            json!({"room_id": ROOM, "sender": "@alice:localhost", "type": "com.example.secret",
                      "content": {"x": 1}}),
        )
        .expect("event");
    let answer = wire
        .post(&serde_json::to_value(denied).expect("json"))
        .await;
    assert_error(&answer, 400, "M_FORBIDDEN", "denied type");
    assert!(
        answer.1["error"]
            .as_str()
            .unwrap_or("")
            .contains("is not allowed"),
        "{}",
        answer.1
    );

    // A member event is decided as the membership it records too.
    let blocked = wire
        .loopback
        .origin
        .event(
            json!({"room_id": ROOM, "sender": "@mallory:localhost", "type": "m.room.member",
                      "state_key": "@mallory:localhost", "content": {"membership": "join"}}),
        )
        .expect("event");
    let answer = wire
        .post(&serde_json::to_value(blocked).expect("json"))
        .await;
    assert_error(&answer, 400, "M_FORBIDDEN", "blocked user's join");
    assert!(
        answer.1["error"]
            .as_str()
            .unwrap_or("")
            .contains("is blocked"),
        "{}",
        answer.1
    );
}

#[tokio::test]
async fn forged_or_broken_requests_are_refused_never_signed() {
    let wire = wire().await;
    let name = wire.loopback.server.server_name().to_string();
    let event = wire.message("hello");
    let body = serde_json::to_vec(&event).expect("json");

    // No X-Matrix at all.
    let mut request = wire
        .loopback
        .origin
        .sign_request(&wire.loopback.base, &name, &body)
        .expect("request");
    request.headers_mut().remove("authorization");
    assert_error(
        &wire.send(request).await,
        401,
        "M_UNAUTHORIZED",
        "no X-Matrix",
    );

    // Signed by a key that is not the origin's (forged X-Matrix).
    let impostor = Origin::new(ORIGIN).expect("impostor");
    assert_error(
        &wire.post_signed(&impostor, &name, &body).await,
        401,
        "M_UNAUTHORIZED",
        "forged X-Matrix",
    );

    // Signed for another destination.
    assert_error(
        &wire
            .post_signed(&wire.loopback.origin, "other.example", &body)
            .await,
        401,
        "M_UNAUTHORIZED",
        "other destination",
    );

    // The body changed after signing the request.
    let mut request = wire
        .loopback
        .origin
        .sign_request(&wire.loopback.base, &name, &body)
        .expect("request");
    *request.body_mut() = serde_json::to_vec(&wire.message("changed")).expect("json");
    assert_error(
        &wire.send(request).await,
        401,
        "M_UNAUTHORIZED",
        "body changed",
    );

    // A server whose keys cannot be fetched.
    let unknown = Origin::new("127.0.0.1:9").expect("unknown");
    assert_error(
        &wire.post_signed(&unknown, &name, &body).await,
        401,
        "M_UNAUTHORIZED",
        "unknown origin",
    );

    // Content changed after the origin hashed and signed the event (bad content hash).
    let mut tampered = event.clone();
    tampered["content"]["body"] = json!("tampered");
    let answer = wire.post(&tampered).await;
    assert_error(&answer, 400, "M_FORBIDDEN", "bad content hash");
    assert!(
        answer.1["error"]
            .as_str()
            .unwrap_or("")
            .contains("content hash"),
        "{}",
        answer.1
    );

    // Hash recomputed, but the origin's signature is not over this event.
    let other = wire
        .loopback
        .origin
        .event(
            json!({"room_id": ROOM, "sender": "@alice:localhost", "type": "m.room.message",
                      "content": {"msgtype": "m.text", "body": "hello"}, "origin_server_ts": 5}),
        )
        .expect("event");
    let mut wrong_signature = serde_json::to_value(&other).expect("json");
    wrong_signature["signatures"] = event["signatures"].clone();
    let answer = wire.post(&wrong_signature).await;
    assert_error(&answer, 400, "M_FORBIDDEN", "wrong origin signature");
    assert!(
        answer.1["error"]
            .as_str()
            .unwrap_or("")
            .contains("signature"),
        "{}",
        answer.1
    );

    // An event signed by another key than the origin's (signatures of a stranger).
    let stranger_event = impostor
        .event(
            json!({"room_id": ROOM, "sender": "@alice:localhost", "type": "m.room.message",
                      "content": {"msgtype": "m.text", "body": "hi"}}),
        )
        .expect("event");
    let answer = wire
        .post(&serde_json::to_value(stranger_event).expect("json"))
        .await;
    assert_error(
        &answer,
        400,
        "M_FORBIDDEN",
        "event signed by a stranger's key",
    );

    // Not JSON, not an object, not canonical, missing fields, unknown room, too large.
    assert_error(
        &wire
            .post_signed(&wire.loopback.origin, &name, b"[1,2]")
            .await,
        400,
        "M_BAD_JSON",
        "an array",
    );
    let unsigned = |body: &[u8]| {
        axum::http::Request::builder()
            .method("POST")
            .uri(format!("{}/_matrix/policy/v1/sign", wire.loopback.base))
            .header(
                "authorization",
                "X-Matrix origin=localhost,key=\"ed25519:origin\",sig=\"AAAA\"",
            )
            .body(body.to_vec())
            .expect("request")
    };
    // (A float cannot be signed: the check comes before the signature's.)
    assert_error(
        &wire.send(unsigned(br#"{"room_id": 1.5}"#)).await,
        400,
        "M_BAD_JSON",
        "a float",
    );
    assert_error(
        &wire.send(unsigned(b"not json")).await,
        400,
        "M_NOT_JSON",
        "not JSON",
    );
    let mut no_sender = event.clone();
    no_sender.as_object_mut().expect("object").remove("sender");
    assert_error(&wire.post(&no_sender).await, 400, "M_BAD_JSON", "no sender");
    let mut elsewhere = wire.message("x");
    elsewhere["room_id"] = json!("!unknown");
    assert_error(
        &wire.post(&elsewhere).await,
        404,
        "M_NOT_FOUND",
        "unknown room",
    );
    let big = "x".repeat(300 * 1024);
    let mut large = event.clone();
    large["content"]["body"] = json!(big);
    assert_error(&wire.post(&large).await, 413, "M_TOO_LARGE", "too large");
    assert_error(
        &wire.send(unsigned(&body)).await,
        401,
        "M_UNAUTHORIZED",
        "a made-up signature",
    );

    // Unknown endpoints: M_UNRECOGNIZED (Synapse's cue to try the unstable path).
    let request = axum::http::Request::builder()
        .uri(format!(
            "{}/_matrix/federation/v1/nothing",
            wire.loopback.base
        ))
        .body(Vec::new())
        .expect("request");
    assert_error(
        &wire.send(request).await,
        404,
        "M_UNRECOGNIZED",
        "unknown endpoint",
    );
}

#[tokio::test]
async fn keys_and_discovery_are_published() {
    let wire = wire().await;
    let name = wire.loopback.server.server_name().to_string();
    let get = |path: &str| {
        axum::http::Request::builder()
            .uri(format!("{}{path}", wire.loopback.base))
            .body(Vec::new())
            .expect("request")
    };
    let (status, keys) = wire.send(get("/_matrix/key/v2/server")).await;
    assert_eq!(status, 200, "{keys}");
    let object: ruma::CanonicalJsonObject = serde_json::from_value(keys.clone()).expect("object");
    let verified =
        msgnode::policyserver::keyring::verified_keys(&name, object, msgnode::clock::now_ms())
            .expect("self-signed key document");
    assert_eq!(verified.len(), 1, "only the federation key: {keys}");
    assert!(!verified.contains_key("ed25519:policy_server"), "{keys}");
    let (status, discovery) = wire.send(get("/.well-known/matrix/policy_server")).await;
    assert_eq!(status, 200, "{discovery}");
    assert_eq!(
        discovery["public_keys"]["ed25519"],
        wire.loopback.server.policy_content()["public_keys"]["ed25519"]
    );
}

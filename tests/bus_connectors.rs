//! The bus's external connectors over real loopback HTTP, against tiny axum servers standing in
//! for the external services. A memory-only node; the stubs authenticate with Network Server
//! tokens (no Synapse).
//!
//! - `[bus.registry] url`: `create`/`read`/`update`/`delete` to `domain://registry.localhost`
//!   become `PUT`/`GET`/`PUT`/`DELETE` on the domain registry's REST API (user and address
//!   percent-encoded), and its status and JSON come back as `body.code`/`body.value`; a registry
//!   that is down is a 408; registering an address the runtime does not hold is a 403 that
//!   never reaches the registry.
//! - `[bus.idm] url`: an asserted `body.identity` is POSTed to the identity provider with the
//!   `idToken`; accepted → the message is delivered and `domain://idm.localhost` reports the
//!   identity; refused → 403, not delivered; down → 408; verifications are remembered per
//!   (user, identity, assertion) and per connection.
//! - The local validator (`[bus.idm] identities`): a Network Server principal has no Matrix
//!   user, so it may assert no identity at all; for Matrix users, listed identities pass.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::Json;
use common::stub::Stub;
use msgnode::cmd::run::{start, Running};
use msgnode::config::{Config, IdmConfig, NetworkServer};
use msgnode::connectors::idm::Idm;
use serde_json::{json, Value};

const ALICE: &str = "alice-token";
const BOB: &str = "bob-token";
const REGISTRY: &str = "domain://registry.localhost";
const IDM: &str = "domain://idm.localhost";
/// An identity of an identity provider the shipped policy trusts.
const ALICE_ID: &str = "user://idp.example/alice";

/// One request a fake service received.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    method: String,
    /// The path as sent (still percent-encoded).
    path: String,
    /// The JSON body (`null` when there was none).
    body: Value,
}

type Answer = dyn Fn(&Seen) -> (u16, Value) + Send + Sync;

#[derive(Clone)]
struct FakeState {
    seen: Arc<Mutex<Vec<Seen>>>,
    answer: Arc<Answer>,
}

/// A fake external service on 127.0.0.1: records every request and answers with `answer`.
struct Fake {
    /// Its base URL (`http://127.0.0.1:<port>`).
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Fake {
    async fn start(answer: impl Fn(&Seen) -> (u16, Value) + Send + Sync + 'static) -> Fake {
        let state = FakeState {
            seen: Arc::default(),
            answer: Arc::new(answer),
        };
        let seen = Arc::clone(&state.seen);
        let app = axum::Router::new().fallback(record).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake");
        let addr = listener.local_addr().expect("fake addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Fake {
            url: format!("http://{addr}"),
            seen,
        }
    }

    /// Everything received so far.
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The last request received.
    fn last(&self) -> Option<Seen> {
        self.seen().pop()
    }

    fn count(&self) -> usize {
        self.seen().len()
    }
}

async fn record(State(state): State<FakeState>, request: Request) -> (StatusCode, Json<Value>) {
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let bytes = axum::body::to_bytes(request.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let seen = Seen {
        method,
        path,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    };
    let (code, value) = (state.answer)(&seen);
    state
        .seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(seen);
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(value),
    )
}

/// A URL where nothing listens (the port was free a moment ago).
fn down_url() -> String {
    format!("http://127.0.0.1:{}", common::synapse::free_port())
}

/// A memory-only node of `localhost` with the Network Servers `alice` and `bob`.
async fn node(adjust: impl FnOnce(&mut Config)) -> (Running, SocketAddr) {
    let mut config = common::bus_config(&common::shipped_policies());
    config.bus.domain = Some("localhost".into());
    config.bus.network_servers = [("alice", ALICE), ("bob", BOB)]
        .into_iter()
        .map(|(name, token)| NetworkServer {
            name: name.into(),
            token: token.into(),
        })
        .collect();
    adjust(&mut config);
    let running = start(config).await.expect("start node");
    let addr = running.bus_addr.expect("bus address");
    (running, addr)
}

/// A connected runtime `runtime://localhost/<id>` holding one hyperty address.
async fn runtime(addr: SocketAddr, id: &str, token: &str) -> (Stub, String) {
    let mut stub = Stub::connect(addr, &format!("runtime://localhost/{id}"), token).await;
    let hyperty = stub.allocate("localhost", "hyperty", 1).await.remove(0);
    (stub, hyperty)
}

/// Percent-encodes every byte but ASCII letters and digits, as the registry connector does.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn code(v: &Value) -> u64 {
    v["body"]["code"].as_u64().unwrap_or(0)
}

fn description(v: &Value) -> &str {
    v["body"]["description"].as_str().unwrap_or("")
}

/// A registry message from `stub`'s runtime.
fn to_registry(stub: &Stub, kind: &str, body: Value) -> Value {
    json!({"type": kind, "from": format!("{}/registry", stub.runtime), "to": REGISTRY, "body": body})
}

async fn quiet(stub: &mut Stub) -> Option<Value> {
    stub.quiet_for(Duration::from_millis(300)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_messages_go_to_the_domain_registry() {
    let registry = Fake::start(|seen| match seen.method.as_str() {
        "PUT" => (200, json!({"stored": seen.body})),
        "GET" if seen.path.ends_with("missing") => (404, json!({"error": "no such hyperty"})),
        "GET" => (200, json!({"descriptor": "hyperty-catalogue://c/Chat"})),
        _ => (200, json!({"deleted": true})),
    })
    .await;
    let idp = Fake::start(|_| (200, json!({"identity": ALICE_ID}))).await;
    let base = format!("{}/api/", registry.url);
    let idp_url = format!("{}/verify", idp.url);
    let (running, addr) = node(|c| {
        c.bus.registry.url = Some(base);
        c.bus.idm.url = Some(idp_url);
    })
    .await;
    let (mut alice, hyperty) = runtime(addr, "alice-rt", ALICE).await;
    let object = alice.allocate("localhost", "comm", 1).await.remove(0);
    let hyperty_path = format!("/api/hyperty/user/{}/{}", enc(ALICE_ID), enc(&hyperty));

    // create (with a verified identity): PUT /hyperty/user/<identity>/<hyperty> with the value.
    let value = json!({
        "user": ALICE_ID, "url": hyperty, "descriptor": "hyperty-catalogue://c/Chat",
        "expires": 3600, "status": "live", "dataSchemes": ["comm"], "resources": ["chat"],
        "runtime": alice.runtime,
    });
    let created = alice
        .request(to_registry(
            &alice,
            "create",
            json!({"identity": ALICE_ID, "idToken": "alice-assertion", "value": value}),
        ))
        .await;
    assert_eq!(code(&created), 200, "{created}");
    assert_eq!(
        created["body"]["value"],
        json!({"stored": value}),
        "{created}"
    );
    assert_eq!(
        registry.last(),
        Some(Seen {
            method: "PUT".into(),
            path: hyperty_path.clone(),
            body: value.clone(),
        })
    );

    // A data object: PUT /hyperty/dataobject/<url>.
    let object_value = json!({"url": object, "schema": "hyperty-catalogue://c/Comm"});
    let stored = alice
        .request(to_registry(
            &alice,
            "create",
            json!({"value": object_value}),
        ))
        .await;
    assert_eq!(code(&stored), 200, "{stored}");
    assert_eq!(
        registry.last(),
        Some(Seen {
            method: "PUT".into(),
            path: format!("/api/hyperty/dataobject/{}", enc(&object)),
            body: object_value,
        })
    );

    // read: GET, and the registry's JSON is the response's value.
    let read = alice
        .request(to_registry(&alice, "read", json!({"resource": hyperty})))
        .await;
    assert_eq!(code(&read), 200, "{read}");
    assert_eq!(
        read["body"]["value"],
        json!({"descriptor": "hyperty-catalogue://c/Chat"})
    );
    let last = registry.last().expect("a request");
    assert_eq!(
        (last.method.as_str(), last.path.as_str()),
        ("GET", hyperty_path.as_str())
    );

    // Every entry of a user: GET /hyperty/user/<user>.
    let all = alice
        .request(to_registry(&alice, "read", json!({"resource": ALICE_ID})))
        .await;
    assert_eq!(code(&all), 200, "{all}");
    let last = registry.last().expect("a request");
    assert_eq!(
        (last.method.as_str(), last.path.clone()),
        ("GET", format!("/api/hyperty/user/{}", enc(ALICE_ID)))
    );

    // The registry's refusal comes back with its code and JSON.
    let missing = "hyperty://localhost/missing";
    let not_found = alice
        .request(to_registry(&alice, "read", json!({"resource": missing})))
        .await;
    assert_eq!(code(&not_found), 404, "{not_found}");
    assert_eq!(
        not_found["body"]["value"],
        json!({"error": "no such hyperty"})
    );
    assert_eq!(description(&not_found), "domain registry refused");
    assert_eq!(
        registry.last().map(|s| s.path),
        Some(format!(
            "/api/hyperty/user/{}/{}",
            enc(ALICE_ID),
            enc(missing)
        ))
    );

    // update: PUT on the entry's path.
    let updated = alice
        .request(to_registry(&alice, "update", json!({"resource": hyperty})))
        .await;
    assert_eq!(code(&updated), 200, "{updated}");
    let last = registry.last().expect("a request");
    assert_eq!(
        (last.method.as_str(), last.path.as_str()),
        ("PUT", hyperty_path.as_str())
    );

    // delete: DELETE on the entry's path.
    let deleted = alice
        .request(to_registry(&alice, "delete", json!({"resource": hyperty})))
        .await;
    assert_eq!(code(&deleted), 200, "{deleted}");
    assert_eq!(deleted["body"]["value"], json!({"deleted": true}));
    let last = registry.last().expect("a request");
    assert_eq!(
        (last.method.as_str(), last.path.as_str()),
        ("DELETE", hyperty_path.as_str())
    );

    // Registering an address this runtime does not hold never reaches the registry.
    let before = registry.count();
    let (_bob, bobs) = runtime(addr, "bob-rt", BOB).await;
    for url in [bobs.as_str(), "hyperty://localhost/nobody"] {
        let refused = alice
            .request(to_registry(
                &alice,
                "create",
                json!({"value": {"url": url}}),
            ))
            .await;
        assert_eq!(code(&refused), 403, "{refused}");
    }
    assert_eq!(registry.count(), before, "{:?}", registry.seen());
    assert_eq!(idp.count(), 1, "the identity was verified once");

    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_down_is_unavailable() {
    let (running, addr) = node(|c| c.bus.registry.url = Some(down_url())).await;
    let (mut alice, hyperty) = runtime(addr, "alice-rt", ALICE).await;
    for (kind, body) in [
        ("create", json!({"value": {"url": hyperty}})),
        ("read", json!({"resource": hyperty})),
    ] {
        let answer = alice.request(to_registry(&alice, kind, body)).await;
        assert_eq!(code(&answer), 408, "{kind}: {answer}");
        assert!(
            description(&answer).contains("domain registry unavailable"),
            "{kind}: {answer}"
        );
    }
    running.stop().await;
}

/// A message from `from` to `to` asserting `identity` with `assertion`.
fn asserting(from: &str, to: &str, identity: Value, assertion: &str) -> Value {
    json!({
        "type": "create", "from": from, "to": to,
        "body": {"identity": identity, "idToken": assertion, "value": {"hello": "there"}},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_provider_verifies_asserted_identities() {
    let idp = Fake::start(|seen| {
        let good = seen.body["assertion"]
            .as_str()
            .is_some_and(|a| a.starts_with("good"));
        if good {
            (200, json!({"identity": ALICE_ID}))
        } else {
            (403, json!({"error": "invalid assertion"}))
        }
    })
    .await;
    let idp_url = format!("{}/verify", idp.url);
    let (running, addr) = node(|c| c.bus.idm.url = Some(idp_url)).await;
    let (mut alice, ha) = runtime(addr, "alice-rt", ALICE).await;
    let (mut bob, hb) = runtime(addr, "bob-rt", BOB).await;

    // Accepted: the node asked the provider, and the message is delivered.
    let message = asserting(&ha, &hb, json!(ALICE_ID), "good-1");
    let id = alice.send(message.clone()).await;
    let got = bob.recv().await;
    assert_eq!(got["id"], id, "{got}");
    assert_eq!(got["body"], message["body"], "delivered unchanged: {got}");
    assert_eq!(
        idp.seen(),
        vec![Seen {
            method: "POST".into(),
            path: "/verify".into(),
            body: json!({"user": null, "identity": ALICE_ID, "assertion": "good-1"}),
        }]
    );
    let me = alice
        .request(json!({"type": "read", "from": ha, "to": IDM}))
        .await;
    assert_eq!(code(&me), 200, "{me}");
    assert_eq!(me["body"]["value"]["identity"], ALICE_ID, "{me}");

    // The connection keeps its verified identity: the same identity is not asked again,
    // whatever the assertion.
    alice
        .send(asserting(&ha, &hb, json!(ALICE_ID), "good-other"))
        .await;
    assert_eq!(bob.recv().await["from"], ha.as_str());
    assert_eq!(idp.count(), 1, "{:?}", idp.seen());

    // Refused by the provider: 403, nothing delivered.
    let refused = bob
        .request(asserting(&hb, &ha, json!(ALICE_ID), "stolen"))
        .await;
    assert_eq!(code(&refused), 403, "{refused}");
    assert!(description(&refused).contains(ALICE_ID), "{refused}");
    assert_eq!(
        quiet(&mut alice).await,
        None,
        "a refused message was delivered"
    );
    assert_eq!(idp.count(), 2);

    // Another assertion for the same identity is asked again (the `userProfile` form).
    let profile = json!({"userProfile": {"userURL": ALICE_ID, "username": "alice"}});
    bob.send(asserting(&hb, &ha, profile.clone(), "good-2"))
        .await;
    assert_eq!(alice.recv().await["from"], hb.as_str());
    assert_eq!(idp.count(), 3);
    assert_eq!(
        idp.last().map(|s| s.body),
        Some(json!({"user": null, "identity": ALICE_ID, "assertion": "good-2"}))
    );

    // The same (user, identity, assertion) on another connection is served from the cache.
    let (mut carol, hc) = runtime(addr, "carol-rt", ALICE).await;
    carol
        .send(asserting(&hc, &hb, json!(ALICE_ID), "good-1"))
        .await;
    assert_eq!(bob.recv().await["from"], hc.as_str());
    assert_eq!(idp.count(), 3, "{:?}", idp.seen());
    let carols = carol
        .request(json!({"type": "read", "from": hc, "to": IDM}))
        .await;
    assert_eq!(carols["body"]["value"]["identity"], ALICE_ID, "{carols}");

    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_provider_down_is_unavailable() {
    let (running, addr) = node(|c| c.bus.idm.url = Some(down_url())).await;
    let (mut alice, ha) = runtime(addr, "alice-rt", ALICE).await;
    let (mut bob, hb) = runtime(addr, "bob-rt", BOB).await;
    let answer = alice
        .request(asserting(&ha, &hb, json!(ALICE_ID), "good-1"))
        .await;
    assert_eq!(code(&answer), 408, "{answer}");
    assert!(
        description(&answer).contains("identity provider unavailable"),
        "{answer}"
    );
    assert_eq!(
        quiet(&mut bob).await,
        None,
        "delivered without a verified identity"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_validator_refuses_network_servers_any_identity() {
    // Listed under the Network Server's name and under a Matrix user: neither applies to a
    // Network Server connection, which has no Matrix user to check against.
    let (running, addr) = node(|c| {
        for key in ["alice", "@alice:localhost"] {
            c.bus
                .idm
                .identities
                .insert(key.into(), vec![ALICE_ID.into()]);
        }
    })
    .await;
    let (mut alice, ha) = runtime(addr, "alice-rt", ALICE).await;
    let (mut bob, hb) = runtime(addr, "bob-rt", BOB).await;
    for identity in [
        ALICE_ID,
        "user://localhost/alice",
        "user://idp.example/mallory",
    ] {
        let refused = alice
            .request(asserting(&ha, &hb, json!(identity), "any"))
            .await;
        assert_eq!(code(&refused), 403, "{identity}: {refused}");
        assert!(
            description(&refused).contains("is not verified for this connection"),
            "{refused}"
        );
    }
    assert_eq!(
        quiet(&mut bob).await,
        None,
        "a refused message was delivered"
    );
    // Without an asserted identity the same message goes through.
    alice
        .send(json!({"type": "create", "from": ha, "to": hb, "body": {}}))
        .await;
    assert_eq!(bob.recv().await["from"], ha.as_str());
    let me = alice
        .request(json!({"type": "read", "from": ha, "to": IDM}))
        .await;
    assert_eq!(me["body"]["value"], json!({"user": null, "identity": null}));
    running.stop().await;
}

#[tokio::test]
async fn local_validator_allows_listed_identities_of_matrix_users() {
    let mut config = IdmConfig::default();
    config
        .identities
        .insert("@alice:localhost".into(), vec![ALICE_ID.into()]);
    let idm = Idm::new(config, "localhost");
    let alice = Some("@alice:localhost");
    for allowed in [ALICE_ID, "user://localhost/alice"] {
        let verified = idm.verify(alice, allowed, None).await;
        assert_eq!(verified.ok().as_deref(), Some(allowed));
    }
    for (user, identity) in [
        (alice, "user://idp.example/mallory"),
        (alice, "user://localhost/bob"),
        (Some("@bob:localhost"), ALICE_ID),
    ] {
        let refused = idm.verify(user, identity, None).await.map_err(|e| e.code());
        assert_eq!(refused, Err(403), "{user:?} asserting {identity}");
    }
}

// Known defects (see the review report): each asserts the expected behaviour and fails today.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_user_entries_are_not_writable_by_anyone() {
    let registry = Fake::start(|_| (200, json!({}))).await;
    let base = registry.url.clone();
    let (running, addr) = node(|c| c.bus.registry.url = Some(base)).await;
    let (mut bob, _) = runtime(addr, "bob-rt", BOB).await;
    for (kind, body) in [
        ("delete", json!({"resource": ALICE_ID})),
        ("create", json!({"value": {"url": ALICE_ID}})),
        ("update", json!({"resource": ALICE_ID})),
    ] {
        let answer = bob.request(to_registry(&bob, kind, body)).await;
        assert_eq!(code(&answer), 403, "{kind}: {answer}");
    }
    assert_eq!(registry.seen(), vec![], "forwarded to the registry");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_update_does_not_replace_the_entry() {
    let registry = Fake::start(|_| (200, json!({}))).await;
    let base = registry.url.clone();
    let (running, addr) = node(|c| c.bus.registry.url = Some(base)).await;
    let (mut alice, hyperty) = runtime(addr, "alice-rt", ALICE).await;
    for body in [
        json!({"resource": hyperty}),
        json!({"resource": hyperty, "attribute": "status", "value": "disconnected"}),
    ] {
        let answer = alice.request(to_registry(&alice, "update", body)).await;
        assert_eq!(code(&answer), 200, "{answer}");
        let sent = registry.last().map(|s| s.body).unwrap_or(Value::Null);
        assert!(sent.is_object() && sent != json!({}), "PUT body {sent}");
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_provider_failing_is_unavailable() {
    let idp = Fake::start(|_| (503, json!({"error": "maintenance"}))).await;
    let idp_url = idp.url.clone();
    let (running, addr) = node(|c| c.bus.idm.url = Some(idp_url)).await;
    let (mut alice, ha) = runtime(addr, "alice-rt", ALICE).await;
    let (_bob, hb) = runtime(addr, "bob-rt", BOB).await;
    let answer = alice
        .request(asserting(&ha, &hb, json!(ALICE_ID), "good-1"))
        .await;
    assert_eq!(code(&answer), 408, "{answer}");
    running.stop().await;
}

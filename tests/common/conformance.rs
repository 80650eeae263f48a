//! What the reference reTHINK clients do to a Messaging Node, written from the reTHINK
//! specs and the behaviour of the reference stubs (Vert.x: an `open` message, the token
//! read from `body.runtimeToken`, a `close` the node answers by closing the socket; Matrix:
//! `?runtimeURL=` and nothing answered), as scenarios any node under test must pass. Each
//! opens a new socket for the same runtime URL right after the previous one said `close`,
//! sends from addresses under the stub's own `hyperty-runtime://D/protostub/…` URL (claimed
//! on first use), and expects no frame it did not ask for.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

use super::stub::{urlencode, Stub};

/// The node under test: its bus, the domain, and two principals' tokens.
#[derive(Clone)]
pub struct Node {
    pub addr: SocketAddr,
    pub domain: String,
    /// The principal every scenario connects as (the reference suite has one).
    pub token: String,
    /// Another principal.
    pub other: String,
}

/// How long a scenario listens for a frame it must not get.
pub const QUIET: Duration = Duration::from_millis(300);

fn code(v: &Value) -> u64 {
    v["body"]["code"].as_u64().unwrap_or(0)
}

impl Node {
    fn mn(&self) -> String {
        format!("domain://msg-node.{}", self.domain)
    }

    fn allocation(&self) -> String {
        format!("{}/address-allocation", self.mn())
    }

    fn sm(&self) -> String {
        format!("{}/sm", self.mn())
    }

    fn registry(&self) -> String {
        format!("domain://registry.{}", self.domain)
    }

    /// `runtime://D/<name>`.
    pub fn runtime(&self, name: &str) -> String {
        format!("runtime://{}/{name}", self.domain)
    }

    /// The stub URL the reference suite pairs with runtime `<name>`.
    pub fn protostub(&self, name: &str) -> String {
        format!("hyperty-runtime://{}/protostub/{name}", self.domain)
    }

    /// A socket as the Vert.x stub opens it (token in the configured URL), with its `open`
    /// answered: `200` and `body.runtimeToken`.
    pub async fn vertx(&self, runtime: &str) -> Stub {
        self.vertx_as(runtime, &self.token).await
    }

    async fn vertx_as(&self, runtime: &str, token: &str) -> Stub {
        let socket = plain(self.addr, &format!("/ws?access_token={}", urlencode(token))).await;
        let mut stub = Stub::from_socket(socket, runtime);
        let open = stub
            .request(json!({"id": 1, "type": "open", "from": runtime, "to": "mn:/session"}))
            .await;
        assert_eq!(open["id"], 1, "{open}");
        assert_eq!(open["from"], "mn:/session", "{open}");
        assert_eq!(code(&open), 200, "{runtime}: {open}");
        assert!(
            open["body"]["runtimeToken"]
                .as_str()
                .is_some_and(|t| !t.is_empty()),
            "the Vert.x stub reads body.runtimeToken: {open}"
        );
        stub
    }

    /// A socket as the later Matrix stub opens it: `?runtimeURL=`, nothing answered.
    pub async fn matrix(&self, runtime: &str) -> Stub {
        let path = format!(
            "/stub/connect?access_token={}&runtimeURL={}",
            urlencode(&self.token),
            urlencode(runtime)
        );
        let mut stub = Stub::from_socket(plain(self.addr, &path).await, runtime);
        assert!(stub.quiet_for(QUIET).await.is_none(), "nothing on connect");
        stub
    }

    /// Allocates `number` addresses of `scheme` from `<protostub>/registry/allocation`, as
    /// the suite asks (optionally under `key`); the allocated addresses.
    async fn allocate(
        &self,
        stub: &mut Stub,
        su: &str,
        scheme: &str,
        number: u64,
        key: Option<&str>,
    ) -> Vec<String> {
        let sender = format!("{su}/registry/allocation");
        let mut value = json!({"number": number});
        if let Some(key) = key {
            value["allocationKey"] = json!(key);
        }
        let answer = stub
            .request(
                json!({"id": 1, "type": "create", "from": sender, "to": self.allocation(),
                "body": {"scheme": scheme, "value": value, "via": su}}),
            )
            .await;
        assert_eq!(answer["from"], self.allocation(), "{answer}");
        assert_eq!(answer["to"], sender, "{answer}");
        assert_eq!(code(&answer), 200, "{scheme} x{number}: {answer}");
        let allocated: Vec<String> = answer["body"]["value"]["allocated"]
            .as_array()
            .expect("allocated")
            .iter()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect();
        assert_eq!(allocated.len() as u64, number, "{answer}");
        allocated
    }

    /// Sends a release (`body`) from `<protostub>/registry/allocation`: answered 200.
    async fn release(&self, stub: &mut Stub, su: &str, body: Value) {
        let sender = format!("{su}/registry/allocation");
        let answer = stub
            .request(
                json!({"id": 2, "type": "delete", "from": sender, "to": self.allocation(), "body": body}),
            )
            .await;
        assert_eq!(answer["to"], sender, "{answer}");
        assert_eq!(code(&answer), 200, "release {body}: {answer}");
    }
}

/// A WebSocket to `ws://addr<path>` with no header of its own (the browsers' stubs).
async fn plain(
    addr: SocketAddr,
    path: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}{path}"))
        .await
        .expect("websocket connect");
    socket
}

/// The Vert.x stub's goodbye: `close` from its session URL (`<runtime>/<token>` once it has
/// one); the node answers nothing and closes the socket.
pub async fn close(mut stub: Stub, session_url: &str) {
    stub.send(json!({"type": "close", "from": session_url, "to": "mn:/session"}))
        .await;
    assert!(stub.closed().await.is_some(), "the node closes the socket");
    let frames: Vec<&Value> = stub
        .inbox
        .iter()
        .filter(|m| m.get("closed").is_none())
        .collect();
    assert!(frames.is_empty(), "no answer to close: {frames:?}");
}

/// Connect and disconnect, both handshakes; a second `close` is harmless.
pub async fn connect_and_disconnect(node: &Node) {
    let runtime = node.runtime("1");
    let stub = node.vertx(&runtime).await;
    close(stub, &format!("{runtime}/session-token")).await;
    let mut stub = node.matrix(&runtime).await;
    let pong = stub
        .request(json!({"type": "ping", "from": runtime, "to": "mn:/session"}))
        .await;
    assert_eq!(code(&pong), 200, "{pong}");
    stub.send(json!({"type": "close", "from": runtime, "to": "mn:/session"}))
        .await;
    stub.send(json!({"type": "close", "from": runtime, "to": "mn:/session"}))
        .await;
    assert!(stub.closed().await.is_some());
}

/// Hyperty and object allocation and release, each step on a new socket of the same
/// runtime opened right after the last one's `close`, sending from the protostub URL.
pub async fn allocation_across_sockets(node: &Node) {
    let runtime = node.runtime("1");
    let su = node.protostub("1");
    let fresh = || async { node.vertx(&runtime).await };
    let bye = |stub: Stub| close(stub, &runtime);
    for (scheme, prefix) in [("hyperty", "hyperty://"), ("connection", "connection://")] {
        let mut stub = fresh().await;
        let one = node.allocate(&mut stub, &su, scheme, 1, None).await;
        assert!(one[0].starts_with(prefix), "{one:?}");
        bye(stub).await;
        // Released on a new socket: what an earlier socket allocated.
        let mut stub = fresh().await;
        node.release(&mut stub, &su, json!({"childrenResources": one}))
            .await;
        bye(stub).await;
        let mut stub = fresh().await;
        let block = node.allocate(&mut stub, &su, scheme, 3, None).await;
        bye(stub).await;
        let mut stub = fresh().await;
        // Nested, as the suite sends it.
        node.release(&mut stub, &su, json!({"childrenResources": [block]}))
            .await;
        bye(stub).await;
        let key = format!("{su}/{scheme}AllocationKey");
        let mut stub = fresh().await;
        node.allocate(&mut stub, &su, scheme, 4, Some(&key)).await;
        bye(stub).await;
        let mut stub = fresh().await;
        node.release(&mut stub, &su, json!({"resource": key})).await;
        bye(stub).await;
    }
    // The key as a one-element array, and the scheme `object`.
    let mut stub = fresh().await;
    let key = format!("{su}/objectKey");
    let objects = node.allocate(&mut stub, &su, "object", 3, Some(&key)).await;
    assert!(
        objects.iter().all(|o| o.starts_with("object://")),
        "{objects:?}"
    );
    node.release(
        &mut stub,
        &su,
        json!({"resource": [key], "attribute": "attribute"}),
    )
    .await;
    bye(stub).await;
}

/// A reporter publishes to its object's changes; two subscribers (one naming an unbound
/// `body.source`) get each update exactly once, then none after unsubscribing.
pub async fn publish_and_subscribe(node: &Node) {
    let (reporter_url, su_r) = (node.runtime("Reporter"), node.protostub("Reporter"));
    let mut reporter = node.vertx(&reporter_url).await;
    let object = node
        .allocate(&mut reporter, &su_r, "connection", 1, None)
        .await
        .remove(0);
    let topics = json!([
        format!("{object}/changes"),
        format!("{object}/children/name1")
    ]);
    let mut subscribers = Vec::new();
    for (name, source) in [("Subscriber", true), ("Subscriber2", false)] {
        let su = node.protostub(name);
        let mut stub = node.vertx(&node.runtime(name)).await;
        let mut body = json!({"resources": topics, "via": su});
        if source {
            body["source"] = json!(su);
        }
        let answer = stub
            .request(json!({"id": 2, "type": "subscribe", "from": format!("{su}/sm"), "to": node.sm(), "body": body}))
            .await;
        assert_eq!(answer["from"], node.sm(), "{answer}");
        assert_eq!(answer["to"], format!("{su}/sm"), "{answer}");
        assert_eq!(code(&answer), 200, "{name}: {answer}");
        subscribers.push((stub, su));
    }
    reporter
        .send(
            json!({"id": 1, "type": "update", "from": object, "to": format!("{object}/changes"),
            "body": {"attribute": "changedAttribute", "value": "new Value"}}),
        )
        .await;
    for (stub, _) in &mut subscribers {
        let update = stub.recv().await;
        assert_eq!(update["type"], "update", "{update}");
        assert_eq!(update["from"], object, "{update}");
        assert_eq!(update["body"]["value"], "new Value", "{update}");
        assert!(stub.quiet_for(QUIET).await.is_none(), "exactly one copy");
    }
    for (stub, su) in &mut subscribers {
        let answer = stub
            .request(
                json!({"id": 3, "type": "unsubscribe", "from": format!("{su}/sm"), "to": node.sm(),
                "body": {"resources": topics}}),
            )
            .await;
        assert_eq!(code(&answer), 200, "{answer}");
    }
    reporter
        .send(
            json!({"id": 2, "type": "update", "from": object, "to": format!("{object}/changes"),
            "body": {"atrribute": "changedAttribute", "value": "a second new Value"}}),
        )
        .await;
    for (stub, _) in &mut subscribers {
        assert!(stub.quiet_for(QUIET).await.is_none(), "unsubscribed");
    }
    for (stub, _) in subscribers {
        close(stub, "mn:/session").await;
    }
    close(reporter, &reporter_url).await;
}

/// Register a hyperty under a user identity the stub only names; look it up on later
/// sockets (by user — found only when `identities` says claimed identities are accepted —
/// with criteria, by address, unknown); keep it alive; a status change reaches the
/// subscribers of `<url>/registration` from the registry.
pub async fn registry_across_sockets(node: &Node, identities: bool) {
    let runtime = node.runtime("1");
    let su = node.protostub("1");
    let user = "user://google.com/openIdTest10";
    let from = format!("{runtime}/registry");
    let mut stub = node.vertx(&runtime).await;
    let hyperty = node
        .allocate(&mut stub, &su, "hyperty", 1, None)
        .await
        .remove(0);
    let created = stub
        .request(json!({"id": 1, "type": "create", "from": from, "to": node.registry(),
            "body": {"value": {"url": hyperty, "descriptor": format!("http://{}/RegistrationTestHyperty", node.domain),
                "user": user, "expires": 3600, "status": "live", "dataSchemes": ["TestSchema"],
                "resources": ["testresource"], "runtime": runtime}, "policyURL": "policyURL"}}))
        .await;
    assert_eq!(created["from"], node.registry(), "{created}");
    assert_eq!(code(&created), 200, "{created}");
    close(stub, &runtime).await;
    let by_user = if identities { 200 } else { 404 };
    for (body, expected) in [
        (json!({"resource": user}), by_user),
        (
            json!({"resource": user, "criteria": {"dataSchemes": ["TestSchema"]}}),
            by_user,
        ),
        (
            json!({"resource": user, "criteria": {"resources": ["testresource"]}}),
            by_user,
        ),
        (
            json!({"resource": user, "criteria": {"resources": ["testresource"], "dataSchemes": ["TestSchema"]}}),
            by_user,
        ),
        (json!({"resource": hyperty}), 200),
        (
            json!({"resource": format!("schema://{}/non-existing-object", node.domain)}),
            404,
        ),
    ] {
        let mut stub = node.vertx(&runtime).await;
        let read = stub
            .request(
                json!({"id": 1, "type": "read", "from": from, "to": node.registry(), "body": body}),
            )
            .await;
        assert_eq!(read["from"], node.registry(), "{read}");
        assert_eq!(code(&read), expected, "read {body}: {read}");
        if expected == 200 && body["resource"] == user {
            assert!(
                read["body"]["value"][&hyperty].is_object(),
                "keyed by URL: {read}"
            );
        }
        close(stub, &runtime).await;
    }
    let mut stub = node.vertx(&runtime).await;
    let alive = stub
        .request(json!({"id": 1, "type": "update", "from": from, "to": node.registry(), "body": {"resource": hyperty}}))
        .await;
    assert_eq!(code(&alive), 200, "keep-alive: {alive}");
    close(stub, &runtime).await;
    // A subscriber of the registration, on a runtime of its own, stays connected.
    let watcher = node.runtime("2");
    let mut subscriber = node.vertx(&watcher).await;
    let sub = subscriber
        .request(json!({"id": 1, "type": "subscribe", "from": format!("{watcher}/registry"), "to": node.sm(),
            "body": {"resources": [format!("{hyperty}/registration")]}}))
        .await;
    assert_eq!(code(&sub), 200, "{sub}");
    let mut stub = node.vertx(&runtime).await;
    let status = stub
        .request(
            json!({"id": 1, "type": "update", "from": from, "to": node.registry(),
            "body": {"resource": hyperty, "value": "disconnected", "attribute": "status"}}),
        )
        .await;
    assert_eq!(code(&status), 200, "{status}");
    let notified = subscriber.recv().await;
    assert_eq!(notified["type"], "update", "{notified}");
    assert_eq!(notified["from"], node.registry(), "{notified}");
    assert_eq!(
        notified["to"],
        format!("{hyperty}/registration"),
        "{notified}"
    );
    assert_eq!(notified["body"]["attribute"], "status", "{notified}");
    assert_eq!(notified["body"]["value"], "disconnected", "{notified}");
    close(stub, &runtime).await;
    close(subscriber, &watcher).await;
}

/// What the first principal claimed stays its: another principal can neither send from it
/// nor connect as a runtime over or under it; runtime URLs of several segments nest under
/// one principal's own.
pub async fn claims_are_the_first_principals(node: &Node) {
    let runtime = node.runtime("Subscriber");
    let mut stub = node.vertx(&runtime).await;
    let su = node.protostub("Subscriber");
    node.allocate(&mut stub, &su, "hyperty", 1, None).await;
    close(stub, &runtime).await;
    for i in 0..3 {
        let nested = format!("{runtime}/{i}");
        let mut stub = node.matrix(&nested).await;
        let pong = stub
            .request(json!({"type": "ping", "from": nested, "to": "mn:/session"}))
            .await;
        assert_eq!(code(&pong), 200, "{nested}: {pong}");
        node.allocate(&mut stub, &format!("{su}/{i}"), "hyperty", 1, None)
            .await;
    }
    // Another principal: not as the protostub, nor over or under the runtimes.
    let other = node.runtime("Other");
    let mut intruder = node.vertx_as(&other, &node.other).await;
    let spoofed = intruder
        .request(json!({"type": "create", "from": format!("{su}/registry/allocation"), "to": node.allocation(),
            "body": {"scheme": "hyperty", "value": {"number": 1}}}))
        .await;
    assert_eq!(code(&spoofed), 403, "{spoofed}");
    // The protostub root is nobody's (400: not a runtime URL); the rest are the first
    // principal's (403).
    let protostubs = format!("hyperty-runtime://{}/protostub", node.domain);
    for url in [
        format!("{runtime}/9"),
        format!("{runtime}/0/x"),
        protostubs.clone(),
    ] {
        let path = format!(
            "/ws?access_token={}&runtimeURL={}",
            urlencode(&node.other),
            urlencode(&url)
        );
        let mut refused = Stub::from_socket(plain(node.addr, &path).await, &url);
        let answer = refused.recv().await;
        let expected = if url == protostubs { 400 } else { 403 };
        assert_eq!(code(&answer), expected, "{url}: {answer}");
    }
    close(intruder, &other).await;
}

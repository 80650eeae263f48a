//! Attempts by one connected runtime to read, divert or forge another's traffic — each
//! refused. A memory-only node with three Network Server principals (alice, bob, mallory).

use std::time::Duration;

mod common;

use common::stub::{urlencode, Stub};
use msgnode::cmd::run::{start, Running};
use msgnode::config::{Config, NetworkServer, Peer};
use serde_json::{json, Value};

const ALICE: &str = "alice-token";
const BOB: &str = "bob-token";
const MALLORY: &str = "mallory-token";
const PEER_TOKEN: &str = "peer-token";
const MN: &str = "domain://msg-node.localhost";

async fn node() -> Running {
    node_with(|_| {}).await
}

async fn node_with(adjust: impl FnOnce(&mut Config)) -> Running {
    let mut config = common::bus_config(&common::shipped_policies());
    config.bus.domain = Some("localhost".into());
    config.bus.network_servers = [("alice", ALICE), ("bob", BOB), ("mallory", MALLORY)]
        .into_iter()
        .map(|(name, token)| NetworkServer {
            name: name.into(),
            token: token.into(),
        })
        .collect();
    // A trusted domain without time windows; hybroker.example stays free for return routes.
    config.bus.peers = vec![Peer {
        domain: "msgnode.test".into(),
        url: "http://127.0.0.1:9".into(),
        token: PEER_TOKEN.into(),
        matrix_user: None,
    }];
    adjust(&mut config);
    start(config).await.expect("start")
}

fn code(v: &Value) -> u64 {
    v["body"]["code"].as_u64().unwrap_or(0)
}

async fn quiet(stub: &mut Stub) -> Option<Value> {
    stub.quiet_for(Duration::from_millis(200)).await
}

/// Connecting as `runtime_url` is refused (the handshake answer's code).
async fn refused_runtime(addr: std::net::SocketAddr, runtime_url: &str) -> u64 {
    let path = format!("/ws?runtimeURL={}", urlencode(runtime_url));
    let mut stub = Stub::from_socket(common::stub::open(addr, &path, MALLORY).await, runtime_url);
    code(&stub.recv().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_runtime_cannot_take_anothers_traffic() {
    let running = node().await;
    let addr = running.bus_addr.expect("bus");
    let mut alice = Stub::connect(addr, "runtime://localhost/alice-rt", ALICE).await;
    let mut bob = Stub::connect(addr, "runtime://localhost/bob-rt", BOB).await;
    let mut mallory = Stub::connect(addr, "runtime://localhost/mallory-rt", MALLORY).await;
    let a = alice.allocate("localhost", "hyperty", 1).await.remove(0);
    let b = bob.allocate("localhost", "hyperty", 1).await.remove(0);
    let m = mallory.allocate("localhost", "hyperty", 1).await.remove(0);

    // Runtime URLs that name someone's address, a node component, a peer, another domain, or
    // a sub-resource of a runtime are refused at the handshake.
    for url in [
        a.as_str(),
        "domain://msg-node.localhost/sm",
        "domain://registry.localhost",
        "domain://msg-node.hybroker.example",
        "hyperty://msgnode.test",
        "runtime://msgnode.test/x",
        "runtime://localhost:8080/x",
        "runtime://localhost/alice-rt/registry",
    ] {
        let answer = refused_runtime(addr, url).await;
        assert!(answer == 400 || answer == 403, "{url}: {answer}");
    }

    // Subscribing to an address (not a topic) would divert its traffic: refused — also to
    // what only looks like a topic under a hyperty, and to addresses nobody holds yet.
    for resource in [
        format!("{a}/children/x"),
        format!("{a}/changes"),
        "runtime://localhost/not-yet-connected".to_string(),
    ] {
        let sub = mallory
            .request(
                json!({"type": "subscribe", "from": "runtime://localhost/mallory-rt/sm",
                "to": format!("{MN}/sm"), "body": {"resources": [resource]}}),
            )
            .await;
        assert_eq!(code(&sub), 403, "{resource}: {sub}");
    }
    bob.send(json!({"type": "create", "from": b, "to": format!("{a}/children/x")}))
        .await;
    assert_eq!(alice.recv().await["to"], format!("{a}/children/x"));
    let sub = mallory
        .request(
            json!({"type": "subscribe", "from": "runtime://localhost/mallory-rt/sm",
            "to": format!("{MN}/sm"), "body": {"resources": [a, "runtime://localhost/alice-rt"]}}),
        )
        .await;
    assert_eq!(code(&sub), 403, "{sub}");
    // A subscribe whose `from` is someone else's is spoofed.
    let sub = mallory
        .request(json!({"type": "subscribe", "from": "runtime://localhost/alice-rt/sm",
            "to": format!("{MN}/sm"), "body": {"resources": ["comm://localhost/x/changes"], "source": m}}))
        .await;
    assert_eq!(code(&sub), 403, "{sub}");
    bob.send(json!({"type": "create", "from": b, "to": a, "body": {"value": "for alice"}}))
        .await;
    assert_eq!(alice.recv().await["body"]["value"], "for alice");
    assert!(quiet(&mut mallory).await.is_none(), "mallory got nothing");

    // A foreign return route stays with the runtime that first used it.
    let foreign = "hyperty://hybroker.example/agent-1";
    alice
        .send(json!({"type": "create", "from": foreign, "to": b, "body": {"value": "hi"}}))
        .await;
    assert_eq!(bob.recv().await["from"], foreign);
    let taken = mallory
        .request(json!({"type": "create", "from": foreign, "to": b}))
        .await;
    assert_eq!(code(&taken), 403, "{taken}");
    let sub_resource = mallory
        .request(json!({"type": "create", "from": format!("{foreign}/x"), "to": b}))
        .await;
    assert_eq!(code(&sub_resource), 403, "{sub_resource}");
    bob.send(json!({"type": "response", "from": b, "to": foreign, "body": {"code": 200}}))
        .await;
    assert_eq!(alice.recv().await["to"], foreign);
    assert!(quiet(&mut mallory).await.is_none());
    assert!(
        quiet(&mut bob).await.is_none(),
        "bob got none of mallory's attempts"
    );

    // Registry: only addresses one holds, and only as one's own identity.
    let squat = mallory
        .request(
            json!({"type": "create", "from": m, "to": "domain://registry.localhost",
            "body": {"value": {"url": a}}}),
        )
        .await;
    assert_eq!(code(&squat), 403, "{squat}");
    let impersonate = mallory
        .request(
            json!({"type": "create", "from": m, "to": "domain://registry.localhost",
            "body": {"value": {"url": m, "user": "user://idp.example/alice"}}}),
        )
        .await;
    // A claimed user is kept aside, never filed as the entry's user.
    assert_eq!(code(&impersonate), 200, "{impersonate}");
    let by_user = bob
        .request(
            json!({"type": "read", "from": b, "to": "domain://registry.localhost",
            "body": {"resource": "user://idp.example/alice"}}),
        )
        .await;
    assert_eq!(code(&by_user), 404, "not discoverable as alice: {by_user}");
    let own = mallory
        .request(
            json!({"type": "create", "from": m, "to": "domain://registry.localhost",
            "body": {"value": {"url": m}}}),
        )
        .await;
    assert_eq!(code(&own), 200, "{own}");

    // URLs read differently by different parsers are refused outright.
    for to in [
        "hyperty://localhost:1@hybroker.example/x",
        "hyperty://localhost/x/../y",
    ] {
        let odd = mallory
            .request(json!({"type": "create", "from": m, "to": to}))
            .await;
        assert_eq!(code(&odd), 400, "{to}: {odd}");
    }

    // A peer's node can still deliver: nobody can occupy its place.
    let http = reqwest::Client::new();
    let from_peer = http
        .post(format!("http://{addr}/bus/v1/messages"))
        .bearer_auth(PEER_TOKEN)
        .body(
            json!({"id": 1, "type": "create", "from": "hyperty://msgnode.test/z", "to": b})
                .to_string(),
        )
        .send()
        .await
        .expect("post");
    assert_eq!(from_peer.status(), 202);
    assert_eq!(bob.recv().await["from"], "hyperty://msgnode.test/z");

    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_away_too_long_is_released() {
    let running = node_with(|c| c.bus.away_release_after = Duration::from_millis(300)).await;
    let addr = running.bus_addr.expect("bus");
    let mut alice = Stub::connect(addr, "runtime://localhost/alice-rt", ALICE).await;
    let mut bob = Stub::connect(addr, "runtime://localhost/bob-rt", BOB).await;
    let a = alice.allocate("localhost", "hyperty", 1).await.remove(0);
    let b = bob.allocate("localhost", "hyperty", 1).await.remove(0);
    bob.drop_socket().await;
    // Within the grace period the address still routes (to bob's inbox) ...
    let queued = alice
        .send(json!({"type": "create", "from": a, "to": b}))
        .await;
    assert!(quiet(&mut alice).await.is_none(), "no error for {queued}");
    // ... after it, bob's addresses are gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        // Routed (queued) messages get no response; a 404 says the address is gone.
        alice
            .send(json!({"type": "create", "from": a, "to": b}))
            .await;
        let answer = quiet(&mut alice).await;
        if answer.as_ref().is_some_and(|r| code(r) == 404) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bob's addresses were not released: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reporter_subscribes_to_its_own_object() {
    let running = node().await;
    let addr = running.bus_addr.expect("bus");
    let mut alice = Stub::connect(addr, "runtime://localhost/alice-rt", ALICE).await;
    let mut bob = Stub::connect(addr, "runtime://localhost/bob-rt", BOB).await;
    let object = alice.allocate("localhost", "comm", 1).await.remove(0);
    let b = bob.allocate("localhost", "hyperty", 1).await.remove(0);
    let sub = alice
        .request(
            json!({"type": "subscribe", "from": "runtime://localhost/alice-rt/sm",
            "to": format!("{MN}/sm"), "body": {"resources": [
                object, format!("{object}/subscription"), format!("{object}/children/chat")]}}),
        )
        .await;
    assert_eq!(code(&sub), 200, "{sub}");
    // Children reach the subscribers (here the reporter); the reporter's own addresses stay its.
    bob.send(json!({"type": "create", "from": b, "to": format!("{object}/children/chat")}))
        .await;
    assert_eq!(alice.recv().await["to"], format!("{object}/children/chat"));
    bob.send(json!({"type": "subscribe", "from": b, "to": format!("{object}/subscription")}))
        .await;
    assert_eq!(alice.recv().await["to"], format!("{object}/subscription"));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_stands_in_for_a_peer_domain() {
    // hybroker.example is both a peer and (in the shipped data) a bindable foreign domain.
    let running = node_with(|c| c.bus.peers[0].domain = "hybroker.example".into()).await;
    let addr = running.bus_addr.expect("bus");
    let mut mallory = Stub::connect(addr, "runtime://localhost/mallory-rt", MALLORY).await;
    let mut bob = Stub::connect(addr, "runtime://localhost/bob-rt", BOB).await;
    let b = bob.allocate("localhost", "hyperty", 1).await.remove(0);
    let refused = mallory
        .request(
            json!({"type": "create", "from": "hyperty://hybroker.example/real-agent", "to": b}),
        )
        .await;
    assert_eq!(code(&refused), 403, "{refused}");
    assert!(quiet(&mut bob).await.is_none());
    running.stop().await;
}

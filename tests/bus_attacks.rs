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

fn description(v: &Value) -> String {
    v["body"]["description"].as_str().unwrap_or("").to_string()
}

/// Review: after bob's runtime was released, eve connected as bob's runtime URL, got the
/// messages queued for bob and changed bob's registry entry. A runtime URL is its first
/// principal's for good, and a release deletes its inbox and registry entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_runtime_url_stays_its_owners_with_nothing_left_in_it() {
    let running = node_with(|c| c.bus.away_release_after = Duration::from_millis(300)).await;
    let addr = running.bus_addr.expect("bus");
    let bob_rt = "runtime://localhost/bob-rt";
    let mut bob = Stub::connect(addr, bob_rt, BOB).await;
    let mut alice = Stub::connect(addr, "runtime://localhost/alice-rt", ALICE).await;
    let b = bob.allocate("localhost", "hyperty", 1).await.remove(0);
    let a = alice.allocate("localhost", "hyperty", 1).await.remove(0);
    assert_eq!(
        code(&bob.register_chat_hyperty(&b, "user://localhost/bob").await),
        200
    );
    let sub = alice
        .request(
            json!({"type": "subscribe", "from": "runtime://localhost/alice-rt/sm",
            "to": format!("{MN}/sm"), "body": {"resources": [format!("{b}/registration")]}}),
        )
        .await;
    assert_eq!(code(&sub), 200, "{sub}");
    bob.drop_socket().await;
    for n in 0..2 {
        alice
            .send(json!({"type": "create", "from": a, "to": b, "body": {"value": {"n": n}}}))
            .await;
    }
    // Released (away too long): its addresses are gone.
    let read = json!({"type": "read", "from": a, "to": "domain://registry.localhost",
        "body": {"resource": b}});
    common::eventually("bob's runtime is released", Duration::from_secs(20), || {
        let (addr, read) = (addr, read.clone());
        async move {
            let mut probe = Stub::connect(addr, "runtime://localhost/probe", ALICE).await;
            let mut read = read;
            read["from"] = json!("runtime://localhost/probe");
            code(&probe.request(read).await) == 404
        }
    })
    .await;
    // Eve cannot take the URL over; bob can come back to it, to an empty inbox.
    let mut eve = Stub::from_socket(
        common::stub::open(
            addr,
            &format!("/ws?runtimeURL={}", urlencode(bob_rt)),
            MALLORY,
        )
        .await,
        bob_rt,
    );
    let refused = eve.recv().await;
    assert_eq!(code(&refused), 403, "{refused}");
    let mut bob = Stub::connect(addr, bob_rt, BOB).await;
    assert!(
        quiet(&mut bob).await.is_none(),
        "nothing queued for the released runtime is delivered"
    );
    let update = bob
        .request(
            json!({"type": "update", "from": b, "to": "domain://registry.localhost",
            "body": {"resource": b, "attribute": "status", "value": "live"}}),
        )
        .await;
    assert_ne!(
        code(&update),
        200,
        "the released hyperty is nobody's now: {update}"
    );
    assert!(quiet(&mut alice).await.is_none(), "no status notification");
    running.stop().await;
}

/// Review: eve subscribed to alice's `<object>/children/chat` and received what bob sent
/// there; alice got nothing. The holder always receives its children; others listen only
/// with the holder's consent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_children_subscription_diverts_nothing() {
    let policies = common::policies_with(|_| {});
    // The consent's reload is what matters here, not the reload gate (the bundle's own
    // tests, slow in a debug build while the other tests of this binary load both cores).
    let running = node_with(|c| {
        c.pdp.policies = policies.path().to_path_buf();
        c.pdp.reload_debounce = Duration::from_millis(50);
        c.pdp.reload_requires_tests = Some(false);
    })
    .await;
    let addr = running.bus_addr.expect("bus");
    let mut alice = Stub::connect(addr, "runtime://localhost/alice-rt", ALICE).await;
    let mut bob = Stub::connect(addr, "runtime://localhost/bob-rt", BOB).await;
    let mut eve = Stub::connect(addr, "runtime://localhost/mallory-rt", MALLORY).await;
    let object = alice.allocate("localhost", "comm", 1).await.remove(0);
    let b = bob.allocate("localhost", "hyperty", 1).await.remove(0);
    let children = format!("{object}/children/chat");
    let subscribe = json!({"type": "subscribe", "from": "runtime://localhost/mallory-rt/sm",
        "to": format!("{MN}/sm"), "body": {"resources": [children]}});
    let refused = eve.request(subscribe.clone()).await;
    assert_eq!(code(&refused), 403, "{refused}");
    assert!(
        description(&refused).contains("needs its consent"),
        "{refused}"
    );
    bob.send(json!({"type": "create", "from": b, "to": children, "body": {"value": "m1"}}))
        .await;
    assert_eq!(
        alice.recv().await["body"]["value"],
        "m1",
        "the holder receives"
    );
    assert!(quiet(&mut eve).await.is_none());

    // With the holder's consent eve listens in — and alice still receives.
    let revision = running.pdp.active().expect("bundle").revision.to_string();
    let path = policies.path().join("config/data.json");
    let mut data: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("data")).expect("json");
    data["subscription"]["consent"][&object] = json!(["runtime://localhost/mallory-rt"]);
    std::fs::write(&path, data.to_string()).expect("write");
    let pdp = running.pdp.clone();
    common::eventually("the consent is active", Duration::from_secs(30), || {
        let (pdp, revision) = (pdp.clone(), revision.clone());
        async move { pdp.active().is_some_and(|a| *a.revision != *revision) }
    })
    .await;
    let allowed = eve.request(subscribe).await;
    assert_eq!(code(&allowed), 200, "{allowed}");
    bob.send(json!({"type": "create", "from": b, "to": children, "body": {"value": "m2"}}))
        .await;
    assert_eq!(
        alice.recv().await["body"]["value"],
        "m2",
        "the holder still receives"
    );
    assert_eq!(eve.recv().await["body"]["value"], "m2");
    running.stop().await;
}

/// Review: eve sent an `update` to alice's `<object>/changes` and bob's subscription
/// delivered it. Only the object's holder publishes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_holder_publishes_an_objects_changes() {
    let running = node().await;
    let addr = running.bus_addr.expect("bus");
    let mut alice = Stub::connect(addr, "runtime://localhost/alice-rt", ALICE).await;
    let mut bob = Stub::connect(addr, "runtime://localhost/bob-rt", BOB).await;
    let mut eve = Stub::connect(addr, "runtime://localhost/mallory-rt", MALLORY).await;
    let object = alice.allocate("localhost", "comm", 1).await.remove(0);
    let e = eve.allocate("localhost", "hyperty", 1).await.remove(0);
    let changes = format!("{object}/changes");
    let sub = bob
        .request(
            json!({"type": "subscribe", "from": "runtime://localhost/bob-rt/sm",
            "to": format!("{MN}/sm"), "body": {"resources": [changes]}}),
        )
        .await;
    assert_eq!(code(&sub), 200, "{sub}");
    for (from, to) in [
        (e.clone(), changes.clone()),
        (e.clone(), format!("{object}/registration")),
    ] {
        let forged = eve
            .request(json!({"type": "update", "from": from, "to": to, "body": {"value": "forged"}}))
            .await;
        assert_eq!(code(&forged), 403, "{to}: {forged}");
        assert!(description(&forged).contains("only the holder"), "{forged}");
    }
    assert!(
        quiet(&mut bob).await.is_none(),
        "nothing forged reached bob"
    );
    alice
        .send(json!({"type": "update", "from": object, "to": changes, "body": {"value": "real"}}))
        .await;
    assert_eq!(bob.recv().await["body"]["value"], "real");
    running.stop().await;
}

/// Third review N1: each subscribe to the same resource with a new `body.source` under the
/// runtime's URL replaced the record's subscriber but added a fan-out entry beside the old
/// one, uncounted; an unsubscribe then removed only the last, and the rest kept delivering.
/// The fan-out keeps one subscriber per (resource, runtime), as the record does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribing_with_new_sources_does_not_grow_the_fanout() {
    let running = node().await;
    let addr = running.bus_addr.expect("bus");
    let mut alice = Stub::connect(addr, "runtime://localhost/alice-rt", ALICE).await;
    let mut bob = Stub::connect(addr, "runtime://localhost/bob-rt", BOB).await;
    let object = alice.allocate("localhost", "comm", 1).await.remove(0);
    let changes = format!("{object}/changes");
    for k in 0..200 {
        let sub = bob
            .request(
                json!({"type": "subscribe", "from": "runtime://localhost/bob-rt/sm",
                "to": format!("{MN}/sm"), "body": {"resources": [changes],
                "source": format!("runtime://localhost/bob-rt/{k}")}}),
            )
            .await;
        assert_eq!(code(&sub), 200, "{sub}");
    }
    // One subscription: a publish reaches bob once, addressed to the last source's topic.
    alice
        .send(json!({"type": "update", "from": object, "to": changes, "body": {"value": 1}}))
        .await;
    assert_eq!(bob.recv().await["body"]["value"], 1);
    assert!(quiet(&mut bob).await.is_none(), "one delivery per runtime");
    let unsub = bob
        .request(
            json!({"type": "unsubscribe", "from": "runtime://localhost/bob-rt/sm",
            "to": format!("{MN}/sm"), "body": {"resources": [changes]}}),
        )
        .await;
    assert_eq!(code(&unsub), 200, "{unsub}");
    alice
        .send(json!({"type": "update", "from": object, "to": changes, "body": {"value": 2}}))
        .await;
    assert!(
        quiet(&mut bob).await.is_none(),
        "after the unsubscribe no earlier source still delivers"
    );
    running.stop().await;
}

/// Third review N7: the reference stubs all live under `hyperty-runtime://D/protostub/<n>`;
/// whoever bound or claimed the root itself would have held every other principal's stubs
/// for good. The root alone is nobody's: refused at the handshake and as a claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_root_cannot_be_claimed() {
    let running = node().await;
    let addr = running.bus_addr.expect("bus");
    let root = "hyperty-runtime://localhost/protostub";
    assert_eq!(refused_runtime(addr, root).await, 400);
    let mut eve = Stub::connect(addr, "runtime://localhost/mallory-rt", MALLORY).await;
    let claimed = eve
        .request(json!({"type": "ping", "from": root, "to": "runtime://localhost/nobody"}))
        .await;
    assert_eq!(code(&claimed), 403, "{claimed}");
    assert!(description(&claimed).contains("spoofed"), "{claimed}");
    let mut bob = Stub::connect(addr, "runtime://localhost/bob-rt", BOB).await;
    let stub = format!("{root}/7/sm");
    let answer = bob
        .request(json!({"type": "ping", "from": stub, "to": "runtime://localhost/nobody"}))
        .await;
    assert_eq!(
        code(&answer),
        404,
        "bob's stub under the root is his: {answer}"
    );
    running.stop().await;
}

/// Third review N17: a released runtime keeps its URL and claimed addresses for good, and
/// what was sent to them after the release waited in its inbox, charged to the senders,
/// until the owner came back to that exact URL — maybe never. Nothing is parked for a
/// tombstone: it is unknown (404) until its owner takes it up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_to_a_released_runtime_are_not_parked_for_ever() {
    let running = node().await;
    let addr = running.bus_addr.expect("bus");
    let runtime = "runtime://localhost/mallory-gone";
    let mut gone = bound(addr, runtime, MALLORY).await;
    let claimed = "hyperty-runtime://localhost/protostub/mallory-gone/sm".to_string();
    let first = gone
        .request(json!({"type": "ping", "from": claimed, "to": "runtime://localhost/nobody"}))
        .await;
    assert_eq!(code(&first), 404, "claimed on first use: {first}");
    gone.send(json!({"type": "disconnect", "from": runtime, "to": "mn:/session"}))
        .await;
    assert!(gone.closed().await.is_some(), "released and closed");
    let mut alice = Stub::connect(addr, "runtime://localhost/alice-rt", ALICE).await;
    let a = alice.allocate("localhost", "hyperty", 1).await.remove(0);
    let pad = "x".repeat(32 * 1024);
    for to in [runtime.to_string(), claimed.clone()] {
        for _ in 0..4 {
            let answer = alice
                .request(json!({"type": "create", "from": a, "to": to, "body": {"pad": pad}}))
                .await;
            assert_eq!(code(&answer), 404, "{to}: {answer}");
        }
    }
    // Taken up again by its owner: nothing waited for it, and it receives again.
    let mut back = bound(addr, runtime, MALLORY).await;
    assert!(quiet(&mut back).await.is_none(), "nothing was parked");
    alice
        .send(json!({"type": "create", "from": a, "to": runtime, "body": {"n": 1}}))
        .await;
    assert_eq!(back.recv().await["body"]["n"], 1);
    running.stop().await;
}

/// Third review N5: `max_connections` was one pool for everybody, so one address that kept
/// reopening connections that never send their headers held every place, and no stub or
/// peer could connect. One address block holds at most `max_connections_per_address`;
/// past it its connections are closed at once, and other addresses still get in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_listener_place() {
    use tokio::io::AsyncReadExt;
    let running = node_with(|c| {
        c.bus.max_connections = 8;
        c.bus.max_connections_per_address = 4;
    })
    .await;
    let addr = running.bus_addr.expect("bus");
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    // The fifth from the same address is closed without an answer.
    let mut fifth = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), fifth.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed at once: {read:?}"
    );
    // Another address (127.0.0.2 is loopback too) still connects and is served.
    let tcp = tokio::net::TcpSocket::new_v4().expect("socket");
    tcp.bind("127.0.0.2:0".parse().expect("addr"))
        .expect("bind");
    let tcp = tcp.connect(addr).await.expect("connect");
    let runtime = "runtime://localhost/alice-rt";
    let path = format!("/ws?runtimeURL={}", urlencode(runtime));
    let (socket, _) = tokio_tungstenite::client_async(
        common::stub::request(addr, &path, ALICE),
        tokio_tungstenite::MaybeTlsStream::Plain(tcp),
    )
    .await
    .expect("another address is served");
    let mut alice = Stub::from_socket(socket, runtime);
    let pong = alice
        .request(json!({"type": "ping", "from": runtime, "to": "mn:/session"}))
        .await;
    assert_eq!(code(&pong), 200, "{pong}");
    // Once the first address's connections close, it gets in again.
    drop(silent);
    let mut bob = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let path = format!("/ws?runtimeURL={}", urlencode("runtime://localhost/bob-rt"));
        let request = common::stub::request(addr, &path, BOB);
        if let Ok((socket, _)) = tokio_tungstenite::connect_async(request).await {
            bob = Some(socket);
            break;
        }
    }
    assert!(bob.is_some(), "the address is served again");
    running.stop().await;
}

/// Percent-encoded dot segments, runtime URLs of other domains, and too many destinations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_urls_foreign_runtime_urls_and_huge_fan_outs_are_refused() {
    let running = node().await;
    let addr = running.bus_addr.expect("bus");
    let mut mallory = Stub::connect(addr, "runtime://localhost/mallory-rt", MALLORY).await;
    let m = mallory.allocate("localhost", "hyperty", 1).await.remove(0);
    for (from, to) in [
        (
            format!("{m}/%2e%2e/alice"),
            "hyperty://localhost/x".to_string(),
        ),
        (
            m.clone(),
            "hyperty://localhost/mine/%2E%2e/alice".to_string(),
        ),
        (m.clone(), "hyperty://localhost/a/%2e/b".to_string()),
    ] {
        let odd = mallory
            .request(json!({"type": "create", "from": from, "to": to}))
            .await;
        assert_eq!(code(&odd), 400, "{from} → {to}: {odd}");
    }
    // A partner's runtime URL is not a local user's to claim; hybroker.example's is (data).
    assert_eq!(
        refused_runtime(addr, "runtime://partner.example/x").await,
        403
    );
    let mut visitor = Stub::connect(addr, "runtime://hybroker.example/visitor", MALLORY).await;
    let pong = visitor
        .request(json!({"type": "ping", "from": "runtime://hybroker.example/visitor", "to": "mn:/session"}))
        .await;
    assert_eq!(code(&pong), 200);
    let to: Vec<String> = (0..300)
        .map(|i| format!("hyperty://localhost/{i}"))
        .collect();
    let fan_out = mallory
        .request(json!({"type": "create", "from": m, "to": to}))
        .await;
    assert_eq!(code(&fan_out), 400, "{fan_out}");
    running.stop().await;
}

/// A stub whose runtime the node has bound (a `ping` answered).
async fn bound(addr: std::net::SocketAddr, runtime: &str, token: &str) -> Stub {
    let mut stub = Stub::connect(addr, runtime, token).await;
    let pong = stub
        .request(json!({"type": "ping", "from": runtime, "to": "mn:/session"}))
        .await;
    assert_eq!(code(&pong), 200, "{runtime}: {pong}");
    stub
}

/// Review: one user made 1,010 Synapse users in 10 s by allocating from fresh runtime URLs:
/// limits were per runtime. They are per principal too, from the policy's data (and the
/// node's own higher backstops).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_per_principal_across_runtimes() {
    let policies = common::policies_with(|data| {
        data["limits"]["per_principal"] = json!({"runtimes": 2, "addresses": 3});
    });
    // These limits contradict the shipped bundle's own fixtures, which the reload gate
    // would rightly refuse to serve: the gate is off for this made-up bundle.
    let running = node_with(|c| {
        c.pdp.policies = policies.path().to_path_buf();
        c.pdp.reload_requires_tests = Some(false);
    })
    .await;
    let addr = running.bus_addr.expect("bus");
    let mut first = bound(addr, "runtime://localhost/m-1", MALLORY).await;
    let mut second = bound(addr, "runtime://localhost/m-2", MALLORY).await;
    assert_eq!(refused_runtime(addr, "runtime://localhost/m-3").await, 403);
    first.allocate("localhost", "hyperty", 2).await;
    second.allocate("localhost", "hyperty", 1).await;
    let over = second
        .request(json!({"type": "create", "from": "runtime://localhost/m-2/registry/allocation",
            "to": format!("{MN}/address-allocation"), "body": {"scheme": "hyperty", "value": {"number": 1}}}))
        .await;
    assert_eq!(code(&over), 403, "{over}");
    assert!(
        description(&over).contains("would give this user 4"),
        "{over}"
    );
    // Another principal is not affected.
    let mut bob = Stub::connect(addr, "runtime://localhost/bob-rt", BOB).await;
    bob.allocate("localhost", "hyperty", 3).await;
    running.stop().await;

    // The node's own backstop, whatever the policy says.
    let running = node_with(|c| c.bus.limits.runtimes_per_principal = 1).await;
    let addr = running.bus_addr.expect("bus");
    let _only = bound(addr, "runtime://localhost/m-1", MALLORY).await;
    assert_eq!(refused_runtime(addr, "runtime://localhost/m-2").await, 403);
    running.stop().await;
}

/// Review: 800 × 1 MiB to a receiver that does not read took the node from 47 MiB to
/// 2.3 GB. Queues are bounded in bytes: the receiver is closed once its socket holds its
/// budget, the inboxes hold theirs, and then the sender is told to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_does_not_read_costs_bounded_memory() {
    let node = common::ChildNode::start(
        "outbound_queue_bytes = 2097152\ninbox_max_bytes = 8388608\nmax_frame_bytes = 1048576",
        &format!(
            "[[bus.network_servers]]\nname = \"alice\"\ntoken = \"{ALICE}\"\n[[bus.network_servers]]\nname = \"bob\"\ntoken = \"{BOB}\""
        ),
    )
    .await;
    let addr = node.bus;
    let mut sender = Stub::connect(addr, "runtime://localhost/alice-rt", ALICE).await;
    let mut sleeper = Stub::connect(addr, "runtime://localhost/bob-rt", BOB).await;
    let a = sender.allocate("localhost", "hyperty", 1).await.remove(0);
    let b = sleeper.allocate("localhost", "hyperty", 1).await.remove(0);
    let before = node.rss();
    let pad = "x".repeat(512 * 1024);
    let mut refused = 0;
    for n in 0..400 {
        sender
            .send(json!({"type": "create", "from": a, "to": b, "body": {"value": {"n": n, "pad": pad}}}))
            .await;
    }
    // The answers: routed messages get none, refused ones a 408.
    while let Some(answer) = sender.quiet_for(Duration::from_millis(500)).await {
        if code(&answer) == 408 {
            refused += 1;
        }
    }
    let grown = node.rss().saturating_sub(before);
    assert!(
        refused > 0,
        "the sender was told to retry once the budgets were full"
    );
    assert!(
        grown < 100 * 1024 * 1024,
        "200 MiB sent to a sleeper grew the node by {} MiB",
        grown / (1024 * 1024)
    );
    drop(sleeper);
}

/// Messages per principal are limited: over it, the sender is told when to retry (429).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_over_its_rate_limit_is_told_to_retry() {
    let running = node_with(|c| c.bus.rate_limit = msgnode::config::RateLimit::new(1, 5)).await;
    let addr = running.bus_addr.expect("bus");
    let mut mallory = Stub::connect(addr, "runtime://localhost/mallory-rt", MALLORY).await;
    let mut answers = Vec::new();
    for _ in 0..8 {
        answers.push(
            mallory
                .request(json!({"type": "ping", "from": "runtime://localhost/mallory-rt", "to": "mn:/session"}))
                .await,
        );
    }
    let limited: Vec<&Value> = answers.iter().filter(|a| code(a) == 429).collect();
    assert!(!limited.is_empty(), "{answers:?}");
    assert!(
        description(limited[0]).contains("retry in"),
        "{}",
        limited[0]
    );
    // Another principal has its own budget.
    let mut bob = Stub::connect(addr, "runtime://localhost/bob-rt", BOB).await;
    let pong = bob
        .request(json!({"type": "ping", "from": "runtime://localhost/bob-rt", "to": "mn:/session"}))
        .await;
    assert_eq!(code(&pong), 200);
    running.stop().await;
}

/// `[[bus.network_servers]]` tables for a child node: alice and bob.
fn alice_and_bob() -> String {
    format!(
        "[[bus.network_servers]]\nname = \"alice\"\ntoken = \"{ALICE}\"\n[[bus.network_servers]]\nname = \"bob\"\ntoken = \"{BOB}\""
    )
}

/// Review B5: 8,192 pipelined registry reads of a 60 KB entry, on a socket that never reads,
/// queued about 500 MiB against a documented 8 MiB, and the read loop stuck in that queue
/// outlived take-overs. Responses count against the socket's byte budget now: the socket is
/// not read further while its queue is full, and is closed once it has made no room for
/// `slow_receiver_close_after`. The entry itself is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_answers_to_a_socket_that_does_not_read_are_bounded() {
    let node = common::ChildNode::start(
        "outbound_queue_bytes = 2097152\nslow_receiver_close_after = \"1s\"",
        &alice_and_bob(),
    )
    .await;
    let addr = node.bus;
    let mut alice = Stub::connect(addr, "runtime://localhost/alice-rt", ALICE).await;
    let h = alice.allocate("localhost", "hyperty", 1).await.remove(0);
    let pad = "x".repeat(60_000);
    let registered = alice
        .request(
            json!({"type": "create", "from": h, "to": "domain://registry.localhost",
            "body": {"value": {"url": h, "pad": pad}}}),
        )
        .await;
    assert_eq!(code(&registered), 200, "{registered}");
    let before = node.rss();
    let eve_rt = "runtime://localhost/eve-rt";
    let mut eve = Stub::connect(addr, eve_rt, BOB).await;
    let reads = 3000;
    for _ in 0..reads {
        eve.send(
            json!({"type": "read", "from": eve_rt, "to": "domain://registry.localhost",
            "body": {"resource": h}}),
        )
        .await;
    }
    let closed = "msgnode_bus_refused_total{reason=\"slow_socket\"}";
    common::eventually(
        "the socket that does not read is closed",
        Duration::from_secs(60),
        || async { node.metric(closed).await >= 1 },
    )
    .await;
    let grown = node.rss().saturating_sub(before);
    assert!(
        grown < 64 * 1024 * 1024,
        "{reads} answers of 60 KB to a socket that does not read grew the node by {} MiB",
        grown / (1024 * 1024)
    );
    let mut answered = 0;
    while eve.quiet_for(common::stub::WAIT).await.is_some() {
        answered += 1;
    }
    assert!(
        answered < reads / 2,
        "the node stopped answering a socket that did not read ({answered} answers)"
    );
    // Nothing of what was accepted is lost.
    let mut bob = Stub::connect(addr, "runtime://localhost/bob-rt", BOB).await;
    let read = bob
        .request(json!({"type": "read", "from": "runtime://localhost/bob-rt",
            "to": "domain://registry.localhost", "body": {"resource": h}}))
        .await;
    assert_eq!(code(&read), 200);
    assert_eq!(
        read["body"]["value"]["pad"].as_str().map(str::len),
        Some(60_000)
    );
}

/// Review B5: a frame that is not a message was answered with its `id`, whatever it was.
/// An invalid or oversized id is not echoed, nor is more than a little of what was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_that_is_no_message_is_answered_small() {
    let running = node().await;
    let addr = running.bus_addr.expect("bus");
    let mut mallory = Stub::connect(addr, "runtime://localhost/mallory-rt", MALLORY).await;
    let big = "x".repeat(100_000);
    for frame in [
        json!({"id": big, "type": "ping"}),
        json!({"id": {"pad": big}, "type": "ping"}),
        json!({"id": 7, "type": "create", "from": format!("not a url {big}"), "to": "a:b"}),
    ] {
        mallory.send_text(&frame.to_string()).await;
        let answer = mallory.recv().await;
        assert_eq!(code(&answer), 400, "{answer}");
        assert!(
            answer.to_string().len() < 1000,
            "{} bytes",
            answer.to_string().len()
        );
        assert!(answer["id"].is_null() || answer["id"] == 7, "{answer}");
    }
    running.stop().await;
}

/// Sends `messages` in order, then a ping: once it is answered every one was handled. The
/// error answers among them (routed messages get none).
async fn send_all(stub: &mut Stub, messages: impl IntoIterator<Item = Value>) -> Vec<Value> {
    for message in messages {
        stub.send(message).await;
    }
    let runtime = stub.runtime.clone();
    let pong = stub
        .request(json!({"type": "ping", "from": runtime, "to": "mn:/session"}))
        .await;
    assert_eq!(code(&pong), 200, "{pong}");
    stub.inbox
        .drain(..)
        .filter(|m| m["type"] == "response")
        .collect()
}

/// Every `body.value.n` a stub receives until it is quiet or closed.
async fn received_ns(stub: &mut Stub) -> Vec<u64> {
    let mut ns = Vec::new();
    while let Some(m) = stub.quiet_for(Duration::from_secs(2)).await {
        if let Some(n) = m["body"]["value"]["n"].as_u64() {
            ns.push(n);
        }
    }
    ns
}

/// The `n`s a socket the node closes (taken over) was still handed: read until its close,
/// not until a pause (a loaded machine pauses the flush for seconds, and what came after
/// would be missed: acknowledged, so no later socket gets it again).
async fn received_until_closed(stub: &mut Stub) -> Vec<u64> {
    let mut ns = Vec::new();
    while let Some(m) = stub.quiet_for(Duration::from_secs(9)).await {
        if let Some(n) = m["body"]["value"]["n"].as_u64() {
            ns.push(n);
        }
    }
    ns
}

/// Adds to `got` what `stub` receives until `got` holds each of `0..upto` (bounded by the
/// stub's wait for each frame).
async fn received_up_to(stub: &mut Stub, got: &mut Vec<u64>, upto: u64) {
    while !(0..upto).all(|n| got.contains(&n)) {
        let m = stub.recv().await;
        if let Some(n) = m["body"]["value"]["n"].as_u64() {
            got.push(n);
        }
    }
}

/// Review B6: a runtime whose reconnecting socket did not read stayed `Draining` for ever,
/// buffering without bound what was sent to it meanwhile, and its later reconnects waited on
/// the hand-over for ever. Now what arrives during a resume goes to the inbox (within its
/// budgets: `a_runtimes_inbox_is_capped_and_resumed_in_pages`), a take-over ends a stuck
/// resume, and nothing is lost: what a stalled socket did not get comes to the next one, in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_resume_is_bounded_and_loses_nothing() {
    let running = node_with(|c| {
        c.bus.outbound_queue_bytes = 256 * 1024;
        c.bus.slow_receiver_close_after = Duration::from_secs(300);
        c.bus.inbox_max_bytes = 256 * 1024 * 1024;
        // Bob alone floods: his share of the inboxes is all of this runtime's.
        c.bus.inbox_max_bytes_per_principal = 128 * 1024 * 1024;
        c.bus.inbox_max_bytes_per_runtime = 128 * 1024 * 1024;
    })
    .await;
    let addr = running.bus_addr.expect("bus");
    let alice_rt = "runtime://localhost/alice-rt";
    let mut alice = Stub::connect(addr, alice_rt, ALICE).await;
    let a = alice.allocate("localhost", "hyperty", 1).await.remove(0);
    let mut bob = Stub::connect(addr, "runtime://localhost/bob-rt", BOB).await;
    let b = bob.allocate("localhost", "hyperty", 1).await.remove(0);
    alice.drop_socket().await;
    let pad = "x".repeat(1024 * 1024 - 200);
    let message = |n: u64| json!({"type": "create", "from": b, "to": a, "body": {"value": {"n": n, "pad": pad}}});
    // More than TCP buffers hold: the hand-over to a socket that does not read stalls.
    let errors = send_all(&mut bob, (0..24).map(message)).await;
    assert!(errors.is_empty(), "{errors:?}");

    // 1. A stalled resume, ended by a take-over: the new socket gets the turn.
    let mut stalled = Stub::connect(addr, alice_rt, ALICE).await;
    let mut taker = bound(addr, alice_rt, ALICE).await;
    // What the stalled socket was handed before the take-over is still on its way to it.
    let mut got = received_until_closed(&mut stalled).await;
    received_up_to(&mut taker, &mut got, 24).await;

    // 2. A stalled resume flooded meanwhile: the flood waits in the inbox, behind what the
    //    stalled socket has not taken yet.
    taker.drop_socket().await;
    let errors = send_all(&mut bob, (24..30).map(message)).await;
    assert!(errors.is_empty(), "{errors:?}");
    let mut stalled = Stub::connect(addr, alice_rt, ALICE).await;
    let errors = send_all(&mut bob, (30..40).map(message)).await;
    assert!(errors.is_empty(), "{errors:?}");
    let mut last = bound(addr, alice_rt, ALICE).await;
    got.extend(received_until_closed(&mut stalled).await);
    received_up_to(&mut last, &mut got, 40).await;

    // Every message came, in order (a page handed to a socket that closed before it was
    // acknowledged may come again).
    let mut firsts: Vec<u64> = Vec::new();
    for n in got {
        if !firsts.contains(&n) {
            firsts.push(n);
        }
    }
    assert_eq!(firsts, (0..40).collect::<Vec<_>>());
    running.stop().await;
}

/// Review B7: a runtime's inbox had no cap of its own (in Matrix, none at all), and a resume
/// loaded all of it at once. One runtime's inbox holds `inbox_max_bytes_per_runtime` now;
/// past it senders are told to retry (408), and a resume hands it over page by page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtimes_inbox_is_capped_and_resumed_in_pages() {
    let running = node_with(|c| {
        c.bus.inbox_max_bytes_per_runtime = 1024 * 1024;
        c.bus.outbound_queue_bytes = 256 * 1024;
    })
    .await;
    let addr = running.bus_addr.expect("bus");
    let http = reqwest::Client::new();
    let alice_rt = "runtime://localhost/alice-rt";
    let mut alice = Stub::connect(addr, alice_rt, ALICE).await;
    let a = alice.allocate("localhost", "hyperty", 1).await.remove(0);
    let mut bob = Stub::connect(addr, "runtime://localhost/bob-rt", BOB).await;
    let b = bob.allocate("localhost", "hyperty", 1).await.remove(0);
    alice.drop_socket().await;
    let pad = "x".repeat(200 * 1024);
    let errors = send_all(
        &mut bob,
        (0..10).map(|n| {
            json!({"type": "create", "from": b, "to": a, "body": {"value": {"n": n, "pad": pad}}})
        }),
    )
    .await;
    assert!(!errors.is_empty(), "past the cap: refused");
    for error in &errors {
        assert_eq!(code(error), 408, "{error}");
        assert!(
            description(error).contains("inbox_max_bytes_per_runtime"),
            "{error}"
        );
    }
    let full = "msgnode_bus_refused_total{reason=\"runtime_inbox_full\"}";
    assert_eq!(
        common::metric(&http, &running, full).await,
        errors.len() as u64
    );
    let accepted = 10 - errors.len() as u64;
    let mut alice = bound(addr, alice_rt, ALICE).await;
    assert_eq!(
        received_ns(&mut alice).await,
        (0..accepted).collect::<Vec<_>>()
    );
    running.stop().await;
}

/// A peer node that takes every message but answers only once let go; what it got, in order.
struct SlowPeer {
    addr: std::net::SocketAddr,
    received: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    gate: std::sync::Arc<tokio::sync::Semaphore>,
}

impl SlowPeer {
    async fn start() -> SlowPeer {
        use axum::routing::post;
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
        let app = axum::Router::new().route(
            "/bus/v1/messages",
            post({
                let (received, gate) = (received.clone(), gate.clone());
                move |body: String| async move {
                    if let Ok(permit) = gate.acquire().await {
                        permit.forget();
                    }
                    let value: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                    received
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(value);
                    axum::http::StatusCode::ACCEPTED
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        SlowPeer {
            addr,
            received,
            gate,
        }
    }

    fn received(&self) -> Vec<Value> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Review B8: every message to a slow peer was a task holding a copy of it, without bound.
/// Messages for one peer wait in one bounded queue (`peer_queue`, `peer_queue_bytes`);
/// past it the sender is told to retry (408), and what was accepted reaches the peer, in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_peer_queues_a_bounded_number_of_messages() {
    let peer = SlowPeer::start().await;
    let url = format!("http://{}", peer.addr);
    let running = node_with(|c| {
        c.bus.peer_queue = 4;
        c.bus.peers[0].url = url;
    })
    .await;
    let addr = running.bus_addr.expect("bus");
    let http = reqwest::Client::new();
    let mut bob = Stub::connect(addr, "runtime://localhost/bob-rt", BOB).await;
    let b = bob.allocate("localhost", "hyperty", 1).await.remove(0);
    let errors = send_all(
        &mut bob,
        (0..20).map(|n| {
            json!({"type": "create", "from": b, "to": "hyperty://msgnode.test/x",
                "body": {"value": {"n": n}}})
        }),
    )
    .await;
    assert!(!errors.is_empty(), "past the peer's queue: refused");
    for error in &errors {
        assert_eq!(code(error), 408, "{error}");
    }
    let full = "msgnode_bus_refused_total{reason=\"peer_queue_full\"}";
    assert_eq!(
        common::metric(&http, &running, full).await,
        errors.len() as u64
    );
    let accepted = 20 - errors.len();
    assert!(
        accepted <= 5,
        "at most 4 waiting and 1 being sent: {accepted}"
    );
    peer.gate.add_permits(100);
    common::eventually(
        "the peer got what was accepted",
        Duration::from_secs(30),
        || async { peer.received().len() >= accepted },
    )
    .await;
    let ns: Vec<u64> = peer
        .received()
        .iter()
        .filter_map(|m| m["body"]["value"]["n"].as_u64())
        .collect();
    assert_eq!(ns.len(), accepted);
    assert!(ns.windows(2).all(|w| w[0] < w[1]), "in order: {ns:?}");
    running.stop().await;
}

/// Review B9: one subscribe could name 10,000 resources, each decided with the whole message
/// in its input. A subscribe names at most `max_destinations` resources, like any message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_names_no_more_resources_than_a_message_has_destinations() {
    let running = node_with(|c| c.bus.max_destinations = 4).await;
    let addr = running.bus_addr.expect("bus");
    let mut mallory = Stub::connect(addr, "runtime://localhost/mallory-rt", MALLORY).await;
    let subscribe = |n: usize| {
        json!({"type": "subscribe", "from": "runtime://localhost/mallory-rt/sm",
            "to": format!("{MN}/sm"),
            "body": {"resources": (0..n).map(|i| format!("comm://localhost/o{i}/changes")).collect::<Vec<_>>()}})
    };
    let over = mallory.request(subscribe(5)).await;
    assert_eq!(code(&over), 400, "{over}");
    assert!(description(&over).contains("max_destinations"), "{over}");
    let within = mallory.request(subscribe(4)).await;
    assert_eq!(code(&within), 200, "{within}");
    running.stop().await;
}

/// Opens a WebSocket that has not said who it is; the upgrade's HTTP status when refused.
async fn unauthenticated(addr: std::net::SocketAddr) -> Result<common::stub::Socket, u16> {
    use tokio_tungstenite::tungstenite::Error;
    match tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await {
        Ok((socket, _)) => Ok(socket),
        Err(Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("connect: {e}"),
    }
}

/// A stub bound as `runtime`, once a handshake place is free (those of sockets just closed
/// are given back when the node sees them close).
async fn bound_when_free(addr: std::net::SocketAddr, runtime: &str, token: &str) -> Stub {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("ws://{addr}/ws?runtimeURL={}", urlencode(runtime));
    for _ in 0..500 {
        let mut request = url.as_str().into_client_request().expect("request");
        let bearer = format!("Bearer {token}").parse().expect("header");
        request.headers_mut().insert("authorization", bearer);
        if let Ok((socket, _)) = tokio_tungstenite::connect_async(request).await {
            let mut stub = Stub::from_socket(socket, runtime);
            let pong = stub
                .request(json!({"type": "ping", "from": runtime, "to": "mn:/session"}))
                .await;
            assert_eq!(code(&pong), 200, "{pong}");
            return stub;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no handshake place became free");
}

/// Review B12: any number of sockets could sit in their handshake, each holding up to a
/// frame's worth of memory. They are limited per address and over all (429 / 503, counted),
/// and a place is free again once its socket is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_in_their_handshake_are_limited() {
    let running = node_with(|c| {
        c.bus.handshakes_per_ip = 2;
        c.bus.max_handshakes = 3;
    })
    .await;
    let addr = running.bus_addr.expect("bus");
    let http = reqwest::Client::new();
    let first = unauthenticated(addr).await.expect("first");
    let second = unauthenticated(addr).await.expect("second");
    assert_eq!(unauthenticated(addr).await.err(), Some(429));
    let per_ip = "msgnode_bus_refused_total{reason=\"handshakes_per_ip\"}";
    assert_eq!(common::metric(&http, &running, per_ip).await, 1);
    drop(first);
    let free = || async { unauthenticated(addr).await.is_ok() };
    common::eventually("a place is free again", Duration::from_secs(10), free).await;
    drop(second);
    // Authenticated sockets hold no place.
    let _alice = bound_when_free(addr, "runtime://localhost/alice-rt", ALICE).await;
    let _bob = bound_when_free(addr, "runtime://localhost/bob-rt", BOB).await;
    common::eventually(
        "the handshakes' places are free",
        Duration::from_secs(10),
        || async {
            let (one, two) = (unauthenticated(addr).await, unauthenticated(addr).await);
            one.is_ok() && two.is_ok()
        },
    )
    .await;
    running.stop().await;

    let running = node_with(|c| c.bus.max_handshakes = 1).await;
    let addr = running.bus_addr.expect("bus");
    let _only = unauthenticated(addr).await.expect("the only place");
    assert_eq!(unauthenticated(addr).await.err(), Some(503));
    running.stop().await;
}

/// Review B2: every per-principal limit was check-then-act across an `await`, so requests
/// racing on many runtimes all saw "0 held" and each passed. Runtimes claimed and addresses
/// allocated at the same instant stay within the principal's limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_for_requests_at_the_same_instant() {
    const RUNTIMES: usize = 4;
    let policies = common::policies_with(|data| {
        data["limits"]["per_principal"] = json!({"runtimes": RUNTIMES, "addresses": 25});
    });
    let running = node_with(|c| {
        c.pdp.policies = policies.path().to_path_buf();
        c.pdp.reload_requires_tests = Some(false);
    })
    .await;
    let addr = running.bus_addr.expect("bus");
    // Twice the runtimes the limit allows, claimed at once.
    let claims = (0..2 * RUNTIMES).map(|i| async move {
        let runtime = format!("runtime://localhost/race-{i}");
        let mut stub = Stub::connect(addr, &runtime, MALLORY).await;
        stub.send(json!({"type": "ping", "from": runtime, "to": "mn:/session"}))
            .await;
        let answer = stub.recv().await;
        (code(&answer) == 200).then_some(stub)
    });
    let mut stubs: Vec<Stub> = futures_util::future::join_all(claims)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(stubs.len(), RUNTIMES, "runtimes bound");
    // Each asks for 10 addresses at once: 25 allowed, so two get theirs and the rest 403.
    let mut ids = Vec::new();
    for stub in &mut stubs {
        let from = format!("{}/registry/allocation", stub.runtime);
        ids.push(
            stub.send(json!({"type": "create", "from": from,
                "to": format!("{MN}/address-allocation"),
                "body": {"scheme": "hyperty", "value": {"number": 10}}}))
                .await,
        );
    }
    let mut allocated = 0;
    for (stub, id) in stubs.iter_mut().zip(&ids) {
        let answer = stub.response_to(id).await;
        match code(&answer) {
            200 => {
                allocated += answer["body"]["value"]["allocated"]
                    .as_array()
                    .map_or(0, Vec::len)
            }
            403 => {}
            other => panic!("{other}: {answer}"),
        }
    }
    assert_eq!(allocated, 20, "within the limit of 25");
    running.stop().await;
}

/// Review B3: a subscribe's foreign `from` became a return route outside every
/// per-principal limit (1,000 per runtime × 1,000 runtimes). Return routes are counted
/// where they are made, whatever the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribes_make_no_return_routes_past_the_limit() {
    let running = node_with(|c| c.bus.limits.foreign_routes_per_principal = 3).await;
    let addr = running.bus_addr.expect("bus");
    let mut made = 0;
    for r in 0..2 {
        let mut stub = bound(addr, &format!("runtime://localhost/sub-{r}"), MALLORY).await;
        for i in 0..3 {
            let sub = stub
                .request(json!({"type": "subscribe",
                    "from": format!("hyperty://hybroker.example/x{r}-{i}"),
                    "to": format!("{MN}/sm"),
                    "body": {"resources": ["comm://localhost/any/changes"]}}))
                .await;
            match code(&sub) {
                200 => made += 1,
                403 => assert!(description(&sub).contains("foreign return routes"), "{sub}"),
                other => panic!("{other}: {sub}"),
            }
        }
    }
    assert_eq!(made, 3, "return routes within the principal's limit");
    running.stop().await;
}

/// Review B4: one 60 KB `from` filled the runtime's stored record to just under the
/// homeserver's event limit, after which every change failed to store. Addresses are at most
/// 255 bytes (the homeserver's state-key limit), refused with a short 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_longer_than_255_bytes_are_refused() {
    let running = node().await;
    let addr = running.bus_addr.expect("bus");
    let mut stub = bound(addr, "runtime://localhost/long", MALLORY).await;
    let long = format!("hyperty://hybroker.example/{}", "x".repeat(60_000));
    let ok = format!("hyperty://hybroker.example/{}", "x".repeat(200));
    let answer = stub
        .request(json!({"type": "create", "from": long, "to": ok}))
        .await;
    assert_eq!(code(&answer), 400, "{}", description(&answer).len());
    assert!(description(&answer).len() < 200, "a short answer");
    let sub = stub
        .request(json!({"type": "subscribe", "from": "runtime://localhost/long/sm",
            "to": format!("{MN}/sm"), "body": {"resources": [format!("comm://localhost/{}/changes", "y".repeat(300))]}}))
        .await;
    assert_eq!(code(&sub), 400, "{sub}");
    let runtime = format!("runtime://localhost/{}", "z".repeat(300));
    assert_eq!(refused_runtime(addr, &runtime).await, 400);
    running.stop().await;
}

/// Two nodes, `msgnode.test` and `hybroker.example`, peers of each other, whose policy
/// trusts both for subscriptions.
async fn peer_nodes() -> (Running, Running, tempfile::TempDir) {
    let policies = common::policies_with(|data| {
        data["subscription"]["trusted_domains"] = json!(["msgnode.test", "hybroker.example"]);
    });
    let (port_a, port_b) = (common::synapse::free_port(), common::synapse::free_port());
    let config = |domain: &str, port: u16, peer: (&str, u16)| {
        let mut config = common::bus_config(&common::shipped_policies());
        config.pdp.policies = policies.path().to_path_buf();
        config.pdp.reload_requires_tests = Some(false);
        config.bus.listen = format!("127.0.0.1:{port}").parse().expect("addr");
        config.bus.domain = Some(domain.into());
        config.bus.network_servers = [("alice", ALICE), ("mallory", MALLORY)]
            .into_iter()
            .map(|(name, token)| NetworkServer {
                name: name.into(),
                token: token.into(),
            })
            .collect();
        config.bus.peers = vec![Peer {
            domain: peer.0.into(),
            url: format!("http://127.0.0.1:{}", peer.1),
            token: PEER_TOKEN.into(),
            matrix_user: None,
        }];
        config
    };
    let a = start(config("msgnode.test", port_a, ("hybroker.example", port_b)))
        .await
        .expect("start a");
    let b = start(config("hybroker.example", port_b, ("msgnode.test", port_a)))
        .await
        .expect("start b");
    (a, b, policies)
}

/// Review B1: a `children` subscription to a foreign object made the topic's destinations
/// non-empty, so the object's own node never got what local users sent to its children.
/// B14: a peer's own updates of its objects were denied to local subscribers (its stand-in
/// runtime held nothing), and "only the holder publishes" was the node's rule for local
/// topics only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_objects_keep_their_route_and_their_publisher() {
    let (a, b, policies) = peer_nodes().await;
    let (addr_a, addr_b) = (a.bus_addr.expect("a"), b.bus_addr.expect("b"));
    let mut holder = bound(addr_b, "runtime://hybroker.example/holder", ALICE).await;
    let object = holder
        .allocate("hybroker.example", "comm", 1)
        .await
        .remove(0);
    let mut eve = bound(addr_a, "runtime://msgnode.test/eve", MALLORY).await;
    let mut alice = bound(addr_a, "runtime://msgnode.test/alice", ALICE).await;
    let sender = alice.allocate("msgnode.test", "hyperty", 1).await.remove(0);
    let children = format!("{object}/children/chat");
    let changes = format!("{object}/changes");
    let subscribe = json!({"type": "subscribe", "from": "runtime://msgnode.test/eve/sm",
        "to": "domain://msg-node.msgnode.test/sm", "body": {"resources": [children, changes]}});
    // A foreign object's children are its holder's, there: listening in needs its consent.
    let refused = eve.request(subscribe.clone()).await;
    assert_eq!(code(&refused), 403, "{refused}");
    assert!(
        description(&refused).contains("needs its consent"),
        "{refused}"
    );
    let revision = a.pdp.active().expect("bundle").revision.to_string();
    let path = policies.path().join("config/data.json");
    let mut data: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("data")).expect("json");
    data["subscription"]["consent"][&object] = json!(["runtime://msgnode.test/eve"]);
    std::fs::write(&path, data.to_string()).expect("write");
    let pdp = a.pdp.clone();
    common::eventually("the consent is active", Duration::from_secs(30), || {
        let (pdp, revision) = (pdp.clone(), revision.clone());
        async move { pdp.active().is_some_and(|a| *a.revision != *revision) }
    })
    .await;
    let sub = eve.request(subscribe).await;
    assert_eq!(code(&sub), 200, "{sub}");

    alice
        .send(json!({"type": "create", "from": sender, "to": children, "body": {"value": "hi"}}))
        .await;
    let got = holder
        .quiet_for(Duration::from_secs(5))
        .await
        .expect("the object's node got its children's message");
    assert_eq!(got["to"], children, "{got}");
    assert_eq!(eve.recv().await["to"], children, "the subscriber too");

    // Only the holder publishes the object's changes, also where the object is foreign.
    let forged = alice
        .request(json!({"type": "update", "from": sender, "to": changes, "body": {"value": "x"}}))
        .await;
    assert_eq!(code(&forged), 403, "{forged}");
    // The object's node relays its holder's update (as a peer does for a subscription it
    // serves): a peer holds its own domain's objects.
    let relayed = reqwest::Client::new()
        .post(format!("http://{addr_a}/bus/v1/messages"))
        .bearer_auth(PEER_TOKEN)
        .body(
            json!({"id": 77, "type": "update", "from": object, "to": changes,
            "body": {"value": "v2"}})
            .to_string(),
        )
        .send()
        .await
        .expect("peer post");
    assert!(relayed.status().is_success(), "{:?}", relayed.text().await);
    let update = eve
        .quiet_for(Duration::from_secs(5))
        .await
        .expect("the peer's own update reached the local subscriber");
    assert_eq!(update["body"]["value"], "v2", "{update}");
    b.stop().await;
    a.stop().await;
}

/// Review R2: a closed socket kept writing what was queued for it with a fresh
/// `write_timeout` per write, so a taken-over socket that read slowly kept its queue for as
/// long as it liked, counted nowhere. A closing socket has one deadline in all now: the old
/// socket, reading one frame at a time, is dropped at it (no close frame, not everything
/// handed over) and no socket stays closing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_over_socket_that_reads_slowly_is_dropped_at_its_deadline() {
    const N: usize = 400;
    let running = node_with(|c| {
        c.bus.write_timeout = Duration::from_secs(2);
        c.bus.outbound_queue_bytes = 32 * 1024 * 1024;
        c.bus.slow_receiver_close_after = Duration::from_secs(60);
    })
    .await;
    let addr = running.bus_addr.expect("bus");
    let http = reqwest::Client::new();
    let runtime = "runtime://localhost/alice-rt";
    let path = format!("/ws?runtimeURL={}", urlencode(runtime));
    let socket = common::stub::open_small_window(addr, &path, ALICE).await;
    let mut old = Stub::from_socket(socket, runtime);
    let a = old.allocate("localhost", "hyperty", 1).await.remove(0);
    let bob_rt = "runtime://localhost/bob-rt";
    let mut bob = Stub::connect(addr, bob_rt, BOB).await;
    let pad = "x".repeat(64 * 1024);
    for n in 0..N {
        bob.send(json!({"type": "create", "from": bob_rt, "to": a, "body": {"value": {"n": n, "pad": pad}}}))
            .await;
    }
    let pong = bob
        .request(json!({"type": "ping", "from": bob_rt, "to": "mn:/session"}))
        .await;
    assert_eq!(
        code(&pong),
        200,
        "all {N} queued for the old socket: {pong}"
    );
    let mut new = Stub::connect(addr, runtime, ALICE).await;
    let pong = new
        .request(json!({"type": "ping", "from": runtime, "to": "mn:/session"}))
        .await;
    assert_eq!(code(&pong), 200, "taken over: {pong}");
    // The old socket reads one frame at a time until the node has dropped it.
    let dropped = "msgnode_bus_refused_total{reason=\"closing_timeout\"}";
    let (mut read, mut close_frame) = (0, false);
    let mut on = |frame: Option<Value>| match frame {
        Some(f) if f.get("closed").is_some() => {
            close_frame = true;
            false
        }
        Some(_) => {
            read += 1;
            true
        }
        None => false,
    };
    let mut open = true;
    while open && common::metric(&http, &running, dropped).await == 0 {
        open = on(old.quiet_for(Duration::from_secs(5)).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while open {
        open = on(old.quiet_for(Duration::from_secs(5)).await);
    }
    assert!(
        !close_frame && read < N,
        "the closing socket was dropped at its deadline (read {read} of {N}, close frame: {close_frame})"
    );
    let closing = "msgnode_bus_sockets_closing";
    common::eventually("no socket is closing", Duration::from_secs(10), || async {
        common::metric(&http, &running, closing).await == 0
    })
    .await;
    running.stop().await;
}

/// Opens a socket.io session on `sio` for `runtime` (Socket.IO's connect, then the `open`
/// message) and waits for the open's answer.
async fn socket_io_open<S>(sio: &mut tokio_tungstenite::WebSocketStream<S>, runtime: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as Ws;
    let open = json!({"id": 1, "type": "open", "from": runtime, "to": "mn:/session"});
    let packets = [
        "40".to_string(),
        format!("42{}", json!(["message", open.to_string()])),
    ];
    for packet in packets {
        sio.send(Ws::Text(packet.into())).await.expect("send");
    }
    let mut answered = false;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(Duration::from_secs(10), sio.next()).await
    {
        if let Ws::Text(t) = frame {
            if t.starts_with("42") && t.contains("runtimeToken") {
                answered = true;
                break;
            }
        }
    }
    assert!(answered, "the open is answered");
}

/// Review R3: a socket.io stub could queue 1,024 messages of up to a frame each (1 GiB) while
/// the node handled one. Its inbound queue is bounded in bytes now (`max_frame_bytes`
/// waiting, as a WebSocket stub's reading): one that sends far ahead of a message waiting
/// for a full receiver is disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_io_stub_cannot_queue_more_than_its_budget() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as Ws;
    let running = node_with(|c| {
        c.bus.outbound_queue_bytes = 64 * 1024;
        c.bus.slow_receiver_close_after = Duration::from_secs(60);
    })
    .await;
    let addr = running.bus_addr.expect("bus");
    let http = reqwest::Client::new();
    let bob_rt = "runtime://localhost/bob-rt";
    let path = format!("/ws?runtimeURL={}", urlencode(bob_rt));
    let mut bob = Stub::from_socket(
        common::stub::open_small_window(addr, &path, BOB).await,
        bob_rt,
    );
    let b = bob.allocate("localhost", "hyperty", 1).await.remove(0);
    let (mut sio, _) = tokio_tungstenite::connect_async(format!(
        "ws://{addr}/socket.io/?EIO=4&transport=websocket&access_token={ALICE}"
    ))
    .await
    .expect("socket.io over WebSocket");
    let alice_rt = "runtime://localhost/alice-rt";
    socket_io_open(&mut sio, alice_rt).await;
    // 64 messages of 256 KiB to bob, who does not read: the node waits on his queue while
    // alice's socket.io stub sends on.
    let pad = "x".repeat(256 * 1024);
    let mut sent = 0;
    for n in 0..64 {
        let message = json!({"type": "create", "id": 10 + n, "from": alice_rt, "to": b,
            "body": {"value": {"n": n, "pad": pad}}});
        let packet = format!("42{}", json!(["message", message.to_string()]));
        if sio.send(Ws::Text(packet.into())).await.is_err() {
            break;
        }
        sent += 1;
    }
    let full = "msgnode_bus_refused_total{reason=\"inbound_full\"}";
    common::eventually(
        "the socket.io stub past its inbound budget is disconnected",
        Duration::from_secs(30),
        || async { common::metric(&http, &running, full).await >= 1 },
    )
    .await;
    let mut closed = false;
    while let Ok(frame) = tokio::time::timeout(Duration::from_secs(10), sio.next()).await {
        match frame {
            Some(Ok(Ws::Text(t))) if t == "41" => {
                closed = true;
                break;
            }
            Some(Ok(Ws::Close(_)) | Err(_)) | None => {
                closed = true;
                break;
            }
            Some(Ok(_)) => {}
        }
    }
    assert!(closed, "disconnected after {sent} messages");
    drop(bob);
    running.stop().await;
}

/// Review R4: a release answered with the client's own `childrenResources`, unchecked and
/// uncapped, so every answer could be a frame. The list is capped and each address checked
/// now, and the answer names only what was released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_echoes_nothing_it_did_not_release() {
    let running = node().await;
    let addr = running.bus_addr.expect("bus");
    let rt = "runtime://localhost/mallory-rt";
    let mut mallory = Stub::connect(addr, rt, MALLORY).await;
    let mine = mallory.allocate("localhost", "hyperty", 2).await;
    let release = |children: Value| {
        json!({"type": "delete", "from": format!("{rt}/registry/allocation"),
            "to": format!("{MN}/address-allocation"), "body": {"childrenResources": children}})
    };
    let too_many: Vec<String> = (0..1001)
        .map(|i| format!("hyperty://localhost/{i}"))
        .collect();
    let answer = mallory.request(release(json!(too_many))).await;
    assert_eq!(code(&answer), 400, "{}", description(&answer));
    for bad in [
        json!(["x".repeat(100_000)]),
        json!(["not a url"]),
        json!([[mine[0], 7]]),
    ] {
        let answer = mallory.request(release(bad)).await;
        assert_eq!(code(&answer), 400, "{}", description(&answer));
        assert!(answer.to_string().len() < 1024, "answered small: {answer}");
    }
    let others: Vec<String> = (0..500)
        .map(|i| format!("hyperty://localhost/not-mine-{i}"))
        .collect();
    let mut children = others.clone();
    children.push(mine[0].clone());
    let answer = mallory.request(release(json!(children))).await;
    assert_eq!(code(&answer), 200, "{answer}");
    assert_eq!(
        answer["body"]["value"]["released"],
        json!([mine[0]]),
        "only what was released"
    );
    running.stop().await;
}

/// Review R6: the peer endpoint read a 2 MB body before it checked the token, and the bus's
/// listener had no connection cap and no timeouts. A wrong token is answered from the
/// headers (no body read); a connection that sends nothing is closed after
/// `handshake_timeout`; past `max_connections` nothing more is served until one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_posts_and_idle_connections_hold_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let running = node_with(|c| {
        c.bus.handshake_timeout = Duration::from_millis(500);
        c.bus.max_connections = 3;
    })
    .await;
    let addr = running.bus_addr.expect("bus");
    let head = |token: &str| {
        format!("POST /bus/v1/messages HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: 1500000\r\n\r\n")
    };
    let answer = |mut tcp: tokio::net::TcpStream| async move {
        let mut text = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut text)).await;
        String::from_utf8_lossy(&text).to_string()
    };
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(head("wrong").as_bytes()).await.expect("head");
    let mut first = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut first))
        .await
        .expect("answered before any body was sent")
        .expect("read");
    assert_eq!(
        &first,
        b"HTTP/1.1 401",
        "{}",
        String::from_utf8_lossy(&first)
    );
    drop(tcp);
    // A peer's body not sent in time: 408, and the connection is not held.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(head(PEER_TOKEN).as_bytes())
        .await
        .expect("head");
    tcp.write_all(&[b' '; 1000])
        .await
        .expect("some of the body");
    let text = answer(tcp).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    // Connections that send nothing are closed by the node.
    let idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
    assert_eq!(answer(idle).await, "", "closed without an answer");
    // Three sockets take every place: a fourth connection is served once one closes.
    let mut stubs = Vec::new();
    for rt in [
        "runtime://localhost/a1",
        "runtime://localhost/a2",
        "runtime://localhost/a3",
    ] {
        stubs.push(Stub::connect(addr, rt, ALICE).await);
    }
    let mut waiting = tokio::net::TcpStream::connect(addr).await.expect("connect");
    waiting
        .write_all(head("wrong").as_bytes())
        .await
        .expect("head");
    let mut status = [0u8; 12];
    let early =
        tokio::time::timeout(Duration::from_millis(500), waiting.read_exact(&mut status)).await;
    assert!(early.is_err(), "not served while every place is taken");
    stubs.pop().expect("a stub").drop_socket().await;
    tokio::time::timeout(Duration::from_secs(10), waiting.read_exact(&mut status))
        .await
        .expect("served once a place is free")
        .expect("read");
    assert_eq!(&status, b"HTTP/1.1 401");
    running.stop().await;
}

/// Review (B11): released runtimes counted against the runtime limit for good, so a
/// runtime that takes a fresh URL per session locked its user out after that many
/// sessions. Live runtimes count against `runtimes_per_principal`; released ones (whose
/// URLs stay their owner's) against the larger `tombstones_per_principal`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_sessions_on_fresh_runtime_urls_do_not_lock_a_user_out() {
    let running = node_with(|c| {
        c.bus.limits.runtimes_per_principal = 2;
        c.bus.limits.tombstones_per_principal = 10;
    })
    .await;
    let addr = running.bus_addr.expect("bus");
    for n in 0..6 {
        let runtime = format!("runtime://localhost/session-{n}");
        let mut stub = bound(addr, &runtime, MALLORY).await;
        stub.send(json!({"type": "disconnect", "from": runtime, "to": "mn:/session"}))
            .await;
        assert!(stub.closed().await.is_some(), "released and closed");
    }
    // More short sessions than live runtimes allowed: still a live one, and another.
    let _one = bound(addr, "runtime://localhost/session-new-1", MALLORY).await;
    let _two = bound(addr, "runtime://localhost/session-new-2", MALLORY).await;
    assert_eq!(
        refused_runtime(addr, "runtime://localhost/session-new-3").await,
        403,
        "two live runtimes at most"
    );
    drop(_two);
    // A released URL stays its owner's: not another principal's to take, its owner's to
    // take up again.
    let path = format!(
        "/ws?runtimeURL={}",
        urlencode("runtime://localhost/session-0")
    );
    let mut alice = Stub::from_socket(common::stub::open(addr, &path, ALICE).await, "x");
    assert_eq!(code(&alice.recv().await), 403, "not alice's");
    running.stop().await;

    // Past the cap of released URLs, a new URL is refused with the reason; a released one
    // is not.
    let running = node_with(|c| c.bus.limits.tombstones_per_principal = 2).await;
    let addr = running.bus_addr.expect("bus");
    for n in 0..2 {
        let runtime = format!("runtime://localhost/short-{n}");
        let mut stub = bound(addr, &runtime, MALLORY).await;
        stub.send(json!({"type": "disconnect", "from": runtime, "to": "mn:/session"}))
            .await;
        assert!(stub.closed().await.is_some(), "released and closed");
    }
    let path = format!(
        "/ws?runtimeURL={}",
        urlencode("runtime://localhost/short-2")
    );
    let mut refused = Stub::from_socket(common::stub::open(addr, &path, MALLORY).await, "x");
    let answer = refused.recv().await;
    assert_eq!(code(&answer), 403, "{answer}");
    assert!(
        description(&answer).contains("released 2 runtime URLs"),
        "{answer}"
    );
    let _again = bound(addr, "runtime://localhost/short-0", MALLORY).await;
    running.stop().await;
}

/// Review N11: binding a released runtime again (a tombstone) made it live with no limit
/// checked, so a principal could have as many live runtimes as tombstones. Reviving one
/// counts against `runtimes_per_principal` like a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reviving_tombstones_stays_within_the_live_runtime_limit() {
    let running = node_with(|c| {
        c.bus.limits.runtimes_per_principal = 2;
        c.bus.limits.tombstones_per_principal = 10;
    })
    .await;
    let addr = running.bus_addr.expect("bus");
    let release = |mut stub: Stub, runtime: String| async move {
        stub.send(json!({"type": "disconnect", "from": runtime, "to": "mn:/session"}))
            .await;
        assert!(stub.closed().await.is_some(), "released and closed");
    };
    for n in 0..2 {
        let runtime = format!("runtime://localhost/old-{n}");
        release(bound(addr, &runtime, MALLORY).await, runtime).await;
    }
    let _live = bound(addr, "runtime://localhost/live-1", MALLORY).await;
    let second = "runtime://localhost/live-2".to_string();
    let live_2 = bound(addr, &second, MALLORY).await;
    let path = format!("/ws?runtimeURL={}", urlencode("runtime://localhost/old-0"));
    let mut revived = Stub::from_socket(common::stub::open(addr, &path, MALLORY).await, "x");
    let answer = revived.recv().await;
    assert_eq!(code(&answer), 403, "two live runtimes at most: {answer}");
    assert!(description(&answer).contains("the limit is 2"), "{answer}");
    // With a live one released, the tombstone is its owner's to take up again.
    release(live_2, second).await;
    let _again = bound(addr, "runtime://localhost/old-0", MALLORY).await;
    running.stop().await;
}

/// Review B10: the inboxes' memory budget was shared, so mallory filling her own away
/// runtimes' inboxes made every other user's messages to away runtimes 408. What waits is
/// charged to the sender's principal within its share (`inbox_max_bytes_per_principal`):
/// she is refused, clearly, and bob's message reaches alice's away runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_principal_filling_the_inboxes_refuses_only_itself() {
    let running = node_with(|c| {
        c.bus.inbox_max_bytes = 1024 * 1024;
        c.bus.inbox_max_bytes_per_principal = 256 * 1024;
        c.bus.inbox_max_bytes_per_runtime = 1024 * 1024;
    })
    .await;
    let addr = running.bus_addr.expect("bus");
    let http = reqwest::Client::new();
    let alice_rt = "runtime://localhost/alice-rt";
    let mut alice = Stub::connect(addr, alice_rt, ALICE).await;
    let a = alice.allocate("localhost", "hyperty", 1).await.remove(0);
    let mut away = Vec::new();
    for n in 0..2 {
        let mut stub =
            Stub::connect(addr, &format!("runtime://localhost/m-away-{n}"), MALLORY).await;
        away.push(stub.allocate("localhost", "hyperty", 1).await.remove(0));
        stub.drop_socket().await;
    }
    alice.drop_socket().await;
    let mut mallory = Stub::connect(addr, "runtime://localhost/mallory-rt", MALLORY).await;
    let m = mallory.allocate("localhost", "hyperty", 1).await.remove(0);
    let pad = "x".repeat(50 * 1024);
    // 40 × 50 KiB over her two away runtimes: past the global budget, as before the fix.
    let errors = send_all(
        &mut mallory,
        (0..40).map(|n| {
            json!({"type": "create", "from": m, "to": away[n % 2], "body": {"value": {"n": n, "pad": pad}}})
        }),
    )
    .await;
    assert!(
        errors.len() > 30,
        "refused past her share: {}",
        errors.len()
    );
    for error in &errors {
        assert_eq!(code(error), 408, "{error}");
        assert!(
            description(error).contains("inbox_max_bytes_per_principal"),
            "{error}"
        );
    }
    let full = "msgnode_bus_refused_total{reason=\"principal_inbox_full\"}";
    assert_eq!(
        common::metric(&http, &running, full).await,
        errors.len() as u64
    );
    // Bob's message to alice's away runtime is held and delivered when she is back.
    let mut bob = Stub::connect(addr, "runtime://localhost/bob-rt", BOB).await;
    let b = bob.allocate("localhost", "hyperty", 1).await.remove(0);
    let errors = send_all(
        &mut bob,
        [json!({"type": "create", "from": b, "to": a, "body": {"value": {"n": 7, "pad": pad}}})],
    )
    .await;
    assert!(errors.is_empty(), "{errors:?}");
    let mut alice = bound(addr, alice_rt, ALICE).await;
    assert_eq!(received_ns(&mut alice).await, [7]);
    running.stop().await;
}

/// Review N9: the status notifications the registry publishes for an update were charged
/// to the node, outside every share, so one user updating a hyperty with away subscribers
/// filled the inboxes' budget for everyone. They count against the updater's share: the
/// updater's subscribers miss what does not fit it, and bob's message to an away runtime
/// still goes in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_notifications_count_against_the_updaters_share() {
    let running = node_with(|c| {
        c.bus.inbox_max_bytes = 2 * 1024 * 1024;
        c.bus.inbox_max_bytes_per_principal = 1024 * 1024;
        c.bus.inbox_max_bytes_per_runtime = 2 * 1024 * 1024;
    })
    .await;
    let addr = running.bus_addr.expect("bus");
    let mut mallory = bound(addr, "runtime://localhost/mallory-rt", MALLORY).await;
    let h = mallory.allocate("localhost", "hyperty", 1).await.remove(0);
    let registered = mallory
        .register_chat_hyperty(&h, "user://localhost/mallory")
        .await;
    assert_eq!(code(&registered), 200, "{registered}");
    away_subscribers(addr, MALLORY, &format!("{h}/registration"), 4).await;
    let a = away_hyperty(addr, ALICE_AWAY, ALICE).await;
    // 20 × 50 KB to each of 4 away subscribers: 4 MB, twice the inboxes' budget.
    status_updates(&mut mallory, &h).await;
    let mut bob = bound(addr, "runtime://localhost/bob-rt", BOB).await;
    let errors = reaches_away(addr, &mut bob, &a).await;
    assert!(errors.is_empty(), "bob's message is taken: {errors:?}");
    running.stop().await;
}

/// `n` runtimes of `principal` (`runtime://localhost/m-sub-N`), each subscribed to
/// `resource`, then away.
async fn away_subscribers(addr: std::net::SocketAddr, principal: &str, resource: &str, n: usize) {
    for n in 0..n {
        let runtime = format!("runtime://localhost/m-sub-{n}");
        let mut sub = bound(addr, &runtime, principal).await;
        let answer = subscribe(&mut sub, &runtime, &[resource.to_string()]).await;
        assert_eq!(code(&answer), 200, "{answer}");
        sub.drop_socket().await;
    }
}

/// The away runtime a message of [`reaches_away`] is sent to.
const ALICE_AWAY: &str = "runtime://localhost/alice-rt";

/// A hyperty of `principal`'s runtime `runtime`, which then goes away.
async fn away_hyperty(addr: std::net::SocketAddr, runtime: &str, principal: &str) -> String {
    let mut stub = bound(addr, runtime, principal).await;
    let hyperty = stub.allocate("localhost", "hyperty", 1).await.remove(0);
    stub.drop_socket().await;
    hyperty
}

/// Twenty status updates of 50 KB of hyperty `h`, registered by `updater`.
async fn status_updates(updater: &mut Stub, h: &str) {
    let pad = "x".repeat(50_000);
    for n in 0..20 {
        let update = updater
            .request(
                json!({"type": "update", "from": h, "to": "domain://registry.localhost",
                "body": {"resource": h, "attribute": "status", "value": format!("{n}{pad}")}}),
            )
            .await;
        assert_eq!(code(&update), 200, "{update}");
    }
}

/// A 60 KB message from a new hyperty of `sender` to `a`, alice's hyperty on the away
/// [`ALICE_AWAY`]: bigger than one notification, so it fits only if they left room in the
/// inboxes. The errors it got; when none, alice gets it on reconnecting.
async fn reaches_away(addr: std::net::SocketAddr, sender: &mut Stub, a: &str) -> Vec<Value> {
    let b = sender.allocate("localhost", "hyperty", 1).await.remove(0);
    let hi = "y".repeat(60_000);
    let errors = send_all(
        sender,
        [json!({"type": "create", "from": b, "to": a, "body": {"value": hi}})],
    )
    .await;
    if errors.is_empty() {
        let mut alice = Stub::connect(addr, ALICE_AWAY, ALICE).await;
        assert_eq!(alice.recv().await["body"]["value"], hi.as_str());
    }
    errors
}

/// Review bus-4 M2: with status notifications charged to the updater (N9), anyone's
/// subscriptions to a victim's `…/registration` made the victim pay: mallory's 30 away
/// runtimes filled bob's share with bob's own status updates, and bob's message to an away
/// runtime got 408. Each away subscriber's copy is charged to the subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn others_subscriptions_do_not_fill_the_updaters_share() {
    let running = node_with(|c| {
        c.bus.inbox_max_bytes = 4 * 1024 * 1024;
        c.bus.inbox_max_bytes_per_principal = 1024 * 1024;
        c.bus.inbox_max_bytes_per_runtime = 2 * 1024 * 1024;
    })
    .await;
    let addr = running.bus_addr.expect("bus");
    let mut bob = bound(addr, "runtime://localhost/bob-rt", BOB).await;
    let h = bob.allocate("localhost", "hyperty", 1).await.remove(0);
    let registered = bob.register_chat_hyperty(&h, "user://localhost/bob").await;
    assert_eq!(code(&registered), 200, "{registered}");
    away_subscribers(addr, MALLORY, &format!("{h}/registration"), 30).await;
    let a = away_hyperty(addr, ALICE_AWAY, ALICE).await;
    // 20 × 50 KB to each of 30 away subscribers: 30 MB, far past bob's 1 MiB share.
    status_updates(&mut bob, &h).await;
    let errors = reaches_away(addr, &mut bob, &a).await;
    assert!(errors.is_empty(), "bob's share is his own: {errors:?}");
    running.stop().await;
}

/// Subscribes `stub` (runtime `runtime`) to `resources`; the answer's code.
async fn subscribe(stub: &mut Stub, runtime: &str, resources: &[String]) -> Value {
    stub.request(json!({"type": "subscribe", "from": format!("{runtime}/sm"),
        "to": format!("{MN}/sm"), "body": {"resources": resources}}))
        .await
}

/// Review B15: subscriptions were bounded per runtime only (10,000 × every runtime a
/// principal owns), and each is decided again on every policy revision. They are bounded
/// per principal too (`[bus.limits] subscriptions_per_principal`, and the policy's
/// `limits.per_principal.subscriptions`), counted in the principal's turn, 403 past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_limited_per_principal_across_runtimes() {
    let running = node_with(|c| c.bus.limits.subscriptions_per_principal = 3).await;
    let addr = running.bus_addr.expect("bus");
    let http = reqwest::Client::new();
    let (m1, m2) = ("runtime://localhost/m-1", "runtime://localhost/m-2");
    let mut first = bound(addr, m1, MALLORY).await;
    let mut second = bound(addr, m2, MALLORY).await;
    let object = first.allocate("localhost", "comm", 1).await.remove(0);
    let topic = |t: &str| format!("{object}/children/{t}");
    let ok = subscribe(&mut first, m1, &[topic("a"), topic("b")]).await;
    assert_eq!(code(&ok), 200, "{ok}");
    let over = subscribe(&mut second, m2, &[topic("c"), topic("d")]).await;
    assert_eq!(code(&over), 403, "{over}");
    assert!(
        description(&over).contains("holds 2 subscriptions (the limit is 3)"),
        "{over}"
    );
    let last = subscribe(&mut second, m2, &[topic("c")]).await;
    assert_eq!(code(&last), 200, "{last}");
    let again = subscribe(&mut second, m2, &[topic("c"), topic("c")]).await;
    assert_eq!(code(&again), 200, "held already: adds nothing {again}");
    let over = subscribe(&mut first, m1, &[topic("e")]).await;
    assert_eq!(code(&over), 403, "{over}");
    let limited = "msgnode_bus_limited_total{limit=\"subscriptions\"}";
    assert_eq!(common::metric(&http, &running, limited).await, 2);
    // An unsubscribe gives a place back; another principal has its own.
    let gone = first
        .request(json!({"type": "unsubscribe", "from": format!("{m1}/sm"),
            "to": format!("{MN}/sm"), "body": {"resources": [topic("a")]}}))
        .await;
    assert_eq!(code(&gone), 200, "{gone}");
    let ok = subscribe(&mut first, m1, &[topic("e")]).await;
    assert_eq!(code(&ok), 200, "{ok}");
    let bob_rt = "runtime://localhost/bob-rt";
    let mut bob = bound(addr, bob_rt, BOB).await;
    let own = bob.allocate("localhost", "comm", 1).await.remove(0);
    let mine: Vec<String> = ["x", "y", "z"]
        .iter()
        .map(|t| format!("{own}/children/{t}"))
        .collect();
    let ok = subscribe(&mut bob, bob_rt, &mine).await;
    assert_eq!(code(&ok), 200, "{ok}");
    running.stop().await;
}

/// Sockets per principal were uncapped: a principal's memory bound was its runtimes
/// (10,000) × a socket's budget. One principal has at most `[bus.limits]
/// sockets_per_principal` connected; one more is refused at its handshake (403, closed with
/// 1008 and a reason saying why), and a place is free again once a socket is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_are_limited_per_principal() {
    let running = node_with(|c| c.bus.limits.sockets_per_principal = 2).await;
    let addr = running.bus_addr.expect("bus");
    let http = reqwest::Client::new();
    let first = bound(addr, "runtime://localhost/m-1", MALLORY).await;
    let _second = bound(addr, "runtime://localhost/m-2", MALLORY).await;
    let third = "runtime://localhost/m-3";
    let path = format!("/ws?runtimeURL={}", urlencode(third));
    let mut refused = Stub::from_socket(common::stub::open(addr, &path, MALLORY).await, third);
    let answer = refused.recv().await;
    assert_eq!(code(&answer), 403, "{answer}");
    assert!(
        description(&answer).contains("sockets_per_principal"),
        "{answer}"
    );
    assert_eq!(refused.closed().await, Some(1008));
    let limited = "msgnode_bus_limited_total{limit=\"sockets\"}";
    assert_eq!(common::metric(&http, &running, limited).await, 1);
    // Another principal has its own places; a closed socket gives its place back.
    let _bob = bound(addr, "runtime://localhost/bob-rt", BOB).await;
    first.drop_socket().await;
    common::eventually(
        "the place is free again",
        Duration::from_secs(10),
        || async {
            // Refused (403, closed) until the node has seen the close: asked again.
            let mut stub = Stub::connect(addr, third, MALLORY).await;
            let pong = stub
                .try_request(json!({"type": "ping", "from": third, "to": "mn:/session"}))
                .await;
            pong.is_some_and(|pong| code(&pong) == 200)
        },
    )
    .await;
    running.stop().await;
}

/// A runtime of mallory's that stops reading once a delivery to it waits (its queue full):
/// `(receiver, its address)`. What it was sent is in `filler`'s task, which stays blocked in
/// that delivery for as long as the receiver does not read.
async fn stalled_receiver(
    addr: std::net::SocketAddr,
    running: &Running,
    http: &reqwest::Client,
) -> (Stub, String) {
    let mut receiver = bound(addr, "runtime://localhost/eve-rt", MALLORY).await;
    let e = receiver.allocate("localhost", "hyperty", 1).await.remove(0);
    let mut filler = bound(addr, "runtime://localhost/eve-filler", MALLORY).await;
    let f = filler.allocate("localhost", "hyperty", 1).await.remove(0);
    let pad = "x".repeat(512 * 1024);
    let to = e.clone();
    // More than the queue and the TCP buffers hold; the filler's socket is not read once
    // its delivery waits, so its own sends block too.
    tokio::spawn(async move {
        for n in 0..64 {
            filler
                .send(json!({"type": "create", "from": f, "to": to, "body": {"value": {"n": n, "pad": pad}}}))
                .await;
        }
        filler
    });
    let slowed = "msgnode_bus_senders_slowed_total";
    common::eventually(
        "a delivery waits for the receiver",
        Duration::from_secs(60),
        || async { common::metric(http, running, slowed).await >= 1 },
    )
    .await;
    (receiver, e)
}

/// Review R1: a principal's turn was held for its whole request — also while the request
/// waited (flow control, up to `slow_receiver_close_after`) on another principal's full
/// receiver — so one receiver that did not read stalled every allocation, subscribe and new
/// runtime of its senders; and turns were 256 shared stripes. The turn covers counting
/// only: while alice's message waits on mallory's full receiver, alice's other runtimes
/// connect and allocate, and so does bob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_receiver_holds_no_turn_of_its_senders() {
    let running = node_with(|c| {
        c.bus.outbound_queue_bytes = 256 * 1024;
        c.bus.slow_receiver_close_after = Duration::from_secs(300);
    })
    .await;
    let addr = running.bus_addr.expect("bus");
    let http = reqwest::Client::new();
    let (receiver, e) = stalled_receiver(addr, &running, &http).await;
    // A `from` alice does not hold yet (a return route to be): counted in her turn, then
    // delivered — which waits, as the receiver's queue is full.
    let mut waiting = bound(addr, "runtime://localhost/alice-1", ALICE).await;
    waiting
        .send(
            json!({"type": "create", "from": "hyperty://hybroker.example/alice-x", "to": e,
            "body": {"value": "waits"}}),
        )
        .await;
    let slowed = "msgnode_bus_senders_slowed_total";
    common::eventually(
        "alice's delivery waits too",
        Duration::from_secs(60),
        || async { common::metric(&http, &running, slowed).await >= 2 },
    )
    .await;
    let ping = waiting
        .send(json!({"type": "ping", "from": "runtime://localhost/alice-1", "to": "mn:/session"}))
        .await;
    // Meanwhile alice's other runtime connects (a new runtime: her turn), allocates and
    // subscribes (her turn again).
    let mut other = bound(addr, "runtime://localhost/alice-2", ALICE).await;
    other.allocate("localhost", "hyperty", 2).await;
    let sub = other
        .request(
            json!({"type": "subscribe", "from": "runtime://localhost/alice-2/sm",
            "to": format!("{MN}/sm"), "body": {"resources": ["comm://localhost/any/changes"]}}),
        )
        .await;
    assert_eq!(code(&sub), 200, "{sub}");
    let mut bob = bound(addr, "runtime://localhost/bob-rt", BOB).await;
    bob.allocate("localhost", "hyperty", 1).await;
    // All that while the first request still waits: its ping is not answered yet.
    let early = quiet(&mut waiting).await;
    assert!(
        early.is_none(),
        "alice's first socket is still waiting: {early:?}"
    );
    // Once the receiver is gone, the waiting delivery ends (in its inbox) and the ping is
    // answered.
    receiver.drop_socket().await;
    let pong = waiting.response_to(&ping).await;
    assert_eq!(code(&pong), 200, "{pong}");
    running.stop().await;
}

/// Review R7: one away subscriber with a full inbox made every publish to the topic a 408
/// for everyone, so mallory could silence alice's object by subscribing to its changes. A
/// subscriber that cannot take a publish misses it (counted); the publisher is not refused
/// and the other subscribers get it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_subscriber_does_not_block_the_publisher() {
    let running = node_with(|c| c.bus.inbox_max_bytes_per_runtime = 256 * 1024).await;
    let addr = running.bus_addr.expect("bus");
    let http = reqwest::Client::new();
    let mut alice = bound(addr, "runtime://localhost/alice-rt", ALICE).await;
    let object = alice.allocate("localhost", "comm", 1).await.remove(0);
    let changes = format!("{object}/changes");
    let subscribe = |runtime: &str| {
        json!({"type": "subscribe", "from": format!("{runtime}/sm"), "to": format!("{MN}/sm"),
            "body": {"resources": [changes]}})
    };
    let mut bob = bound(addr, "runtime://localhost/bob-rt", BOB).await;
    let sub = bob.request(subscribe("runtime://localhost/bob-rt")).await;
    assert_eq!(code(&sub), 200, "{sub}");
    let eve_rt = "runtime://localhost/eve-rt";
    let mut eve = bound(addr, eve_rt, MALLORY).await;
    let sub = eve.request(subscribe(eve_rt)).await;
    assert_eq!(code(&sub), 200, "{sub}");
    eve.drop_socket().await;
    // Mallory fills her away subscriber's inbox from another runtime, until it refuses.
    let mut filler = bound(addr, "runtime://localhost/eve-filler", MALLORY).await;
    let f = filler.allocate("localhost", "hyperty", 1).await.remove(0);
    let pad = "x".repeat(100 * 1024);
    let errors = send_all(
        &mut filler,
        (0..4).map(|n| json!({"type": "create", "from": f, "to": eve_rt, "body": {"value": {"n": n, "pad": pad}}})),
    )
    .await;
    assert!(!errors.is_empty(), "the inbox is full");
    // Alice publishes (more than mallory's inbox has room for): not refused, and bob gets it.
    let errors = send_all(
        &mut alice,
        [json!({"type": "update", "from": object, "to": changes,
            "body": {"value": {"v": 2, "pad": pad}}})],
    )
    .await;
    assert!(errors.is_empty(), "{errors:?}");
    let update = bob.recv().await;
    assert_eq!(update["body"]["value"]["v"], 2, "{}", update["type"]);
    let missed = "msgnode_bus_refused_total{reason=\"subscriber_missed\"}";
    assert_eq!(common::metric(&http, &running, missed).await, 1);
    running.stop().await;
}

/// What the node answers a message `message` posted by the peer node `msgnode.test`.
async fn from_peer(http: &reqwest::Client, addr: std::net::SocketAddr, message: Value) -> Value {
    let answer = http
        .post(format!("http://{addr}/bus/v1/messages"))
        .bearer_auth(PEER_TOKEN)
        .body(message.to_string())
        .send()
        .await
        .expect("post");
    assert_eq!(answer.status(), 200, "an answer");
    answer.json().await.expect("JSON")
}

/// Review R5, N13: a peer node's stand-in allocated (and in Matrix mode was never answered,
/// its queue closed from the start), subscribed and registered, and a peer's message could
/// name a third domain, which this node forwarded on its own line. A peer only routes: it
/// may not allocate, subscribe or write to the registry, nor reach another domain through
/// this node (403 each, with the reason); it may still read the registry and reach local
/// addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_only_routes() {
    let running = node().await;
    let addr = running.bus_addr.expect("bus");
    let http = reqwest::Client::new();
    let from = "hyperty://msgnode.test/x";
    let refused = [
        (
            "allocate addresses",
            json!({"type": "create", "to": format!("{MN}/address-allocation"),
                "body": {"scheme": "hyperty", "value": {"number": 2}}}),
        ),
        (
            "subscribe",
            json!({"type": "subscribe", "to": format!("{MN}/sm"),
                "body": {"resources": ["comm://localhost/o/changes"]}}),
        ),
        (
            "write to the registry",
            json!({"type": "create", "to": "domain://registry.localhost",
                "body": {"value": {"url": from}}}),
        ),
        (
            "write to the registry",
            json!({"type": "update", "to": "domain://registry.localhost",
                "body": {"resource": from, "attribute": "status", "value": "live"}}),
        ),
        (
            "write to the registry",
            json!({"type": "delete", "to": "domain://registry.localhost",
                "body": {"value": {"url": from}}}),
        ),
        (
            "not forwarded to a third domain",
            json!({"type": "create", "to": "hyperty://hybroker.example/y"}),
        ),
        // M8: a peer's `close` released its stand-in.
        (
            "close a session",
            json!({"type": "close", "to": "mn:/session"}),
        ),
    ];
    for (n, (reason, mut message)) in refused.into_iter().enumerate() {
        message["id"] = json!(n + 1);
        message["from"] = json!(from);
        let answer = from_peer(&http, addr, message.clone()).await;
        assert_eq!(code(&answer), 403, "{message}: {answer}");
        assert!(description(&answer).contains(reason), "{message}: {answer}");
    }
    // Reading the registry, and a local address, still work.
    let read = from_peer(
        &http,
        addr,
        json!({"id": 20, "type": "read", "from": from, "to": "domain://registry.localhost",
            "body": {"resource": "hyperty://localhost/nobody"}}),
    )
    .await;
    assert_ne!(code(&read), 403, "{read}");
    let mut bob = bound(addr, "runtime://localhost/bob-rt", BOB).await;
    let b = bob.allocate("localhost", "hyperty", 1).await.remove(0);
    let posted = http
        .post(format!("http://{addr}/bus/v1/messages"))
        .bearer_auth(PEER_TOKEN)
        .body(json!({"id": 21, "type": "create", "from": from, "to": b}).to_string())
        .send()
        .await
        .expect("post");
    assert_eq!(posted.status(), 202);
    assert_eq!(bob.recv().await["from"], from);
    running.stop().await;
}

/// Review bus-4 M10 (N13's `Destination::Topic` branch): a peer's message to a third
/// domain's topic that local runtimes subscribed to is refused whole (403, nothing delivered
/// to the local subscribers, nothing forwarded to the third domain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_does_not_publish_to_a_third_domains_topic() {
    let policies = common::policies_with(|data| {
        data["subscription"]["trusted_domains"] = json!(["hybroker.example"]);
        data["subscription"]["consent"]["comm://hybroker.example/room"] =
            json!(["runtime://localhost/alice-rt"]);
    });
    let running = node_with(|c| {
        c.pdp.policies = policies.path().to_path_buf();
        c.pdp.reload_requires_tests = Some(false);
    })
    .await;
    let addr = running.bus_addr.expect("bus");
    let http = reqwest::Client::new();
    let children = "comm://hybroker.example/room/children/chat";
    let mut alice = bound(addr, "runtime://localhost/alice-rt", ALICE).await;
    let sub = alice
        .request(
            json!({"type": "subscribe", "from": "runtime://localhost/alice-rt/sm",
            "to": format!("{MN}/sm"), "body": {"resources": [children]}}),
        )
        .await;
    assert_eq!(code(&sub), 200, "{sub}");
    let answer = from_peer(
        &http,
        addr,
        json!({"id": 1, "type": "create", "from": "hyperty://msgnode.test/h",
            "to": children, "body": {"value": "relayed?"}}),
    )
    .await;
    assert_eq!(code(&answer), 403, "{answer}");
    assert!(
        description(&answer).contains("not forwarded to a third domain"),
        "{answer}"
    );
    assert!(
        quiet(&mut alice).await.is_none(),
        "a local subscriber got it"
    );
    running.stop().await;
}

/// Review R13: a message to several peer nodes was answered once — the first target's answer
/// or failure — and a later target's failure was only logged. Each failure reaches the
/// sender, naming its target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failed_foreign_target_is_reported() {
    let running = node().await;
    let addr = running.bus_addr.expect("bus");
    let mut mallory = bound(addr, "runtime://localhost/mallory-rt", MALLORY).await;
    let m = mallory.allocate("localhost", "hyperty", 1).await.remove(0);
    // No node for the first (trusted) domain: 404 at once; the second's node does not answer.
    let (nowhere, unreachable) = ("hyperty://hybroker.example/x", "hyperty://msgnode.test/y");
    let id = mallory
        .send(json!({"type": "create", "from": m, "to": [nowhere, unreachable]}))
        .await;
    let mut failed = Vec::new();
    while let Some(answer) = mallory.quiet_for(Duration::from_secs(5)).await {
        assert_eq!(answer["id"], id, "{answer}");
        failed.push(description(&answer));
    }
    failed.sort();
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(failed[0].contains(nowhere), "{failed:?}");
    assert!(failed[1].contains(unreachable), "{failed:?}");
    running.stop().await;
}

/// Review R12: a peer's message to the children of its own object, which local runtimes
/// subscribed to, was sent back to that peer as well (doubling peer traffic, and using the
/// line local users need). The local subscribers get it; the peer does not get it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_message_does_not_go_back_to_the_peer() {
    let peer = SlowPeer::start().await;
    let url = format!("http://{}", peer.addr);
    let policies = common::policies_with(|data| {
        data["subscription"]["trusted_domains"] = json!(["msgnode.test"]);
        // A foreign object's children are its holder's: alice listens in with its consent.
        data["subscription"]["consent"]["comm://msgnode.test/room"] =
            json!(["runtime://localhost/alice-rt"]);
    });
    let running = node_with(|c| {
        c.bus.peers[0].url = url;
        c.pdp.policies = policies.path().to_path_buf();
        c.pdp.reload_requires_tests = Some(false);
    })
    .await;
    peer.gate.add_permits(100);
    let addr = running.bus_addr.expect("bus");
    let http = reqwest::Client::new();
    let children = "comm://msgnode.test/room/children/chat";
    let mut alice = bound(addr, "runtime://localhost/alice-rt", ALICE).await;
    let sub = alice
        .request(
            json!({"type": "subscribe", "from": "runtime://localhost/alice-rt/sm",
            "to": format!("{MN}/sm"), "body": {"resources": [children]}}),
        )
        .await;
    assert_eq!(code(&sub), 200, "{sub}");
    let posted = http
        .post(format!("http://{addr}/bus/v1/messages"))
        .bearer_auth(PEER_TOKEN)
        .body(
            json!({"id": 1, "type": "create", "from": "hyperty://msgnode.test/h",
                "to": children, "body": {"value": "hi"}})
            .to_string(),
        )
        .send()
        .await
        .expect("post");
    assert_eq!(posted.status(), 202);
    assert_eq!(alice.recv().await["body"]["value"], "hi");
    // A local message to the same topic does go to the object's node: after it, the peer
    // has exactly that one.
    let a = alice.allocate("localhost", "hyperty", 1).await.remove(0);
    alice
        .send(json!({"type": "create", "from": a, "to": children, "body": {"value": "local"}}))
        .await;
    common::eventually(
        "the object's node gets the local message",
        Duration::from_secs(30),
        || async { !peer.received().is_empty() },
    )
    .await;
    let got: Vec<Value> = peer.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["body"]["value"], "local");
    running.stop().await;
}

/// Review R11: the byte budgets were checked before the message waited (on a full receiver)
/// and charged only after, so senders waiting together all passed the same check and then
/// all took the room: a peer's line and an away runtime's inbox overshot their caps by one
/// frame per sender. The room is reserved at the check: of eight senders waiting together on
/// a full receiver, only as many as fit take room in the peer line and the away inbox; the
/// others are told to retry at once, and what the peer and the away runtime get never
/// exceeds the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_do_not_overshoot_the_byte_caps() {
    const PAD: usize = 64 * 1024;
    // Three messages of a little more than PAD fit, a fourth does not.
    const CAP: usize = 3 * PAD + 4096;
    let peer = SlowPeer::start().await;
    let url = format!("http://{}", peer.addr);
    let running = node_with(|c| {
        c.bus.outbound_queue_bytes = 256 * 1024;
        c.bus.slow_receiver_close_after = Duration::from_secs(300);
        c.bus.inbox_max_bytes_per_runtime = CAP;
        c.bus.peer_queue = 100;
        c.bus.peer_queue_bytes = CAP;
        c.bus.peers[0].url = url;
    })
    .await;
    let addr = running.bus_addr.expect("bus");
    let http = reqwest::Client::new();
    let alice_rt = "runtime://localhost/alice-rt";
    let mut alice = Stub::connect(addr, alice_rt, ALICE).await;
    let a = alice.allocate("localhost", "hyperty", 1).await.remove(0);
    alice.drop_socket().await;
    let (receiver, e) = stalled_receiver(addr, &running, &http).await;
    let pad = "x".repeat(PAD);
    let mut senders = Vec::new();
    for i in 0..8 {
        let mut bob = bound(addr, &format!("runtime://localhost/bob-{i}"), BOB).await;
        let b = bob.allocate("localhost", "hyperty", 1).await.remove(0);
        senders.push((bob, b));
    }
    // All at once: each waits on the full receiver (first in `to`) before its other targets.
    for (n, (bob, b)) in senders.iter_mut().enumerate() {
        bob.send(
            json!({"type": "create", "from": b, "to": [e, a, "hyperty://msgnode.test/x"],
            "body": {"value": {"n": n, "pad": pad}}}),
        )
        .await;
    }
    let mut refused = 0;
    for (bob, _) in &mut senders {
        if let Some(answer) = bob.quiet_for(Duration::from_secs(2)).await {
            assert_eq!(code(&answer), 408, "{answer}");
            refused += 1;
        }
    }
    assert!(
        refused >= 5,
        "at most 3 fit the caps while waiting together; {refused} of 8 refused"
    );
    // The receiver goes: the waiting deliveries end and go on to their other targets. A
    // refusal that came after the first wait (a loaded machine) still counts as one.
    receiver.drop_socket().await;
    peer.gate.add_permits(100);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while peer.received().len() + refused < 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "the peer got what was accepted: {} received, {refused} refused",
            peer.received().len()
        );
        for (bob, _) in &mut senders {
            if let Some(answer) = bob.quiet_for(Duration::from_millis(50)).await {
                assert_eq!(code(&answer), 408, "{answer}");
                refused += 1;
            }
        }
    }
    assert!(
        peer.received().len() <= 3,
        "the peer line never held more than its cap: {}",
        peer.received().len()
    );
    let mut alice = bound(addr, alice_rt, ALICE).await;
    let got = received_ns(&mut alice).await;
    assert!(
        !got.is_empty() && got.len() <= 3,
        "the away inbox never held more than its cap: {got:?}"
    );
    running.stop().await;
}

/// The socket.io stubs' Engine.IO send buffer was bounded in packets only (`outbound_queue`,
/// 8,192 of up to a frame each) behind the socket's byte-bounded queue, so a socket.io stub
/// that did not read could hold gigabytes where a WebSocket stub holds its queue's bytes.
/// Engine.IO's buffer holds at most `max_frame_bytes` now: behind a socket.io stub that does
/// not read, its queue fills and its sender is slowed as behind a WebSocket stub, having
/// handed it a few MiB, not everything it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_io_stub_that_does_not_read_holds_bounded_bytes() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as Ws;
    let running = node_with(|c| {
        c.bus.outbound_queue_bytes = 256 * 1024;
        c.bus.slow_receiver_close_after = Duration::from_secs(300);
    })
    .await;
    let addr = running.bus_addr.expect("bus");
    let http = reqwest::Client::new();
    let mut sio =
        common::stub::open_small_window(addr, "/socket.io/?EIO=4&transport=websocket", ALICE).await;
    let alice_rt = "runtime://localhost/alice-rt";
    socket_io_open(&mut sio, alice_rt).await;
    let allocate = json!({"id": 2, "type": "create", "from": format!("{alice_rt}/registry/allocation"),
        "to": format!("{MN}/address-allocation"),
        "body": {"scheme": "hyperty", "value": {"number": 1}}});
    let packet = format!("42{}", json!(["message", allocate.to_string()]));
    sio.send(Ws::Text(packet.into())).await.expect("send");
    // Alice's hyperty, from the allocation's answer.
    let mut a = None;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(Duration::from_secs(10), sio.next()).await
    {
        let Ws::Text(t) = frame else { continue };
        let Some(event) = t.strip_prefix("42") else {
            continue;
        };
        let event: Value = serde_json::from_str(event).expect("an event");
        if event[1]["id"] == 2 {
            assert_eq!(code(&event[1]), 200, "{event}");
            a = event[1]["body"]["value"]["allocated"][0]
                .as_str()
                .map(str::to_string);
            break;
        }
    }
    let a = a.expect("alice's hyperty");
    let mut bob = Stub::connect(addr, "runtime://localhost/bob-rt", BOB).await;
    let b = bob.allocate("localhost", "hyperty", 1).await.remove(0);
    // Alice reads nothing more; bob sends her far more than her queue and Engine.IO's buffer
    // hold together (and the kernel's buffers too).
    let pad = "x".repeat(64 * 1024);
    let sender = tokio::spawn(async move {
        for n in 0..400 {
            bob.send(json!({"type": "create", "from": b, "to": a, "body": {"value": {"n": n, "pad": pad}}}))
                .await;
        }
        bob
    });
    let slowed = "msgnode_bus_senders_slowed_total";
    common::eventually(
        "the sender to a socket.io stub that does not read is slowed",
        Duration::from_secs(60),
        || async { common::metric(&http, &running, slowed).await >= 1 },
    )
    .await;
    // What went into alice's queue, Engine.IO's buffer and the kernel's buffers by then (and
    // a moment after): her queue's 256 KiB, a frame, and the kernel's few MiB — not the
    // 25 MiB sent (an Engine.IO buffer of 8,192 packets took nearly all of it).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let direct = "msgnode_bus_deliveries_total{outcome=\"direct\"}";
    let taken = common::metric(&http, &running, direct).await;
    assert!(
        taken < 128,
        "{taken} messages of 64 KiB (over 8 MiB) went to a socket.io stub that reads nothing"
    );
    assert!(!sender.is_finished(), "bob is held back, not done");
    sender.abort();
    drop(sio);
    running.stop().await;
}

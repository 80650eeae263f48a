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
    let running = node_with(|c| {
        c.pdp.policies = policies.path().to_path_buf();
        c.pdp.reload_debounce = Duration::from_millis(50);
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
    // A reload runs the bundle's ~170 tests first (the reload gate): slow in a debug build
    // while the other tests of this binary load both cores.
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

//! Two replicas of the node in front of one real Synapse (`[bus] replica`): a runtime
//! connected to either is reachable from both — messages, responses, subscriptions and
//! registry entries cross through Matrix — and a runtime that reconnects to the other
//! replica moves there (the old socket is closed, nothing is lost or repeated).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;

use common::stub::Stub;
use common::synapse::{copy_dir, Synapse};
use msgnode::cmd::run::{start, Running};
use msgnode::config::Config;
use serde_json::{json, Value};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const MN: &str = "domain://msg-node.localhost";
/// How long a message through Matrix may take here (Synapse pushes in ~5–35 ms; CI is slow).
const THROUGH_MATRIX: Duration = Duration::from_secs(20);

fn config(synapse: &Synapse, policies: &Path, replica: &str, appservice: bool) -> Config {
    let mut config = common::bus_config(policies);
    synapse.serve(&mut config);
    // One replica serves the appservice; both act through it.
    config.pep.enabled = appservice;
    config.bus.replica = Some(replica.to_string());
    config
}

/// Replicas `a` (serving the appservice) and `b` of one node in front of `synapse`, with a
/// copy of the shipped policies (kept while the returned directory lives).
async fn replicas(synapse: &Synapse) -> (tempfile::TempDir, Running, Running) {
    let policies_dir = tempfile::tempdir().expect("tempdir");
    let policies: PathBuf = policies_dir.path().join("policies");
    copy_dir(&Path::new(REPO).join("policies"), &policies);
    let a: Running = start(config(synapse, &policies, "a", true))
        .await
        .expect("start replica a");
    let b: Running = start(config(synapse, &policies, "b", false))
        .await
        .expect("start replica b");
    (policies_dir, a, b)
}

fn code(answer: &Value) -> u64 {
    answer["body"]["code"].as_u64().unwrap_or(0)
}

/// The next frame within `within` that is not a response.
async fn next_message(stub: &mut Stub, within: Duration) -> Value {
    tokio::time::timeout(within, async {
        loop {
            let frame = stub.recv().await;
            if frame["type"] != "response" {
                return frame;
            }
        }
    })
    .await
    .expect("a message within the wait")
}

/// Sends `message` from `stub` until its node knows the destination (not 404); the id of
/// the send that was routed.
async fn send_once_routable(stub: &mut Stub, message: Value) -> Value {
    let deadline = Instant::now() + THROUGH_MATRIX;
    loop {
        let id = stub.send(message.clone()).await;
        match stub.quiet_for(Duration::from_millis(300)).await {
            Some(answer) if answer["id"] == id && code(&answer) == 404 => {
                assert!(
                    Instant::now() < deadline,
                    "destination still unknown: {answer}"
                );
            }
            Some(other) => {
                stub.inbox.push_front(other);
                return id;
            }
            None => return id,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_reach_each_others_runtimes_through_matrix() {
    let synapse = Synapse::start();
    let alice_token = synapse.register("alice");
    let bob_token = synapse.register("bob");
    let (_policies, a, b) = replicas(&synapse).await;
    let (addr_a, addr_b) = (
        a.bus_addr.expect("bus address a"),
        b.bus_addr.expect("bus address b"),
    );

    let mut alice = Stub::connect(addr_a, "runtime://localhost/alice-r", &alice_token).await;
    let mut bob = Stub::connect(addr_b, "runtime://localhost/bob-r", &bob_token).await;
    let alice_h = alice.allocate("localhost", "hyperty", 1).await;
    let bob_h = bob.allocate("localhost", "hyperty", 1).await;

    // --- Request on replica a to a hyperty on replica b, and the response back.
    let request =
        json!({"type": "create", "from": alice_h[0], "to": bob_h[0], "body": {"value": {"n": 1}}});
    let id = send_once_routable(&mut alice, request).await;
    let got = next_message(&mut bob, THROUGH_MATRIX).await;
    assert_eq!(got["from"], alice_h[0], "{got}");
    assert_eq!(got["body"]["value"]["n"], 1, "{got}");
    assert_eq!(got["id"], id, "the routed send, once: {got}");
    bob.send(
        json!({"id": got["id"], "type": "response", "from": bob_h[0], "to": alice_h[0],
        "body": {"code": 200}}),
    )
    .await;
    let answer = alice.response_to(&id).await;
    assert_eq!(code(&answer), 200, "{answer}");
    assert!(
        bob.quiet_for(Duration::from_millis(500)).await.is_none(),
        "delivered once"
    );

    // --- Pub/sub across replicas: bob (on b) subscribes to alice's object (on a).
    let object = alice.allocate("localhost", "comm", 1).await.remove(0);
    let changes = format!("{object}/changes");
    let subscribed = bob
        .request(
            json!({"type": "subscribe", "from": "runtime://localhost/bob-r/sm",
            "to": format!("{MN}/sm"), "body": {"resources": [changes], "source": bob_h[0]}}),
        )
        .await;
    assert_eq!(code(&subscribed), 200, "{subscribed}");
    // Replica a learns of the subscription through Matrix; until then a change reaches no one.
    let deadline = Instant::now() + THROUGH_MATRIX;
    let mut n = 0;
    let first = loop {
        n += 1;
        alice
            .send(json!({"type": "update", "from": object, "to": changes, "body": {"value": {"n": n}}}))
            .await;
        if let Some(change) = bob.quiet_for(Duration::from_millis(500)).await {
            break change["body"]["value"]["n"].as_u64().expect("n");
        }
        assert!(
            Instant::now() < deadline,
            "no change reached the other replica"
        );
    };
    // Every later change arrives once and in order.
    let mut later = Vec::new();
    while later.len() < (n - first) as usize {
        later.push(next_message(&mut bob, THROUGH_MATRIX).await["body"]["value"]["n"].clone());
    }
    assert_eq!(
        later,
        ((first + 1)..=n).map(|n| json!(n)).collect::<Vec<_>>()
    );
    alice
        .send(json!({"type": "update", "from": object, "to": changes, "body": {"value": {"n": 1000}}}))
        .await;
    let change = next_message(&mut bob, THROUGH_MATRIX).await;
    assert_eq!(change["body"]["value"]["n"], 1000, "{change}");
    assert!(
        bob.quiet_for(Duration::from_millis(500)).await.is_none(),
        "exactly once"
    );

    // --- The built-in registry is shared: registered on a, read on b.
    let registered = alice
        .register_chat_hyperty(&alice_h[0], "user://localhost/alice")
        .await;
    assert_eq!(code(&registered), 200, "{registered}");
    let read = json!({"type": "read", "from": bob_h[0], "to": "domain://registry.localhost",
        "body": {"resource": alice_h[0]}});
    let deadline = Instant::now() + THROUGH_MATRIX;
    while code(&bob.request(read.clone()).await) != 200 {
        assert!(Instant::now() < deadline, "the entry is not readable on b");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // --- Bob's runtime reconnects to replica a: the socket on b is closed, and it is
    // reached directly on a from now on.
    let mut bob_on_a = Stub::connect(addr_a, "runtime://localhost/bob-r", &bob_token).await;
    let ping = bob_on_a
        .request(json!({"type": "ping", "from": "runtime://localhost/bob-r", "to": "mn:/session"}))
        .await;
    assert_eq!(code(&ping), 200, "{ping}");
    assert!(bob.closed().await.is_some(), "the socket on b is closed");
    let id = alice
        .send(json!({"type": "create", "from": alice_h[0], "to": bob_h[0], "body": {"value": {"n": 2}}}))
        .await;
    let got = next_message(&mut bob_on_a, Duration::from_secs(5)).await;
    assert_eq!(got["body"]["value"]["n"], 2, "{got}");
    bob_on_a
        .send(
            json!({"id": id, "type": "response", "from": bob_h[0], "to": alice_h[0],
            "body": {"code": 200}}),
        )
        .await;
    assert_eq!(code(&alice.response_to(&id).await), 200);
    // Bob's allocations moved with it: it still sends from its hyperty, now on a.
    bob_on_a
        .send(json!({"type": "create", "from": bob_h[0], "to": alice_h[0], "body": {"value": {"n": 3}}}))
        .await;
    let got = next_message(&mut alice, Duration::from_secs(5)).await;
    assert_eq!(
        got["from"], bob_h[0],
        "not refused as spoofed on the new replica: {got}"
    );
    assert_eq!(got["body"]["value"]["n"], 3, "{got}");

    // --- Away, then back on the other replica: what was sent meanwhile (kept by a) is
    // handed over by b, in order, once.
    bob_on_a.drop_socket().await;
    // Let the node see the close first: what it writes into a closing socket is lost (there
    // is no application-level ack).
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 4..7 {
        alice
            .send(json!({"type": "create", "from": alice_h[0], "to": bob_h[0], "body": {"value": {"n": n}}}))
            .await;
    }
    let mut bob_again = Stub::connect(addr_b, "runtime://localhost/bob-r", &bob_token).await;
    let mut resumed = Vec::new();
    while resumed.len() < 3 {
        resumed
            .push(next_message(&mut bob_again, THROUGH_MATRIX).await["body"]["value"]["n"].clone());
    }
    assert_eq!(resumed, vec![json!(4), json!(5), json!(6)]);
    assert!(
        bob_again
            .quiet_for(Duration::from_millis(500))
            .await
            .is_none(),
        "once"
    );
    a.stop().await;
    b.stop().await;
}

/// Third review N3: a claim made on first use on one replica reached the other only as a
/// binding, never in its claims, so another principal could bind a runtime URL over it
/// there and receive what was addressed under it. The follower takes the claims of every
/// record it adopts, and refuses a URL over them as the first replica would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_made_on_one_replica_is_respected_by_the_other() {
    let synapse = Synapse::start();
    let alice_token = synapse.register("alice");
    let bob_token = synapse.register("bob");
    let eve_token = synapse.register("eve");
    let (_policies, a, b) = replicas(&synapse).await;
    let (addr_a, addr_b) = (
        a.bus_addr.expect("bus address a"),
        b.bus_addr.expect("bus address b"),
    );
    let mut alice = Stub::connect(addr_a, "runtime://localhost/alice-r", &alice_token).await;
    let claimed = "hyperty-runtime://localhost/protostub/alice/sm";
    let first = alice
        .request(json!({"type": "ping", "from": claimed, "to": "runtime://localhost/nobody"}))
        .await;
    assert_eq!(code(&first), 404, "claimed on first use on a: {first}");
    // Replica b has followed once it routes to the claimed address.
    let mut bob = Stub::connect(addr_b, "runtime://localhost/bob-r", &bob_token).await;
    let bob_h = bob.allocate("localhost", "hyperty", 1).await.remove(0);
    send_once_routable(
        &mut bob,
        json!({"type": "create", "from": bob_h, "to": claimed, "body": {}}),
    )
    .await;
    next_message(&mut alice, THROUGH_MATRIX).await;
    // Eve, on b, cannot take the runtime URL over alice's claim.
    let over = "hyperty-runtime://localhost/protostub/alice";
    let path = format!("/ws?runtimeURL={}", common::stub::urlencode(over));
    let mut eve = Stub::from_socket(common::stub::open(addr_b, &path, &eve_token).await, over);
    let answer = eve.recv().await;
    assert_eq!(code(&answer), 403, "{answer}");
    a.stop().await;
    b.stop().await;
}

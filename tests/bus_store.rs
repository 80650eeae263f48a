//! A runtime's record bigger than one Matrix event, with a real Synapse: one runtime holds
//! 2,000 addresses (far past what one 64 KiB state event can hold), the node restarts, and
//! every address is back, its owner's, and reachable.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;

use common::stub::{urlencode, Stub};
use common::synapse::{copy_dir, Synapse};
use msgnode::cmd::run::start;
use msgnode::config::Config;
use serde_json::{json, Value};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const MN: &str = "domain://msg-node.localhost";

fn code(answer: &Value) -> u64 {
    answer["body"]["code"].as_u64().unwrap_or(0)
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect()
}

/// The node's configuration with Synapse behind it and the shipped policies, a runtime
/// allowed 5,000 addresses (copied into `dir`).
fn big_runtimes(synapse: &Synapse, dir: &Path) -> Config {
    let policies: PathBuf = dir.join("policies");
    copy_dir(&Path::new(REPO).join("policies"), &policies);
    let data = policies.join("config/data.json");
    let mut json: Value =
        serde_json::from_str(&std::fs::read_to_string(&data).expect("read")).expect("json");
    json["allocation"]["max_addresses_per_runtime"] = json!(5000);
    std::fs::write(&data, json.to_string()).expect("write");
    let mut config = common::bus_config(&policies);
    // The bundle's own tests check the shipped per-runtime limit, raised here.
    config.pdp.reload_requires_tests = Some(false);
    synapse.serve(&mut config);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_with_2000_addresses_survives_a_restart_with_synapse() {
    let (synapse, dir) = (Synapse::start(), tempfile::tempdir().expect("tempdir"));
    let (alice_token, bob_token) = (synapse.register("alice"), synapse.register("bob"));
    let config = big_runtimes(&synapse, dir.path());
    let running = start(config.clone()).await.expect("start");
    let addr = running.bus_addr.expect("bus");

    let runtime = "runtime://localhost/alice-big";
    let mut alice = Stub::connect(addr, runtime, &alice_token).await;
    let mut allocated: Vec<(String, Vec<String>)> = Vec::new();
    for block in 0..20 {
        let key = format!("block-{block}");
        let answer = alice
            .request(
                json!({"type": "create", "from": format!("{runtime}/registry/allocation"),
                "to": format!("{MN}/address-allocation"),
                "body": {"scheme": "hyperty", "value": {"number": 100, "allocationKey": key}}}),
            )
            .await;
        assert_eq!(code(&answer), 200, "block {block}: {answer}");
        allocated.push((key, strings(&answer["body"]["value"]["allocated"])));
    }
    let all: BTreeSet<String> = allocated.iter().flat_map(|(_, a)| a.clone()).collect();
    assert_eq!(all.len(), 2000);
    let last = allocated[19].1[99].clone();

    // A restart: everything comes back from the state room.
    drop(alice);
    running.stop().await;
    let running = start(config).await.expect("restart");
    let addr = running.bus_addr.expect("bus");
    let mut alice = Stub::connect(addr, runtime, &alice_token).await;
    let mut bob = Stub::connect(addr, "runtime://localhost/bob-1", &bob_token).await;
    let bob_h = bob.allocate("localhost", "hyperty", 1).await.remove(0);

    // The 2,000th is delivered to alice, and it is hers to send from.
    bob.send(json!({"type": "create", "from": bob_h, "to": last, "body": {"value": {"n": 1}}}))
        .await;
    let got = alice.recv().await;
    assert_eq!(got["to"], last.as_str(), "{got}");
    assert_eq!(got["body"]["value"]["n"], 1, "{got}");
    alice
        .send(json!({"type": "create", "from": last, "to": bob_h, "body": {"value": {"n": 2}}}))
        .await;
    let got = bob.recv().await;
    assert_eq!(got["from"], last.as_str(), "{got}");

    // Not bob's: he cannot send from any of them, nor take the runtime URL.
    for address in [&allocated[0].1[0], &last] {
        let refused = bob
            .request(json!({"type": "create", "from": address, "to": bob_h, "body": {}}))
            .await;
        assert_eq!(code(&refused), 403, "{refused}");
    }
    let path = format!("/ws?runtimeURL={}", urlencode(runtime));
    let mut thief = Stub::from_socket(common::stub::open(addr, &path, &bob_token).await, runtime);
    assert_eq!(code(&thief.recv().await), 403);

    // Every block is back whole: releasing each by its key names exactly what was given.
    let mut released = BTreeSet::new();
    for (key, addresses) in &allocated {
        let answer = alice
            .request(
                json!({"type": "delete", "from": format!("{runtime}/registry/allocation"),
                "to": format!("{MN}/address-allocation"), "body": {"resource": key}}),
            )
            .await;
        assert_eq!(code(&answer), 200, "{answer}");
        let got: BTreeSet<String> = strings(&answer["body"]["value"]["released"])
            .into_iter()
            .collect();
        assert_eq!(got, addresses.iter().cloned().collect(), "block {key}");
        released.extend(got);
    }
    assert_eq!(released, all);
    assert!(alice.quiet_for(Duration::from_millis(100)).await.is_none());
    running.stop().await;
}

/// Runtimes opened all at once (their records go out together, in shared events): each is
/// its first principal's, across a restart — the released one too, which nobody else can
/// claim — and each keeps what it allocated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtimes_opened_at_once_stay_their_owners_across_a_restart_with_synapse() {
    const N: usize = 24;
    let synapse = Synapse::start();
    let alice_token = synapse.register("alice");
    let bob_token = synapse.register("bob");
    let mut config = common::bus_config(&Path::new(REPO).join("policies"));
    config.bus.handshakes_per_ip = 64;
    config.bus.max_handshakes = 64;
    config.bus.handshake_rate.per_second = 1000;
    config.bus.handshake_rate.burst = 1000;
    synapse.serve(&mut config);
    let running = start(config.clone()).await.expect("start");
    let addr = running.bus_addr.expect("bus");

    let urls: Vec<String> = (0..N)
        .map(|i| format!("runtime://localhost/crowd/{i}"))
        .collect();
    let opened = futures_util::future::join_all(urls.iter().map(|url| {
        let token = alice_token.clone();
        async move {
            let mut stub = Stub::connect(addr, url, &token).await;
            let hyperty = stub.allocate("localhost", "hyperty", 1).await.remove(0);
            (stub, hyperty)
        }
    }))
    .await;
    let (mut stubs, hyperties): (Vec<Stub>, Vec<String>) = opened.into_iter().unzip();
    // The first one says goodbye: a tombstone, still alice's.
    stubs[0]
        .send(json!({"type": "close", "from": urls[0], "to": "mn:/session"}))
        .await;
    assert!(
        stubs[0].closed().await.is_some(),
        "the socket closes once released"
    );
    drop(stubs);
    running.stop().await;

    let running = start(config).await.expect("restart");
    let addr = running.bus_addr.expect("bus");
    // None of them is bob's to take, the released one neither.
    for url in &urls {
        let path = format!("/ws?runtimeURL={}", urlencode(url));
        let mut thief = Stub::from_socket(common::stub::open(addr, &path, &bob_token).await, url);
        let refused = thief.recv().await;
        assert_eq!(code(&refused), 403, "{url}: {refused}");
    }
    // Alice's, each with its hyperty (the released one empty again).
    let mut bob = Stub::connect(addr, "runtime://localhost/bob-1", &bob_token).await;
    let bob_h = bob.allocate("localhost", "hyperty", 1).await.remove(0);
    for (i, (url, hyperty)) in urls.iter().zip(&hyperties).enumerate().skip(N - 3) {
        let mut alice = Stub::connect(addr, url, &alice_token).await;
        bob.send(
            json!({"type": "create", "from": bob_h, "to": hyperty, "body": {"value": {"n": i}}}),
        )
        .await;
        let got = alice.recv().await;
        assert_eq!(got["to"], hyperty.as_str(), "{got}");
    }
    let mut again = Stub::connect(addr, &urls[0], &alice_token).await;
    let fresh = again.allocate("localhost", "hyperty", 1).await;
    assert_eq!(fresh.len(), 1);
    running.stop().await;
}

/// Allocations sent back to back on one runtime, without waiting for answers (as the
/// reference suite sends them: they share the homeserver's writes), and the node stops while
/// some are still in flight: after the restart every address that was answered 200 is still
/// that runtime's (it releases each, named exactly), and none is another principal's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_allocations_in_flight_on_one_runtime_survive_a_restart_with_synapse() {
    const N: usize = 900; // past one event: the record is split while the answers wait
    let synapse = Synapse::start();
    let alice_token = synapse.register("alice");
    let bob_token = synapse.register("bob");
    let mut config = common::bus_config(&Path::new(REPO).join("policies"));
    synapse.serve(&mut config);
    let running = start(config.clone()).await.expect("start");
    let addr = running.bus_addr.expect("bus");

    let runtime = "runtime://localhost/alice-burst";
    let mut alice = Stub::connect(addr, runtime, &alice_token).await;
    for i in 0..N {
        alice
            .send(json!({"id": i + 1, "type": "create",
                "from": format!("{runtime}/registry/allocation"),
                "to": format!("{MN}/address-allocation"),
                "body": {"scheme": "hyperty", "value": {"number": 1}}}))
            .await;
    }
    let mut answered: BTreeSet<String> = BTreeSet::new();
    let mut refused = 0;
    let mut note = |answer: &Value, answered: &mut BTreeSet<String>| {
        if answer["type"] != "response" {
            return;
        }
        match code(answer) {
            200 => answered.extend(strings(&answer["body"]["value"]["allocated"])),
            _ => refused += 1,
        }
    };
    // Half the answers, then the node stops with the rest in flight.
    while answered.len() < N / 2 {
        let answer = alice.recv().await;
        note(&answer, &mut answered);
    }
    running.stop().await;
    while let Some(answer) = alice.quiet_for(Duration::from_secs(2)).await {
        note(&answer, &mut answered);
    }
    assert!(answered.len() >= N / 2 && answered.len() + refused <= N);
    drop(alice);

    let running = start(config).await.expect("restart");
    let addr = running.bus_addr.expect("bus");
    let mut bob = Stub::connect(addr, "runtime://localhost/bob-1", &bob_token).await;
    let bob_h = bob.allocate("localhost", "hyperty", 1).await.remove(0);
    let answered: Vec<String> = answered.into_iter().collect();
    for address in answered.iter().step_by(37).chain(answered.last()) {
        let refused = bob
            .request(json!({"type": "create", "from": address, "to": bob_h, "body": {}}))
            .await;
        assert_eq!(code(&refused), 403, "{address}: {refused}");
    }
    let mut alice = Stub::connect(addr, runtime, &alice_token).await;
    for chunk in answered.chunks(100) {
        let answer = alice
            .request(
                json!({"type": "delete", "from": format!("{runtime}/registry/allocation"),
                "to": format!("{MN}/address-allocation"),
                "body": {"childrenResources": chunk}}),
            )
            .await;
        assert_eq!(code(&answer), 200, "{answer}");
        let released: BTreeSet<String> = strings(&answer["body"]["value"]["released"])
            .into_iter()
            .collect();
        assert_eq!(
            released,
            chunk.iter().cloned().collect(),
            "every answered address is still the runtime's"
        );
    }
    running.stop().await;
}

/// Releases by address sent back to back on one runtime holding a record of several
/// events (each release is recorded in the record's head, not by rewriting the part that
/// held the address), and the node stops while some are in flight: after the restart every
/// address whose release was answered 200 is gone from the runtime (releasing it again
/// names nothing), every one not released is still the runtime's, and none is another
/// principal's to send from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_releases_in_flight_on_one_runtime_survive_a_restart_with_synapse() {
    const N: usize = 1500; // several parts: the releases land in parts, not only the head
    let (synapse, dir) = (Synapse::start(), tempfile::tempdir().expect("tempdir"));
    let (alice_token, bob_token) = (synapse.register("alice"), synapse.register("bob"));
    let config = big_runtimes(&synapse, dir.path());
    let running = start(config.clone()).await.expect("start");
    let addr = running.bus_addr.expect("bus");

    let runtime = "runtime://localhost/alice-release";
    let allocation = format!("{runtime}/registry/allocation");
    let mut alice = Stub::connect(addr, runtime, &alice_token).await;
    for i in 0..N {
        alice
            .send(json!({"id": i + 1, "type": "create", "from": allocation,
                "to": format!("{MN}/address-allocation"),
                "body": {"scheme": "hyperty", "value": {"number": 1}}}))
            .await;
    }
    let mut held: Vec<String> = Vec::new();
    while held.len() < N {
        let answer = alice.recv().await;
        if answer["type"] == "response" {
            assert_eq!(code(&answer), 200, "{answer}");
            held.extend(strings(&answer["body"]["value"]["allocated"]));
        }
    }
    // Released one by one, back to back; the node stops once half are answered.
    for (i, address) in held.iter().enumerate() {
        alice
            .send(
                json!({"id": N + i + 1, "type": "delete", "from": allocation,
                "to": format!("{MN}/address-allocation"),
                "body": {"childrenResources": [address]}}),
            )
            .await;
    }
    let mut released: BTreeSet<String> = BTreeSet::new();
    let note = |answer: &Value, released: &mut BTreeSet<String>| {
        if answer["type"] == "response" && code(answer) == 200 {
            released.extend(strings(&answer["body"]["value"]["released"]));
        }
    };
    while released.len() < N / 2 {
        let answer = alice.recv().await;
        note(&answer, &mut released);
    }
    running.stop().await;
    while let Some(answer) = alice.quiet_for(Duration::from_secs(2)).await {
        note(&answer, &mut released);
    }
    drop(alice);

    let running = start(config).await.expect("restart");
    let addr = running.bus_addr.expect("bus");
    let mut bob = Stub::connect(addr, "runtime://localhost/bob-1", &bob_token).await;
    let bob_h = bob.allocate("localhost", "hyperty", 1).await.remove(0);
    for address in held.iter().step_by(53).chain(held.last()) {
        let refused = bob
            .request(json!({"type": "create", "from": address, "to": bob_h, "body": {}}))
            .await;
        assert_eq!(code(&refused), 403, "{address}: {refused}");
    }
    let mut alice = Stub::connect(addr, runtime, &alice_token).await;
    // Releasing everything again: nothing whose release was answered comes back.
    let mut again: BTreeSet<String> = BTreeSet::new();
    for chunk in held.chunks(100) {
        let answer = alice
            .request(json!({"type": "delete", "from": allocation,
                "to": format!("{MN}/address-allocation"),
                "body": {"childrenResources": chunk}}))
            .await;
        assert_eq!(code(&answer), 200, "{answer}");
        again.extend(strings(&answer["body"]["value"]["released"]));
    }
    assert!(
        again.is_disjoint(&released),
        "an answered release came back after the restart"
    );
    // The rest (a release not answered may or may not have been stored): the runtime's own.
    let all: BTreeSet<String> = held.iter().cloned().collect();
    assert!(again.is_subset(&all), "nothing but the runtime's own");
    running.stop().await;
}

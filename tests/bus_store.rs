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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_with_2000_addresses_survives_a_restart_with_synapse() {
    let synapse = Synapse::start();
    let alice_token = synapse.register("alice");
    let bob_token = synapse.register("bob");
    let dir = tempfile::tempdir().expect("tempdir");
    let policies: PathBuf = dir.path().join("policies");
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

//! The reference reTHINK clients' conventions (see `common::conformance`), against a
//! memory-only node and against a node with a real Synapse behind it: handshakes, claims on
//! first use, sockets in a row for one runtime URL, allocation, pub/sub, the registry; and
//! the data switches (claimed identities, claimed hyperty addresses) with what they change.

mod common;

use common::conformance::{self, close, Node};
use common::synapse::Synapse;
use msgnode::cmd::run::{start, Running};
use msgnode::config::{Config, NetworkServer};
use serde_json::{json, Value};

const SUITE: &str = "reference-suite-token";
const OTHER: &str = "other-principal-token";

fn principals(config: &mut Config) {
    config.bus.domain = Some("localhost".into());
    config.bus.network_servers = [("suite", SUITE), ("other", OTHER)]
        .into_iter()
        .map(|(name, token)| NetworkServer {
            name: name.into(),
            token: token.into(),
        })
        .collect();
}

async fn memory_node(policies: &std::path::Path) -> (Running, Node) {
    let mut config = common::bus_config(policies);
    // A bundle with switches or limits changed contradicts the shipped bundle's own tests
    // and fixtures, which the reload gate would rightly refuse to serve: off for these.
    config.pdp.reload_requires_tests = Some(policies == common::shipped_policies());
    principals(&mut config);
    started(config).await
}

/// Starts the node of `config`, and how the scenarios reach it.
async fn started(config: Config) -> (Running, Node) {
    let running = start(config).await.expect("start");
    let node = Node {
        addr: running.bus_addr.expect("bus"),
        domain: "localhost".into(),
        token: SUITE.into(),
        other: OTHER.into(),
    };
    (running, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_clients_connect_allocate_and_release_across_sockets() {
    let (running, node) = memory_node(&common::shipped_policies()).await;
    conformance::connect_and_disconnect(&node).await;
    conformance::allocation_across_sockets(&node).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_clients_publish_and_subscribe() {
    let (running, node) = memory_node(&common::shipped_policies()).await;
    conformance::publish_and_subscribe(&node).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_stay_with_the_first_principal() {
    let (running, node) = memory_node(&common::shipped_policies()).await;
    conformance::claims_are_the_first_principals(&node).await;
    running.stop().await;
}

/// Registrations outlive the registering socket; found by the identity the stub only names
/// when `claims.identities` is on, never when off (the shipped default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_entries_are_found_by_claimed_identity_only_when_switched_on() {
    let (running, node) = memory_node(&common::shipped_policies()).await;
    conformance::registry_across_sockets(&node, false).await;
    running.stop().await;
    let on = common::policies_with(|data| data["claims"]["identities"] = json!(true));
    let (running, node) = memory_node(on.path()).await;
    conformance::registry_across_sockets(&node, true).await;
    running.stop().await;
}

/// Claimed addresses count against the principal's limits; a hyperty address nobody holds
/// is taken on first use only when `claims.hyperty_addresses` is on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_count_against_limits_and_hyperty_claims_follow_their_switch() {
    let code = |v: &Value| v["body"]["code"].as_u64().unwrap_or(0);
    let limited = common::policies_with(|data| {
        data["limits"]["per_principal"]["addresses"] = json!(2);
    });
    let (running, node) = memory_node(limited.path()).await;
    let runtime = node.runtime("1");
    let mut stub = node.vertx(&runtime).await;
    let ping = |from: String| json!({"type": "ping", "from": from, "to": node.runtime("nobody")});
    let mut codes = Vec::new();
    for i in 0..3 {
        let from = format!("{}/{i}", node.protostub("1"));
        codes.push(code(&stub.request(ping(from)).await));
    }
    // Two claimed (routed to an address nobody holds: 404), the third over the limit.
    assert_eq!(codes, [404, 404, 403], "{codes:?}");
    let made_up = "hyperty://localhost/6f1d3c2b-made-up";
    let refused = stub.request(ping(made_up.into())).await;
    assert_eq!(code(&refused), 403, "{refused}");
    assert!(
        refused["body"]["description"]
            .as_str()
            .is_some_and(|d| d.contains("spoofed")),
        "{refused}"
    );
    close(stub, &runtime).await;
    running.stop().await;

    let on = common::policies_with(|data| data["claims"]["hyperty_addresses"] = json!(true));
    let (running, node) = memory_node(on.path()).await;
    let mut stub = node.vertx(&node.runtime("1")).await;
    let mut listener = node.vertx(&node.runtime("2")).await;
    let other_hyperty = "hyperty://localhost/0a1b-listener";
    listener
        .request(json!({"type": "ping", "from": other_hyperty, "to": node.runtime("nobody")}))
        .await;
    stub.send(json!({"type": "create", "from": made_up, "to": other_hyperty}))
        .await;
    let got = listener.recv().await;
    assert_eq!(got["from"], made_up, "{got}");
    let intruder = node.runtime("intruder");
    let path = format!(
        "/ws?access_token={OTHER}&runtimeURL={}",
        common::stub::urlencode(&intruder)
    );
    let mut other = common::stub::Stub::from_socket(
        tokio_tungstenite::connect_async(format!("ws://{}{path}", node.addr))
            .await
            .expect("connect")
            .0,
        &intruder,
    );
    let taken = other
        .request(json!({"type": "create", "from": made_up, "to": other_hyperty}))
        .await;
    assert_eq!(code(&taken), 403, "claimed for good: {taken}");
    running.stop().await;
}

/// A claim whose decision could not be made (here: a remote PDP that fails every claim of a
/// runtime address) is answered "policy unavailable", so the stub knows to try again; it is
/// not passed on to the message's own decision, which would call the `from` spoofed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_the_policy_could_not_decide_is_unavailable_not_spoofed() {
    use axum::{routing::post, Json, Router};
    let pdp = Router::new().route(
        "/v1/data/{*path}",
        post(|Json(body): Json<Value>| async move {
            let input = &body["input"];
            if input["kind"] == "claim" && input["claim"]["kind"] == "runtime_address" {
                return Err(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
            }
            Ok(Json(json!({"result": {"allow": true, "reasons": []}})))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let pdp_addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, pdp).await });
    let mut config = common::bus_config(&common::shipped_policies());
    config.pep.pdp_url = Some(format!("http://{pdp_addr}"));
    principals(&mut config);
    let (running, node) = started(config).await;
    let runtime = node.runtime("1");
    let mut stub = node.vertx(&runtime).await;
    let from = format!("{}/sm", node.protostub("1"));
    let answer = stub
        .request(json!({"type": "ping", "from": from, "to": node.runtime("nobody")}))
        .await;
    assert_eq!(answer["body"]["code"], 403, "{answer}");
    let description = answer["body"]["description"].as_str().unwrap_or("");
    assert!(
        description.contains("policy unavailable") && !description.contains("spoofed"),
        "{answer}"
    );
    close(stub, &runtime).await;
    running.stop().await;
}

/// The same scenarios with Synapse behind the node: every state change is stored before
/// it is answered, so a `close` and the next socket's requests race the homeserver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_clients_with_synapse_behind() {
    let synapse = Synapse::start();
    let mut config = common::bus_config(&common::shipped_policies());
    synapse.serve(&mut config);
    principals(&mut config);
    let (running, node) = started(config.clone()).await;
    conformance::connect_and_disconnect(&node).await;
    conformance::allocation_across_sockets(&node).await;
    conformance::publish_and_subscribe(&node).await;
    conformance::registry_across_sockets(&node, false).await;
    conformance::claims_are_the_first_principals(&node).await;
    // A close and, at once, a new socket, many times: each new socket's own sub-addresses
    // work (never "released meanwhile", never spoofed).
    let runtime = node.runtime("reconnecting");
    for _ in 0..10 {
        let stub = node.vertx(&runtime).await;
        close(stub, &runtime).await;
        let mut again = node.vertx(&runtime).await;
        let allocated = again
            .request(json!({"type": "create", "from": format!("{runtime}/registry/allocation"),
                "to": "domain://msg-node.localhost/address-allocation", "body": {"scheme": "hyperty"}}))
            .await;
        assert_eq!(allocated["body"]["code"], 200, "{allocated}");
        close(again, &runtime).await;
    }
    // Allocations sent back to back share the homeserver's writes; every one is stored
    // before it is answered, so a restart knows them all.
    let runtime = node.runtime("pipelined");
    let mut stub = node.vertx(&runtime).await;
    let sender = format!("{}/registry/allocation", node.protostub("pipelined"));
    for i in 0..50 {
        stub.send(json!({"id": 100 + i, "type": "create", "from": sender,
            "to": "domain://msg-node.localhost/address-allocation", "body": {"scheme": "hyperty"}}))
            .await;
    }
    let mut allocated = Vec::new();
    for i in 0..50 {
        let answer = stub.response_to(&json!(100 + i)).await;
        assert_eq!(answer["body"]["code"], 200, "{answer}");
        allocated.push(answer["body"]["value"]["allocated"][0].clone());
    }
    running.stop().await;
    let (running, node) = started(config).await;
    let probe = node.runtime("probe");
    let mut stub = node.vertx(&probe).await;
    for hyperty in &allocated {
        stub.send(json!({"type": "ping", "from": probe, "to": hyperty}))
            .await;
    }
    assert!(
        stub.quiet_for(conformance::QUIET).await.is_none(),
        "every allocation restored: none is unknown (404)"
    );
    running.stop().await;
}

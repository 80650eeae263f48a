//! Two domains whose nodes reach each other over Matrix federation (`[[bus.peers]]
//! matrix_user`): each node in front of its own real Synapse, the two Synapses federating on
//! loopback. A request to a hyperty of the other domain travels as an event in the room the
//! sending node shares with the other node's appservice user, the response comes back the
//! same way, and the other node's refusals (404) reach the sender too.

use std::time::{Duration, Instant};

mod common;

use common::stub::Stub;
use common::synapse::Synapse;
use msgnode::cmd::run::{start, Running};
use msgnode::config::{Config, Peer};
use serde_json::{json, Value};

/// Federation on loopback takes a few hundred ms; the first message waits for the invited
/// node to join, and CI machines are slow.
const THROUGH_FEDERATION: Duration = Duration::from_secs(45);

fn config(synapse: &Synapse, domain: &str, peer: (&str, &Synapse)) -> Config {
    let mut config = common::bus_config(&common::shipped_policies());
    synapse.serve(&mut config);
    config.bus.domain = Some(domain.to_string());
    config.bus.peers = vec![Peer {
        domain: peer.0.to_string(),
        url: String::new(),
        token: String::new(),
        matrix_user: Some(format!("@_msgnode:{}", peer.1.server_name())),
    }];
    config
}

/// The next frame within `within` (the stub's own wait is shorter than federation's).
async fn next_frame(stub: &mut Stub, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        if let Some(frame) = stub.quiet_for(Duration::from_secs(2)).await {
            return frame;
        }
        assert!(
            Instant::now() < deadline,
            "nothing arrived within {within:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cross_domains_over_matrix_federation() {
    let synapse_a = Synapse::start_federating();
    let synapse_b = Synapse::start_federating();
    let alice_token = synapse_a.register("alice");
    let bob_token = synapse_b.register("bob");
    // Two domains the shipped policy trusts.
    let a: Running = start(config(
        &synapse_a,
        "msgnode.test",
        ("hybroker.example", &synapse_b),
    ))
    .await
    .expect("start node a");
    let b: Running = start(config(
        &synapse_b,
        "hybroker.example",
        ("msgnode.test", &synapse_a),
    ))
    .await
    .expect("start node b");

    let mut alice = Stub::connect(
        a.bus_addr.expect("bus a"),
        "runtime://msgnode.test/alice-1",
        &alice_token,
    )
    .await;
    let mut bob = Stub::connect(
        b.bus_addr.expect("bus b"),
        "runtime://hybroker.example/bob-1",
        &bob_token,
    )
    .await;
    let ha = alice.allocate("msgnode.test", "hyperty", 1).await.remove(0);
    let hb = bob
        .allocate("hybroker.example", "hyperty", 1)
        .await
        .remove(0);

    // A → B over federation, unchanged, and the response back.
    let request =
        json!({"id": 9, "type": "create", "from": ha, "to": hb, "body": {"value": {"hello": "b"}}});
    alice.send(request.clone()).await;
    let got = next_frame(&mut bob, THROUGH_FEDERATION).await;
    assert_eq!(got, request, "delivered unchanged across domains");
    bob.send(json!({"id": 9, "type": "response", "from": hb, "to": ha, "body": {"code": 200}}))
        .await;
    let answer = next_frame(&mut alice, THROUGH_FEDERATION).await;
    assert_eq!(answer["type"], "response", "{answer}");
    assert_eq!(answer["from"], hb.as_str(), "{answer}");
    assert_eq!(answer["id"], 9, "{answer}");

    // Several in a row arrive once each. (This node sends them in order; the receiving
    // homeserver may push federated events in another order.)
    for n in 0..5 {
        alice
            .send(json!({"type": "create", "from": ha, "to": hb, "body": {"n": n}}))
            .await;
    }
    let mut got = Vec::new();
    for _ in 0..5 {
        let frame = next_frame(&mut bob, THROUGH_FEDERATION).await;
        got.push(frame["body"]["n"].as_u64().expect("n"));
    }
    got.sort_unstable();
    assert_eq!(got, vec![0, 1, 2, 3, 4], "each once");
    assert!(
        bob.quiet_for(Duration::from_millis(500)).await.is_none(),
        "once"
    );

    // The other node's refusal comes back over federation too.
    alice
        .send(json!({"id": 77, "type": "create", "from": ha, "to": "hyperty://hybroker.example/nobody"}))
        .await;
    let missing = next_frame(&mut alice, THROUGH_FEDERATION).await;
    assert_eq!(missing["id"], 77, "{missing}");
    assert_eq!(missing["body"]["code"], 404, "{missing}");

    // A node never takes a peer's domain as a sender from a local runtime.
    let spoof = alice
        .request(json!({"type": "create", "from": "hyperty://hybroker.example/x", "to": ha}))
        .await;
    assert_eq!(spoof["body"]["code"], 403, "{spoof}");

    a.stop().await;
    b.stop().await;
}

/// N6, the Matrix transport: a peer's message event for a local runtime whose queue is full
/// and that does not read never holds up the appservice's transaction, nor the events after
/// it (other peer messages, ordinary events the appservice decides).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_addressee_does_not_stall_appservice_transactions() {
    let synapse = Synapse::start();
    let eve_token = synapse.register("eve");
    let bob_token = synapse.register("bob");
    let mut config = common::bus_config(&common::shipped_policies());
    synapse.serve(&mut config);
    config.bus.domain = Some("msgnode.test".into());
    let peer_user = "@_msgnode:hybroker.example";
    config.bus.peers = vec![Peer {
        domain: "hybroker.example".into(),
        url: String::new(),
        token: String::new(),
        matrix_user: Some(peer_user.into()),
    }];
    config.bus.outbound_queue = 4;
    config.bus.outbound_queue_bytes = 256 * 1024;
    // Far longer than any wait below: an event that waited on flow control would hold the
    // transaction past it.
    config.bus.slow_receiver_close_after = Duration::from_secs(600);
    config.bus.inbox_max_bytes_per_principal = 32 * 1024 * 1024;
    let running = start(config).await.expect("start node");
    let addr = running.bus_addr.expect("bus");
    let http = reqwest::Client::new();

    // Eve's runtime R does not read, and her other runtime fills its queue.
    let r_url = "runtime://msgnode.test/eve-r";
    let path = format!("/ws?runtimeURL={}", common::stub::urlencode(r_url));
    let mut r = Stub::from_socket(
        common::stub::open_small_window(addr, &path, &eve_token).await,
        r_url,
    );
    let hr = r.allocate("msgnode.test", "hyperty", 1).await.remove(0);
    let mut filler = Stub::connect(addr, "runtime://msgnode.test/eve-f", &eve_token).await;
    let hf = filler
        .allocate("msgnode.test", "hyperty", 1)
        .await
        .remove(0);
    let mut bob = Stub::connect(addr, "runtime://msgnode.test/bob-1", &bob_token).await;
    let hb = bob.allocate("msgnode.test", "hyperty", 1).await.remove(0);
    let filling = common::stub::fill_until_stuck(filler, hf, hr.clone()).await;

    // One transaction: the peer's message to R, ten to Bob, and an ordinary event.
    // The one to R is bigger than the filler's messages: no room in R's queue for it.
    let peer_event = |n: u64, to: &str, pad: usize| {
        let message = json!({"id": n, "type": "create", "from": "hyperty://hybroker.example/p",
            "to": to, "body": {"n": n, "pad": "x".repeat(pad)}});
        json!({"type": "org.msgnode.rethink.message", "sender": peer_user,
            "room_id": "!peer:hybroker.example", "event_id": format!("$n6-{n}"),
            "content": {"message": message.to_string()}})
    };
    let mut events = vec![peer_event(0, &hr, 80 * 1024)];
    events.extend((1..=10).map(|n| peer_event(n, &hb, 0)));
    events.push(
        json!({"type": "m.room.message", "sender": "@carol:hybroker.example",
        "room_id": "!elsewhere:hybroker.example", "event_id": "$n6-ordinary",
        "content": {"msgtype": "m.text", "body": "hello"}}),
    );
    let answered = http
        .put(format!(
            "http://127.0.0.1:{}/_matrix/app/v1/transactions/n6-1",
            synapse.as_port
        ))
        .bearer_auth(synapse.token("hs_token"))
        .timeout(Duration::from_secs(120))
        .json(&json!({ "events": events }))
        .send()
        .await
        .expect("the transaction is answered");
    assert_eq!(answered.status().as_u16(), 200);
    let mut got = Vec::new();
    while got.len() < 10 {
        let frame = next_frame(&mut bob, Duration::from_secs(30)).await;
        got.push(frame["body"]["n"].as_u64().expect("n"));
    }
    assert_eq!(
        got,
        (1..=10).collect::<Vec<_>>(),
        "Bob gets his 10, in order"
    );
    filling.abort();
    drop(r);
    running.stop().await;
}

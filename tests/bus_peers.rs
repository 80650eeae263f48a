//! Two nodes of different domains, each with its own bus (memory-only, Network Server tokens):
//! a message to an address of the other domain goes to that domain's node over HTTP and the
//! answer comes back the same way; unknown domains and wrong peer tokens are refused.

use std::time::Duration;

mod common;

use common::stub::Stub;
use msgnode::cmd::run::{start, Running};
use msgnode::config::{Config, NetworkServer, Peer};
use serde_json::json;

const NS_TOKEN: &str = "service-token";
const PEER_TOKEN: &str = "shared-peer-token";

fn config(domain: &str, bus_port: u16, peer: (&str, u16)) -> Config {
    let mut config = common::bus_config(&common::shipped_policies());
    config.bus.listen = format!("127.0.0.1:{bus_port}").parse().expect("addr");
    config.bus.domain = Some(domain.to_string());
    config.bus.network_servers = vec![NetworkServer {
        name: "svc".into(),
        token: NS_TOKEN.into(),
    }];
    config.bus.peers = vec![Peer {
        domain: peer.0.into(),
        url: format!("http://127.0.0.1:{}", peer.1),
        token: PEER_TOKEN.into(),
        matrix_user: None,
    }];
    config
}

async fn node(config: Config) -> Running {
    start(config).await.expect("start node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cross_domains_through_peer_nodes() {
    let (port_a, port_b) = (common::synapse::free_port(), common::synapse::free_port());
    // Two domains the shipped policy trusts (and that have no time windows).
    let a = node(config("msgnode.test", port_a, ("hybroker.example", port_b))).await;
    let b = node(config("hybroker.example", port_b, ("msgnode.test", port_a))).await;
    let addr_a = a.bus_addr.expect("bus a");
    let addr_b = b.bus_addr.expect("bus b");

    let mut on_a = Stub::connect(addr_a, "runtime://msgnode.test/svc-1", NS_TOKEN).await;
    let mut on_b = Stub::connect(addr_b, "runtime://hybroker.example/svc-1", NS_TOKEN).await;
    let ha = on_a.allocate("msgnode.test", "hyperty", 1).await.remove(0);
    let hb = on_b
        .allocate("hybroker.example", "hyperty", 1)
        .await
        .remove(0);

    // A → B and the answer back.
    let request =
        json!({"id": 9, "type": "create", "from": ha, "to": hb, "body": {"value": {"hello": "b"}}});
    on_a.send(request.clone()).await;
    let got = on_b.recv().await;
    assert_eq!(got, request, "delivered unchanged across nodes");
    on_b.send(json!({"id": 9, "type": "response", "from": hb, "to": ha, "body": {"code": 200}}))
        .await;
    let answer = on_a.recv().await;
    assert_eq!(answer["type"], "response", "{answer}");
    assert_eq!(answer["from"], hb.as_str(), "{answer}");

    // The peer's node answers for addresses it does not hold.
    let missing = on_a
        .request(json!({"type": "create", "from": ha, "to": "hyperty://hybroker.example/nobody"}))
        .await;
    assert_eq!(missing["body"]["code"], 404, "{missing}");

    // A domain without a peer (trusted by policy, but no route).
    let no_route = on_a
        .request(json!({"type": "create", "from": ha, "to": "hyperty://partner.example/x"}))
        .await;
    let code = no_route["body"]["code"].as_u64().unwrap_or(0);
    assert!(code == 404 || code == 403, "{no_route}");

    // A peer may only send from its own domain, and needs the token.
    let http = reqwest::Client::new();
    let spoofed = http
        .post(format!("http://{addr_b}/bus/v1/messages"))
        .bearer_auth(PEER_TOKEN)
        .body(
            json!({"id": 1, "type": "create", "from": "hyperty://other.example/x", "to": hb})
                .to_string(),
        )
        .send()
        .await
        .expect("post");
    let body: serde_json::Value = spoofed.json().await.expect("json");
    assert_eq!(body["body"]["code"], 403, "{body}");
    let unknown = http
        .post(format!("http://{addr_b}/bus/v1/messages"))
        .bearer_auth("wrong")
        .body(request.to_string())
        .send()
        .await
        .expect("post");
    assert_eq!(unknown.status(), 401);
    assert!(
        on_b.quiet_for(Duration::from_millis(200)).await.is_none(),
        "nothing else reached B"
    );

    a.stop().await;
    b.stop().await;
}

/// N6: a local runtime whose queue is full and that does not read never holds up a peer's
/// posts: the peer's message to it is answered after a short wait (it waits in the
/// runtime's inbox), and the peer's messages to others go on; the runtime gets it once it
/// reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_addressee_does_not_stall_a_peer() {
    let port = common::synapse::free_port();
    let mut config = config("msgnode.test", port, ("hybroker.example", 9));
    config.bus.outbound_queue = 4;
    config.bus.outbound_queue_bytes = 256 * 1024;
    // Far longer than any wait below: a post that waited on flow control would not be
    // answered in time.
    config.bus.slow_receiver_close_after = Duration::from_secs(600);
    config.bus.inbox_max_bytes_per_principal = 32 * 1024 * 1024;
    let running = node(config).await;
    let addr = running.bus_addr.expect("bus");
    let http = reqwest::Client::new();

    // Eve's runtime R does not read, and her other runtime fills its queue.
    let r_url = "runtime://msgnode.test/eve-r";
    let path = format!("/ws?runtimeURL={}", common::stub::urlencode(r_url));
    let mut r = Stub::from_socket(
        common::stub::open_small_window(addr, &path, NS_TOKEN).await,
        r_url,
    );
    let hr = r.allocate("msgnode.test", "hyperty", 1).await.remove(0);
    let mut filler = Stub::connect(addr, "runtime://msgnode.test/eve-f", NS_TOKEN).await;
    let hf = filler
        .allocate("msgnode.test", "hyperty", 1)
        .await
        .remove(0);
    let mut bob = Stub::connect(addr, "runtime://msgnode.test/bob", NS_TOKEN).await;
    let hb = bob.allocate("msgnode.test", "hyperty", 1).await.remove(0);
    let filling = common::stub::fill_until_stuck(filler, hf.clone(), hr.clone()).await;

    // The peer's message to R is bigger than the filler's: no room in R's queue for it.
    let post = |n: u64, to: &str, pad: usize| {
        let body = json!({"id": n, "type": "create", "from": "hyperty://hybroker.example/p",
            "to": to, "body": {"n": n, "pad": "x".repeat(pad)}});
        http.post(format!("http://{addr}/bus/v1/messages"))
            .bearer_auth(PEER_TOKEN)
            .timeout(Duration::from_secs(60))
            .body(body.to_string())
            .send()
    };
    // 202: routed (an error answer would be a 200 with the answer as its body).
    let first = post(0, &hr, 80 * 1024)
        .await
        .expect("the post to R is answered");
    assert_eq!(first.status(), reqwest::StatusCode::ACCEPTED);
    for n in 1..=10 {
        let answer = post(n, &hb, 0).await.expect("each post to Bob is answered");
        assert_eq!(answer.status(), reqwest::StatusCode::ACCEPTED);
    }
    let mut got = Vec::new();
    while got.len() < 10 {
        let frame = bob.recv().await;
        got.push(frame["body"]["n"].as_u64().expect("n"));
    }
    assert_eq!(
        got,
        (1..=10).collect::<Vec<_>>(),
        "Bob gets his 10, in order"
    );
    // R was closed, and its message waits for it: R reconnects and gets it (after what the
    // filler had queued for it, if anything).
    filling.abort();
    drop(r);
    let mut r = Stub::connect(addr, r_url, NS_TOKEN).await;
    loop {
        let frame = r.recv().await;
        if frame["from"] == "hyperty://hybroker.example/p" {
            assert_eq!(frame["body"]["n"], 0, "the peer's message to R");
            break;
        }
        assert_eq!(
            frame["from"].as_str(),
            Some(hf.as_str()),
            "only the filler's before"
        );
    }
    running.stop().await;
}

/// Review bus-4 M3: a peer's message that found a local receiver's queue full closed it at
/// once (1013), however well it read: a partner domain's user could force reconnects at
/// will. A peer's message waits for room (briefly, see `bus::flow::PEER_WAIT`) as a local
/// sender's does; a receiver that reads takes the whole burst (more than its queue holds), in
/// order, on one socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_burst_does_not_close_a_reading_receiver() {
    let port = common::synapse::free_port();
    let mut config = config("msgnode.test", port, ("hybroker.example", 9));
    config.bus.outbound_queue_bytes = 256 * 1024;
    let running = node(config).await;
    let addr = running.bus_addr.expect("bus");
    let http = reqwest::Client::new();
    // R reads steadily, one frame at a time (its small receive window keeps what the node
    // wrote from piling up in the kernel), and fails if its socket closes.
    let r_url = "runtime://msgnode.test/reader";
    let path = format!("/ws?runtimeURL={}", common::stub::urlencode(r_url));
    let mut r = Stub::from_socket(
        common::stub::open_small_window(addr, &path, NS_TOKEN).await,
        r_url,
    );
    let hr = r.allocate("msgnode.test", "hyperty", 1).await.remove(0);
    const BURST: u64 = 96;
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < BURST as usize {
            let frame = r.recv().await;
            got.push(frame["body"]["n"].as_u64().expect("n"));
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        got
    });
    for n in 0..BURST {
        let body = json!({"id": n, "type": "create", "from": "hyperty://hybroker.example/p",
            "to": hr, "body": {"n": n, "pad": "x".repeat(64 * 1024)}});
        let answer = http
            .post(format!("http://{addr}/bus/v1/messages"))
            .bearer_auth(PEER_TOKEN)
            .timeout(Duration::from_secs(60))
            .body(body.to_string())
            .send()
            .await
            .expect("each post is answered");
        assert_eq!(answer.status(), reqwest::StatusCode::ACCEPTED, "post {n}");
    }
    let got = reader.await.expect("R reads the burst on its one socket");
    assert_eq!(got, (0..BURST).collect::<Vec<_>>(), "all of it, in order");
    running.stop().await;
}

/// Review bus-4 M4: the peer line sent 4 posts at once, ordered per target address only, so
/// one runtime's `create` to the peer's `…/a` and its `update` to `…/a/child` raced, and a
/// slow first post let the second arrive first. Each sender's messages leave in order now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_senders_messages_to_two_addresses_of_a_peer_arrive_in_order() {
    use std::sync::{Arc, Mutex};
    // The peer: takes its time over the first message to `…/a`, then records the order
    // in which it has dealt with each.
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = Arc::clone(&seen);
    let peer = axum::Router::new().route(
        "/bus/v1/messages",
        axum::routing::post(move |body: String| {
            let record = Arc::clone(&record);
            async move {
                let message: serde_json::Value = serde_json::from_str(&body).expect("JSON");
                let to = message["to"].as_str().unwrap_or_default().to_string();
                if to.ends_with("/a") {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                record.lock().expect("seen").push(to);
                axum::http::StatusCode::ACCEPTED
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("peer listener");
    let peer_port = listener.local_addr().expect("peer addr").port();
    let server = tokio::spawn(async move { axum::serve(listener, peer).await });

    let port = common::synapse::free_port();
    let running = node(config(
        "msgnode.test",
        port,
        ("hybroker.example", peer_port),
    ))
    .await;
    let addr = running.bus_addr.expect("bus");
    let mut sender = Stub::connect(addr, "runtime://msgnode.test/sender", NS_TOKEN).await;
    let h = sender
        .allocate("msgnode.test", "hyperty", 1)
        .await
        .remove(0);
    let (a, child) = (
        "hyperty://hybroker.example/a",
        "hyperty://hybroker.example/a/child",
    );
    sender
        .send(json!({"type": "create", "from": h, "to": a, "body": {"value": {}}}))
        .await;
    sender
        .send(json!({"type": "update", "from": h, "to": child, "body": {"value": {}}}))
        .await;
    let mut got = Vec::new();
    for _ in 0..1500 {
        got = seen.lock().expect("seen").clone();
        if got.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        got,
        [a, child],
        "the peer got them in the order they were sent"
    );
    server.abort();
    running.stop().await;
}

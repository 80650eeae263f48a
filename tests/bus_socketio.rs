//! The socket.io protocol stub (the reference Node.js stub: socket.io-client 1.x, Engine.IO
//! protocol 3) on the bus's own listener: a polling handshake, the upgrade to WebSocket,
//! reTHINK messages as `message` events (sent as JSON text, received as objects), `open`
//! answered like the Vert.x stub's, and a `close` answered only by a Socket.IO DISCONNECT.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use msgnode::cmd::run::start;
use msgnode::config::NetworkServer;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as Ws;

const TOKEN: &str = "socketio-suite-token";

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Splits an Engine.IO 3 text payload (`<length>:<packet>…`) into its packets.
fn packets(mut payload: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some((len, rest)) = payload.split_once(':') {
        let len: usize = len.parse().expect("packet length");
        let packet: String = rest.chars().take(len).collect();
        payload = &rest[packet.len()..];
        out.push(packet);
    }
    out
}

/// What socket.io-client 1.x does: a polling handshake (`EIO=3`), then the WebSocket
/// upgrade (`2probe` / `3probe` / `5`). Returns the socket and every packet seen so far.
async fn connect(addr: SocketAddr) -> (Socket, Vec<String>) {
    let http = reqwest::Client::new();
    let base = format!("http://{addr}/socket.io/?EIO=3&access_token={TOKEN}");
    let first = http
        .get(format!("{base}&transport=polling&t=1"))
        .header("origin", "http://localhost:9876")
        .send()
        .await
        .expect("handshake");
    assert_eq!(first.status(), 200);
    assert_eq!(
        first
            .headers()
            .get("access-control-allow-credentials")
            .and_then(|v| v.to_str().ok()),
        Some("true"),
        "browsers' polling sends credentials"
    );
    let mut seen = packets(&first.text().await.expect("body"));
    let open: Value =
        serde_json::from_str(seen[0].strip_prefix('0').expect("open packet")).expect("open JSON");
    let sid = open["sid"].as_str().expect("sid").to_string();
    if !seen.iter().any(|p| p == "40") {
        let more = http
            .get(format!("{base}&transport=polling&t=2&sid={sid}"))
            .send()
            .await
            .expect("poll");
        seen.extend(packets(&more.text().await.expect("body")));
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{addr}/socket.io/?EIO=3&transport=websocket&sid={sid}&access_token={TOKEN}"
    ))
    .await
    .expect("upgrade");
    ws.send(Ws::Text("2probe".into())).await.expect("probe");
    loop {
        match next(&mut ws).await.as_deref() {
            Some("3probe") => break,
            Some(other) => seen.push(other.to_string()),
            None => panic!("closed during the upgrade"),
        }
    }
    ws.send(Ws::Text("5".into())).await.expect("upgrade");
    (ws, seen)
}

async fn next(ws: &mut Socket) -> Option<String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a packet within the wait")
        {
            Some(Ok(Ws::Text(t))) => return Some(t.to_string()),
            Some(Ok(Ws::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// Sends a reTHINK message as the stub does: `message` with one JSON text argument.
async fn send(ws: &mut Socket, message: Value) {
    let packet = format!("42{}", json!(["message", message.to_string()]));
    ws.send(Ws::Text(packet.into())).await.expect("send");
}

/// The next reTHINK message the node emits (an object payload), skipping pings.
async fn recv(ws: &mut Socket) -> Option<Value> {
    loop {
        let packet = next(ws).await?;
        if let Some(event) = packet.strip_prefix("42") {
            let event: Value = serde_json::from_str(event).expect("event JSON");
            assert_eq!(event[0], "message", "{event}");
            assert!(event[1].is_object(), "emitted as an object: {event}");
            return Some(event[1].clone());
        }
        if packet == "41" {
            return None;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_io_stub_opens_allocates_and_closes() {
    let mut config = common::bus_config(&common::shipped_policies());
    config.bus.domain = Some("localhost".into());
    config.bus.network_servers = vec![NetworkServer {
        name: "suite".into(),
        token: TOKEN.into(),
    }];
    let running = start(config).await.expect("start");
    let addr = running.bus_addr.expect("bus");
    let (mut ws, seen) = connect(addr).await;
    assert!(
        seen.iter().any(|p| p == "40"),
        "the default namespace is connected: {seen:?}"
    );
    let runtime = "runtime://localhost/1";
    send(
        &mut ws,
        json!({"id": 1, "type": "open", "from": runtime, "to": "mn:/session"}),
    )
    .await;
    let open = recv(&mut ws).await.expect("open answered");
    assert_eq!(open["from"], "mn:/session", "{open}");
    assert_eq!(open["body"]["code"], 200, "{open}");
    let sender = "hyperty-runtime://localhost/protostub/1/registry/allocation";
    send(
        &mut ws,
        json!({"id": 2, "type": "create", "from": sender,
            "to": "domain://msg-node.localhost/address-allocation",
            "body": {"scheme": "hyperty", "value": {"number": 1}, "via": "hyperty-runtime://localhost/protostub/1"}}),
    )
    .await;
    let allocated = recv(&mut ws).await.expect("allocation answered");
    assert_eq!(allocated["id"], 2, "{allocated}");
    assert_eq!(allocated["to"], sender, "{allocated}");
    assert_eq!(allocated["body"]["code"], 200, "{allocated}");
    // Not a JSON message: a 400 response, the socket stays.
    let bad = format!("42{}", json!(["message", "not json"]));
    ws.send(Ws::Text(bad.into())).await.expect("send");
    let refused = recv(&mut ws).await.expect("refusal");
    assert_eq!(refused["body"]["code"], 400, "{refused}");
    // A close: no answer from mn:/session (the stub would read it as connected), then `41`.
    send(
        &mut ws,
        json!({"id": 3, "type": "close", "from": runtime, "to": "mn:/session"}),
    )
    .await;
    assert_eq!(recv(&mut ws).await, None, "only a DISCONNECT after close");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_io_stub_without_a_valid_open_is_told_and_disconnected() {
    let mut config = common::bus_config(&common::shipped_policies());
    config.bus.domain = Some("localhost".into());
    config.bus.network_servers = vec![NetworkServer {
        name: "suite".into(),
        token: "another-token".into(),
    }];
    let running = start(config).await.expect("start");
    let addr = running.bus_addr.expect("bus");
    let (mut ws, _) = connect(addr).await;
    send(
        &mut ws,
        json!({"id": 1, "type": "open", "from": "runtime://localhost/1", "to": "mn:/session"}),
    )
    .await;
    let refused = recv(&mut ws).await.expect("an answer");
    assert_eq!(refused["body"]["code"], 401, "unknown token: {refused}");
    assert_eq!(recv(&mut ws).await, None, "then disconnected");
    running.stop().await;
}

//! What real reTHINK stubs and runtimes send, as the reference nodes accept it: the token in
//! the connect frame or glued to the query, runtimes of another domain, releases repeated
//! after a reconnect, nested `childrenResources`, the 2016 registry shape, status updates
//! without `attribute`, no answer to a refused `response`, and a silent `disconnect`.

use std::time::Duration;

mod common;

use common::stub::{urlencode, Stub};
use msgnode::cmd::run::{start, Running};
use msgnode::config::NetworkServer;
use serde_json::{json, Value};

const TOKEN: &str = "stub-token";
const MN: &str = "domain://msg-node.localhost";

async fn node() -> Running {
    let mut config = common::bus_config(&common::shipped_policies());
    config.bus.domain = Some("localhost".into());
    config.bus.network_servers = vec![NetworkServer {
        name: "stubs".into(),
        token: TOKEN.into(),
    }];
    start(config).await.expect("start")
}

fn code(v: &Value) -> u64 {
    v["body"]["code"].as_u64().unwrap_or(0)
}

/// A socket opened without an Authorization header.
async fn bare(addr: std::net::SocketAddr, path_and_query: &str, runtime: &str) -> Stub {
    let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}{path_and_query}"))
        .await
        .expect("connect");
    Stub::from_socket(socket, runtime)
}

async fn ping(stub: &mut Stub) -> u64 {
    let runtime = stub.runtime.clone();
    code(
        &stub
            .request(json!({"type": "ping", "from": runtime, "to": "mn:/session"}))
            .await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_reference_stubs_send_works() {
    let running = node().await;
    let addr = running.bus_addr.expect("bus");

    // The 2016 Matrix stub: the token in the connect frame.
    let mut connect = bare(addr, "/stub/connect", "runtime://localhost/m2016").await;
    connect
        .send_text(
            &json!({"cmd": "connect", "data": {"runtimeURL": "runtime://localhost/m2016", "accessToken": TOKEN}})
                .to_string(),
        )
        .await;
    assert_eq!(connect.recv().await["response"], 200);
    assert_eq!(ping(&mut connect).await, 200);

    // The later Matrix stub glues `?runtimeURL=` to a URL that already has a query.
    let runtime = "runtime://localhost/glued";
    let mut glued = bare(
        addr,
        &format!("/ws?access_token={TOKEN}?runtimeURL={}", urlencode(runtime)),
        runtime,
    )
    .await;
    assert_eq!(ping(&mut glued).await, 200);

    // A runtime of another domain (runtime-core names runtimes after its home domain).
    let mut visitor = Stub::connect(addr, "runtime://hybroker.example/guid-1", TOKEN).await;
    assert_eq!(ping(&mut visitor).await, 200);
    let visiting = visitor.allocate("localhost", "hyperty", 1).await;
    assert_eq!(visiting.len(), 1);

    // Release is idempotent across a reconnect, and `childrenResources` may be nested.
    let runtime = "runtime://localhost/alloc";
    let mut stub = Stub::connect(addr, runtime, TOKEN).await;
    let addresses = stub.allocate("localhost", "hyperty", 2).await;
    stub.send_text(&json!({"cmd": "disconnect", "data": {"runtimeURL": runtime}}).to_string())
        .await;
    assert_eq!(
        stub.closed().await,
        Some(1000),
        "disconnect closes without a frame"
    );
    let mut stub = Stub::connect(addr, runtime, TOKEN).await;
    let released = stub
        .request(json!({"type": "delete", "from": format!("{runtime}/registry/allocation"),
            "to": format!("{MN}/hyperty-address-allocation"), "body": {"childrenResources": [addresses]}}))
        .await;
    assert_eq!(code(&released), 200, "{released}");

    // The 2016 registry shape; a status change without `attribute`.
    let hyperty = stub.allocate("localhost", "hyperty", 1).await.remove(0);
    let registered = stub
        .request(json!({"type": "create", "from": hyperty, "to": "domain://registry.localhost/",
            "body": {"value": {"user": "alice@example.com", "hypertyDescriptorURL": "hyperty-catalogue://localhost/Chat",
                "hypertyURL": hyperty, "expires": 3600}}}))
        .await;
    assert_eq!(code(&registered), 200, "{registered}");
    let changed = stub
        .request(
            json!({"type": "update", "from": hyperty, "to": "domain://registry.localhost",
            "body": {"resource": hyperty, "value": {"status": "disconnected"}}}),
        )
        .await;
    assert_eq!(code(&changed), 200, "{changed}");
    let read = stub
        .request(
            json!({"type": "read", "from": hyperty, "to": "domain://registry.localhost",
            "body": {"resource": hyperty}}),
        )
        .await;
    assert_eq!(read["body"]["value"]["status"], "disconnected", "{read}");
    assert_eq!(
        read["body"]["value"]["claimedUser"], "alice@example.com",
        "{read}"
    );

    // A `response` that cannot be delivered is not answered.
    let _ = stub
        .send(json!({"type": "response", "from": hyperty, "to": "hyperty://localhost/gone", "body": {"code": 200}}))
        .await;
    assert!(
        stub.quiet_for(Duration::from_millis(200)).await.is_none(),
        "no answer to a response"
    );
    running.stop().await;
}

//! Flow control: a receiver that reads late slows its sender down and loses nothing; one
//! that stays behind past `[bus] slow_receiver_close_after` is closed and resumes from its
//! inbox, in order. Both are counted.

mod common;

use std::time::Duration;

use common::stub::Stub;
use msgnode::cmd::run::{start, Running};
use msgnode::config::NetworkServer;
use serde_json::json;

const SENDER: &str = "flow-sender-token";
const RECEIVER: &str = "flow-receiver-token";
const MESSAGES: u64 = 200;

async fn node(close_after: Duration) -> Running {
    let mut config = common::bus_config(&common::shipped_policies());
    config.bus.domain = Some("localhost".into());
    config.bus.outbound_queue = 4;
    config.bus.outbound_queue_bytes = 256 * 1024;
    config.bus.slow_receiver_close_after = close_after;
    // The sender alone floods 200 × 64 KiB: once its receiver is closed, all of what is
    // left waits in the inbox, so its share must hold that much (the default is 8 MiB).
    config.bus.inbox_max_bytes_per_principal = 16 * 1024 * 1024;
    config.bus.network_servers = [("sender", SENDER), ("receiver", RECEIVER)]
        .into_iter()
        .map(|(name, token)| NetworkServer {
            name: name.into(),
            token: token.into(),
        })
        .collect();
    start(config).await.expect("start")
}

/// Sends `MESSAGES` messages of 64 KiB (more than the sockets' buffers hold) from `from` to
/// `to`, without waiting.
async fn flood(sender: &mut Stub, from: &str, to: &str) {
    let pad = "x".repeat(64 * 1024);
    for n in 0..MESSAGES {
        sender
            .send(json!({"type": "create", "from": from, "to": to, "body": {"value": {"n": n, "pad": pad}}}))
            .await;
    }
}

/// Reads `MESSAGES` messages from `receiver`; their `n`s.
async fn drain(receiver: &mut Stub) -> Vec<u64> {
    let mut seen = Vec::new();
    while (seen.len() as u64) < MESSAGES {
        let message = receiver.recv().await;
        seen.push(message["body"]["value"]["n"].as_u64().expect("n"));
    }
    seen
}

async fn counter(running: &Running, name: &str) -> u64 {
    common::metric(
        &reqwest::Client::new(),
        running,
        &format!("msgnode_{name}_total "),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_reads_late_slows_its_sender_and_loses_nothing() {
    let running = node(Duration::from_secs(120)).await;
    let addr = running.bus_addr.expect("bus");
    let mut sender = Stub::connect(addr, "runtime://localhost/sender", SENDER).await;
    let mut receiver = Stub::connect(addr, "runtime://localhost/receiver", RECEIVER).await;
    let a = sender.allocate("localhost", "hyperty", 1).await.remove(0);
    let b = receiver.allocate("localhost", "hyperty", 1).await.remove(0);
    let sending = tokio::spawn(async move {
        flood(&mut sender, &a, &b).await;
        sender
    });
    // The receiver reads only once the sender had to wait.
    common::eventually("the sender is slowed", Duration::from_secs(60), || {
        let running = &running;
        async move { counter(running, "bus_senders_slowed").await > 0 }
    })
    .await;
    let seen = drain(&mut receiver).await;
    assert_eq!(seen, (0..MESSAGES).collect::<Vec<_>>(), "all, in order");
    let mut sender = sending.await.expect("sender");
    assert!(
        sender.quiet_for(Duration::from_millis(300)).await.is_none(),
        "no refusal"
    );
    assert_eq!(counter(&running, "bus_receivers_closed").await, 0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_behind_too_long_is_closed_and_resumes_from_its_inbox() {
    let running = node(Duration::from_millis(300)).await;
    let addr = running.bus_addr.expect("bus");
    let mut sender = Stub::connect(addr, "runtime://localhost/sender", SENDER).await;
    let mut receiver = Stub::connect(addr, "runtime://localhost/receiver", RECEIVER).await;
    let a = sender.allocate("localhost", "hyperty", 1).await.remove(0);
    let b = receiver.allocate("localhost", "hyperty", 1).await.remove(0);
    flood(&mut sender, &a, &b).await;
    common::eventually("the receiver is closed", Duration::from_secs(60), || {
        let running = &running;
        async move { counter(running, "bus_receivers_closed").await == 1 }
    })
    .await;
    // What reached its socket before the close — read until the node closes it (a pause of
    // a few seconds in its flush, on a loaded machine, is no end: what it still wrote after
    // would be missed) — then the rest from the inbox.
    let mut seen = Vec::new();
    while let Some(message) = receiver.quiet_for(Duration::from_secs(9)).await {
        if let Some(n) = message["body"]["value"]["n"].as_u64() {
            seen.push(n);
        }
    }
    let mut again = Stub::connect(addr, "runtime://localhost/receiver", RECEIVER).await;
    while (seen.len() as u64) < MESSAGES {
        let message = again.recv().await;
        seen.push(message["body"]["value"]["n"].as_u64().expect("n"));
    }
    assert_eq!(
        seen,
        (0..MESSAGES).collect::<Vec<_>>(),
        "none lost, in order"
    );
    running.stop().await;
}

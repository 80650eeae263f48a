//! `msgnode bench --mode bus`: policy-checked reTHINK messages routed between connected
//! runtimes, and how fast their history reaches Matrix.
//!
//! Starts a Synapse of its own (data on tmpfs) and the node as a child process (so its CPU
//! time can be read from `/proc`), connects protocol stubs over real WebSockets (pairs: a
//! client sends `create` requests to its partner's hyperty, the partner answers each with a
//! `response`: two routed messages per round trip), and prints for each case the round-trip
//! p50/p99, routed messages per second and the node's CPU time per routed message — with the
//! decision cache warm (identical messages but for `id`) and cold (a distinct body each
//! time). Then it waits for the history to be persisted, prints the persisted rate and the
//! lag, and reads the journal room back to check that every routed message is there.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as Ws;

use super::node::{Node, TOKEN};
use super::stats::Stats;
use super::synapse::BenchSynapse;
use crate::cli::BenchArgs;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One connected stub with one allocated hyperty.
struct BenchStub {
    socket: Socket,
    hyperty: String,
}

async fn connect(addr: SocketAddr, runtime: &str) -> anyhow::Result<BenchStub> {
    let url = format!(
        "ws://{addr}/ws?runtimeURL={}",
        crate::matrix::encode(runtime)
    );
    let mut request = url.into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    let allocate = json!({"id": 1, "type": "create", "from": format!("{runtime}/registry/allocation"),
        "to": "domain://msg-node.localhost/address-allocation", "body": {"scheme": "hyperty", "value": {"number": 1}}});
    socket.send(Ws::Text(allocate.to_string().into())).await?;
    loop {
        match socket.next().await {
            Some(Ok(Ws::Text(t))) => {
                let answer: Value = serde_json::from_str(&t)?;
                if answer["id"] == 1 && answer["type"] == "response" {
                    let hyperty = answer["body"]["value"]["allocated"][0]
                        .as_str()
                        .with_context(|| format!("allocation failed: {answer}"))?
                        .to_string();
                    return Ok(BenchStub { socket, hyperty });
                }
            }
            Some(Ok(_)) => continue,
            other => bail!("socket closed during allocation: {other:?}"),
        }
    }
}

/// Answers every request it gets with a response (from its hyperty to the sender). A cold
/// request (one carrying `body.value.n`) gets a cold response (`body.n`), so that neither
/// direction hits the decision cache.
async fn echo(mut stub: BenchStub) {
    while let Some(Ok(frame)) = stub.socket.next().await {
        let Ws::Text(text) = frame else { continue };
        let Ok(request) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if request["type"] == "response" {
            continue;
        }
        let mut body = json!({"code": 200});
        if let Some(n) = request["body"]["value"].get("n") {
            body["n"] = n.clone();
        }
        let response = json!({"id": request["id"], "type": "response", "from": stub.hyperty, "to": request["from"], "body": body});
        if stub
            .socket
            .send(Ws::Text(response.to_string().into()))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Keeps `window` requests in flight to `to` until `deadline`; the stub (for the next case)
/// and the round-trip times.
async fn client(
    mut stub: BenchStub,
    to: String,
    window: usize,
    cold: bool,
    deadline: Instant,
    first_id: u64,
) -> (BenchStub, Vec<u64>) {
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let mut latencies = Vec::new();
    let mut next = first_id;
    loop {
        while sent.len() < window && Instant::now() < deadline {
            let value = if cold {
                json!({"text": "hello", "n": next})
            } else {
                json!({"text": "hello"})
            };
            let text = json!({"id": next, "type": "create", "from": stub.hyperty, "to": to, "body": {"value": value}})
                .to_string();
            if stub.socket.send(Ws::Text(text.into())).await.is_err() {
                return (stub, latencies);
            }
            sent.insert(next, Instant::now());
            next += 1;
        }
        if sent.is_empty() {
            return (stub, latencies);
        }
        let frame = match tokio::time::timeout(Duration::from_secs(10), stub.socket.next()).await {
            Ok(Some(Ok(frame))) => frame,
            _ => return (stub, latencies),
        };
        let Ws::Text(text) = frame else { continue };
        let Ok(answer) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if let Some(started) = answer["id"].as_u64().and_then(|id| sent.remove(&id)) {
            if answer["body"]["code"] != 200 {
                eprintln!("bench: unexpected answer {answer}");
            }
            latencies.push(started.elapsed().as_nanos() as u64);
        }
    }
}

/// Runs the bus benchmark and prints its rows.
///
/// # Errors
/// Synapse or the node cannot start, or stubs cannot connect.
pub fn run(args: &BenchArgs, measure: Duration) -> anyhow::Result<()> {
    let synapse = BenchSynapse::start()?;
    let dir = std::env::temp_dir().join(format!("msgnode-bench-bus-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let node = Node::start(
        Some(&synapse),
        &dir,
        Path::new("policies"),
        // Every stub of the benchmark is the one "bench" principal.
        "[bus.limits]\nsockets_per_principal = 1000000",
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let result = runtime.block_on(measure_all(args, &synapse, &node, measure));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The journal's counters at one moment.
struct History {
    recorded: f64,
    persisted: f64,
}

impl History {
    async fn read(node: &Node, http: &reqwest::Client) -> History {
        History {
            recorded: node
                .metric(http, "msgnode_bus_journal_recorded_total ")
                .await,
            persisted: node
                .metric(http, "msgnode_bus_journal_persisted_total ")
                .await,
        }
    }
}

async fn measure_all(
    args: &BenchArgs,
    synapse: &BenchSynapse,
    node: &Node,
    measure: Duration,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let started = Instant::now();
    while tokio::net::TcpStream::connect(node.bus).await.is_err() {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the node did not start listening within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "msgnode bench --mode bus: {measure:?} per case; node in its own process (2 worker threads), load generator on 1 thread; {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<6} {:>9} {:>5} {:>10} {:>10} {:>12} {:>9} {:>11} {:>9}",
        "stubs",
        "in flight",
        "cache",
        "rtt p50",
        "rtt p99",
        "routed msg/s",
        "cpu/msg",
        "history/s",
        "behind"
    );
    let mut routed_total = 0u64;
    let mut next_id = 100u64;
    let many = args.connections.max(2);
    for (group, (stubs, windows)) in [(2usize, [1usize, 64]), (many, [1, 8])]
        .into_iter()
        .enumerate()
    {
        let pairs = (stubs / 2).max(1);
        let mut clients = Vec::new();
        for i in 0..pairs {
            let server =
                connect(node.bus, &format!("runtime://localhost/bench-{group}-s{i}")).await?;
            let client_stub =
                connect(node.bus, &format!("runtime://localhost/bench-{group}-c{i}")).await?;
            let to = server.hyperty.clone();
            tokio::spawn(echo(server));
            clients.push((client_stub, to));
        }
        for window in windows {
            for cold in [false, true] {
                let deadline = Instant::now() + measure;
                let cpu_before = node.cpu();
                let history_before = History::read(node, &http).await;
                let begun = Instant::now();
                let tasks: Vec<_> = clients
                    .drain(..)
                    .map(|(stub, to)| {
                        next_id += 10_000_000;
                        let task =
                            tokio::spawn(client(stub, to.clone(), window, cold, deadline, next_id));
                        (task, to)
                    })
                    .collect();
                let mut latencies = Vec::new();
                for (task, to) in tasks {
                    let (stub, times) = task.await?;
                    latencies.extend(times);
                    clients.push((stub, to));
                }
                let elapsed = begun.elapsed();
                let history_after = History::read(node, &http).await;
                let routed = latencies.len() as u64 * 2;
                routed_total += routed;
                let cpu = match (cpu_before, node.cpu()) {
                    (Some(a), Some(b)) if routed > 0 => {
                        format!("{:.1} µs", (b - a).as_secs_f64() * 1e6 / routed as f64)
                    }
                    _ => "n/a".to_string(),
                };
                let mut stats = Stats {
                    latencies_ns: latencies,
                    elapsed,
                };
                let (p50, p99) = stats.quantiles();
                println!(
                    "{:<6} {:>9} {:>5} {:>10} {:>10} {:>12.0} {:>9} {:>11.0} {:>9.0}",
                    pairs * 2,
                    window,
                    if cold { "cold" } else { "warm" },
                    super::stats::micros(p50),
                    super::stats::micros(p99),
                    routed as f64 / elapsed.as_secs_f64(),
                    cpu,
                    (history_after.persisted - history_before.persisted) / elapsed.as_secs_f64(),
                    history_after.recorded - history_after.persisted,
                );
            }
        }
    }
    // History: is everything there, and how long did the last of it take?
    let end = History::read(node, &http).await;
    let drain = Instant::now();
    let mut persisted = end.persisted;
    while persisted < end.recorded && drain.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        persisted = History::read(node, &http).await.persisted;
    }
    let events = node
        .metric(&http, "msgnode_bus_journal_events_sent_total ")
        .await;
    println!(
        "history: {:.0} messages recorded, {persisted:.0} persisted in {events:.0} Matrix events; the last caught up {:.2} s after the load",
        end.recorded,
        drain.elapsed().as_secs_f64(),
    );
    let entries = crate::persist::journal::Journal::read_all(&*synapse.actor()?)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the journal room: {e}"))?;
    let mut seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    let gaps = seqs.windows(2).filter(|w| w[1] != w[0] + 1).count();
    println!(
        "history check: {} entries read back from the journal room ({} distinct, {gaps} gaps); {routed_total} messages routed by the benchmark",
        entries.len(),
        seqs.len()
    );
    Ok(())
}

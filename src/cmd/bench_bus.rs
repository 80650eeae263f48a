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
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as Ws;

use super::bench::Stats;
use super::bench_proxy::BenchSynapse;
use crate::cli::BenchArgs;

const TOKEN: &str = "bench-network-server-token";

/// The node under test, as a child process; killed when dropped.
struct Node {
    child: Child,
    bus: SocketAddr,
    pdp: SocketAddr,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn start(synapse: &BenchSynapse, dir: &Path) -> anyhow::Result<Node> {
        let free = || -> anyhow::Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let (bus, pdp) = (free()?, free()?);
        let config = format!(
            r#"[pdp]
listen = "127.0.0.1:{pdp}"
policies = "policies"
[pdp.decision_log]
enabled = false
[pep]
enabled = true
listen = "127.0.0.1:{as_port}"
homeserver = "http://127.0.0.1:{hs}"
registration = "{registration}"
[bus]
enabled = true
listen = "127.0.0.1:{bus}"
[[bus.network_servers]]
name = "bench"
token = "{TOKEN}"
[log]
level = "warn"
"#,
            as_port = synapse.as_port,
            hs = synapse.port,
            registration = synapse.registration().display(),
        );
        let path = dir.join("msgnode-bench.toml");
        std::fs::write(&path, config)?;
        let child = Command::new(std::env::current_exe()?)
            .args(["--config"])
            .arg(&path)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the node")?;
        Ok(Node {
            child,
            bus: SocketAddr::from(([127, 0, 0, 1], bus)),
            pdp: SocketAddr::from(([127, 0, 0, 1], pdp)),
        })
    }

    /// The node's CPU time so far (user + system), from `/proc/<pid>/stat`.
    fn cpu(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // USER_HZ is 100 on Linux.
        Some(Duration::from_millis(ticks * 10))
    }

    async fn metric(&self, http: &reqwest::Client, series: &str) -> f64 {
        let Ok(response) = http
            .get(format!("http://{}/metrics", self.pdp))
            .send()
            .await
        else {
            return 0.0;
        };
        let text = response.text().await.unwrap_or_default();
        text.lines()
            .filter_map(|l| l.strip_prefix(series))
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .sum()
    }
}

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
        crate::pep::homeserver::encode(runtime)
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

/// Answers every request it gets with a response (from its hyperty to the sender).
async fn echo(mut stub: BenchStub, cold: bool) {
    while let Some(Ok(frame)) = stub.socket.next().await {
        let Ws::Text(text) = frame else { continue };
        let Ok(request) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if request["type"] == "response" {
            continue;
        }
        let mut body = json!({"code": 200});
        if cold {
            body["n"] = request["id"].clone();
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

/// Keeps `window` requests in flight to `to` until `deadline`; the round-trip times.
async fn client(
    mut stub: BenchStub,
    to: String,
    window: usize,
    cold: bool,
    deadline: Instant,
) -> Vec<u64> {
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let mut latencies = Vec::new();
    let mut next: u64 = 100;
    let request = |id: u64, from: &str| {
        let value = if cold {
            json!({"text": "hello", "n": id})
        } else {
            json!({"text": "hello"})
        };
        json!({"id": id, "type": "create", "from": from, "to": to, "body": {"value": value}})
            .to_string()
    };
    loop {
        while sent.len() < window && Instant::now() < deadline {
            let text = request(next, &stub.hyperty);
            if stub.socket.send(Ws::Text(text.into())).await.is_err() {
                return latencies;
            }
            sent.insert(next, Instant::now());
            next += 1;
        }
        if sent.is_empty() {
            return latencies;
        }
        let frame = match tokio::time::timeout(Duration::from_secs(10), stub.socket.next()).await {
            Ok(Some(Ok(frame))) => frame,
            _ => return latencies,
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

struct Case {
    name: &'static str,
    pairs: usize,
    window: usize,
    cold: bool,
}

/// Runs the bus benchmark and prints its rows.
///
/// # Errors
/// Synapse or the node cannot start, or stubs cannot connect.
pub fn run(args: &BenchArgs, measure: Duration) -> anyhow::Result<()> {
    let synapse = BenchSynapse::start()?;
    let dir = tempfile_dir()?;
    let node = Node::start(&synapse, &dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let result = runtime.block_on(measure_all(args, &synapse, &node, measure));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("msgnode-bench-bus-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
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
    let many = (args.connections.max(2) / 2).max(1);
    let cases = [
        Case {
            name: "bus 2 stubs, 1 in flight",
            pairs: 1,
            window: 1,
            cold: false,
        },
        Case {
            name: "bus 2 stubs, 1 in flight",
            pairs: 1,
            window: 1,
            cold: true,
        },
        Case {
            name: "bus 2 stubs, 64 in flight",
            pairs: 1,
            window: 64,
            cold: false,
        },
        Case {
            name: "bus 2 stubs, 64 in flight",
            pairs: 1,
            window: 64,
            cold: true,
        },
        Case {
            name: "bus N stubs, 8 in flight",
            pairs: many,
            window: 8,
            cold: false,
        },
        Case {
            name: "bus N stubs, 8 in flight",
            pairs: many,
            window: 8,
            cold: true,
        },
    ];
    println!(
        "msgnode bench --mode bus: {measure:?} per case, node in its own process, load generator on 1 thread; {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<30} {:>6} {:>6} {:>10} {:>10} {:>12} {:>12}",
        "case", "stubs", "cache", "rtt p50", "rtt p99", "routed msg/s", "cpu/msg"
    );
    let mut generation = 0;
    let mut routed_total = 0u64;
    let load_started = Instant::now();
    let persisted_before = node
        .metric(&http, "msgnode_bus_journal_persisted_total ")
        .await;
    for case in cases {
        generation += 1;
        let mut stubs = Vec::new();
        for i in 0..case.pairs * 2 {
            stubs.push(
                connect(
                    node.bus,
                    &format!("runtime://localhost/bench-{generation}-{i}"),
                )
                .await?,
            );
        }
        let mut tasks = Vec::new();
        let deadline = Instant::now() + measure;
        let cpu_before = node.cpu();
        let begun = Instant::now();
        while stubs.len() >= 2 {
            let (Some(server), Some(client_stub)) = (stubs.pop(), stubs.pop()) else {
                break;
            };
            let to = server.hyperty.clone();
            tokio::spawn(echo(server, case.cold));
            tasks.push(tokio::spawn(client(
                client_stub,
                to,
                case.window,
                case.cold,
                deadline,
            )));
        }
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await.unwrap_or_default());
        }
        let elapsed = begun.elapsed();
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
            "{:<30} {:>6} {:>6} {:>10} {:>10} {:>12.0} {:>12}",
            case.name,
            case.pairs * 2,
            if case.cold { "cold" } else { "warm" },
            super::bench::micros(p50),
            super::bench::micros(p99),
            routed as f64 / elapsed.as_secs_f64(),
            cpu
        );
    }
    let load_elapsed = load_started.elapsed();
    // History: how far behind, how fast, and is everything there?
    let recorded = node
        .metric(&http, "msgnode_bus_journal_recorded_total ")
        .await;
    let persisted_at_end = node
        .metric(&http, "msgnode_bus_journal_persisted_total ")
        .await;
    let lag_start = Instant::now();
    let mut persisted = persisted_at_end;
    while persisted < recorded && lag_start.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        persisted = node
            .metric(&http, "msgnode_bus_journal_persisted_total ")
            .await;
    }
    let drained_in = lag_start.elapsed();
    let events = node
        .metric(&http, "msgnode_bus_journal_events_sent_total ")
        .await;
    println!(
        "history: {recorded:.0} messages recorded, {persisted:.0} persisted in {events:.0} Matrix events; {:.0} persisted/s during the load ({:.0} behind at its end, caught up {:.1} s later)",
        (persisted_at_end - persisted_before) / load_elapsed.as_secs_f64(),
        recorded - persisted_at_end,
        drained_in.as_secs_f64(),
    );
    let entries = journal_entries(synapse).await?;
    let mut seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    let gaps = seqs.windows(2).filter(|w| w[1] != w[0] + 1).count();
    println!(
        "history check: {} entries in the journal room ({} distinct, {gaps} gaps); {routed_total} routed by the benchmark",
        entries.len(),
        seqs.len()
    );
    Ok(())
}

async fn journal_entries(
    synapse: &BenchSynapse,
) -> anyhow::Result<Vec<crate::bus::journal::JournalEntry>> {
    let registration = crate::pep::registration::read(&synapse.registration())?;
    let homeserver = Arc::new(crate::pep::homeserver::Homeserver::new(
        &format!("http://127.0.0.1:{}", synapse.port),
        Duration::from_secs(30),
    )?);
    let actor = crate::pep::actor::Actor::new(&registration, "localhost", homeserver)?;
    crate::bus::journal::Journal::read_all(&actor)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the journal room: {e}"))
}

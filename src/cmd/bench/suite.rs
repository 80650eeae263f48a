//! `msgnode bench --mode suite`: the shapes of the reTHINK Messaging Node performance specs
//! (`tests/msg-node` of the reTHINK specs), timed from one stub's point of view as those
//! specs time them, beside the best reference node's mean from the D6.4 report:
//! - allocation: N `create`s to `MN/address-allocation` sent back to back (1 address, 3,
//!   3 under an allocation key; schemes `hyperty` and `object`), until N answers; then N
//!   releases the same way;
//! - messages: N `create`s of 100 B / 1 kB / 10 kB from one hyperty to another, sent back
//!   to back, until the receiver has all N (checked in order);
//! - publish: N subscribers of one object's changes (joining `--join-concurrency` at a
//!   time, the join timed too); one update, until the last one has it (and how many did not
//!   within 10 s). A subscription answered "policy unavailable" (its decision timed out) is
//!   asked again, and every such retry is counted in the join's row and the summary; any
//!   retry fails the run unless `--allow-retries`.
//!
//! The node runs as a child process, memory-only or in front of its own Synapse (SQLite or
//! PostgreSQL, data on tmpfs), with its per-principal limits raised for the sizes.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as Ws;

use super::node::{Node, TOKEN};
use super::synapse::BenchSynapse;
use crate::cli::{BenchArgs, BenchBackend, SuiteShape};

const MN: &str = "domain://msg-node.localhost";
/// How long one case may take before it is reported as failed.
const CASE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long subscribers wait for a published update.
const PUBLISH_WAIT: Duration = Duration::from_secs(10);

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
type Tx = SplitSink<Socket, Ws>;
type Rx = SplitStream<Socket>;

/// Runs every shape for `args.sizes` and prints one row per case.
///
/// # Errors
/// Synapse or the node cannot start, or a stub cannot connect.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let synapse = match args.backend {
        BenchBackend::Memory => None,
        BenchBackend::Sqlite => {
            std::env::set_var("SYNAPSE_DATABASE", "sqlite");
            Some(BenchSynapse::start()?)
        }
        BenchBackend::Postgres => {
            std::env::set_var("SYNAPSE_DATABASE", "postgres");
            Some(BenchSynapse::start()?)
        }
    };
    let dir = std::env::temp_dir().join(format!("msgnode-bench-suite-{}", std::process::id()));
    let policies = dir.join("policies");
    std::fs::create_dir_all(&dir)?;
    raised_limits(&args.policies, &policies)?;
    let most = args.sizes.iter().copied().max().unwrap_or(0) * 3 + 100;
    // Every subscriber is one socket in this process and one in the node (a child, which
    // inherits the limit), beside Synapse's connections: raised here, or a clear error.
    let largest = args.sizes.iter().copied().max().unwrap_or(0);
    raise_open_files(
        u64::try_from(largest)
            .unwrap_or(u64::MAX)
            .saturating_add(1024),
    )?;
    let keys = format!(
        "outbound_queue = 20000\nhandshakes_per_ip = 1024\nmax_handshakes = 1024\nhandshake_rate = {{ per_second = 1000000, burst = 1000000 }}\nmax_connections = {most}\nmax_connections_per_address = {most}\n[bus.limits]\naddresses_per_principal = {most}\nruntimes_per_principal = {most}\nsubscriptions_per_principal = {most}\nsockets_per_principal = {most}"
    );
    let node = Node::start(synapse.as_ref(), &dir, &policies, &keys)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let result = runtime.block_on(all(args, &node));
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Raises this process's soft limit of open files to at least `wanted` (up to the hard
/// limit, which only root can raise); fails when the hard limit is lower.
fn raise_open_files(wanted: u64) -> anyhow::Result<()> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    let current = limit.current.unwrap_or(u64::MAX);
    if current >= wanted {
        return Ok(());
    }
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if hard < wanted {
        bail!(
            "these sizes need {wanted} open files, and the hard limit is {hard}: raise it \
             (ulimit -Hn, or LimitNOFILE) or run smaller sizes"
        );
    }
    limit.current = Some(wanted);
    setrlimit(Resource::Nofile, limit).context("raising the limit of open files")?;
    eprintln!("open files: soft limit raised from {current} to {wanted}");
    Ok(())
}

/// Copies the bundle with its per-principal and per-runtime limits out of the way.
fn raised_limits(from: &Path, to: &Path) -> anyhow::Result<()> {
    for entry in walkdir::WalkDir::new(from) {
        let entry = entry?;
        let target = to.join(entry.path().strip_prefix(from)?);
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    let path = to.join("config/data.json");
    let mut data: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .context("the bundle's config/data.json")?;
    data["limits"]["per_principal"] = json!({});
    data["allocation"]["max_addresses_per_runtime"] = json!(10_000_000);
    std::fs::write(&path, data.to_string())?;
    Ok(())
}

/// One stub: a WebSocket with the `open` handshake done.
struct Stub {
    tx: Tx,
    rx: Rx,
}

async fn connect(node: &Node, runtime: &str) -> anyhow::Result<Stub> {
    let url = format!("ws://{}/ws?access_token={TOKEN}", node.bus);
    let (socket, _) = tokio_tungstenite::connect_async(url).await?;
    let (mut tx, mut rx) = socket.split();
    let open = json!({"id": 1, "type": "open", "from": runtime, "to": "mn:/session"});
    tx.send(Ws::Text(open.to_string().into())).await?;
    let answer = next_json(&mut rx).await?;
    if answer["body"]["code"] != 200 {
        bail!("open refused: {answer}");
    }
    Ok(Stub { tx, rx })
}

async fn next_json(rx: &mut Rx) -> anyhow::Result<Value> {
    loop {
        match tokio::time::timeout(CASE_TIMEOUT, rx.next()).await {
            Ok(Some(Ok(Ws::Text(t)))) => return Ok(serde_json::from_str(&t)?),
            Ok(Some(Ok(_))) => continue,
            Ok(other) => bail!("socket closed: {other:?}"),
            Err(_) => bail!("no frame within {CASE_TIMEOUT:?}"),
        }
    }
}

/// Sends `messages` back to back on `stub` while collecting `expect` answers; the time to
/// the last answer and the answers that were not 200.
async fn pipelined(
    stub: &mut Stub,
    messages: Vec<Value>,
    expect: usize,
) -> anyhow::Result<(Duration, usize, Vec<Value>)> {
    let started = Instant::now();
    let Stub { tx, rx } = stub;
    let send = async {
        for m in messages {
            tx.feed(Ws::Text(m.to_string().into())).await?;
        }
        tx.flush().await?;
        anyhow::Ok(())
    };
    let receive = async {
        let mut failed = std::collections::BTreeMap::<String, usize>::new();
        let mut answers = Vec::with_capacity(expect);
        while answers.len() < expect {
            let answer = next_json(rx).await?;
            if answer["body"]["code"] != 200 {
                let why = format!(
                    "{} {}",
                    answer["body"]["code"], answer["body"]["description"]
                );
                *failed.entry(why).or_default() += 1;
            }
            answers.push(answer);
        }
        anyhow::Ok((failed, answers))
    };
    let (sent, received) = tokio::join!(send, receive);
    sent?;
    let (failed, answers) = received?;
    // Why answers failed, so a row's count can be read (decision timeouts, the homeserver).
    for (why, count) in &failed {
        println!("  {count} answered {why}");
    }
    Ok((started.elapsed(), failed.values().sum(), answers))
}

fn row(case: &str, n: usize, took: Option<Duration>, failed: usize, reference: Option<u64>) {
    let took = took.map_or("FAIL".to_string(), |t| {
        format!("{:.0}", t.as_secs_f64() * 1000.0)
    });
    let reference = reference.map_or("-".to_string(), |r| r.to_string());
    println!("{case:<34} {n:>7} {took:>10} {failed:>7} {reference:>10}");
}

async fn all(args: &BenchArgs, node: &Node) -> anyhow::Result<()> {
    node.ready().await?;
    println!(
        "msgnode bench --mode suite ({:?}): node in its own process, load generator on 1 thread; {} cores",
        args.backend,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<34} {:>7} {:>10} {:>7} {:>10}",
        "case", "n", "ms", "failed", "D6.4 ms"
    );
    if args.shapes.contains(&SuiteShape::Alloc) {
        println!(
            "allocations: all n sent back to back, none awaited (the specs' allocLoop); the node \
             reads on while at most {} answers of a socket wait for their write",
            crate::bus::MAX_PENDING_ANSWERS
        );
        for &n in &args.sizes {
            allocations(node, n).await?;
        }
    }
    if args.shapes.contains(&SuiteShape::Messages) {
        for &n in &args.sizes {
            messages(node, n).await?;
        }
    }
    if args.shapes.contains(&SuiteShape::Publish) {
        let retries = publish(node, &args.sizes, args.join_concurrency.max(1)).await?;
        println!("subscriptions retried after \"policy unavailable\": {retries}");
        if retries > 0 && !args.allow_retries {
            bail!(
                "{retries} subscription decisions timed out under load and were asked again \
                 (--allow-retries to accept the figures anyway)"
            );
        }
    }
    Ok(())
}

/// The best reference node's mean (ms) for a case and size, from the D6.4 report.
fn reference(case: &str, n: usize) -> Option<u64> {
    let i = match n {
        100 => 0,
        1000 => 1,
        10_000 => 2,
        _ => return None,
    };
    let table: [(&str, [u64; 3]); 18] = [
        ("alloc hyperty x1", [175, 1572, 15847]),
        ("dealloc hyperty x1", [152, 1292, 12646]),
        ("alloc hyperty x3", [181, 1605, 15835]),
        ("dealloc hyperty x3", [155, 1368, 13348]),
        ("alloc hyperty x3 key", [158, 1586, 15711]),
        ("dealloc hyperty x3 key", [150, 1349, 13097]),
        ("alloc object x1", [139, 1552, 15077]),
        ("dealloc object x1", [126, 1246, 12487]),
        ("alloc object x3", [166, 1520, 14918]),
        ("dealloc object x3", [131, 1352, 13342]),
        ("alloc object x3 key", [153, 1498, 15149]),
        ("dealloc object x3 key", [146, 1322, 13118]),
        ("messages 100 B", [129, 1307, 12731]),
        ("messages 1 kB", [129, 1340, 13158]),
        ("messages 10 kB", [172, 1642, 16431]),
        ("publish 100 B", [193, 358, 0]),
        ("publish 1 kB", [188, 384, 0]),
        ("publish 10 kB", [197, 374, 0]),
    ];
    let publish_index = match n {
        100 => Some(0),
        200 => Some(1),
        _ => None,
    };
    table.iter().find(|(c, _)| *c == case).and_then(|(c, row)| {
        if c.starts_with("publish") {
            publish_index.map(|i| row[i])
        } else {
            Some(row[i])
        }
    })
}

async fn allocations(node: &Node, n: usize) -> anyhow::Result<()> {
    let runtime = "runtime://localhost/1";
    let sender = "hyperty-runtime://localhost/protostub/1/registry/allocation";
    let mut stub = connect(node, runtime).await?;
    for scheme in ["hyperty", "object"] {
        for (number, keyed) in [(1, false), (3, false), (3, true)] {
            let label = format!("{scheme} x{number}{}", if keyed { " key" } else { "" });
            let creates: Vec<Value> = (1..=n)
                .map(|i| {
                    let mut value = json!({"number": number});
                    if keyed {
                        value["allocationKey"] = json!(format!("allocationKey{i}"));
                    }
                    json!({"id": i, "type": "create", "from": sender, "to": format!("{MN}/address-allocation"),
                        "body": {"scheme": scheme, "value": value}})
                })
                .collect();
            let (took, failed, answers) = pipelined(&mut stub, creates, n).await?;
            row(
                &format!("alloc {label}"),
                n,
                Some(took),
                failed,
                reference(&format!("alloc {label}"), n),
            );
            let deletes: Vec<Value> = answers
                .iter()
                .enumerate()
                .map(|(i, answer)| {
                    let body = if keyed {
                        json!({"resource": [format!("allocationKey{}", i + 1)]})
                    } else {
                        json!({"childrenResources": [answer["body"]["value"]["allocated"].clone()]})
                    };
                    json!({"id": 2, "type": "delete", "from": sender, "to": format!("{MN}/address-allocation"), "body": body})
                })
                .collect();
            let (took, failed, _) = pipelined(&mut stub, deletes, n).await?;
            row(
                &format!("dealloc {label}"),
                n,
                Some(took),
                failed,
                reference(&format!("dealloc {label}"), n),
            );
        }
    }
    Ok(())
}

/// Allocates one hyperty for `stub` (from `runtime`); its address.
async fn hyperty(stub: &mut Stub, runtime: &str) -> anyhow::Result<String> {
    let create = json!({"id": 1, "type": "create", "from": format!("{runtime}/registry/allocation"),
        "to": format!("{MN}/address-allocation"), "body": {"scheme": "hyperty", "value": {"number": 1}}});
    let (_, _, answers) = pipelined(stub, vec![create], 1).await?;
    answers[0]["body"]["value"]["allocated"][0]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("allocation failed: {}", answers[0]))
}

async fn messages(node: &Node, n: usize) -> anyhow::Result<()> {
    let mut one = connect(node, "runtime://localhost/m1").await?;
    let mut two = connect(node, "runtime://localhost/m2").await?;
    let from = hyperty(&mut one, "runtime://localhost/m1").await?;
    let to = hyperty(&mut two, "runtime://localhost/m2").await?;
    for (label, size) in [("100 B", 100), ("1 kB", 1024), ("10 kB", 10240)] {
        let payload = "x".repeat(size);
        let started = Instant::now();
        let Stub { tx, rx: answers } = &mut one;
        let send = async {
            for i in 0..n {
                let m = json!({"id": 1, "type": "create", "from": from, "to": to,
                    "body": {"scheme": "hyperty", "value": {"data": format!("{payload}{i}")}}});
                tx.feed(Ws::Text(m.to_string().into())).await?;
            }
            tx.flush().await?;
            anyhow::Ok(())
        };
        // Until each message has arrived or been refused (the node answers the sender only
        // when it refuses one); one arriving before an earlier one counts as out of order.
        let receive = async {
            let (mut arrived, mut refused, mut out_of_order) = (0, Vec::new(), 0);
            let mut last: Option<usize> = None;
            while arrived + refused.len() < n {
                tokio::select! {
                    got = next_json(&mut two.rx) => {
                        let got = got?;
                        arrived += 1;
                        let i = got["body"]["value"]["data"]
                            .as_str()
                            .and_then(|d| d.strip_prefix(payload.as_str()))
                            .and_then(|i| i.parse::<usize>().ok());
                        match (i, last) {
                            (Some(i), Some(l)) if i <= l => out_of_order += 1,
                            (Some(i), _) => last = Some(i),
                            (None, _) => out_of_order += 1,
                        }
                    }
                    answer = next_json(answers) => refused.push(answer?),
                }
            }
            anyhow::Ok((out_of_order, refused))
        };
        let (sent, received) = tokio::join!(send, receive);
        sent?;
        let (out_of_order, refused) = received?;
        if let Some(first) = refused.first() {
            eprintln!(
                "messages {label}: {} of {n} refused, the first: {first}",
                refused.len()
            );
        }
        let failed = out_of_order + refused.len();
        let case = format!("messages {label}");
        row(
            &case,
            n,
            Some(started.elapsed()),
            failed,
            reference(&case, n),
        );
    }
    Ok(())
}

/// The publish shape; how many subscriptions were asked again.
async fn publish(node: &Node, sizes: &[usize], concurrency: usize) -> anyhow::Result<usize> {
    let reporter_url = "runtime://localhost/Reporter";
    let mut reporter = connect(node, reporter_url).await?;
    let create = json!({"id": 1, "type": "create", "from": format!("{reporter_url}/registry/allocation"),
        "to": format!("{MN}/address-allocation"), "body": {"scheme": "connection", "value": {"number": 1}}});
    let (_, _, answers) = pipelined(&mut reporter, vec![create], 1).await?;
    let object = answers[0]["body"]["value"]["allocated"][0]
        .as_str()
        .context("object allocation failed")?
        .to_string();
    let changes = format!("{object}/changes");
    let mut subscribers: Vec<Rx> = Vec::new();
    let mut sizes = sizes.to_vec();
    sizes.sort_unstable();
    let limit = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let retries = Arc::new(AtomicUsize::new(0));
    for n in sizes {
        // Connect and subscribe the ones missing, `concurrency` at a time.
        let (joined_before, retried_before) = (subscribers.len(), retries.load(Ordering::Relaxed));
        let started = Instant::now();
        let mut joining = tokio::task::JoinSet::new();
        for i in subscribers.len()..n {
            let (limit, changes) = (Arc::clone(&limit), changes.clone());
            let retries = Arc::clone(&retries);
            let node_bus = node.bus;
            joining.spawn(async move {
                let _permit = limit.acquire().await?;
                subscriber(node_bus, i, &changes, &retries).await
            });
        }
        while let Some(joined) = joining.join_next().await {
            subscribers.push(joined??);
        }
        row(
            &format!("subscribe, {concurrency} at once (retried)"),
            n - joined_before,
            Some(started.elapsed()),
            retries.load(Ordering::Relaxed) - retried_before,
            None,
        );
        for (label, size) in [("100 B", 100), ("1 kB", 1024), ("10 kB", 10240)] {
            let value = "x".repeat(size);
            let update = json!({"id": 1, "type": "update", "from": object, "to": changes,
                "body": {"attribute": "changedAttribute", "value": value}});
            let started = Instant::now();
            let waiting: Vec<_> = subscribers
                .drain(..)
                .map(|mut rx| {
                    tokio::spawn(async move {
                        let got = tokio::time::timeout(PUBLISH_WAIT, next_json(&mut rx)).await;
                        let at = matches!(got, Ok(Ok(ref m)) if m["type"] == "update")
                            .then(Instant::now);
                        (rx, at)
                    })
                })
                .collect();
            reporter
                .tx
                .send(Ws::Text(update.to_string().into()))
                .await?;
            let mut last = started;
            let mut lost = 0;
            for waiter in waiting {
                let (rx, at) = waiter.await?;
                match at {
                    Some(at) => last = last.max(at),
                    None => lost += 1,
                }
                subscribers.push(rx);
            }
            let case = format!("publish {label}");
            let took = (lost == 0).then(|| last - started);
            row(&case, n, took, lost, reference(&case, n));
        }
    }
    Ok(retries.load(Ordering::Relaxed))
}

/// Subscriber `i`: connected as `runtime://localhost/Subscriber/<i>`, subscribed to
/// `changes`; its receiving half (the sending half is dropped, the socket stays open). Each
/// subscription asked again after "policy unavailable" adds one to `retries`.
async fn subscriber(
    bus: std::net::SocketAddr,
    i: usize,
    changes: &str,
    retries: &AtomicUsize,
) -> anyhow::Result<Rx> {
    let url = format!("ws://{bus}/ws?access_token={TOKEN}");
    let runtime = format!("runtime://localhost/Subscriber/{i}");
    let (socket, _) = tokio_tungstenite::connect_async(url).await?;
    let (mut tx, mut rx) = socket.split();
    let open = json!({"id": 1, "type": "open", "from": runtime, "to": "mn:/session"});
    tx.send(Ws::Text(open.to_string().into())).await?;
    let opened = next_json(&mut rx).await?;
    if opened["body"]["code"] != 200 {
        // The node closes a socket whose open it refused: said here, not as a broken pipe.
        bail!("subscriber {i}: open refused: {opened}");
    }
    let su = format!("hyperty-runtime://localhost/protostub/Subscriber/{i}");
    let subscribe = json!({"id": 2, "type": "subscribe", "from": format!("{su}/sm"), "to": format!("{MN}/sm"),
        "body": {"resources": [changes, changes.replace("/changes", "/children/name1")],
                 "source": format!("hyperty-runtime://localhost/protostub/Subscriber{i}")}});
    // A loaded machine may time a decision out ("policy unavailable"): asked again, counted.
    let mut tries = 0;
    loop {
        tx.send(Ws::Text(subscribe.to_string().into())).await?;
        let answer = next_json(&mut rx).await?;
        if answer["body"]["code"] == 200 {
            break;
        }
        tries += 1;
        let unavailable = answer["body"]["description"]
            .as_str()
            .is_some_and(|d| d.contains("unavailable"));
        if !unavailable || tries == 5 {
            bail!("subscription {i} refused: {answer}");
        }
        retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Kept open by leaking the sending half into a task that holds it until the receiver
    // is dropped with the process.
    tokio::spawn(async move {
        let _tx = tx;
        std::future::pending::<()>().await;
    });
    Ok(rx)
}

//! `msgnode bench --mode policy-server`: what deciding events inside the homeserver costs.
//!
//! 1. `/sign` over loopback TLS from an in-process client: a stand-in origin server's
//!    events (each distinct, signed beforehand; so are the `X-Matrix` headers), on the
//!    server's 1 and 2 worker threads — X-Matrix and event signature verification, the
//!    decision and the policy signature each time; then the same events again (answered by
//!    event id).
//! 2. A real Synapse (`scripts/synapse`, data on tmpfs, removed afterwards) with the node's
//!    policy server on loopback: the same sequential sends into rooms without and with
//!    `m.room.policy`, in the same run, and the policy server's own time per sign request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

use super::proxy::{histogram_quantiles, send_phase};
use super::stats::Stats;
use super::synapse::BenchSynapse;
use crate::cli::BenchArgs;
use crate::policyserver::testing::Loopback;

/// Room version 12 room id of the stand-in origin's events.
const ROOM: &str = "!benchRoomAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
const ORIGIN: &str = "localhost";

/// Runs both parts and prints their rows.
///
/// # Errors
/// The node or Synapse cannot start, or requests fail.
pub fn run(args: &BenchArgs, measure: Duration) -> anyhow::Result<()> {
    println!(
        "msgnode bench --mode policy-server: {:?} per case, {} cores, {} client connections",
        measure,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        args.connections
    );
    println!(
        "{:<26} {:>8} {:>10} {:>10} {:>14}",
        "case", "threads", "p50", "p99", "signs/s"
    );
    for threads in [1, 2] {
        let (fresh, cached) = sign_case(args, threads, measure)?;
        fresh.print("sign, each event new", threads);
        cached.print("sign, same events again", threads);
    }
    synapse_case(args, measure)
}

/// The `/sign` case on `threads` server threads: (distinct events, the same again).
fn sign_case(
    args: &BenchArgs,
    threads: usize,
    measure: Duration,
) -> anyhow::Result<(Stats, Stats)> {
    let dir = tempfile_dir()?;
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    let loopback = server_rt.block_on(Loopback::start(
        &args.policies,
        &dir.join("ps"),
        ORIGIN,
        ROOM,
        |config| config.cache_max_entries = 1_000_000,
    ))?;
    let origin = &loopback.origin;
    let base = loopback.base.clone();
    let destination = loopback.server.server_name().to_string();
    // Enough distinct events for the case at ~10k signs/s, prepared before the clock starts.
    let count = ((measure.as_secs_f64() * 12_000.0) as usize).clamp(2_000, 60_000);
    let mut requests = Vec::with_capacity(count);
    for n in 0..count {
        let event = origin.event(json!({"room_id": ROOM, "sender": "@alice:localhost",
            "type": "m.room.message", "content": {"msgtype": "m.text", "body": format!("bench {n}")}}))?;
        let body = serde_json::to_vec(&event)?;
        requests.push(origin.sign_request(&base, &destination, &body)?);
    }
    let requests = Arc::new(requests);
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let http = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let fresh = client_rt.block_on(drive(&http, &requests, args.connections, measure, true))?;
    let cached = client_rt.block_on(drive(&http, &requests, args.connections, measure, false))?;
    drop(loopback);
    drop(client_rt);
    drop(server_rt);
    let _ = std::fs::remove_dir_all(&dir);
    Ok((fresh, cached))
}

/// Sends the prepared requests on `connections` concurrent loops for `measure` (`fresh`:
/// each at most once; else cycling over the first ones).
async fn drive(
    http: &reqwest::Client,
    requests: &Arc<Vec<axum::http::Request<Vec<u8>>>>,
    connections: usize,
    measure: Duration,
    fresh: bool,
) -> anyhow::Result<Stats> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections.max(1) {
        let (http, requests, next, stop) = (
            http.clone(),
            Arc::clone(requests),
            Arc::clone(&next),
            Arc::clone(&stop),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let n = match fresh {
                    true if n >= requests.len() => break,
                    true => n,
                    false => n % 512.min(requests.len()),
                };
                let request = reqwest::Request::try_from(clone_request(&requests[n])?)?;
                let t0 = Instant::now();
                let response = http.execute(request).await?;
                let status = response.status();
                let _ = response.bytes().await?;
                anyhow::ensure!(status.is_success(), "sign answered {status}");
                latencies.push(t0.elapsed().as_nanos() as u64);
            }
            anyhow::Ok(latencies)
        }));
    }
    tokio::time::sleep(measure).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    if fresh && next.load(Ordering::Relaxed) >= requests.len() {
        println!("  (ran out of prepared events: the rate below is a lower bound)");
    }
    Ok(Stats {
        latencies_ns: latencies,
        elapsed,
    })
}

fn clone_request(
    request: &axum::http::Request<Vec<u8>>,
) -> anyhow::Result<axum::http::Request<Vec<u8>>> {
    let mut copy = axum::http::Request::builder()
        .method(request.method())
        .uri(request.uri());
    for (name, value) in request.headers() {
        copy = copy.header(name, value);
    }
    Ok(copy.body(request.body().clone())?)
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "msgnode-bench-ps-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Sends into rooms without and with the policy server on a real Synapse, same run.
fn synapse_case(args: &BenchArgs, measure: Duration) -> anyhow::Result<()> {
    let synapse = BenchSynapse::start()?;
    let homeserver = format!("http://127.0.0.1:{}", synapse.port);
    let dir = tempfile_dir()?;
    let clients = args.connections.clamp(1, 4);
    let tokens = synapse.register_users(clients)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut config = synapse.node_config(&args.policies)?;
        config.pep.registration = Some(synapse.registration());
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        config.policy_server.enabled = true;
        config.policy_server.listen = format!("127.0.0.1:{port}").parse()?;
        config.policy_server.server_name = format!("localhost:{port}");
        config.policy_server.state_dir = dir.join("ps");
        config.policy_server.servers = [("localhost".to_string(), homeserver.clone())].into();
        config.policy_server.rooms = Vec::new();
        let node = crate::cmd::run::start(config).await?;
        let ps = node.policy_server.clone().context("policy server did not start")?;
        let http = reqwest::Client::new();
        let (mut plain, mut protected) = (Vec::new(), Vec::new());
        for token in &tokens {
            for list in [&mut plain, &mut protected] {
                let created: Value = http
                    .post(format!("{homeserver}/_matrix/client/v3/createRoom"))
                    .bearer_auth(token)
                    .json(&json!({"invite": ["@_msgnode:localhost"],
                                  "power_level_content_override": {"users": {"@_msgnode:localhost": 100}}}))
                    .send()
                    .await?
                    .json()
                    .await?;
                let room = created["room_id"].as_str().context("no room_id")?.to_string();
                list.push((token.clone(), room));
            }
        }
        for (_, room) in &protected {
            ps.protect(room).await?;
        }
        println!(
            "\nsends to a real Synapse, {clients} clients sequentially, {measure:?} per case (after a warm-up), alternating:"
        );
        send_phase(&http, &homeserver, &plain, measure.min(Duration::from_secs(5)), "warm-a").await?;
        send_phase(&http, &homeserver, &protected, measure.min(Duration::from_secs(5)), "warm-b").await?;
        let half = measure / 2;
        let mut without = send_phase(&http, &homeserver, &plain, half, "a1").await?;
        let mut with = send_phase(&http, &homeserver, &protected, half, "b1").await?;
        let more_with = send_phase(&http, &homeserver, &protected, half, "b2").await?;
        let more_without = send_phase(&http, &homeserver, &plain, half, "a2").await?;
        without.latencies_ns.extend(more_without.latencies_ns);
        without.elapsed += more_without.elapsed;
        with.latencies_ns.extend(more_with.latencies_ns);
        with.elapsed += more_with.elapsed;
        let (w50, _) = without.quantiles();
        let (p50, _) = with.quantiles();
        println!("{:<26} {:>8} {:>10} {:>10} {:>14}", "case", "clients", "p50", "p99", "messages/s");
        without.print("send, no policy server", clients);
        with.print("send, policy server", clients);
        let metrics = http.get(format!("http://{}/metrics", node.pdp_addr)).send().await?.text().await?;
        let (s50, s99) = histogram_quantiles(&metrics, "msgnode_policy_server_sign_duration_seconds");
        println!(
            "{:<26} {:>8} {:>10} {:>10} {:>14}",
            "policy server's time", "", format!("≤{:.0} µs", s50 * 1e6), format!("≤{:.0} µs", s99 * 1e6), "(histogram)"
        );
        println!(
            "added p50: {:+.1} ms ({:+.0} % of Synapse's own send time)",
            (p50 as f64 - w50 as f64) / 1e6,
            (p50 as f64 - w50 as f64) / (w50.max(1) as f64) * 100.0
        );
        node.stop().await;
        anyhow::Ok(())
    })?;
    drop(synapse);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

//! `msgnode bench --mode proxy`: what the Matrix proxy costs in front of a real Synapse.
//!
//! Starts a Synapse of its own (`scripts/synapse`, data on tmpfs, removed afterwards) and a
//! node with the proxy, registers `--connections` users with a room each, warms up, then
//! measures the same sequential sends (`PUT …/send/m.room.message/…`) directly to Synapse
//! and through the proxy, and reads the proxy's own time per request from its histogram.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::stats::Stats;
use super::synapse::BenchSynapse;
use crate::cli::BenchArgs;

/// Runs the proxy benchmark and prints its rows.
///
/// # Errors
/// Synapse or the node cannot start, or sends fail.
pub fn run(args: &BenchArgs, measure: Duration) -> anyhow::Result<()> {
    let synapse = BenchSynapse::start()?;
    let homeserver = format!("http://127.0.0.1:{}", synapse.port);
    let tokens = synapse.register_users(args.connections.max(1))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut config = synapse.node_config(&args.policies)?;
        config.pep.enabled = true;
        config.pep.listen = "127.0.0.1:0".parse()?;
        let node = crate::cmd::run::start(config).await?;
        let proxy = format!("http://{}", node.pep_addr.context("proxy did not start")?);
        let http = reqwest::Client::new();
        let mut rooms = Vec::new();
        for token in &tokens {
            let created: Value = http
                .post(format!("{homeserver}/_matrix/client/v3/createRoom"))
                .bearer_auth(token)
                .json(&json!({}))
                .send()
                .await?
                .json()
                .await?;
            rooms.push(created["room_id"].as_str().context("no room_id")?.to_string());
        }
        let clients: Vec<(String, String)> = tokens.into_iter().zip(rooms).collect();
        println!(
            "proxy in front of Synapse: {} clients sending sequentially, {:?} per case (after a warm-up)",
            clients.len(),
            measure
        );
        send_phase(&http, &homeserver, &clients, measure.min(Duration::from_secs(10)), "warm").await?;
        let direct = send_phase(&http, &homeserver, &clients, measure, "direct").await?;
        let proxied = send_phase(&http, &proxy, &clients, measure, "proxy").await?;
        println!("{:<26} {:>8} {:>10} {:>10} {:>14}", "case", "clients", "p50", "p99", "messages/s");
        direct.print("send, direct to Synapse", clients.len());
        proxied.print("send, through msgnode", clients.len());
        let metrics = http.get(format!("http://{}/metrics", node.pdp_addr)).send().await?.text().await?;
        let (p50, p99) = histogram_quantiles(&metrics, "msgnode_pep_enforce_duration_seconds");
        println!(
            "{:<26} {:>8} {:>10} {:>10} {:>14}",
            "proxy's own time",
            "",
            format!("≤{:.0} µs", p50 * 1e6),
            format!("≤{:.0} µs", p99 * 1e6),
            "(histogram)"
        );
        node.stop().await;
        anyhow::Ok(())
    })?;
    drop(synapse);
    Ok(())
}

pub(super) async fn send_phase(
    http: &reqwest::Client,
    base: &str,
    clients: &[(String, String)],
    duration: Duration,
    label: &str,
) -> anyhow::Result<Stats> {
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(c, (token, room))| {
            let (http, base, token, room, label) = (
                http.clone(),
                base.to_string(),
                token.clone(),
                room.clone(),
                label.to_string(),
            );
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    let url = format!(
                        "{base}/_matrix/client/v3/rooms/{room}/send/m.room.message/{label}-{c}-{n}"
                    );
                    let t0 = Instant::now();
                    let response = http
                        .put(url)
                        .bearer_auth(&token)
                        .json(&json!({"msgtype": "m.text", "body": "bench"}))
                        .send()
                        .await?;
                    if !response.status().is_success() {
                        bail!(
                            "send failed: {} {}",
                            response.status(),
                            response.text().await.unwrap_or_default()
                        );
                    }
                    latencies.push(t0.elapsed().as_nanos() as u64);
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    Ok(Stats {
        latencies_ns: latencies,
        elapsed: start.elapsed(),
    })
}

/// Upper bounds of the buckets holding the 50th and 99th percentile of a histogram.
pub(super) fn histogram_quantiles(text: &str, name: &str) -> (f64, f64) {
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&format!("{name}_bucket{{le=\""))?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    let at = |q: f64| {
        buckets
            .iter()
            .find(|(_, c)| *c >= q * total)
            .map_or(0.0, |b| b.0)
    };
    (at(0.5), at(0.99))
}

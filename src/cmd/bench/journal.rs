//! `msgnode bench --mode journal`: the journal's group commit against a real Synapse under a
//! sustained offered rate (`--rate` messages per second for `--seconds`), each message with a
//! fresh random id (nothing compresses away); the lag printed each second, then everything
//! read back and checked gapless.

use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::synapse::BenchSynapse;
use crate::cli::BenchArgs;
use crate::config::JournalConfig;
use crate::persist::journal::Journal;

/// Runs the journal benchmark and prints its figures.
///
/// # Errors
/// Synapse cannot start, or the journal room does not hold every record in order.
pub fn run(args: &BenchArgs, measure: Duration) -> anyhow::Result<()> {
    let synapse = BenchSynapse::start()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(sustained(&synapse, args.rate.max(1), measure))
}

async fn sustained(synapse: &BenchSynapse, rate: u64, measure: Duration) -> anyhow::Result<()> {
    let actor = synapse.actor()?;
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let journal = Journal::start(
        actor.clone(),
        JournalConfig::default(),
        shutdown.clone(),
        &tracker,
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot open the journal: {e}"))?;
    let seconds = measure.as_secs().max(1);
    println!("msgnode bench journal: {rate} messages/s offered for {seconds} s");
    let start = Instant::now();
    let charge: crate::persist::shares::Charge = std::sync::Arc::from("@bench:example.com");
    let mut sent = 0u64;
    let mut max_lag = 0;
    for second in 1..=seconds {
        while sent < rate * second {
            let message = json!({
                "id": uuid::Uuid::new_v4().to_string(), "type": "create",
                "from": format!("hyperty://example.com/{}", sent % 7),
                "to": "domain://registry.example.com",
                "body": {"value": {"name": "alice", "status": "online", "counter": sent * 3}},
            });
            journal.record(
                &message.to_string(),
                vec![format!("hyperty-runtime://example.com/{}", sent % 17)],
                &charge,
            );
            sent += 1;
            if sent.is_multiple_of(500) {
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        let stats = journal.stats();
        max_lag = max_lag.max(stats.lag);
        println!(
            "t={:>5.1}s recorded={} persisted={} lag={} oldest={:?} events={} bytes={}",
            start.elapsed().as_secs_f64(),
            stats.recorded,
            stats.persisted,
            stats.lag,
            stats.oldest_unpersisted,
            stats.events_sent,
            stats.bytes_sent
        );
    }
    let offered = start.elapsed();
    journal.flush().await;
    let done = start.elapsed();
    let stats = journal.stats();
    println!(
        "sustained: {sent} records offered in {offered:?} ({:.0}/s), all persisted after {done:?} ({:.0}/s); {} events ({:.0} records/event, {:.0} bytes/record), max lag {max_lag}, {} failures",
        sent as f64 / offered.as_secs_f64(),
        sent as f64 / done.as_secs_f64(),
        stats.events_sent,
        sent as f64 / stats.events_sent.max(1) as f64,
        stats.bytes_sent as f64 / sent.max(1) as f64,
        stats.send_failures,
    );
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    let entries = Journal::read_all(&actor)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the journal room: {e}"))?;
    let in_order = entries
        .iter()
        .enumerate()
        .all(|(i, e)| e.seq == i as u64 + 1);
    if entries.len() as u64 != sent || !in_order {
        bail!(
            "the journal room holds {} entries (in order: {in_order}) of {sent} recorded",
            entries.len()
        );
    }
    println!("read back: all {sent} entries, gapless and in order");
    Ok(())
}

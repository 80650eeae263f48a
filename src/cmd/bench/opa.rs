//! `msgnode bench --mode eval --against opa`: msgnode beside the real OPA engine (Go, OPA
//! v1.20.2, the C library `scripts/opa` installs), on the same bundle and inputs, in one run.
//!
//! Both engines load the bundle (without tests) and prepare the decision rule once, as their
//! servers do; each decision hands an engine the input as JSON text, which it parses and
//! decides (msgnode: parsed into regorus's value and `Pdp::decide_value`, cache off; OPA:
//! `OpaEvalDocument`, whose answer comes back as JSON text).
//! Inputs: every fixture of the bundle, round robin. Rounds alternate the engines (OPA,
//! msgnode, OPA, msgnode, … on 1 thread, then on 2) so that both see the same machine load;
//! the table shows the median of each figure over the rounds, and the ratios of those
//! medians. `cpu/dec` is the CPU time the evaluating threads used per decision (from
//! `/proc/thread-self/schedstat`): unlike wall time it does not grow when other processes
//! take the cores, so it shows whether two threads pay for sharing anything.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::stats::{load_average, micros, thread_cpu_ns, Stats};
use crate::cli::BenchArgs;
use crate::pdp::bundle::Bundle;
use crate::pdp::decision_log::EnforcementPoint;
use crate::pdp::engine::DataPath;
use crate::pdp::opa::{Opa, OpaBundle};
use crate::pdp::Pdp;

/// Alternated rounds per case.
const ROUNDS: usize = 5;

/// One round of one engine on some threads.
struct Round {
    p50: u64,
    p99: u64,
    rate: f64,
    cpu_per_decision: u64,
}

/// Runs the comparison.
///
/// # Errors
/// The OPA library or the bundle does not load, or an engine's decision differs from the
/// other's on a fixture (the speeds of different decisions are not comparable).
pub fn run(args: &BenchArgs, seconds: Duration) -> anyhow::Result<()> {
    let library = match &args.opa {
        Some(path) => path.clone(),
        None => default_library()?,
    };
    let opa = Opa::load(&library)?;
    let bundle = Bundle::read(&args.policies)?;
    let decision = DataPath::from_ref(&crate::config::PdpConfig::default().decision)?;
    let opa = OpaBundle::load(opa, &bundle, &decision)?;
    let pdp = super::bench_pdp(args, false)?;
    let inputs = fixture_inputs(&args.policies.join("fixtures"))?;
    same_decisions(&pdp, &opa, &decision, &inputs)?;
    let per_round = seconds
        .div_f64(ROUNDS as f64)
        .max(Duration::from_millis(200));
    println!(
        "msgnode bench --against opa: {} fixture inputs, {ROUNDS} alternated rounds of {per_round:?} per engine and case; load {}",
        inputs.len(),
        load_average()
    );
    println!(
        "{:<24} {:>8} {:>10} {:>10} {:>13} {:>10}",
        "case", "threads", "p50", "p99", "decisions/s", "cpu/dec"
    );
    for threads in [1, 2] {
        let mut opa_rounds = Vec::new();
        let mut ours = Vec::new();
        for _ in 0..ROUNDS {
            opa_rounds.push(round(&inputs, threads, per_round, |input| {
                opa.evaluate(&decision, Some(input)).is_ok()
            }));
            ours.push(round(&inputs, threads, per_round, |input| {
                regorus::Value::from_json_str(input)
                    .is_ok_and(|v| !pdp.decide_value(v, EnforcementPoint::Bus).failed)
            }));
        }
        let (o, m) = (median(&opa_rounds), median(&ours));
        print_row("OPA 1.20.2", threads, &o);
        print_row("msgnode", threads, &m);
        println!(
            "{:<24} {:>8} {:>10} {:>10} {:>13} {:>10}",
            "ratio (OPA / msgnode)",
            threads,
            ratio(o.p50 as f64, m.p50 as f64),
            ratio(o.p99 as f64, m.p99 as f64),
            ratio(m.rate, o.rate),
            ratio(o.cpu_per_decision as f64, m.cpu_per_decision as f64),
        );
    }
    println!("load afterwards {}", load_average());
    Ok(())
}

fn default_library() -> anyhow::Result<PathBuf> {
    let output = std::process::Command::new("scripts/opa")
        .arg("path")
        .output()
        .context("running scripts/opa path (run from the repository root, or pass --opa LIB)")?;
    if !output.status.success() {
        bail!(
            "scripts/opa path failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim(),
    ))
}

/// Every fixture's input, as JSON text.
fn fixture_inputs(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading fixtures in {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let mut inputs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        let fixture: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}", file.display()))?;
        inputs.push(fixture["input"].to_string());
    }
    if inputs.is_empty() {
        bail!("no fixtures in {}", dir.display());
    }
    Ok(inputs)
}

/// Both engines decide every input alike, or the race is not fair.
fn same_decisions(
    pdp: &Pdp,
    opa: &OpaBundle,
    decision: &DataPath,
    inputs: &[String],
) -> anyhow::Result<()> {
    for input in inputs {
        let ours = pdp.decide(serde_json::from_str(input)?, EnforcementPoint::Bus);
        let theirs = opa.evaluate(decision, Some(input))?;
        let theirs_allow = theirs.as_ref().and_then(|d| d["allow"].as_bool());
        if theirs_allow != Some(ours.allow) {
            bail!("OPA decides {theirs:?} and msgnode {ours:?} on {input}");
        }
    }
    Ok(())
}

/// `threads` threads deciding round robin for `length`; `decide` says whether it decided.
fn round(
    inputs: &[String],
    threads: usize,
    length: Duration,
    decide: impl Fn(&str) -> bool + Sync,
) -> Round {
    let start = Instant::now();
    let per_thread: Vec<(Vec<u64>, u64)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let decide = &decide;
                scope.spawn(move || {
                    let mut latencies = Vec::with_capacity(1 << 16);
                    let cpu_start = thread_cpu_ns();
                    let deadline = Instant::now() + length;
                    let mut i = t;
                    while Instant::now() < deadline {
                        let t0 = Instant::now();
                        std::hint::black_box(decide(&inputs[i % inputs.len()]));
                        latencies.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
                        i += threads;
                    }
                    (latencies, thread_cpu_ns().saturating_sub(cpu_start))
                })
            })
            .collect();
        workers.into_iter().filter_map(|w| w.join().ok()).collect()
    });
    let cpu: u64 = per_thread.iter().map(|(_, cpu)| cpu).sum();
    let mut stats = Stats {
        latencies_ns: per_thread.into_iter().flat_map(|(l, _)| l).collect(),
        elapsed: start.elapsed(),
    };
    let (p50, p99) = stats.quantiles();
    let n = stats.latencies_ns.len().max(1) as u64;
    Round {
        p50,
        p99,
        rate: stats.latencies_ns.len() as f64 / stats.elapsed.as_secs_f64(),
        cpu_per_decision: cpu / n,
    }
}

/// The median of each figure over the rounds.
fn median(rounds: &[Round]) -> Round {
    fn mid<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        v[v.len() / 2]
    }
    Round {
        p50: mid(rounds.iter().map(|r| r.p50).collect()),
        p99: mid(rounds.iter().map(|r| r.p99).collect()),
        rate: mid(rounds.iter().map(|r| r.rate).collect()),
        cpu_per_decision: mid(rounds.iter().map(|r| r.cpu_per_decision).collect()),
    }
}

fn print_row(name: &str, threads: usize, r: &Round) {
    println!(
        "{:<24} {:>8} {:>10} {:>10} {:>13.0} {:>10}",
        name,
        threads,
        micros(r.p50),
        micros(r.p99),
        r.rate,
        micros(r.cpu_per_decision)
    );
}

fn ratio(numerator: f64, denominator: f64) -> String {
    if denominator > 0.0 {
        format!("{:.1}×", numerator / denominator)
    } else {
        "-".into()
    }
}

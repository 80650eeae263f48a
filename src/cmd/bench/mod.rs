//! `msgnode bench`: decision latency and throughput figures (printed, never asserted).
//!
//! Inputs are the `kind: "message"` fixtures of the bundle (`<policies>/fixtures/*.json`):
//! realistic reTHINK messages, allowed and denied. Cases:
//! - `eval uncached`: `Pdp::decide_input` with the cache off, on the typed input an
//!   enforcement point builds (built outside the timed region; the fixtures the node could
//!   have built) — the cache key, regorus's value built from the typed input, evaluation of
//!   the decision rule on this thread's VM, result conversion, metrics.
//! - `eval cached`: the same inputs with a fresh `message.id` each time (ignored by the cache
//!   key, as in real traffic), after one warm-up pass.
//! - `http`: `POST /v1/data/<decision>` over loopback with keep-alive connections, the server
//!   on 1 and then 2 worker threads, the load generator in the same process. The decision
//!   log is off in every case (it is asynchronous, but its I/O would share the 2 cores).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

mod bus;
mod journal;
mod node;
#[cfg(feature = "opa")]
mod opa;
mod policy_server;
mod proxy;
mod stats;
mod suite;
mod synapse;

use stats::Stats;

use crate::cli::{Against, BenchArgs, BenchMode};
use crate::config::{Config, PdpConfig};
use crate::pdp::{EnforcementPoint, Pdp};
use crate::policy::input::{Allocation, Input, MessageInput, Subject, Target};

/// Runs the benchmarks `args` selects.
///
/// # Errors
/// The bundle or its fixtures do not load, or the server cannot start.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let seconds = Duration::from_secs_f64(args.seconds.max(0.1));
    if args.mode == BenchMode::Proxy {
        proxy::run(&args, seconds)?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.mode == BenchMode::Bus {
        bus::run(&args, seconds)?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.mode == BenchMode::PolicyServer {
        policy_server::run(&args, seconds)?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.mode == BenchMode::Suite {
        suite::run(&args)?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.mode == BenchMode::Journal {
        journal::run(&args, seconds)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(Against::Opa) = args.against {
        against_opa(&args, seconds)?;
        return Ok(ExitCode::SUCCESS);
    }
    let inputs = message_inputs(&args.policies.join("fixtures"))?;
    println!(
        "msgnode bench: {} message inputs from {}/fixtures, {:?} per case, {} cores, load {}",
        inputs.len(),
        args.policies.display(),
        seconds,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        stats::load_average()
    );
    println!(
        "{:<26} {:>8} {:>10} {:>10} {:>14} {:>10}",
        "case", "threads", "p50", "p99", "decisions/s", "cpu/dec"
    );
    if matches!(args.mode, BenchMode::All | BenchMode::Eval) {
        let typed: Vec<(Value, Typed)> = inputs
            .iter()
            .filter_map(|input| Some((input.clone(), Typed::of(input)?)))
            .collect();
        if typed.is_empty() {
            bail!("no message fixture is an input the node could have built");
        }
        println!(
            "(eval: the {} inputs the node could have built, as typed inputs)",
            typed.len()
        );
        for cached in [false, true] {
            let pdp = bench_pdp(&args, cached)?;
            for threads in [1, 2] {
                let (stats, cpu_ns) = eval_case(&pdp, &typed, threads, seconds, cached);
                let name = if cached {
                    "eval cached"
                } else {
                    "eval uncached"
                };
                stats.print_with_cpu(name, threads, cpu_ns);
            }
        }
    }
    if matches!(args.mode, BenchMode::All | BenchMode::Http) {
        for cached in [true, false] {
            for threads in [1, 2] {
                let stats = http_case(&args, &inputs, threads, seconds, cached)?;
                let name = if cached {
                    "http cached"
                } else {
                    "http uncached"
                };
                stats.print(name, threads);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "opa")]
fn against_opa(args: &BenchArgs, seconds: Duration) -> anyhow::Result<()> {
    opa::run(args, seconds)
}

#[cfg(not(feature = "opa"))]
fn against_opa(_: &BenchArgs, _: Duration) -> anyhow::Result<()> {
    bail!("--against opa: this msgnode was built without the `opa` feature")
}

fn pdp_config(args: &BenchArgs, cached: bool) -> PdpConfig {
    let mut config = PdpConfig {
        policies: args.policies.clone(),
        ..PdpConfig::default()
    };
    config.cache.enabled = cached;
    config.decision_log.enabled = false;
    config
}

fn bench_pdp(args: &BenchArgs, cached: bool) -> anyhow::Result<Pdp> {
    let pdp = Pdp::builder(&pdp_config(args, cached)).build()?;
    pdp.reload()?;
    Ok(pdp)
}

fn message_inputs(dir: &std::path::Path) -> anyhow::Result<Vec<Value>> {
    let mut inputs = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading fixtures in {}", dir.display()))?;
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let Ok(fixture) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if fixture["input"]["kind"] == "message" {
            inputs.push(fixture["input"].clone());
        }
    }
    if inputs.is_empty() {
        bail!("no fixtures with kind \"message\" in {}", dir.display());
    }
    Ok(inputs)
}

/// The typed parts of a `kind: "message"` input besides the message, as an enforcement
/// point builds them; `None` when the fixture is not one the node could have built.
#[derive(Clone)]
struct Typed {
    subject: Subject,
    context: crate::policy::input::Context,
    targets: Vec<Target>,
    allocation: Option<Allocation>,
}

impl Typed {
    fn of(input: &Value) -> Option<Self> {
        fn field<T: serde::de::DeserializeOwned>(input: &Value, name: &str) -> Option<T> {
            serde_json::from_value(input.get(name)?.clone()).ok()
        }
        // Older fixtures have no `targets`: the node always sends them, none here.
        let mut input = input.clone();
        if let Some(object) = input.as_object_mut() {
            object
                .entry("targets")
                .or_insert_with(|| Value::Array(vec![]));
        }
        let input = &input;
        let targets = input["targets"]
            .as_array()?
            .iter()
            .map(|t| {
                Some(Target {
                    address: t["address"].as_str()?.to_string(),
                    topic: match t.get("topic").map(|t| t.as_str()) {
                        None => None,
                        Some(Some("changes")) => Some("changes"),
                        Some(Some("registration")) => Some("registration"),
                        Some(Some("children")) => Some("children"),
                        Some(_) => return None,
                    },
                    held_by_sender: t["held_by_sender"].as_bool()?,
                })
            })
            .collect::<Option<_>>()?;
        let typed = Self {
            subject: field(input, "subject")?,
            context: field(input, "context")?,
            targets,
            allocation: match input.get("allocation") {
                None => None,
                Some(a) => Some(serde_json::from_value(a.clone()).ok()?),
            },
        };
        // Only a fixture whose typed form is the fixture itself (with its `targets`).
        (typed.input(input).to_value() == *input).then_some(typed)
    }

    /// The input with `input`'s message.
    fn input<'a>(&self, input: &'a Value) -> Input<'a> {
        Input::Message(MessageInput {
            message: &input["message"],
            subject: self.subject.clone(),
            context: self.context.clone(),
            targets: self.targets.clone(),
            allocation: self.allocation.clone(),
        })
    }
}

fn with_fresh_id(input: &Value, id: u64) -> Value {
    let mut input = input.clone();
    if let Some(message) = input.get_mut("message").and_then(Value::as_object_mut) {
        message.insert("id".to_string(), Value::from(id));
    }
    input
}

fn eval_case(
    pdp: &Pdp,
    typed: &[(Value, Typed)],
    threads: usize,
    duration: Duration,
    cached: bool,
) -> (Stats, u64) {
    if cached {
        for (input, parts) in typed {
            pdp.decide_input(&parts.input(input), EnforcementPoint::Bus);
        }
    }
    let start = Instant::now();
    let per_thread: Vec<(Vec<u64>, u64)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let typed = &typed;
                scope.spawn(move || {
                    let cpu_start = stats::thread_cpu_ns();
                    let mut latencies = Vec::with_capacity(1 << 20);
                    let mut i = t;
                    let deadline = Instant::now() + duration;
                    while Instant::now() < deadline {
                        // Prepared outside the timed region: an enforcement point builds its
                        // typed input anyway (regorus's value is built inside, on a miss).
                        let (input, parts) = &typed[i % typed.len()];
                        let json = with_fresh_id(input, i as u64);
                        let input = parts.input(&json);
                        let t0 = Instant::now();
                        std::hint::black_box(pdp.decide_input(&input, EnforcementPoint::Bus));
                        latencies.push(t0.elapsed().as_nanos() as u64);
                        i += threads;
                    }
                    (latencies, stats::thread_cpu_ns().saturating_sub(cpu_start))
                })
            })
            .collect();
        workers.into_iter().filter_map(|w| w.join().ok()).collect()
    });
    let cpu_ns = per_thread.iter().map(|(_, cpu)| cpu).sum();
    let stats = Stats {
        latencies_ns: per_thread.into_iter().flat_map(|(l, _)| l).collect(),
        elapsed: start.elapsed(),
    };
    (stats, cpu_ns)
}

fn http_case(
    args: &BenchArgs,
    inputs: &[Value],
    threads: usize,
    duration: Duration,
    cached: bool,
) -> anyhow::Result<Stats> {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    let mut config = Config {
        pdp: pdp_config(args, cached),
        ..Config::default()
    };
    config.pdp.listen = "127.0.0.1:0".parse()?;
    let node = server_rt.block_on(crate::cmd::run::start(config))?;
    let bodies: Vec<bytes::Bytes> = inputs
        .iter()
        .map(|input| {
            serde_json::to_vec(&serde_json::json!({ "input": input })).map(bytes::Bytes::from)
        })
        .collect::<Result<_, _>>()?;

    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let addr = node.pdp_addr;
    let path = format!("/v1/data/{}", config_decision_url());
    let stats = client_rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let measuring = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let bodies = Arc::new(bodies);
        let mut tasks = Vec::new();
        let connections = args.connections;
        for c in 0..connections {
            let (path, stop, measuring, errors, bodies) = (
                path.clone(),
                Arc::clone(&stop),
                Arc::clone(&measuring),
                Arc::clone(&errors),
                Arc::clone(&bodies),
            );
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(1 << 16);
                let Ok(mut conn) = Connection::open(addr).await else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return latencies;
                };
                // Warm-up: one pass over the inputs on this connection.
                for body in bodies.iter() {
                    let _ = conn.post(&path, body.clone()).await;
                }
                let mut i = c;
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    match conn.post(&path, bodies[i % bodies.len()].clone()).await {
                        Ok(()) if measuring.load(Ordering::Relaxed) => {
                            latencies.push(t0.elapsed().as_nanos() as u64)
                        }
                        Ok(()) => {}
                        Err(e) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            eprintln!("  request failed: {e}");
                            match Connection::open(addr).await {
                                Ok(fresh) => conn = fresh,
                                Err(_) => break,
                            }
                        }
                    }
                    i += connections;
                }
                latencies
            }));
        }
        // Let every connection finish its warm-up before the clock starts.
        tokio::time::sleep(Duration::from_millis(500)).await;
        measuring.store(true, Ordering::Relaxed);
        let start = Instant::now();
        tokio::time::sleep(duration).await;
        stop.store(true, Ordering::Relaxed);
        let elapsed = start.elapsed();
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await.unwrap_or_default());
        }
        let errors = errors.load(Ordering::Relaxed);
        if errors > 0 {
            eprintln!("  ({errors} failed requests)");
        }
        anyhow::Ok(Stats {
            latencies_ns: latencies,
            elapsed,
        })
    })?;
    server_rt.block_on(node.stop());
    Ok(stats)
}

/// One keep-alive HTTP/1.1 connection of the load generator (hyper, no pool: as lean as a
/// client gets, so the figures measure the server).
struct Connection {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
}

impl Connection {
    async fn open(addr: std::net::SocketAddr) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Self { sender })
    }

    async fn post(&mut self, path: &str, body: bytes::Bytes) -> anyhow::Result<()> {
        self.sender.ready().await?;
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, "127.0.0.1")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(body))?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        http_body_util::BodyExt::collect(response.into_body()).await?;
        if !status.is_success() {
            bail!("status {status}");
        }
        Ok(())
    }
}

fn config_decision_url() -> String {
    PdpConfig::default()
        .decision
        .trim_start_matches("data.")
        .replace('.', "/")
}

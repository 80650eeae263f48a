//! Helpers shared by the integration tests (each test binary uses some of them).
#![allow(dead_code)]

pub mod matrix;
pub mod stub;
pub mod synapse;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use msgnode::cmd::run::Running;
use msgnode::config::Config;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The repository's shipped policy bundle.
pub fn shipped_policies() -> PathBuf {
    Path::new(REPO).join("policies")
}

/// A node with its bus on, both listening on free loopback ports, deciding with the bundle in
/// `policies` (decision log off).
pub fn bus_config(policies: &Path) -> Config {
    let mut config = Config::default();
    config.pdp.listen = "127.0.0.1:0".parse().expect("addr");
    config.pdp.policies = policies.to_path_buf();
    config.pdp.schema_dir = Path::new(REPO).join("schemas");
    config.pdp.decision_log.enabled = false;
    config.bus.enabled = true;
    config.bus.listen = "127.0.0.1:0".parse().expect("addr");
    config
}

/// Polls `done` until it holds and returns how long that took; panics naming `what` when it
/// does not hold within `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut done: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < within {
        if done().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within {within:?}");
}

/// The value of one Prometheus series of the node (0 when absent).
pub async fn metric(http: &reqwest::Client, running: &Running, series: &str) -> u64 {
    let text = http
        .get(format!("http://{}/metrics", running.pdp_addr))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

//! Helpers shared by the integration tests (each test binary uses some of them).
#![allow(dead_code)]

pub mod conformance;
pub mod console;
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

/// The shipped bundle in a directory of the test's own, with `edit` applied to its data.
pub fn policies_with(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    synapse::copy_dir(&shipped_policies(), dir.path());
    let path = dir.path().join("config/data.json");
    let mut data: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("data")).expect("json");
    edit(&mut data);
    std::fs::write(&path, data.to_string()).expect("write data");
    dir
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

/// A node running as a child process of the test (`msgnode run` with a config of the
/// test's own), so that what it costs — its resident memory — is its own; killed when
/// dropped.
pub struct ChildNode {
    child: std::process::Child,
    pub bus: std::net::SocketAddr,
    /// Its PDP API (also `/metrics`).
    pub pdp: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl ChildNode {
    /// Starts `msgnode run` with the repository's bundle, its PDP API and bus on free
    /// loopback ports, `bus_keys` (TOML lines) in `[bus]` and the TOML `tables` after it, and
    /// waits until its bus accepts connections.
    pub async fn start(bus_keys: &str, tables: &str) -> ChildNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = synapse::free_port;
        let (pdp, bus) = (port(), port());
        let text = format!(
            "[pdp]\nlisten = \"127.0.0.1:{pdp}\"\npolicies = \"{}\"\nschema_dir = \"{}\"\n[pdp.decision_log]\nenabled = false\n[bus]\nenabled = true\nlisten = \"127.0.0.1:{bus}\"\n{bus_keys}\n{tables}\n[log]\nlevel = \"warn\"\n",
            shipped_policies().display(),
            Path::new(REPO).join("schemas").display(),
        );
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).expect("write config");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_msgnode"))
            .arg("--config")
            .arg(&path)
            .arg("run")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start msgnode");
        let bus = std::net::SocketAddr::from(([127, 0, 0, 1], bus));
        eventually(
            "the child node listens",
            Duration::from_secs(60),
            || async move { tokio::net::TcpStream::connect(bus).await.is_ok() },
        )
        .await;
        ChildNode {
            child,
            bus,
            pdp: std::net::SocketAddr::from(([127, 0, 0, 1], pdp)),
            _dir: dir,
        }
    }

    /// The value of one of its Prometheus series (0 when absent).
    pub async fn metric(&self, series: &str) -> u64 {
        let text = reqwest::get(format!("http://{}/metrics", self.pdp))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    }

    /// Its resident memory, in bytes.
    pub fn rss(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(0, |kb| kb * 1024)
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

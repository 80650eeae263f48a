//! The node under test of the bus benchmarks: `msgnode run` as a child process (so its CPU
//! time is its own, read from `/proc`), memory-only or in front of a [`BenchSynapse`].

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use super::synapse::BenchSynapse;

/// The Network Server token the benchmarks' stubs authenticate with.
pub(super) const TOKEN: &str = "bench-network-server-token";

/// The node under test, as a child process; killed when dropped.
pub(super) struct Node {
    child: Child,
    pub(super) bus: SocketAddr,
    pub(super) pdp: SocketAddr,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    /// Starts the node with the bundle `policies`, in front of `synapse` (or memory-only),
    /// with `bus_keys` (TOML lines) added to `[bus]`; its config is written into `dir`. The
    /// bundle is served without its own tests: the suite raises its limits in a copy, which
    /// the shipped tests (checking the shipped limits) would refuse.
    pub(super) fn start(
        synapse: Option<&BenchSynapse>,
        dir: &Path,
        policies: &Path,
        bus_keys: &str,
    ) -> anyhow::Result<Node> {
        let free = || -> anyhow::Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let (bus, pdp) = (free()?, free()?);
        // The config file lives in `dir`, and its relative paths would be taken from there.
        let policies = std::path::absolute(policies)?;
        let pep = match synapse {
            Some(synapse) => format!(
                "[pep]\nenabled = true\nlisten = \"127.0.0.1:{}\"\nhomeserver = \"http://127.0.0.1:{}\"\nregistration = \"{}\"\n",
                synapse.as_port,
                synapse.port,
                std::path::absolute(synapse.registration())?.display()
            ),
            None => String::new(),
        };
        let config = format!(
            r#"[pdp]
listen = "127.0.0.1:{pdp}"
policies = "{policies}"
reload_requires_tests = false
[pdp.decision_log]
enabled = false
{pep}[bus]
enabled = true
listen = "127.0.0.1:{bus}"
domain = "localhost"
{bus_keys}
[bus.rate_limit]
per_second = 0
[[bus.network_servers]]
name = "bench"
token = "{TOKEN}"
[log]
level = "warn"
"#,
            policies = policies.display(),
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

    /// Waits until the node's bus accepts connections.
    pub(super) async fn ready(&self) -> anyhow::Result<()> {
        for _ in 0..600 {
            if tokio::net::TcpStream::connect(self.bus).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("the node's bus did not listen within 60 s")
    }

    /// The node's CPU time so far (user + system), from `/proc/<pid>/stat`.
    pub(super) fn cpu(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // USER_HZ is 100 on Linux.
        Some(Duration::from_millis(ticks * 10))
    }

    /// The sum of a metric's series whose line starts with `series`.
    pub(super) async fn metric(&self, http: &reqwest::Client, series: &str) -> f64 {
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

//! A throw-away Synapse for the benchmarks that need one (installed and run by
//! `scripts/synapse`, data on tmpfs, wiped when dropped).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::matrix::{registration, Actor, Homeserver};

/// A throw-away Synapse; wiped when dropped.
pub(crate) struct BenchSynapse {
    state: PathBuf,
    venv: PathBuf,
    /// Its client-server port.
    pub(crate) port: u16,
    /// Where it pushes appservice transactions.
    pub(crate) as_port: u16,
}

impl BenchSynapse {
    /// Installs (first time) and starts a Synapse on free loopback ports.
    pub(crate) fn start() -> anyhow::Result<Self> {
        let script = Path::new("scripts/synapse");
        if !script.exists() {
            bail!("run `msgnode bench --mode proxy` from the repository root (it needs scripts/synapse)");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let as_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let synapse = Self {
            state: std::env::temp_dir().join(format!("msgnode-bench-{}", std::process::id())),
            venv: std::fs::canonicalize(".")?.join(".state/venv"),
            port,
            as_port,
        };
        synapse.script(&["start"])?;
        Ok(synapse)
    }

    /// Acting as the appservice it was set up with.
    ///
    /// # Errors
    /// The registration cannot be read.
    pub(crate) fn actor(&self) -> anyhow::Result<Arc<Actor>> {
        let registration = registration::read(&self.registration())?;
        let homeserver = Arc::new(Homeserver::new(
            &format!("http://127.0.0.1:{}", self.port),
            Duration::from_secs(30),
        )?);
        Ok(Arc::new(Actor::new(
            &registration,
            "localhost",
            homeserver,
        )?))
    }

    /// Registers `count` users (`bench0`, `bench1`, …); their access tokens.
    ///
    /// # Errors
    /// A registration fails.
    pub(crate) fn register_users(&self, count: usize) -> anyhow::Result<Vec<String>> {
        (0..count)
            .map(|i| {
                let out = self.script(&["register", &format!("bench{i}"), "bench-password"])?;
                let answer: serde_json::Value =
                    serde_json::from_str(out.trim()).context("register answer")?;
                Ok(answer["access_token"]
                    .as_str()
                    .context("no access_token")?
                    .to_string())
            })
            .collect()
    }

    /// A node for a benchmark against this Synapse: the PDP on a free port deciding with
    /// `policies`, no decision log, the Matrix side pointing here (no listener enabled).
    ///
    /// # Errors
    /// Never in practice (the fixed addresses parse).
    pub(crate) fn node_config(&self, policies: &Path) -> anyhow::Result<crate::config::Config> {
        let mut config = crate::config::Config::default();
        config.pdp.policies = policies.to_path_buf();
        config.pdp.listen = "127.0.0.1:0".parse()?;
        config.pdp.decision_log.enabled = false;
        config.pep.homeserver = format!("http://127.0.0.1:{}", self.port);
        Ok(config)
    }

    /// The appservice registration it was set up with.
    pub(crate) fn registration(&self) -> PathBuf {
        self.state.join("synapse/appservice.yaml")
    }

    pub(crate) fn script(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new("scripts/synapse")
            .args(args)
            .env("MSGNODE_STATE_DIR", &self.state)
            .env("MSGNODE_VENV", &self.venv)
            .env("SYNAPSE_PORT", self.port.to_string())
            .env("SYNAPSE_DATA_ON_TMPFS", "1")
            .env("MSGNODE_BIN", std::env::current_exe()?)
            .env(
                "MSGNODE_AS_URL",
                format!("http://127.0.0.1:{}", self.as_port),
            )
            .output()
            .context("running scripts/synapse")?;
        if !output.status.success() {
            bail!(
                "scripts/synapse {args:?} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

impl Drop for BenchSynapse {
    fn drop(&mut self) {
        let _ = self.script(&["reset"]);
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

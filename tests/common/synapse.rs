//! A real Synapse for the integration tests, installed and run by `scripts/synapse`: one per
//! test binary, data on tmpfs, stopped and wiped when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// A Synapse of our own, stopped and wiped when dropped (also when a test panics).
pub struct Synapse {
    pub state: tempfile::TempDir,
    pub port: u16,
    /// Where it pushes appservice transactions (the node's proxy listener).
    pub as_port: u16,
    /// Its federation listener, when it federates (with other loopback homeservers only).
    pub federation_port: Option<u16>,
}

impl Synapse {
    pub fn start() -> Synapse {
        Self::start_with(None)
    }

    /// A Synapse that federates with other loopback ones: server_name `127.0.0.1:<port>`.
    #[allow(dead_code)] // not every test binary federates
    pub fn start_federating() -> Synapse {
        Self::start_with(Some(free_port()))
    }

    fn start_with(federation_port: Option<u16>) -> Synapse {
        let state = tempfile::tempdir().expect("tempdir");
        let synapse = Synapse {
            state,
            port: free_port(),
            as_port: free_port(),
            federation_port,
        };
        synapse.script(&["start"]);
        synapse
    }

    /// Its server_name.
    #[allow(dead_code)]
    pub fn server_name(&self) -> String {
        match self.federation_port {
            Some(port) => format!("127.0.0.1:{port}"),
            None => "localhost".to_string(),
        }
    }

    pub fn registration(&self) -> PathBuf {
        self.state.path().join("synapse/appservice.yaml")
    }

    pub fn token(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.registration()).expect("registration");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .expect("token line")
            .trim()
            .to_string()
    }

    pub fn script(&self, args: &[&str]) -> String {
        let mut command = Command::new(Path::new(REPO).join("scripts/synapse"));
        if let Some(port) = self.federation_port {
            command
                .env("SYNAPSE_FEDERATION_PORT", port.to_string())
                .env("SYNAPSE_SERVER_NAME", self.server_name());
        }
        let output = command
            .args(args)
            .env("MSGNODE_STATE_DIR", self.state.path())
            .env("MSGNODE_VENV", Path::new(REPO).join(".state/venv"))
            .env("SYNAPSE_PORT", self.port.to_string())
            .env("SYNAPSE_DATA_ON_TMPFS", "1")
            .env("MSGNODE_BIN", env!("CARGO_BIN_EXE_msgnode"))
            .env(
                "MSGNODE_AS_URL",
                format!("http://127.0.0.1:{}", self.as_port),
            )
            .output()
            .expect("run scripts/synapse");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "scripts/synapse {args:?} failed:\n{text}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        text
    }

    /// Registers `user` and returns its access token.
    pub fn register(&self, user: &str) -> String {
        let out = self.script(&["register", user, "secret-password"]);
        let answer: Value = serde_json::from_str(out.trim()).expect("register JSON");
        answer["access_token"].as_str().expect("token").to_string()
    }

    /// Points `config`'s Matrix side at this Synapse: the proxy and appservice listen where
    /// it pushes transactions, with its registration and server name.
    pub fn serve(&self, config: &mut msgnode::config::Config) {
        config.pep.enabled = true;
        config.pep.listen = format!("127.0.0.1:{}", self.as_port).parse().expect("addr");
        config.pep.homeserver = self.url();
        config.pep.server_name = self.server_name();
        config.pep.registration = Some(self.registration());
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        let _ = Command::new(Path::new(REPO).join("scripts/synapse"))
            .arg("reset")
            .env("MSGNODE_STATE_DIR", self.state.path())
            .env("MSGNODE_VENV", Path::new(REPO).join(".state/venv"))
            .output();
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Copies a directory tree (a policy bundle a test edits).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir").flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

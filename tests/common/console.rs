//! A PDP-only node with the console on (shipped policies, copied so a test may break them),
//! and authenticated requests to it.

use std::path::PathBuf;

use msgnode::cmd::run::{start, Running};
use serde_json::Value;

/// The `[pdp] token` of console nodes.
pub const TOKEN: &str = "console-test-token";
/// The `[console] write_token` of console nodes in write mode.
pub const WRITE_TOKEN: &str = "console-test-write-token";

/// A running node with `[console] enabled`.
pub struct ConsoleNode {
    /// The node.
    pub running: Running,
    /// `http://127.0.0.1:port`.
    pub base: String,
    /// The node's copy of the shipped policies.
    pub policies: PathBuf,
    /// Keeps the policies on disk.
    pub dir: tempfile::TempDir,
    /// Keeps the `[pdp] shadow` candidate on disk.
    candidate: Option<tempfile::TempDir>,
    /// A client.
    pub http: reqwest::Client,
}

impl ConsoleNode {
    /// `write`: `[console] write`; `candidate`: edits a copy of the shipped data into the
    /// `[pdp] shadow` candidate.
    pub async fn start(write: bool, candidate: Option<fn(&mut Value)>) -> ConsoleNode {
        Self::start_with(write, candidate, |_| {}).await
    }

    /// [`ConsoleNode::start`], with `edit` applied to the configuration last.
    pub async fn start_with(
        write: bool,
        candidate: Option<fn(&mut Value)>,
        edit: impl FnOnce(&mut msgnode::config::Config),
    ) -> ConsoleNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let policies = dir.path().join("policies");
        super::synapse::copy_dir(&super::shipped_policies(), &policies);
        let mut config = super::bus_config(&policies);
        config.bus.enabled = false;
        config.pdp.token = Some(TOKEN.to_string());
        config.pdp.decision_log.enabled = true;
        config.pdp.decision_log.output = dir.path().join("decisions.jsonl").display().to_string();
        config.pdp.reload_debounce = std::time::Duration::from_millis(50);
        config.console.enabled = true;
        config.console.write = write;
        config.console.write_token = write.then(|| WRITE_TOKEN.to_string());
        let candidate = candidate.map(super::policies_with);
        config.pdp.shadow = candidate.as_ref().map(|c| c.path().to_path_buf());
        edit(&mut config);
        let running = start(config).await.expect("start");
        let base = format!("http://{}", running.pdp_addr);
        ConsoleNode {
            running,
            base,
            policies,
            dir,
            candidate,
            http: reqwest::Client::new(),
        }
    }

    /// A request to `path` with the token.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
    }

    /// A request to `path` with the write token.
    pub fn write(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(WRITE_TOKEN)
    }

    /// `GET path` with the token: status and JSON body.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .expect("send");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Decides the shipped fixture `name` over the API (as another node would), with
    /// `edit` applied to its input; returns the decision id.
    pub async fn decide_fixture(&self, name: &str, edit: impl FnOnce(&mut Value)) -> String {
        let mut input = fixture_input(name);
        edit(&mut input);
        let response = self
            .request(reqwest::Method::POST, "/v1/data/msgnode/authz/decision")
            .json(&serde_json::json!({ "input": input }))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 200, "{name}");
        let body: Value = response.json().await.expect("json");
        body["decision_id"]
            .as_str()
            .expect("decision_id")
            .to_string()
    }

    /// Waits until the shadow kept a difference for decision `id`; the console's status
    /// then.
    pub async fn shadow_difference(&self, id: &str) -> Value {
        super::eventually(
            "the shadow keeps the difference",
            std::time::Duration::from_secs(10),
            || async {
                let (_, status) = self.get("/console/api/status").await;
                status["shadow"]["recent"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|d| d["decision_id"] == id))
            },
        )
        .await;
        self.get("/console/api/status").await.1
    }

    /// Stops the node.
    pub async fn stop(self) {
        self.running.stop().await;
    }
}

/// The input of the shipped fixture `name` (`policies/fixtures/{name}.json`).
pub fn fixture_input(name: &str) -> Value {
    let path = super::shipped_policies().join(format!("fixtures/{name}.json"));
    let fixture: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("fixture")).expect("json");
    fixture["input"].clone()
}

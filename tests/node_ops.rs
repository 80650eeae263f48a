//! Operating the node as an operator does: the real binary, its signals, its logs and its
//! configuration errors (loopback only; every child is killed when its test ends).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use serde_json::Value;

const POLICY: &str = "package t\ndefault allow := false\nallow if input.user == \"alice\"\ndecision := {\"allow\": allow, \"reasons\": []}\n";

/// A running `msgnode` and the lines of its stderr.
struct Node {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Node {
    fn spawn(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Node {
        let mut child = Command::new(env!("CARGO_BIN_EXE_msgnode"))
            .args(args)
            .current_dir(dir)
            .envs(env.iter().copied())
            .env_remove("RUST_LOG")
            .env_remove("MSGNODE_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn msgnode");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Node {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (10 s at most) for a stderr line containing `text`; the line.
    fn wait_for(&mut self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                self.seen.push(line.clone());
                if line.contains(text) {
                    return line;
                }
            }
        }
        panic!("no line with {text:?} in:\n{}", self.seen.join("\n"));
    }

    /// Collects what the node writes for `how_long`.
    fn drain(&mut self, how_long: Duration) {
        let deadline = Instant::now() + how_long;
        while Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(50)) {
                self.seen.push(line);
            }
        }
    }

    fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

/// The PDP's address from its JSON "PDP API listening" event.
fn pdp_addr(line: &str) -> String {
    let event: Value = serde_json::from_str(line).expect("a JSON log line");
    event["fields"]["pdp_addr"]
        .as_str()
        .expect("pdp_addr")
        .to_string()
}

fn decide(addr: &str, user: &str) -> Value {
    let body = format!("{{\"input\": {{\"user\": \"{user}\"}}}}");
    let output = Command::new("curl")
        .args([
            "-s",
            "-XPOST",
            &format!("http://{addr}/v1/data/t/decision"),
            "-d",
            &body,
        ])
        .output()
        .expect("curl");
    serde_json::from_slice(&output.stdout).unwrap_or(Value::Null)
}

fn config(dir: &Path, log_file: &str, level: &str) -> String {
    format!(
        "[pdp]\nlisten = \"127.0.0.1:0\"\npolicies = \"{}\"\nschema_dir = \"{}/schemas\"\ndecision = \"data.t.decision\"\n[pdp.decision_log]\noutput = \"{}\"\n[log]\nformat = \"json\"\nlevel = \"{level}\"\n",
        dir.join("policies").display(),
        env!("CARGO_MANIFEST_DIR"),
        dir.join(log_file).display()
    )
}

#[test]
fn sighup_reloads_logs_and_bundle_and_never_kills_the_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir.path().join("policies/t.rego"), POLICY);
    let file = dir.path().join("msgnode.toml");
    write(&file, &config(dir.path(), "first.log", "info"));
    let mut node = Node::spawn(
        dir.path(),
        &["pdp", "-c", file.to_str().expect("utf8")],
        &[],
    );
    let addr = pdp_addr(&node.wait_for("PDP API listening"));
    assert_eq!(decide(&addr, "alice")["result"]["allow"], true);

    // New decision-log file and level, and a policy edit the watcher has not seen yet.
    write(&file, &config(dir.path(), "second.log", "debug"));
    node.signal("HUP");
    node.wait_for("decision log reopened");
    assert!(node.alive(), "SIGHUP must not kill the node");
    assert_eq!(decide(&addr, "alice")["result"]["allow"], true);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(dir.path().join("second.log"))
        .is_ok_and(|t| t.contains("decision_id"))
    {
        assert!(Instant::now() < deadline, "no record in the reopened log");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A configuration that does not parse changes nothing.
    write(&file, "[pdp\nbroken");
    node.signal("HUP");
    node.wait_for("the configuration does not load; nothing changed");
    assert!(node.alive());
    assert_eq!(decide(&addr, "alice")["result"]["allow"], true);

    node.signal("TERM");
    node.wait_for("shutting down");
    let deadline = Instant::now() + Duration::from_secs(15);
    while node.alive() {
        assert!(Instant::now() < deadline, "SIGTERM drains and exits");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn pdp_runs_the_pdp_alone_and_json_logs_are_json_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir.path().join("policies/t.rego"), POLICY);
    let file = dir.path().join("msgnode.toml");
    write(&file, &config(dir.path(), "d.log", "info"));
    let mut node = Node::spawn(
        dir.path(),
        &["pdp", "-c", file.to_str().expect("utf8")],
        &[
            ("MSGNODE_BUS__ENABLED", "true"),
            ("MSGNODE_BUS__LISTEN", "127.0.0.1:0"),
        ],
    );
    let addr = pdp_addr(&node.wait_for("PDP API listening"));
    assert_eq!(decide(&addr, "bob")["result"]["allow"], false);
    node.drain(Duration::from_millis(500));
    for line in &node.seen {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "not JSON: {line}"
        );
        assert!(
            !line.contains('\u{1b}'),
            "colour codes in a log that is not a terminal: {line}"
        );
        assert!(
            !line.contains("reTHINK bus listening"),
            "msgnode pdp started the bus: {line}"
        );
    }
    assert!(
        node.seen.iter().any(|l| l.contains("\"tower_http")),
        "the access log: {:?}",
        node.seen
    );
}

#[test]
fn a_missing_policy_directory_is_one_error_then_quiet_retries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("msgnode.toml");
    write(&file, &config(dir.path(), "d.log", "info"));
    let mut node = Node::spawn(
        dir.path(),
        &["pdp", "-c", file.to_str().expect("utf8")],
        &[],
    );
    node.wait_for("PDP API listening");
    node.drain(Duration::from_millis(3500));
    let errors: Vec<&String> = node
        .seen
        .iter()
        .filter(|l| l.contains("\"ERROR\""))
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("no revision is serving"),
        "no claim of a previous revision: {}",
        errors[0]
    );
    assert!(
        !errors[0].contains("previous revision keeps serving"),
        "{}",
        errors[0]
    );
    let retries = node
        .seen
        .iter()
        .filter(|l| l.contains("looking for it again"))
        .count();
    assert_eq!(retries, 1, "{:?}", node.seen);
    // It appears: loaded.
    write(&dir.path().join("policies/t.rego"), POLICY);
    node.wait_for("policy bundle activated");
}

#[test]
fn config_errors_are_printed_once_naming_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.toml");
    write(&file, "[pdp]\nlisten_addr = \"x\"\n");
    let output = Command::new(env!("CARGO_BIN_EXE_msgnode"))
        .args(["-c", file.to_str().expect("utf8"), "pdp"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("listen_addr").count(), 1, "{err}");
    assert!(
        err.contains("bad.toml: pdp.listen_addr: unknown key (allowed: listen,"),
        "{err}"
    );
    assert!(!err.contains("default."), "{err}");
}

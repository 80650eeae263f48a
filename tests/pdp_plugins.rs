//! The PDP's network plugins against real HTTP servers on loopback: bundles pulled from a
//! bundle server (ETag, signatures, the copy kept on disk, long polling) and decision logs uploaded to a
//! collector (gzip batches, retries, a bounded buffer).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use msgnode::cmd::run::{start, Running};
use msgnode::config::{BundleConfig, Config, DecisionUploadConfig, VerificationConfig};
use serde_json::{json, Value};

const POLICY: &str = "package t\ndefault allow := false\nallow if input.user == data.config.who\nreasons contains \"not the one\" if not allow\ndecision := {\"allow\": allow, \"reasons\": reasons}\n";
const TEST: &str =
    "package t_test\ntest_the_one if data.t.allow with input as {\"user\": data.config.who}\n";

/// Serves `app` on a loopback port of its own for the rest of the test.
async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// What the bundle server serves: the tarball and its ETag; how often it said 304.
#[derive(Default)]
struct Served {
    bundle: Mutex<(Vec<u8>, String)>,
    not_modified: AtomicUsize,
    /// `Prefer` headers seen (long polling).
    prefer: Mutex<Vec<String>>,
}

async fn bundle_get(State(served): State<Arc<Served>>, headers: HeaderMap) -> Response {
    if let Some(prefer) = headers.get("prefer").and_then(|v| v.to_str().ok()) {
        served.prefer.lock().expect("lock").push(prefer.to_string());
    }
    let (bytes, etag) = served.bundle.lock().expect("lock").clone();
    if headers
        .get("if-none-match")
        .is_some_and(|v| v == etag.as_str())
    {
        served.not_modified.fetch_add(1, Ordering::SeqCst);
        return StatusCode::NOT_MODIFIED.into_response();
    }
    (StatusCode::OK, [("etag", etag)], bytes).into_response()
}

/// `policy build`s a bundle that grants `who`, signed with `key` (`alg`).
fn build(dir: &Path, who: &str, key: &Path, alg: &str) -> Vec<u8> {
    let src = dir.join(format!("src-{who}"));
    for (name, text) in [
        ("t.rego", POLICY.to_string()),
        ("t_test.rego", TEST.to_string()),
        ("config/data.json", format!("{{\"who\": \"{who}\"}}")),
    ] {
        let path = src.join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }
    let out = dir.join(format!("{who}.tar.gz"));
    let built = Command::new(env!("CARGO_BIN_EXE_msgnode"))
        .args([
            "policy",
            "build",
            path(&src),
            "-o",
            path(&out),
            "--revision",
            who,
        ])
        .args(["--signing-key", path(key), "--signing-alg", alg])
        .output()
        .expect("msgnode policy build");
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    std::fs::read(out).expect("tarball")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// A key pair made by openssl: (private, public) PEM files.
fn keypair(dir: &Path, name: &str, alg: &str) -> (PathBuf, PathBuf) {
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    let genpkey: &[&str] = match alg {
        "RS256" => &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ],
        _ => &["genpkey", "-algorithm", "ed25519"],
    };
    let ok = Command::new("openssl")
        .args(genpkey)
        .args(["-out", path(&private)])
        .output()
        .expect("openssl")
        .status
        .success()
        && Command::new("openssl")
            .args([
                "pkey",
                "-in",
                path(&private),
                "-pubout",
                "-out",
                path(&public),
            ])
            .output()
            .expect("openssl")
            .status
            .success();
    assert!(ok, "openssl could not make a {alg} key");
    (private, public)
}

fn node_config(dir: &Path, url: &str, public_key: &Path, alg: &str) -> Config {
    let mut config = Config::default();
    config.pdp.listen = "127.0.0.1:0".parse().expect("addr");
    config.pdp.policies = dir.join("no-such-dir");
    config.pdp.schemas.clear();
    config.pdp.decision = "data.t.decision".into();
    config.pdp.decision_log.enabled = false;
    config.pdp.bundle = Some(BundleConfig {
        url: url.to_string(),
        name: "authz".into(),
        min_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(100),
        persist_dir: Some(dir.join("persisted")),
        verification: Some(VerificationConfig {
            public_key: public_key.to_path_buf(),
            algorithm: alg.into(),
            key_id: None,
            scope: None,
        }),
        ..BundleConfig::default()
    });
    config
}

async fn fetch(http: &reqwest::Client, running: &Running, path: &str) -> (u16, Value) {
    let response = http
        .get(format!("http://{}{path}", running.pdp_addr))
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn allowed(http: &reqwest::Client, running: &Running, user: &str) -> bool {
    let response = http
        .post(format!("http://{}/v1/data/t/allow", running.pdp_addr))
        .json(&json!({"input": {"user": user}}))
        .send()
        .await
        .expect("send");
    response.json::<Value>().await.expect("json")["result"] == json!(true)
}

async fn eventually<F, Fut>(what: &str, done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    common::eventually(what, Duration::from_secs(15), done).await;
}

#[tokio::test]
async fn replicas_follow_the_bundle_server_refuse_bad_signatures_and_start_from_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (private, public) = keypair(dir.path(), "signer", "EdDSA");
    let (intruder, _) = keypair(dir.path(), "intruder", "EdDSA");
    let served = Arc::new(Served::default());
    *served.bundle.lock().expect("lock") = (
        build(dir.path(), "alice", &private, "EdDSA"),
        "\"a\"".into(),
    );
    let url = serve(
        Router::new()
            .route("/bundles/authz.tar.gz", get(bundle_get))
            .with_state(Arc::clone(&served)),
    )
    .await;
    let url = format!("{url}/bundles/authz.tar.gz");
    let http = reqwest::Client::new();

    let node = start(node_config(dir.path(), &url, &public, "EdDSA"))
        .await
        .expect("start");
    eventually("first bundle active", || async {
        fetch(&http, &node, "/health?bundles").await.0 == 200
    })
    .await;
    assert!(allowed(&http, &node, "alice").await);
    eventually("polls answered 304", || async {
        served.not_modified.load(Ordering::SeqCst) >= 2
    })
    .await;

    // A new revision is picked up.
    *served.bundle.lock().expect("lock") =
        (build(dir.path(), "bob", &private, "EdDSA"), "\"b\"".into());
    eventually("revision bob", || async {
        fetch(&http, &node, "/health").await.1["revision"] == "bob"
    })
    .await;
    assert!(allowed(&http, &node, "bob").await && !allowed(&http, &node, "alice").await);

    // A bundle signed with another key is refused; bob keeps serving.
    *served.bundle.lock().expect("lock") = (
        build(dir.path(), "carol", &intruder, "EdDSA"),
        "\"c\"".into(),
    );
    eventually("bad signature reported", || async {
        let (_, status) = fetch(&http, &node, "/v1/status").await;
        status["result"]["bundles"]["authz"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("signature"))
    })
    .await;
    let (_, status) = fetch(&http, &node, "/v1/status").await;
    let authz = &status["result"]["bundles"]["authz"];
    assert_eq!(authz["active_revision"], "bob", "{status}");
    assert_eq!(authz["code"], "bundle_error", "{status}");
    assert!(allowed(&http, &node, "bob").await && !allowed(&http, &node, "carol").await);
    node.stop().await;

    // The server is down at start: the bundle kept on disk serves.
    let dead = format!("http://127.0.0.1:{}/bundles/authz.tar.gz", closed_port());
    let node = start(node_config(dir.path(), &dead, &public, "EdDSA"))
        .await
        .expect("start");
    let (code, health) = fetch(&http, &node, "/health?bundles").await;
    assert_eq!(code, 200, "{health}");
    assert_eq!(health["revision"], "bob", "{health}");
    assert_eq!(health["bundles"]["authz"]["source"], "disk", "{health}");
    assert!(allowed(&http, &node, "bob").await);
    eventually("the dead server is reported", || async {
        fetch(&http, &node, "/v1/status").await.1["result"]["bundles"]["authz"]["code"]
            == "bundle_error"
    })
    .await;
    node.stop().await;
}

#[tokio::test]
async fn rs256_signed_bundles_verify_and_a_missing_bundle_is_not_ready() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (private, public) = keypair(dir.path(), "rsa", "RS256");
    let served = Arc::new(Served::default());
    *served.bundle.lock().expect("lock") =
        (build(dir.path(), "dave", &private, "RS256"), "\"d\"".into());
    let url = serve(
        Router::new()
            .route("/b.tar.gz", get(bundle_get))
            .with_state(Arc::clone(&served)),
    )
    .await;
    let http = reqwest::Client::new();
    let mut config = node_config(dir.path(), &format!("{url}/b.tar.gz"), &public, "RS256");
    if let Some(bundle) = config.pdp.bundle.as_mut() {
        bundle.long_polling_timeout = Some(Duration::from_secs(2));
    }
    let node = start(config).await.expect("start");
    eventually("RS256 bundle active", || async {
        fetch(&http, &node, "/health?bundles").await.0 == 200
    })
    .await;
    assert!(allowed(&http, &node, "dave").await);
    assert!(
        served
            .prefer
            .lock()
            .expect("lock")
            .iter()
            .any(|p| p == "wait=2"),
        "long polling asks the server to wait"
    );
    node.stop().await;

    // Nothing on disk, nothing at the URL: not ready, with the reason.
    let empty = tempfile::tempdir().expect("tempdir");
    let node = start(node_config(
        empty.path(),
        &format!("{url}/missing.tar.gz"),
        &public,
        "RS256",
    ))
    .await
    .expect("start");
    eventually("404 reported", || async {
        let (code, health) = fetch(&http, &node, "/health?bundles").await;
        code == 503
            && health["bundles"]["authz"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("404"))
    })
    .await;
    node.stop().await;
}

/// A bundle server that long-polls as OPA's protocol says: a request whose `If-None-Match` is
/// the current ETag and that says `Prefer: wait=N` is held until a new revision is set (then
/// answered 200 with it) or for N seconds (then 304); answers carry the long-poll content
/// type. Every request is numbered, and every answer logged with the request's number.
#[derive(Default)]
struct LongPoll {
    bundle: Mutex<(Vec<u8>, String)>,
    changed: Mutex<Option<tokio::sync::watch::Sender<u64>>>,
    requests: AtomicUsize,
    held_now: AtomicUsize,
    /// (request number, status, ETag answered, whether it had been held).
    answers: Mutex<Vec<(usize, u16, String, bool)>>,
}

const LONG_POLL: &str = "application/vnd.openpolicyagent.bundles";

impl LongPoll {
    fn new(bundle: Vec<u8>, etag: &str) -> Arc<Self> {
        let served = LongPoll::default();
        *served.bundle.lock().expect("lock") = (bundle, etag.into());
        *served.changed.lock().expect("lock") = Some(tokio::sync::watch::channel(0).0);
        Arc::new(served)
    }

    fn set(&self, bundle: Vec<u8>, etag: &str) {
        *self.bundle.lock().expect("lock") = (bundle, etag.into());
        if let Some(changed) = self.changed.lock().expect("lock").as_ref() {
            changed.send_modify(|n| *n += 1);
        }
    }

    fn answers(&self) -> Vec<(usize, u16, String, bool)> {
        self.answers.lock().expect("lock").clone()
    }

    async fn answer(
        self: Arc<Self>,
        request: hyper::Request<hyper::body::Incoming>,
    ) -> Result<Response, std::convert::Infallible> {
        let number = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let mut changed = match self.changed.lock().expect("lock").as_ref() {
            Some(sender) => sender.subscribe(),
            None => return Ok(StatusCode::INTERNAL_SERVER_ERROR.into_response()),
        };
        let headers = request.headers();
        let wait = headers
            .get("prefer")
            .and_then(|v| v.to_str().ok())
            .and_then(|p| p.strip_prefix("wait="))
            .and_then(|n| n.parse::<u64>().ok());
        let asked = headers
            .get("if-none-match")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let current = self.bundle.lock().expect("lock").1.clone();
        let mut held = false;
        if let (Some(wait), Some(asked)) = (wait, &asked) {
            if *asked == current {
                held = true;
                self.held_now.fetch_add(1, Ordering::SeqCst);
                let news = tokio::time::timeout(Duration::from_secs(wait), changed.changed()).await;
                self.held_now.fetch_sub(1, Ordering::SeqCst);
                if news.is_err() {
                    self.log(number, 304, &current, held);
                    return Ok(
                        (StatusCode::NOT_MODIFIED, [("content-type", LONG_POLL)]).into_response()
                    );
                }
            }
        }
        let (bytes, etag) = self.bundle.lock().expect("lock").clone();
        if asked.as_deref() == Some(etag.as_str()) {
            self.log(number, 304, &etag, held);
            return Ok((StatusCode::NOT_MODIFIED, [("content-type", LONG_POLL)]).into_response());
        }
        self.log(number, 200, &etag, held);
        Ok((
            StatusCode::OK,
            [("content-type", LONG_POLL.to_string()), ("etag", etag)],
            bytes,
        )
            .into_response())
    }

    fn log(&self, number: usize, status: u16, etag: &str, held: bool) {
        self.answers
            .lock()
            .expect("lock")
            .push((number, status, etag.to_string(), held));
    }
}

/// Serves `served` on loopback; aborting the returned task closes the listener and every
/// open connection, held requests included (the server going down mid-poll).
async fn serve_long_poll(served: Arc<LongPoll>) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let served = Arc::clone(&served);
            let service =
                hyper::service::service_fn(move |request| Arc::clone(&served).answer(request));
            connections.spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (format!("http://{addr}/bundles/authz.tar.gz"), task)
}

#[tokio::test]
async fn long_polling_gets_a_new_revision_on_the_held_request_and_survives_the_server_dying() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (private, public) = keypair(dir.path(), "signer", "EdDSA");
    let served = LongPoll::new(build(dir.path(), "alice", &private, "EdDSA"), "\"a\"");
    let (url, server) = serve_long_poll(Arc::clone(&served)).await;
    let http = reqwest::Client::new();
    let mut config = node_config(dir.path(), &url, &public, "EdDSA");
    if let Some(bundle) = config.pdp.bundle.as_mut() {
        // A held request outlasts the test; a plain poll would come only a minute later.
        bundle.long_polling_timeout = Some(Duration::from_secs(60));
        bundle.min_delay = Duration::from_secs(60);
        bundle.max_delay = Duration::from_secs(60);
        bundle.persist_dir = None;
    }
    let node = start(config).await.expect("start");
    eventually("alice active and the next request held", || async {
        fetch(&http, &node, "/health").await.1["revision"] == "alice"
            && served.held_now.load(Ordering::SeqCst) == 1
    })
    .await;
    let before = served.requests.load(Ordering::SeqCst);

    // The new revision goes out on the request that was already waiting.
    served.set(build(dir.path(), "bob", &private, "EdDSA"), "\"b\"");
    eventually("revision bob", || async {
        fetch(&http, &node, "/health").await.1["revision"] == "bob"
    })
    .await;
    let answers = served.answers();
    let bob: Vec<_> = answers.iter().filter(|a| a.2 == "\"b\"").collect();
    assert!(
        matches!(bob.as_slice(), [(n, 200, _, true), ..] if *n <= before),
        "bob answered on a request held since before the change ({before} requests then): {answers:?}"
    );
    assert!(allowed(&http, &node, "bob").await && !allowed(&http, &node, "alice").await);

    // Right after activating, the node asks again and is held again.
    eventually("held again", || async {
        served.held_now.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(served.requests.load(Ordering::SeqCst) > before);

    // The server dies while it holds the request: the last good bundle keeps serving.
    server.abort();
    eventually("the dead server is reported", || async {
        fetch(&http, &node, "/v1/status").await.1["result"]["bundles"]["authz"]["code"]
            == "bundle_error"
    })
    .await;
    let (code, health) = fetch(&http, &node, "/health?bundles").await;
    assert_eq!(
        (code, &health["revision"]),
        (200, &json!("bob")),
        "{health}"
    );
    assert!(allowed(&http, &node, "bob").await && !allowed(&http, &node, "alice").await);
    node.stop().await;
}

#[tokio::test]
async fn a_long_poll_that_times_out_is_a_304_and_the_node_asks_again_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (private, public) = keypair(dir.path(), "signer", "EdDSA");
    let served = LongPoll::new(build(dir.path(), "erin", &private, "EdDSA"), "\"e\"");
    let (url, _server) = serve_long_poll(Arc::clone(&served)).await;
    let http = reqwest::Client::new();
    let mut config = node_config(dir.path(), &url, &public, "EdDSA");
    if let Some(bundle) = config.pdp.bundle.as_mut() {
        bundle.long_polling_timeout = Some(Duration::from_secs(1));
        bundle.min_delay = Duration::from_secs(60);
        bundle.max_delay = Duration::from_secs(60);
        bundle.persist_dir = None;
    }
    let node = start(config).await.expect("start");
    // With a minute between plain polls, two held 304s in a row within the test's patience
    // can only come from asking again as soon as a held request ends.
    eventually("two held requests timed out", || async {
        served
            .answers()
            .iter()
            .filter(|a| a.1 == 304 && a.3)
            .count()
            >= 2
    })
    .await;
    let (_, status) = fetch(&http, &node, "/v1/status").await;
    let authz = &status["result"]["bundles"]["authz"];
    assert_eq!(authz["active_revision"], "erin", "{status}");
    assert!(authz["code"].is_null(), "a 304 is no error: {status}");
    assert!(allowed(&http, &node, "erin").await);
    node.stop().await;
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

/// What the collector received: decoded records, and how many requests it failed on purpose.
#[derive(Default)]
struct Collected {
    records: Mutex<Vec<Value>>,
    fail_first: AtomicUsize,
    encodings: Mutex<Vec<String>>,
}

async fn logs_post(
    State(collected): State<Arc<Collected>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    if collected
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let encoding = headers
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    collected.encodings.lock().expect("lock").push(encoding);
    let mut json = String::new();
    if flate2::read::GzDecoder::new(&body[..])
        .read_to_string(&mut json)
        .is_err()
    {
        return StatusCode::BAD_REQUEST;
    }
    match serde_json::from_str::<Vec<Value>>(&json) {
        Ok(batch) => {
            collected.records.lock().expect("lock").extend(batch);
            StatusCode::NO_CONTENT
        }
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

fn upload_config(dir: &Path, url: &str, max_buffer: usize) -> Config {
    std::fs::create_dir_all(dir.join("policies")).expect("mkdir");
    std::fs::write(dir.join("policies/t.rego"), POLICY).expect("write");
    std::fs::write(
        dir.join("policies/data.json"),
        r#"{"config": {"who": "alice"}}"#,
    )
    .expect("write");
    let mut config = Config::default();
    config.pdp.listen = "127.0.0.1:0".parse().expect("addr");
    config.pdp.policies = dir.join("policies");
    config.pdp.schemas.clear();
    config.pdp.decision = "data.t.decision".into();
    config.pdp.decision_log.output = "off".into();
    config
        .pdp
        .decision_log
        .labels
        .insert("app".into(), "chat".into());
    config.pdp.decision_log.upload = Some(DecisionUploadConfig {
        url: url.to_string(),
        max_batch: 3,
        flush_interval: Duration::from_millis(50),
        max_buffer,
        ..DecisionUploadConfig::default()
    });
    config
}

#[tokio::test]
async fn decision_logs_are_uploaded_in_gzip_batches_and_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let collected = Arc::new(Collected::default());
    collected.fail_first.store(2, Ordering::SeqCst);
    let url = serve(
        Router::new()
            .route("/logs", post(logs_post))
            .with_state(Arc::clone(&collected)),
    )
    .await;
    let node = start(upload_config(dir.path(), &format!("{url}/logs"), 1000))
        .await
        .expect("start");
    let http = reqwest::Client::new();
    for user in ["alice", "bob", "alice", "carol", "alice"] {
        allowed(&http, &node, user).await;
    }
    eventually("five records uploaded", || async {
        collected.records.lock().expect("lock").len() >= 5
    })
    .await;
    let records = collected.records.lock().expect("lock").clone();
    let first = &records[0];
    assert_eq!(first["path"], "t/allow", "{first}");
    assert_eq!(first["labels"]["app"], "chat", "{first}");
    assert!(first["labels"]["id"].is_string(), "{first}");
    assert_eq!(first["enforcement_point"], "http_api", "{first}");
    assert!(
        first["bundles"]["policies"]["revision"].is_string(),
        "{first}"
    );
    assert!(collected
        .encodings
        .lock()
        .expect("lock")
        .iter()
        .all(|e| e == "gzip"));
    assert!(
        common::metric(
            &http,
            &node,
            "msgnode_pdp_decision_log_upload_failures_total"
        )
        .await
            >= 2
    );
    node.stop().await;
}

#[tokio::test]
async fn a_collector_that_is_down_costs_only_the_oldest_records_past_the_buffer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dead = format!("http://127.0.0.1:{}/logs", closed_port());
    let node = start(upload_config(dir.path(), &dead, 4))
        .await
        .expect("start");
    let http = reqwest::Client::new();
    for _ in 0..20 {
        assert!(allowed(&http, &node, "alice").await, "decisions go on");
    }
    eventually("drops counted", || async {
        common::metric(
            &http,
            &node,
            "msgnode_pdp_decision_log_upload_dropped_total",
        )
        .await
            >= 10
    })
    .await;
    node.stop().await;
}

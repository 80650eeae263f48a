//! The PDP's HTTP API over real loopback HTTP: OPA-compatible shapes, bad input, auth,
//! health, metrics and hot reload.

use std::path::Path;
use std::time::Duration;

mod common;

use msgnode::cmd::run::{start, Running};
use msgnode::config::Config;
use serde_json::{json, Value};

const POLICY: &str = r#"package t
default allow := false
allow if input.user == "alice"
reasons contains "user is not alice" if not allow
decision := {"allow": allow, "reasons": reasons}
"#;

struct Node {
    running: Option<Running>,
    dir: tempfile::TempDir,
    base: String,
    http: reqwest::Client,
}

impl Node {
    async fn start(files: &[(&str, &str)], tweak: impl FnOnce(&mut Config)) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        for (path, text) in files {
            write(&dir.path().join(path), text);
        }
        let mut config = Config::default();
        config.pdp.listen = "127.0.0.1:0".parse().expect("addr");
        config.pdp.policies = dir.path().join("policies");
        config.pdp.schema_dir = dir.path().join("schemas");
        config.pdp.schemas.clear();
        config.pdp.decision = "data.t.decision".into();
        config.pdp.decision_log.output = dir.path().join("decisions.log").display().to_string();
        config.pdp.reload_debounce = Duration::from_millis(50);
        tweak(&mut config);
        let running = start(config).await.expect("start");
        let base = format!("http://{}", running.pdp_addr);
        Node {
            running: Some(running),
            dir,
            base,
            http: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body);
        status_and_json(request).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        status_and_json(self.http.get(format!("{}{path}", self.base))).await
    }

    async fn text(&self, path: &str) -> String {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("send");
        response.text().await.expect("body")
    }

    fn policy(&self, name: &str, text: &str) {
        write(&self.dir.path().join("policies").join(name), text);
    }

    async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
    }
}

/// Sends `request`; the body as JSON (or as a JSON string when it is not JSON).
async fn status_and_json(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    // Write-then-rename, as editors do, so the watcher never reads a half-written file.
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Polls until `done` holds (10 s at most); returns how long it took.
async fn eventually<F, Fut>(done: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    common::eventually("condition", Duration::from_secs(10), done).await
}

#[tokio::test]
async fn data_api_answers_as_opa_does() {
    let node = Node::start(
        &[
            ("policies/t.rego", POLICY),
            ("policies/cfg/data.json", r#"{"limit": 3}"#),
        ],
        |_| {},
    )
    .await;

    let (status, body) = node
        .post("/v1/data/t/allow", r#"{"input": {"user": "alice"}}"#)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["result"], json!(true));
    assert!(
        body["decision_id"]
            .as_str()
            .is_some_and(|id| id.len() == 36),
        "{body}"
    );

    let (status, body) = node
        .post("/v1/data/t", r#"{"input": {"user": "bob"}}"#)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["result"]["allow"], json!(false));
    assert_eq!(body["result"]["reasons"], json!(["user is not alice"]));

    // Undefined: 200 without result.
    let (status, body) = node.post("/v1/data/t/nothing", r#"{"input": {}}"#).await;
    assert_eq!(status, 200);
    assert!(body.get("result").is_none(), "{body}");
    assert!(body.get("decision_id").is_some());

    // No input: evaluated anyway, with OPA's warning.
    let (status, body) = node.post("/v1/data/t/allow", "{}").await;
    assert_eq!(status, 200);
    assert_eq!(body["warning"]["code"], json!("api_usage_warning"));
    assert_eq!(body["result"], json!(false));

    // GET, data documents, the whole tree, ?metrics and ?provenance.
    let (status, body) = node.get("/v1/data/cfg/limit").await;
    assert_eq!((status, &body["result"]), (200, &json!(3)));
    let (status, body) = node
        .get("/v1/data/t/allow?input=%7B%22user%22%3A%22alice%22%7D")
        .await;
    assert_eq!((status, &body["result"]), (200, &json!(true)));
    let (status, body) = node
        .post("/v1/data", r#"{"input": {"user": "alice"}}"#)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["result"]["cfg"]["limit"], json!(3));
    assert_eq!(body["result"]["t"]["allow"], json!(true));
    let (_, body) = node
        .post(
            "/v1/data/t/allow?metrics=true&provenance",
            r#"{"input": {"user": "alice"}}"#,
        )
        .await;
    assert!(
        body["metrics"]["timer_rego_query_eval_ns"].is_u64(),
        "{body}"
    );
    assert!(
        body["metrics"]["timer_server_handler_ns"].is_u64(),
        "{body}"
    );
    assert!(
        body["provenance"]["bundles"]["policies"]["revision"].is_string(),
        "{body}"
    );

    // Paths that only differ in slashes are the same document.
    for path in [
        "/v1/data//t/allow",
        "/v1/data/t/allow/",
        "/v1/data/t//allow",
    ] {
        let (status, body) = node.post(path, r#"{"input": {"user": "alice"}}"#).await;
        assert_eq!((status, &body["result"]), (200, &json!(true)), "{path}");
    }

    // Every decision is logged, as one JSON line each.
    let log = node.dir.path().join("decisions.log");
    eventually(|| {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log)
                .map(|t| t.lines().count() >= 10)
                .unwrap_or(false)
        }
    })
    .await;
    let text = std::fs::read_to_string(&log).expect("log");
    for line in text.lines() {
        let record: Value = serde_json::from_str(line).expect("json line");
        // OPA's decision-log shape, plus who asked.
        for key in [
            "decision_id",
            "timestamp",
            "path",
            "labels",
            "requested_by",
            "metrics",
            "enforcement_point",
        ] {
            assert!(record.get(key).is_some(), "{key} missing: {line}");
        }
        assert!(
            !record["path"].as_str().unwrap_or("").starts_with("data"),
            "{line}"
        );
        assert_eq!(record["enforcement_point"], "http_api", "{line}");
        assert!(record["labels"]["id"].is_string(), "{line}");
        assert!(
            record["requested_by"]
                .as_str()
                .unwrap_or("")
                .starts_with("127.0.0.1:"),
            "{line}"
        );
    }
    node.stop().await;
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_the_server_keeps_serving() {
    let node = Node::start(&[("policies/t.rego", POLICY)], |c| {
        c.pdp.max_body_bytes = 4096
    })
    .await;
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed JSON",
            b"{\"input\": ".to_vec(),
            400,
            "malformed input document",
        ),
        (
            "not an object",
            b"[1, 2]".to_vec(),
            400,
            "expected a JSON object",
        ),
        (
            "invalid UTF-8",
            b"{\"input\": \"\xff\xfe\"}".to_vec(),
            400,
            "malformed input document",
        ),
        (
            "deep nesting",
            format!("{{\"input\": {}1{}}}", "[".repeat(300), "]".repeat(300)).into_bytes(),
            400,
            "recursion limit",
        ),
        (
            "huge body",
            format!("{{\"input\": \"{}\"}}", "x".repeat(10_000)).into_bytes(),
            413,
            "exceeds the limit of 4096 bytes",
        ),
    ];
    for (what, body, status, message) in cases {
        let (got, error) = node.post("/v1/data/t/allow", body).await;
        assert_eq!(got, status, "{what}: {error}");
        assert_eq!(error["code"], json!("invalid_parameter"), "{what}: {error}");
        assert!(
            error["message"].as_str().unwrap_or("").contains(message),
            "{what}: {error}"
        );
    }
    // Wrong types in the input are the policy's business: it denies.
    let (status, body) = node
        .post("/v1/data/t/decision", r#"{"input": {"user": 42}}"#)
        .await;
    assert_eq!((status, &body["result"]["allow"]), (200, &json!(false)));
    // An evaluation error is a 500 with the engine's message.
    node.policy("conflict.rego", "package c\nx := input.a\nx := input.b\n");
    eventually(|| async { node.get("/v1/policies/conflict.rego").await.0 == 200 }).await;
    let (status, body) = node
        .post("/v1/data/c/x", r#"{"input": {"a": 1, "b": 2}}"#)
        .await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["code"], json!("internal_error"));
    assert_eq!(body["errors"][0]["code"], json!("eval_error"));
    // Unknown route and wrong method.
    assert_eq!(node.get("/v2/nothing").await.0, 404);
    let response = node
        .http
        .delete(format!("{}/v1/data/t", node.base))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 405);
    // Still serving.
    let (status, body) = node
        .post("/v1/data/t/allow", r#"{"input": {"user": "alice"}}"#)
        .await;
    assert_eq!((status, &body["result"]), (200, &json!(true)));
    node.stop().await;
}

#[tokio::test]
async fn token_is_required_when_configured() {
    let node = Node::start(&[("policies/t.rego", POLICY)], |c| {
        c.pdp.token = Some("s3cret".into())
    })
    .await;
    let (status, body) = node.post("/v1/data/t/allow", "{}").await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], json!("unauthorized"));
    let response = node
        .http
        .post(format!("{}/v1/data/t/allow", node.base))
        .bearer_auth("wrong")
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 401);
    let response = node
        .http
        .post(format!("{}/v1/data/t/allow", node.base))
        .bearer_auth("s3cret")
        .body(r#"{"input": {"user": "alice"}}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(node.get("/metrics").await.0, 401);
    // Probes need no token.
    assert_eq!(node.get("/health").await.0, 200);
    node.stop().await;
}

#[tokio::test]
async fn schema_bound_paths_reject_invalid_input_with_a_pointer() {
    let schema = r#"{"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
        "required": ["user"], "properties": {"user": {"type": "string"}}}"#;
    let node = Node::start(
        &[
            ("policies/t.rego", POLICY),
            ("schemas/in.schema.json", schema),
        ],
        |c| {
            c.pdp.schemas.insert("t".into(), "in.schema.json".into());
        },
    )
    .await;
    let (status, body) = node
        .post("/v1/data/t/allow", r#"{"input": {"user": 7}}"#)
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], json!("invalid_parameter"));
    assert_eq!(body["errors"][0]["pointer"], json!("/user"));
    assert!(
        body["message"].as_str().unwrap_or("").contains("at /user"),
        "{body}"
    );
    let (status, _) = node
        .post("/v1/data/t/allow", r#"{"input": {"user": "alice"}}"#)
        .await;
    assert_eq!(status, 200);
    node.stop().await;
}

#[tokio::test]
async fn policies_health_and_metrics_report_the_bundle() {
    let node = Node::start(
        &[
            ("policies/t.rego", POLICY),
            ("policies/t_test.rego", "package t_test\ntest_x if true\n"),
        ],
        |_| {},
    )
    .await;
    let (status, body) = node.get("/v1/policies").await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = body["result"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|p| p["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["t.rego"], "test modules are not served");
    let (status, body) = node.get("/v1/policies/t.rego").await;
    assert_eq!(
        (status, body["result"]["raw"].as_str()),
        (200, Some(POLICY))
    );
    let (status, body) = node.get("/v1/policies/nope.rego").await;
    assert_eq!((status, &body["code"]), (404, &json!("resource_not_found")));

    let (status, body) = node.get("/health").await;
    assert_eq!(status, 200);
    assert_eq!(body["last_load_ok"], json!(true));
    assert_eq!(node.get("/health/live").await.0, 200);

    node.post("/v1/data/t/allow", r#"{"input": {"user": "alice"}}"#)
        .await;
    node.post("/v1/data/t/allow", r#"{"input": {"user": "alice"}}"#)
        .await;
    let text = node.text("/metrics").await;
    for series in [
        "msgnode_pdp_decisions_total{result=\"allow\"}",
        "msgnode_pdp_cache_hits_total 1",
        "msgnode_pdp_cache_misses_total",
        "msgnode_pdp_eval_duration_seconds_bucket",
        "msgnode_pdp_bundle_reloads_total{result=\"ok\"} 1",
        "msgnode_pdp_bundle_last_reload_ok 1",
        "msgnode_pdp_bundle_info{revision=",
        "msgnode_pdp_http_requests_total{route=\"v1/data\",code=\"200\"}",
        "msgnode_pdp_decision_log_dropped_total 0",
    ] {
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }
    node.stop().await;
}

/// A cached decision outlived a time window's edge by up to the cache's TTL (10 s): the
/// default key left `context.time` out. An input past the edge is decided afresh.
#[tokio::test]
async fn a_cached_decision_does_not_outlive_a_time_windows_edge() {
    let policy = r#"package t
default allow := false
allow if input.context.time < "2026-12-02T10:00:00Z"
decision := {"allow": allow, "reasons": set()}
"#;
    let node = Node::start(&[("policies/t.rego", policy)], |_| {}).await;
    let at = |time: &str| format!(r#"{{"input": {{"context": {{"time": "{time}"}}}}}}"#);
    for _ in 0..2 {
        let (status, body) = node
            .post("/v1/data/t/allow", at("2026-12-02T09:59:59Z"))
            .await;
        assert_eq!((status, &body["result"]), (200, &json!(true)), "{body}");
    }
    let (status, body) = node
        .post("/v1/data/t/allow", at("2026-12-02T10:00:00Z"))
        .await;
    assert_eq!((status, &body["result"]), (200, &json!(false)), "{body}");
    let text = node.text("/metrics").await;
    assert!(text.contains("msgnode_pdp_cache_hits_total 1"), "{text}");
    node.stop().await;
}

/// A reload opens every file of the bundle (and the gate runs its tests, which read them):
/// those reads are no change, so an idle node reloads nothing — it did, again and again.
#[tokio::test]
async fn an_idle_node_does_not_reload_its_own_reads() {
    let test = "package t_test\ntest_alice if data.t.allow with input as {\"user\": \"alice\"}\n";
    let node = Node::start(
        &[("policies/t.rego", POLICY), ("policies/t_test.rego", test)],
        |_| {},
    )
    .await;
    let reloads = || async {
        let text = node.text("/metrics").await;
        text.lines()
            .find(|l| l.starts_with("msgnode_pdp_bundle_reloads_total{result=\"ok\"}"))
            .map(str::to_string)
    };
    // One real change: one reload, whose own reads of the files must not start another.
    let before = reloads().await;
    write(
        &node.dir.path().join("policies/t.rego"),
        &format!("{POLICY}# edited\n"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while reloads().await == before && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = reloads().await;
    assert_ne!(after, before, "the edit is reloaded");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(reloads().await, after, "no reload without a change");
    node.stop().await;
}

#[tokio::test]
async fn policy_edits_apply_without_restart_and_broken_edits_change_nothing_but_health() {
    let node = Node::start(&[("policies/t.rego", POLICY)], |_| {}).await;
    let decide = |user: &'static str| {
        let node = &node;
        async move {
            node.post(
                "/v1/data/t/allow",
                format!(r#"{{"input": {{"user": "{user}"}}}}"#),
            )
            .await
            .1["result"]
                .clone()
        }
    };
    assert_eq!(decide("carol").await, json!(false));
    let (_, health) = node.get("/health").await;
    let first_revision = health["revision"].clone();

    node.policy("t.rego", &POLICY.replace("\"alice\"", "\"carol\""));
    let took = eventually(|| async { decide("carol").await == json!(true) }).await;
    eprintln!("policy edit applied after {took:?}");
    assert_eq!(
        decide("alice").await,
        json!(false),
        "no half-applied bundle"
    );

    node.policy("t.rego", "package t\nallow if {\n");
    eventually(|| async { node.get("/health").await.1["last_load_ok"] == json!(false) }).await;
    let (status, health) = node.get("/health").await;
    assert_eq!(status, 200, "the previous revision still serves");
    assert!(
        health["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("t.rego:"),
        "{health}"
    );
    assert_ne!(health["revision"], first_revision);
    assert_eq!(
        decide("carol").await,
        json!(true),
        "decisions unchanged by the broken edit"
    );
    let metrics = node.text("/metrics").await;
    assert!(
        metrics.contains("msgnode_pdp_bundle_reloads_total{result=\"failed\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("msgnode_pdp_bundle_last_reload_ok 0"),
        "{metrics}"
    );

    node.policy("t.rego", POLICY);
    eventually(|| async { node.get("/health").await.1["last_load_ok"] == json!(true) }).await;
    assert_eq!(decide("alice").await, json!(true));
    node.stop().await;
}

#[tokio::test]
async fn missing_policy_dir_is_unhealthy_until_it_appears() {
    let node = Node::start(&[], |_| {}).await;
    let (status, health) = node.get("/health").await;
    assert_eq!(status, 503);
    assert!(
        health["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("does not exist"),
        "{health}"
    );
    let (status, body) = node.post("/v1/data/t/allow", r#"{"input": {}}"#).await;
    assert_eq!(status, 503);
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("no policy bundle loaded"),
        "{body}"
    );
    node.policy("t.rego", POLICY);
    eventually(|| async { node.get("/health").await.0 == 200 }).await;
    let (status, body) = node
        .post("/v1/data/t/allow", r#"{"input": {"user": "alice"}}"#)
        .await;
    assert_eq!((status, &body["result"]), (200, &json!(true)));
    node.stop().await;
}

#[tokio::test]
async fn clients_over_their_rate_limit_are_told_when_to_retry() {
    let node = Node::start(
        &[(
            "policies/t.rego",
            "package t\ndecision := {\"allow\": true}\n",
        )],
        |config| config.pdp.rate_limit = msgnode::config::RateLimit::new(1, 3),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(node.post("/v1/data/t/decision", "{}").await.0, 200);
    }
    let response = node
        .http
        .post(format!("{}/v1/data/t/decision", node.base))
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 429);
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["code"], "too_many_requests", "{body}");
    node.stop().await;
}

#[tokio::test]
async fn a_revision_whose_tests_fail_never_serves_and_health_names_the_tests() {
    const TEST: &str =
        "package t_test\ntest_alice_allowed if data.t.allow with input as {\"user\": \"alice\"}\n";
    let node = Node::start(
        &[("policies/t.rego", POLICY), ("policies/t_test.rego", TEST)],
        |_| {},
    )
    .await;
    let (_, health) = node.get("/health").await;
    let first = health["revision"].clone();
    assert!(first.is_string(), "{health}");

    // A data-only edit that breaks the bundle's test, as in the issue: refused.
    node.policy("t.rego", &POLICY.replace("\"alice\"", "\"mallory\""));
    eventually(|| async { node.get("/health").await.1["last_load_ok"] == json!(false) }).await;
    let (status, health) = node.get("/health").await;
    assert_eq!(status, 200, "the previous revision still serves: {health}");
    assert_eq!(health["revision"], first, "{health}");
    assert_eq!(
        health["failing_tests"],
        json!(["data.t_test.test_alice_allowed"]),
        "{health}"
    );
    let (_, body) = node
        .post("/v1/data/t/allow", r#"{"input": {"user": "alice"}}"#)
        .await;
    assert_eq!(body["result"], json!(true), "decided by the old revision");
    let metrics = node.text("/metrics").await;
    assert!(
        metrics
            .contains("msgnode_pdp_bundle_failing_test{test=\"data.t_test.test_alice_allowed\"} 1"),
        "{metrics}"
    );

    // The fix passes the gate: the new revision serves and the failures are gone.
    node.policy("t_test.rego", &TEST.replace("\"alice\"", "\"mallory\""));
    eventually(|| async { node.get("/health").await.1["last_load_ok"] == json!(true) }).await;
    let (_, health) = node.get("/health").await;
    assert_ne!(health["revision"], first);
    assert!(health.get("failing_tests").is_none(), "{health}");
    let (_, body) = node
        .post("/v1/data/t/allow", r#"{"input": {"user": "mallory"}}"#)
        .await;
    assert_eq!(body["result"], json!(true));
    let (status, status_body) = node.get("/v1/status").await;
    assert_eq!(status, 200);
    assert_eq!(
        status_body["result"]["bundles"]["policies"]["active_revision"], health["revision"],
        "{status_body}"
    );
    node.stop().await;
}

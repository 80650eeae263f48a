//! The console over loopback HTTP: the token, cross-origin refusal, masking in the tail (the
//! list and the live stream), read-only mode, the playground and the shadow's differences.

mod common;

use std::time::Duration;

use common::console::{ConsoleNode, TOKEN, WRITE_TOKEN};
use common::eventually;
use reqwest::Method;
use serde_json::{json, Value};

const SECRET: &str = "secret-lunch-4711";

/// A message the shipped policies allow, carrying a secret in a masked field.
fn with_secret(input: &mut Value) {
    input["message"]["body"]["value"]["name"] = json!(SECRET);
}

#[tokio::test]
async fn the_console_needs_the_token_as_bearer_or_basic_password() {
    let node = ConsoleNode::start(false, None).await;
    let url = format!("{}/console", node.base);
    let anonymous = node.http.get(&url).send().await.expect("send");
    assert_eq!(anonymous.status(), 401);
    let challenge = anonymous.headers()["www-authenticate"]
        .to_str()
        .expect("ascii");
    assert!(challenge.starts_with("Basic realm="), "{challenge}");
    let wrong = node
        .http
        .get(&url)
        .bearer_auth("nope")
        .send()
        .await
        .expect("send");
    assert_eq!(wrong.status(), 401);
    for path in [
        "/console/api/recent",
        "/console/api/events",
        "/console/api/status",
        "/console/app.js",
    ] {
        let response = node
            .http
            .get(format!("{}{path}", node.base))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 401, "{path}");
    }
    let page = node
        .request(Method::GET, "/console")
        .send()
        .await
        .expect("send");
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(
        csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(page.text().await.expect("html").contains("msgnode console"));
    let basic = node
        .http
        .get(&url)
        .basic_auth("security", Some(TOKEN))
        .send()
        .await
        .expect("send");
    assert_eq!(
        basic.status(),
        200,
        "a browser logs in with the token as password"
    );
    node.stop().await;
}

#[tokio::test]
async fn the_console_is_off_unless_enabled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = common::bus_config(&common::shipped_policies());
    config.bus.enabled = false;
    config.pdp.decision_log.output = dir.path().join("d.jsonl").display().to_string();
    let running = msgnode::cmd::run::start(config).await.expect("start");
    let response = reqwest::get(format!("http://{}/console", running.pdp_addr))
        .await
        .expect("send");
    assert_eq!(response.status(), 404);
    running.stop().await;
}

#[tokio::test]
async fn cross_origin_requests_are_refused_and_no_cors_is_granted() {
    let node = ConsoleNode::start(true, None).await;
    let attacks = [
        ("origin", "http://evil.example"),
        ("origin", "null"),
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-site", "same-site"),
    ];
    for (header, value) in attacks {
        for (method, path) in [
            (Method::GET, "/console/api/recent"),
            (Method::GET, "/console/api/events"),
            (Method::POST, "/console/api/playground"),
            (Method::DELETE, "/console/api/shadow"),
        ] {
            let response = node
                .request(method.clone(), path)
                .header(header, value)
                .header("content-type", "application/json")
                .body(r#"{"input": {}}"#)
                .send()
                .await
                .expect("send");
            assert_eq!(
                response.status(),
                403,
                "{method} {path} with {header}: {value}"
            );
            assert!(response
                .headers()
                .get("access-control-allow-origin")
                .is_none());
        }
    }
    // A preflight gets no CORS grant either.
    let preflight = node
        .http
        .request(
            Method::OPTIONS,
            format!("{}/console/api/playground", node.base),
        )
        .header("origin", "http://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("send");
    assert!(preflight
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    let same = node
        .request(Method::GET, "/console/api/status")
        .header("origin", node.base.as_str())
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .expect("send");
    assert_eq!(same.status(), 200);
    node.stop().await;
}

#[tokio::test]
async fn a_masked_field_never_reaches_the_tail() {
    let node = ConsoleNode::start(false, None).await;
    // A live stream open before the decision, read as the page reads it.
    let mut stream = node
        .request(Method::GET, "/console/api/events?kind=message")
        .send()
        .await
        .expect("send");
    assert_eq!(stream.status(), 200);
    assert!(stream.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("text/event-stream"));
    let id = node
        .decide_fixture("message_allow_hyperty_create", with_secret)
        .await;
    let mut seen = String::new();
    while !seen.contains(&id) {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.chunk())
            .await
            .expect("an event within 10 s")
            .expect("read")
            .expect("open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("event: decision"), "{seen}");
    assert!(
        !seen.contains(SECRET),
        "the stream carried the masked value: {seen}"
    );
    assert!(
        seen.contains("/input/message/body/value"),
        "the mask is said: {seen}"
    );
    let (status, recent) = node.get("/console/api/recent").await;
    assert_eq!(status, 200);
    let text = recent.to_string();
    assert!(text.contains(&id) && !text.contains(SECRET), "{text}");
    // The playground replays the decision as logged: masked there too.
    let response = node
        .request(Method::POST, "/console/api/playground")
        .json(&json!({"decision_id": id}))
        .send()
        .await
        .expect("send");
    let body: Value = response.json().await.expect("json");
    assert!(!body.to_string().contains(SECRET), "{body}");
    assert_eq!(body["masked"], json!(["/input/message/body/value"]));
    // The decision log itself is masked the same way (one mask for every output).
    let log = node.dir.path().join("decisions.jsonl");
    eventually(
        "the decision is in the log",
        Duration::from_secs(10),
        || {
            let log = log.clone();
            let id = id.clone();
            async move { std::fs::read_to_string(&log).is_ok_and(|t| t.contains(&id)) }
        },
    )
    .await;
    assert!(!std::fs::read_to_string(&log).expect("log").contains(SECRET));
    node.stop().await;
}

#[tokio::test]
async fn read_only_consoles_refuse_writes() {
    let node = ConsoleNode::start(false, Some(|data| drop_type(data, "create"))).await;
    let (_, status) = node.get("/console/api/status").await;
    assert_eq!(status["write"], false);
    let revision = status["shadow"]["revision"].clone();
    assert!(revision.is_string(), "{status}");
    for method in [Method::PUT, Method::DELETE] {
        let response = node
            .request(method.clone(), "/console/api/shadow")
            .body(vec![0u8; 16])
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 403, "{method}");
        let body: Value = response.json().await.expect("json");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("read-only")),
            "{body}"
        );
    }
    let (_, after) = node.get("/console/api/status").await;
    assert_eq!(after["shadow"]["revision"], revision, "nothing changed");
    node.stop().await;
}

fn drop_type(data: &mut Value, kind: &str) {
    if let Some(types) = data["message"]["allowed_types"].as_array_mut() {
        types.retain(|t| t != kind);
    }
}

#[tokio::test]
async fn the_playground_and_the_shadow_show_both_sides() {
    let node = ConsoleNode::start(true, Some(|data| drop_type(data, "create"))).await;
    // A fixture the active bundle denies, with its reason; the candidate denies it too.
    let (_, fixtures) = node.get("/console/api/fixtures").await;
    let fixture = fixtures
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|f| f["path"].as_str())
        .find(|p| p.ends_with("message_deny_blocked_user.json"))
        .expect("the fixture is listed")
        .to_string();
    let response = node
        .request(Method::POST, "/console/api/playground")
        .json(&json!({ "fixture": fixture }))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["active"]["allow"], false, "{body}");
    assert!(
        body["active"]["reasons"][0]
            .as_str()
            .is_some_and(|r| r.contains("blocked")),
        "{body}"
    );
    assert_eq!(body["candidate"]["allow"], false, "{body}");
    // A live `create` the active bundle allows and the candidate would deny: a difference.
    let id = node
        .decide_fixture("message_allow_hyperty_create", |_| {})
        .await;
    let status = node.shadow_difference(&id).await;
    let group = &status["shadow"]["groups"][0][0];
    assert_eq!(
        (
            group["from"].as_str(),
            group["to"].as_str(),
            group["kind"].as_str()
        ),
        (Some("allow"), Some("deny"), Some("message"))
    );
    let metrics = node
        .request(Method::GET, "/metrics")
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains(r#"msgnode_pdp_shadow_differences_total{from="allow",to="deny"} 1"#),
        "{metrics}"
    );
    // Write mode: [pdp] token alone may not write; the write token unloads the candidate,
    // and the playground then has one side.
    let refused = node
        .request(Method::DELETE, "/console/api/shadow")
        .send()
        .await
        .expect("send");
    assert_eq!(refused.status(), 403);
    let unloaded = node
        .write(Method::DELETE, "/console/api/shadow")
        .send()
        .await
        .expect("send");
    assert_eq!(unloaded.status(), 200);
    let response = node
        .request(Method::POST, "/console/api/playground")
        .json(&json!({ "input": common::console::fixture_input("message_allow_hyperty_create") }))
        .send()
        .await
        .expect("send");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["active"]["allow"], true, "{body}");
    assert!(body["candidate"].is_null(), "{body}");
    // Playground questions are not decisions: the tail holds only the live one.
    let (_, recent) = node.get("/console/api/recent").await;
    assert_eq!(recent.as_array().map(Vec::len), Some(1), "{recent}");
    // Counts and coverage of the active revision.
    let (_, counts) = node.get("/console/api/counts").await;
    assert!(counts.to_string().contains("message/allow"), "{counts}");
    let (status, coverage) = node.get("/console/api/coverage").await;
    assert_eq!(status, 200, "{coverage}");
    let file = &coverage["files"][0];
    assert!(
        file["covered"].as_array().is_some_and(|c| !c.is_empty()),
        "{file}"
    );
    assert!(file["source"].is_string(), "{file}");
    node.stop().await;
}

/// A tarball of one module, `candidate.rego`.
fn tarball(rego: &str) -> Vec<u8> {
    let file = msgnode::pdp::bundle::BundleFile {
        id: "candidate.rego".into(),
        shown: "candidate.rego".into(),
        bytes: rego.as_bytes().to_vec(),
    };
    msgnode::pdp::bundle::tarball::write(&[file]).expect("tarball")
}

/// Finding 1 of the console review: a candidate uploaded in write mode that quotes its whole
/// input (`decision := {"x": input}`) to read live secrets. The API token alone cannot load
/// it; loaded with the write token, it decides the input as the log has it (masked, cut), so
/// the differences it makes carry no secret, and its words are cut.
#[tokio::test]
async fn an_uploaded_candidate_cannot_read_what_the_log_masks() {
    let node = ConsoleNode::start(true, None).await;
    let exfiltrate = tarball("package msgnode.authz\n\ndecision := {\"x\": input}\n");
    let with_api_token = node
        .request(Method::PUT, "/console/api/shadow")
        .body(exfiltrate.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(
        with_api_token.status(),
        403,
        "a PEP's token cannot load candidates"
    );
    let loaded = node
        .write(Method::PUT, "/console/api/shadow")
        .body(exfiltrate)
        .send()
        .await
        .expect("send");
    assert_eq!(
        loaded.status(),
        200,
        "{}",
        loaded.text().await.unwrap_or_default()
    );
    let id = node
        .decide_fixture("message_allow_hyperty_create", |input| {
            with_secret(input);
            input["message"]["body"]["idToken"] = json!(SECRET);
            input["message"]["body"]["padding"] = json!("p".repeat(200_000));
        })
        .await;
    let status = node.shadow_difference(&id).await;
    let text = status.to_string();
    assert!(
        !text.contains(SECRET),
        "the candidate read a masked field: {text}"
    );
    assert!(text.contains("**REDACTED**"), "it saw the mask: {text}");
    assert!(
        text.len() < 16 * 1024,
        "its words are cut: {} bytes",
        text.len()
    );
    node.stop().await;
}

/// Finding 3 of the console review: DNS rebinding. The attacker's page is same-origin with
/// itself (`Origin` and `Host` both name its host): refused, even with the token.
#[tokio::test]
async fn a_rebound_host_name_is_refused() {
    let node = ConsoleNode::start(false, None).await;
    let port = node.running.pdp_addr.port();
    let evil = format!("evil.example:{port}");
    for path in ["/console", "/console/api/recent", "/console/api/events"] {
        let response = node
            .request(Method::GET, path)
            .header("host", evil.as_str())
            .header("origin", format!("http://{evil}"))
            .header("sec-fetch-site", "same-origin")
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 403, "{path}");
    }
    let own = node
        .request(Method::GET, "/console/api/status")
        .header("host", format!("localhost:{port}"))
        .send()
        .await
        .expect("send");
    assert_eq!(own.status(), 200);
    node.stop().await;
}

/// Finding 3, the other half: a console that DNS rebinding or a PEP's token could write
/// through, or that anyone on the network could read, does not start.
#[tokio::test]
async fn an_unguarded_console_does_not_start() {
    let base = || {
        let mut config = common::bus_config(&common::shipped_policies());
        config.bus.enabled = false;
        config.pdp.decision_log.enabled = false;
        config.console.enabled = true;
        config
    };
    let mut write_without_token = base();
    write_without_token.console.write = true;
    write_without_token.console.write_token = Some(WRITE_TOKEN.into());
    let mut write_with_api_token_only = base();
    write_with_api_token_only.pdp.token = Some(TOKEN.into());
    write_with_api_token_only.console.write = true;
    let mut open_to_the_network = base();
    open_to_the_network.pdp.listen = "0.0.0.0:0".parse().expect("addr");
    for (config, expected) in [
        (write_without_token, "[console] write needs [pdp] token"),
        (write_with_api_token_only, "needs [console] write_token"),
        (open_to_the_network, "needs [pdp] token"),
    ] {
        let error = match msgnode::cmd::run::start(config).await {
            Ok(running) => {
                running.stop().await;
                panic!("started: {expected}");
            }
            Err(error) => format!("{error:#}"),
        };
        assert!(error.contains(expected), "{error}");
    }
}

/// Finding 9 of the console review: tails are capped per client and end after
/// `tail_lifetime` (the page's EventSource reconnects), so held connections cannot lock the
/// security team out.
#[tokio::test]
async fn tails_are_capped_per_client_and_end() {
    let node = ConsoleNode::start_with(false, None, |config| {
        config.console.max_subscribers_per_client = 1;
        config.console.tail_lifetime = Duration::from_secs(1);
    })
    .await;
    let mut first = node
        .request(Method::GET, "/console/api/events")
        .send()
        .await
        .expect("send");
    assert_eq!(first.status(), 200);
    let second = node
        .request(Method::GET, "/console/api/events")
        .send()
        .await
        .expect("send");
    assert_eq!(second.status(), 503, "one tail per client here");
    // The first ends by itself, and its place is free again.
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(_)) = first.chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "the tail did not end");
    eventually(
        "the place is free again",
        Duration::from_secs(10),
        || async {
            node.request(Method::GET, "/console/api/events")
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        },
    )
    .await;
    node.stop().await;
}

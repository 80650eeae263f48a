//! The Matrix proxy in front of a real Synapse on loopback (one Synapse for this test binary,
//! installed and started by `scripts/synapse`): allowed traffic reaches other users, denied
//! traffic is refused with its reason and never reaches the homeserver, every spelling of a
//! path gets the same decision, policy edits apply without restart, and a PDP that cannot
//! decide fails closed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod common;

use common::matrix::Client;
use common::metric;

use common::synapse::{copy_dir, Synapse};

use msgnode::cmd::run::{start, Running};
use msgnode::config::{Config, PdpFailure};
use serde_json::{json, Value};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The status code of a sent request.
async fn status_of(
    request: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
) -> u16 {
    request.await.expect("send").status().as_u16()
}

/// A node with the proxy on the port Synapse pushes to, serving the appservice API too.
async fn appservice_node(synapse: &Synapse, policies: PathBuf) -> Running {
    let mut config = node_config(synapse, policies, PdpFailure::Forbidden);
    config.pep.listen = format!("127.0.0.1:{}", synapse.as_port)
        .parse()
        .expect("addr");
    config.pep.registration = Some(synapse.registration());
    start(config).await.expect("start msgnode")
}

async fn node(synapse: &Synapse, policies: PathBuf, on_failure: PdpFailure) -> Running {
    start(node_config(synapse, policies, on_failure))
        .await
        .expect("start msgnode")
}

fn node_config(synapse: &Synapse, policies: PathBuf, on_failure: PdpFailure) -> Config {
    let mut config = Config::default();
    config.pdp.listen = "127.0.0.1:0".parse().expect("addr");
    config.pdp.policies = policies;
    config.pdp.schema_dir = Path::new(REPO).join("schemas");
    config.pdp.decision_log.enabled = false;
    config.pdp.reload_debounce = Duration::from_millis(50);
    config.pep.enabled = true;
    config.pep.listen = "127.0.0.1:0".parse().expect("addr");
    config.pep.homeserver = synapse.url();
    config.pep.on_pdp_failure = on_failure;
    config
}

fn assert_forbidden(answer: &(u16, Value), reason: &str, what: &str) {
    assert_eq!(answer.0, 403, "{what}: {}", answer.1);
    assert_eq!(
        answer.1["errcode"],
        json!("M_FORBIDDEN"),
        "{what}: {}",
        answer.1
    );
    let error = answer.1["error"].as_str().unwrap_or("");
    assert!(
        error.contains(reason),
        "{what}: {error:?} should contain {reason:?}"
    );
}

async fn eventually<F, Fut>(what: &str, done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    common::eventually(what, Duration::from_secs(30), done).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_enforces_policy_in_front_of_synapse() {
    let synapse = Synapse::start();
    let policies = tempfile::tempdir().expect("tempdir");
    copy_dir(&Path::new(REPO).join("policies"), policies.path());
    let running = appservice_node(&synapse, policies.path().to_path_buf()).await;
    let base = format!("http://{}", running.pep_addr.expect("proxy address"));
    let http = reqwest::Client::new();
    let as_user = |token: String| Client {
        http: http.clone(),
        base: base.clone(),
        token,
    };
    let alice = as_user(synapse.register("alice"));
    let bob = as_user(synapse.register("bob"));
    let mallory = as_user(synapse.register("mallory"));

    // A real client library (matrix-nio) logs in, creates a room, chats and syncs through
    // the proxy; the forbidden send comes back as a Matrix error with the reason.
    synapse.register("nio");
    let clients = Command::new(Path::new(REPO).join("scripts/synapse"))
        .arg("clients")
        .output()
        .expect("scripts/synapse clients");
    assert!(
        clients.status.success(),
        "{}",
        String::from_utf8_lossy(&clients.stderr)
    );
    let nio = Command::new(Path::new(REPO).join(".state/clients-venv/bin/python"))
        .arg(Path::new(REPO).join("tests/clients/nio_chat.py"))
        .args([&base, "nio", "secret-password"])
        .output()
        .expect("run matrix-nio client");
    let stdout = String::from_utf8_lossy(&nio.stdout);
    assert!(
        nio.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&nio.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim()).expect("client report");
    for key in [
        "login",
        "room_created",
        "allowed_send",
        "denied_send_is_error",
    ] {
        assert_eq!(report[key], json!(true), "{key}: {report}");
    }
    assert_eq!(report["denied_status"], json!("M_FORBIDDEN"), "{report}");
    assert!(
        report["denied_message"]
            .as_str()
            .unwrap_or("")
            .contains("com.example.nio-secret"),
        "{report}"
    );
    assert!(
        report["synced_bodies"]
            .as_array()
            .is_some_and(|b| b.contains(&json!("hello from nio"))),
        "{report}"
    );

    // Pass-through: the login flows come from Synapse unchanged.
    let (status, flows) = alice.get("/_matrix/client/v3/login").await;
    assert_eq!(status, 200);
    assert!(
        flows["flows"].as_array().is_some_and(|f| !f.is_empty()),
        "{flows}"
    );

    // Allowed: create a room, invite and join, send; the other user sees it in /sync.
    let (status, created) = alice
        .post(
            "/_matrix/client/v3/createRoom",
            json!({"preset": "private_chat"}),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let room = created["room_id"].as_str().expect("room_id").to_string();
    let (status, body) = alice
        .post(
            &format!("/_matrix/client/v3/rooms/{room}/invite"),
            json!({"user_id": "@bob:localhost"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = bob
        .post(&format!("/_matrix/client/v3/join/{room}"), json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = alice
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t1"),
            json!({"msgtype": "m.text", "body": "hello bob"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    eventually("bob sees the message", || async {
        let (_, sync) = bob.get("/_matrix/client/v3/sync?timeout=0").await;
        sync["rooms"]["join"][&room]["timeline"]["events"]
            .as_array()
            .is_some_and(|events| {
                events
                    .iter()
                    .any(|e| e["content"]["body"] == json!("hello bob"))
            })
    })
    .await;

    // Denied: an event type the room does not allow, in every spelling of the path.
    let encoded_room = room.replace('!', "%21").replace(':', "%3A");
    for path in [
        format!("/_matrix/client/v3/rooms/{room}/send/com.example.secret/d1"),
        format!("/_matrix/client/r0/rooms/{room}/send/com.example.secret/d2"),
        format!("/_matrix/client/unstable/rooms/{room}/send/com.example.secret/d3"),
        format!("/_matrix/client/v3/rooms/{encoded_room}/send/com.example.secret/d4"),
        format!("/_matrix/client/v3/rooms/{room}/send/com%2Eexample%2Esecret/d5"),
        format!("/_matrix/client/v3/rooms/{room}//send/com.example.secret/d6/"),
        format!("//_matrix/client/v3/rooms/{room}/send/com.example.secret/d7"),
    ] {
        let answer = alice.put(&path, json!({"body": "leak"})).await;
        assert_forbidden(
            &answer,
            "event type 'com.example.secret' is not allowed",
            &path,
        );
    }
    // Synapse's other forms of the same endpoints: POST without a txnId, the api/v1 prefix.
    for path in [
        format!("/_matrix/client/v3/rooms/{room}/send/com.example.secret"),
        format!("/_matrix/client/api/v1/rooms/{room}/send/com.example.secret"),
    ] {
        let answer = alice.post(&path, json!({"body": "leak"})).await;
        assert_forbidden(
            &answer,
            "event type 'com.example.secret' is not allowed",
            &path,
        );
    }
    let answer = alice
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/invite/txn-1"),
            json!({"user_id": "@eve:evil.example"}),
        )
        .await;
    assert_forbidden(&answer, "invitee domain", "PUT invite with a txnId");
    let answer = alice
        .post(
            &format!("/_matrix/client/v3/rooms/{room}/upgrade"),
            json!({"new_version": "10"}),
        )
        .await;
    assert_forbidden(&answer, "not supported through msgnode", "room upgrade");
    // Review findings, as regressions: an empty txnId is a txnId; a blocked user cannot create
    // even a bare room; a non-object body is refused, not a crash; no admin API.
    let answer = alice
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/send/com.example.secret/"),
            json!({"body": "leak"}),
        )
        .await;
    assert_forbidden(
        &answer,
        "event type 'com.example.secret' is not allowed",
        "empty txnId",
    );
    let answer = mallory
        .post("/_matrix/client/v3/createRoom", json!({}))
        .await;
    assert_forbidden(&answer, "is blocked", "a blocked user's bare createRoom");
    let (status, body) = alice
        .call(
            reqwest::Method::PUT,
            &format!("/_matrix/client/v3/rooms/{room}/redact/$x/t"),
            Some(json!([])),
        )
        .await;
    assert_eq!(
        (status, &body["errcode"]),
        (400, &json!("M_NOT_JSON")),
        "{body}"
    );
    let answer = mallory
        .put(
            "/_matrix/client/v3/profile/@mallory:localhost/displayname",
            json!({"displayname": "Not Mallory"}),
        )
        .await;
    assert_forbidden(&answer, "is blocked", "a blocked user's profile change");
    let (status, body) = alice
        .put(
            "/_matrix/client/v3/profile/@alice:localhost/displayname",
            json!({"displayname": "Alice"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = alice.get("/_synapse/admin/v1/server_version").await;
    assert_eq!(status, 403);
    // A second token (behind `Connection: authorization` and in the query) cannot make the
    // homeserver act as someone other than the user the policy decided for.
    let response = http
        .put(format!(
            "{base}/_matrix/client/v3/rooms/{room}/send/m.room.message/two-tokens?access_token={}",
            mallory.token
        ))
        .bearer_auth(&alice.token)
        .header("connection", "authorization")
        .json(&json!({"msgtype": "m.text", "body": "who sent this?"}))
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    let sent: Value = response.json().await.unwrap_or(Value::Null);
    if status == 200 {
        let event_id = sent["event_id"].as_str().expect("event_id");
        let (_, event) = alice
            .get(&format!("/_matrix/client/v3/rooms/{room}/event/{event_id}"))
            .await;
        assert_eq!(
            event["sender"],
            json!("@alice:localhost"),
            "executed as another user: {event}"
        );
    } else {
        assert!(status >= 400, "{status} {sent}");
    }
    let (_, messages) = alice
        .get(&format!(
            "/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=100"
        ))
        .await;
    let chunk = messages["chunk"].as_array().expect("chunk");
    assert!(
        chunk
            .iter()
            .all(|e| e["type"] != json!("com.example.secret")),
        "a denied event reached the room"
    );
    assert!(chunk
        .iter()
        .any(|e| e["content"]["body"] == json!("hello bob")));

    // Denied: createRoom with a forbidden initial_state, an invite to an untrusted domain, a
    // blocked user's join.
    let answer = alice
        .post(
            "/_matrix/client/v3/createRoom",
            json!({"initial_state": [{"type": "m.room.server_acl", "state_key": "", "content": {"allow": ["*"]}}]}),
        )
        .await;
    assert_forbidden(
        &answer,
        "event type 'm.room.server_acl' is not allowed",
        "createRoom initial_state",
    );
    let answer = alice
        .post(
            &format!("/_matrix/client/v3/rooms/{room}/invite"),
            json!({"user_id": "@eve:evil.example"}),
        )
        .await;
    assert_forbidden(
        &answer,
        "invitee domain of '@eve:evil.example' is not trusted",
        "invite",
    );
    let (status, _) = alice
        .post(
            &format!("/_matrix/client/v3/rooms/{room}/invite"),
            json!({"user_id": "@mallory:localhost"}),
        )
        .await;
    assert_eq!(status, 403, "inviting a blocked user");
    let answer = mallory
        .post(&format!("/_matrix/client/v3/join/{room}"), json!({}))
        .await;
    assert_forbidden(&answer, "is blocked", "blocked user's join");
    let answer = mallory
        .put(&format!("/_matrix/client/v3/join/{room}/txn-1"), json!({}))
        .await;
    assert_forbidden(
        &answer,
        "is blocked",
        "blocked user's join, PUT with a txnId",
    );
    let answer = mallory
        .post(&format!("/_matrix/client/v3/rooms/{room}/join"), json!({}))
        .await;
    assert_forbidden(
        &answer,
        "is blocked",
        "blocked user's join via /rooms/…/join",
    );

    // Tokens: none → 401 from the proxy; a wrong one → the homeserver's own 401.
    let anonymous = as_user(String::new());
    let (status, body) = anonymous
        .http
        .put(format!(
            "{base}/_matrix/client/v3/rooms/{room}/send/m.room.message/x"
        ))
        .json(&json!({}))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map(|s| (s, ()))
        .expect("send");
    assert_eq!(status, 401, "{body:?}");
    let wrong = as_user("syt_wrong".to_string());
    let (status, body) = wrong
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/x"),
            json!({}),
        )
        .await;
    assert_eq!((status, &body["errcode"]), (401, &json!("M_UNKNOWN_TOKEN")));

    // A policy edit applies without restart.
    let data_file = policies.path().join("config/data.json");
    let mut data: Value =
        serde_json::from_str(&std::fs::read_to_string(&data_file).expect("read")).expect("json");
    data["matrix"]["event_types"]["default"]
        .as_array_mut()
        .expect("list")
        .push(json!("com.example.secret"));
    std::fs::write(&data_file, serde_json::to_vec_pretty(&data).expect("json")).expect("write");
    let mut attempt = 0;
    eventually("the edited policy allows the event type", || {
        attempt += 1;
        let path =
            format!("/_matrix/client/v3/rooms/{room}/send/com.example.secret/after-edit-{attempt}");
        let alice = &alice;
        async move { alice.put(&path, json!({"body": "now allowed"})).await.0 == 200 }
    })
    .await;

    // Fail closed: a node whose PDP has no bundle forwards nothing.
    for (failure, status, errcode) in [
        (PdpFailure::Forbidden, 403, "M_FORBIDDEN"),
        (PdpFailure::Unavailable, 503, "M_UNKNOWN"),
    ] {
        let broken = node(&synapse, policies.path().join("does-not-exist"), failure).await;
        let client = Client {
            http: http.clone(),
            base: format!("http://{}", broken.pep_addr.expect("proxy")),
            token: alice.token.clone(),
        };
        let (got, body) = client
            .put(
                &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/fc-{status}"),
                json!({"body": "x"}),
            )
            .await;
        assert_eq!((got, &body["errcode"]), (status, &json!(errcode)), "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap_or("")
                .starts_with("policy unavailable"),
            "{body}"
        );
        broken.stop().await;
    }

    // The appservice API: hs_token checked, transactions processed once (also across a
    // restart), namespace users created on query, ping.
    let appservice = |path: &str| format!("{base}/_matrix/app/v1/{path}");
    let hs_token = synapse.token("hs_token");
    let query = |path: String| http.get(appservice(&path)).bearer_auth(&hs_token).send();
    assert_eq!(
        status_of(query("users/@_msgnode_watcher:localhost".into())).await,
        200
    );
    assert_eq!(status_of(query("users/@alice:localhost".into())).await, 404);
    assert_eq!(
        status_of(query("rooms/%23nothing:localhost".into())).await,
        404
    );
    let ping = http
        .post(appservice("ping"))
        .bearer_auth(&hs_token)
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(ping.status().as_u16(), 200);

    // Synapse pushes events of rooms a namespace user is in; one sent straight to Synapse
    // (not through the proxy) is decided too.
    let (status, body) = alice
        .post(
            &format!("/_matrix/client/v3/rooms/{room}/invite"),
            json!({"user_id": "@_msgnode_watcher:localhost"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let as_token = synapse.token("as_token");
    let joined = http
        .post(format!(
            "{}/_matrix/client/v3/join/{room}?user_id=@_msgnode_watcher:localhost",
            synapse.url()
        ))
        .bearer_auth(&as_token)
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(joined.status().as_u16(), 200);
    // Give the node's user the power to redact (through the proxy: power levels are allowed).
    let (status, mut levels) = alice
        .get(&format!(
            "/_matrix/client/v3/rooms/{room}/state/m.room.power_levels"
        ))
        .await;
    assert_eq!(status, 200, "{levels}");
    levels["users"]["@_msgnode_watcher:localhost"] = json!(100);
    let (status, body) = alice
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels"),
            levels,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let direct = http
        .put(format!(
            "{}/_matrix/client/v3/rooms/{room}/send/com.example.other/direct-1",
            synapse.url()
        ))
        .bearer_auth(&alice.token)
        .json(&json!({"body": "around the proxy"}))
        .send()
        .await
        .expect("send");
    assert_eq!(direct.status().as_u16(), 200);
    let direct_event: Value = direct.json().await.expect("json");
    let denied = "msgnode_pep_appservice_events_total{outcome=\"denied\"} ";
    let running_ref = &running;
    let http_ref = &http;
    eventually("the pushed event is decided and denied", || async move {
        metric(http_ref, running_ref, denied).await >= 1
    })
    .await;
    let event_id = direct_event["event_id"]
        .as_str()
        .expect("event_id")
        .to_string();
    let alice_ref = &alice;
    let room_ref = &room;
    let event_ref = &event_id;
    eventually(
        "the denied event is redacted with its reason",
        || async move {
            let (_, event) = alice_ref
                .get(&format!(
                    "/_matrix/client/v3/rooms/{room_ref}/event/{event_ref}"
                ))
                .await;
            event["content"] == json!({})
                && event["unsigned"]["redacted_because"]["content"]["reason"]
                    .as_str()
                    .is_some_and(|r| {
                        r.contains(
                            "denied by policy: event type 'com.example.other' is not allowed",
                        )
                    })
        },
    )
    .await;

    let txn = |id: &str, token: Option<&str>| {
        let mut request = http
            .put(appservice(&format!("transactions/{id}")))
            .json(&json!({"events": []}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let first = txn("t-1", None).await.expect("send");
    let status = first.status().as_u16();
    assert_eq!(status, 401, "{}", first.text().await.unwrap_or_default());
    assert_eq!(status_of(txn("t-1", Some("wrong"))).await, 403);
    assert_eq!(status_of(txn("t-1", Some(&hs_token))).await, 200);
    assert_eq!(status_of(txn("t-1", Some(&hs_token))).await, 200);
    let processed = "msgnode_pep_appservice_transactions_total{outcome=\"processed\"} ";
    let duplicate = "msgnode_pep_appservice_transactions_total{outcome=\"duplicate\"} ";
    assert_eq!(
        metric(&http, &running, duplicate).await,
        1,
        "the replay was not processed again"
    );
    let before_restart = metric(&http, &running, processed).await;
    assert!(before_restart >= 1);
    running.stop().await;
    let running = appservice_node(&synapse, policies.path().to_path_buf()).await;
    assert_eq!(status_of(txn("t-1", Some(&hs_token))).await, 200);
    assert_eq!(
        metric(&http, &running, duplicate).await,
        1,
        "replayed after a restart: not processed again"
    );

    running.stop().await;
}

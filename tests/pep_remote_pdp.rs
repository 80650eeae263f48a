//! The Matrix proxy deciding with a remote PDP (`[pep] pdp_url`) in front of a real Synapse:
//! a separately started node serves the PDP API; while it runs, allowed requests reach
//! Synapse and denials carry the policy's reasons; once it is stopped, requests are refused
//! with "policy unavailable" and never reach Synapse.

use std::path::Path;
use std::time::Duration;

mod common;

use common::matrix::Client;
use common::metric;
use common::synapse::Synapse;

use msgnode::cmd::run::{start, Running};
use msgnode::config::Config;
use serde_json::{json, Value};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn base_config() -> Config {
    let mut config = Config::default();
    config.pdp.listen = "127.0.0.1:0".parse().expect("addr");
    config.pdp.schema_dir = Path::new(REPO).join("schemas");
    config.pdp.decision_log.enabled = false;
    config
}

/// A node that only serves the PDP API, with the shipped policies.
async fn pdp_node() -> Running {
    let mut config = base_config();
    config.pdp.policies = Path::new(REPO).join("policies");
    config.pdp.token = Some("pdp-secret".to_string());
    start(config).await.expect("start the PDP node")
}

/// A node whose proxy asks the PDP at `pdp`; its own PDP has no bundle, so any allow can
/// only have come from the remote one.
async fn proxy_node(synapse: &Synapse, pdp: &Running) -> Running {
    let mut config = base_config();
    config.pdp.policies = Path::new(REPO).join("policies/does-not-exist");
    config.pep.enabled = true;
    config.pep.listen = "127.0.0.1:0".parse().expect("addr");
    config.pep.homeserver = synapse.url();
    config.pep.pdp_url = Some(format!("http://{}", pdp.pdp_addr));
    config.pep.pdp_token = Some("pdp-secret".to_string());
    config.pep.pdp_timeout = Duration::from_millis(500);
    start(config).await.expect("start the proxy node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_fails_closed_when_the_remote_pdp_goes_away() {
    let synapse = Synapse::start();
    let pdp = pdp_node().await;
    let node = proxy_node(&synapse, &pdp).await;
    let proxy = format!("http://{}", node.pep_addr.expect("proxy address"));
    let http = reqwest::Client::new();
    let alice = Client {
        http: http.clone(),
        base: proxy.clone(),
        token: synapse.register("alice"),
    };
    let direct = Client {
        http: http.clone(),
        base: synapse.url(),
        token: alice.token.clone(),
    };

    // Decided remotely (schema-checked there too): createRoom, an allowed and a denied send.
    let (status, created) = alice
        .post(
            "/_matrix/client/v3/createRoom",
            json!({"preset": "private_chat", "name": "remote"}),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let room = created["room_id"].as_str().expect("room_id").to_string();
    // Synapse 1.163 creates room version 12 rooms, whose ids have no server part; the
    // proxy's identifier checks (ruma) and the input schema take them.
    assert!(!room.contains(':'), "expected a room version 12 id: {room}");
    let send = |txn: &str| format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}");
    let (status, body) = alice
        .put(
            &send("t1"),
            json!({"msgtype": "m.text", "body": "decided remotely"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = alice
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/send/com.example.secret/t2"),
            json!({"body": "leak"}),
        )
        .await;
    assert_eq!((status, &body["errcode"]), (403, &json!("M_FORBIDDEN")));
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("event type 'com.example.secret' is not allowed")),
        "the remote policy's reasons come through: {body}"
    );

    // The PDP goes away: refused, fail closed, and nothing reaches Synapse.
    pdp.stop().await;
    let (status, body) = alice
        .put(
            &send("t3"),
            json!({"msgtype": "m.text", "body": "after the PDP stopped"}),
        )
        .await;
    assert_eq!(
        (status, &body["errcode"], &body["error"]),
        (403, &json!("M_FORBIDDEN"), &json!("policy unavailable")),
        "{body}"
    );
    // Malformed identifiers are refused before any decision: 400, not "policy unavailable".
    for (method, path, body) in [
        (
            reqwest::Method::PUT,
            "/_matrix/client/v3/rooms/not-a-room/send/m.room.message/t4".to_string(),
            json!({}),
        ),
        (
            reqwest::Method::POST,
            format!("/_matrix/client/v3/rooms/{room}/invite"),
            json!({"user_id": "eve"}),
        ),
        (
            reqwest::Method::POST,
            "/_matrix/client/v3/join/evil.example".to_string(),
            json!({}),
        ),
        (
            reqwest::Method::PUT,
            "/_matrix/client/v3/profile/alice/displayname".to_string(),
            json!({"displayname": "A"}),
        ),
    ] {
        let (status, answer) = alice.call(method, &path, Some(body)).await;
        assert_eq!(
            (status, &answer["errcode"]),
            (400, &json!("M_INVALID_PARAM")),
            "{path}: {answer}"
        );
    }

    let (status, messages) = direct
        .get(&format!(
            "/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=100"
        ))
        .await;
    assert_eq!(status, 200, "{messages}");
    let bodies: Vec<&Value> = messages["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .map(|e| &e["content"]["body"])
        .collect();
    assert!(bodies.contains(&&json!("decided remotely")), "{messages}");
    assert!(
        !bodies.contains(&&json!("after the PDP stopped")),
        "a request nobody decided reached Synapse"
    );

    assert!(
        metric(
            &http,
            &node,
            "msgnode_pep_remote_pdp_decisions_total{outcome=\"allowed\"} "
        )
        .await
            >= 2
    );
    assert_eq!(
        metric(
            &http,
            &node,
            "msgnode_pep_remote_pdp_decisions_total{outcome=\"unreachable\"} "
        )
        .await,
        1,
        "one unreachable decision"
    );
    node.stop().await;
}

//! msgnode as the Matrix policy server (MSC4284) of rooms on a real Synapse: clients that
//! talk to Synapse directly, and a second Synapse federating on loopback, get every event
//! decided by the node's Rego policy before Synapse accepts it.
//!
//! One scenario, in order (two Synapses start once): the node protects a room (its
//! appservice user joins, invites the policy server's user, which joins over federation;
//! `m.room.policy` is written); a direct client's denied event is refused with the policy's
//! reason and absent from `/messages`, an allowed one is delivered carrying the policy
//! signature; a policy edit flips the decision without a restart; the second Synapse's
//! allowed event arrives, its denied member event is soft-failed (and its denied message
//! refused to its own client); with the policy server down, Synapse refuses. Beside it: the
//! sweep protecting the configured rooms (`scripts/run`'s setup), and a room whose admin
//! invites the policy server directly and writes `m.room.policy` without the node's user.

use std::path::Path;
use std::time::Duration;

mod common;

use common::matrix::Client;
use common::synapse::{copy_dir, free_port, Synapse};
use msgnode::cmd::run::{start, Running};
use msgnode::config::Config;
use serde_json::{json, Value};

const WITHIN: Duration = Duration::from_secs(30);

fn node_config(synapse: &Synapse, policies: &Path, state: &Path) -> Config {
    let mut config = Config::default();
    config.pdp.listen = "127.0.0.1:0".parse().expect("addr");
    config.pdp.policies = policies.to_path_buf();
    config.pdp.schema_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    config.pdp.decision_log.enabled = false;
    config.pdp.reload_debounce = Duration::from_millis(50);
    synapse.serve(&mut config);
    let port = free_port();
    let ps = &mut config.policy_server;
    ps.enabled = true;
    ps.listen = format!("127.0.0.1:{port}").parse().expect("addr");
    ps.server_name = format!("localhost:{port}");
    ps.state_dir = state.to_path_buf();
    // Loopback Synapses have self-signed certificates.
    ps.verify_certificates = false;
    // The test protects its room itself.
    ps.rooms = Vec::new();
    config
}

/// Edits the bundle's data: `edit` changes `data.json`'s value.
fn edit_data(policies: &Path, edit: impl FnOnce(&mut Value)) {
    let file = policies.join("config/data.json");
    let mut data: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("json");
    edit(&mut data);
    std::fs::write(&file, serde_json::to_vec_pretty(&data).expect("json")).expect("write");
}

/// Waits until the node serves a revision other than `before`.
async fn new_revision(node: &Running, before: Option<String>) {
    common::eventually("the edited policy is served", WITHIN, || {
        let changed = node.pdp.status().revision != before;
        async move { changed }
    })
    .await;
}

async fn messages(client: &Client, room: &str) -> Vec<Value> {
    let (status, page) = client
        .get(&format!(
            "/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=100"
        ))
        .await;
    assert_eq!(status, 200, "{page}");
    page["chunk"].as_array().cloned().unwrap_or_default()
}

fn has_body(events: &[Value], body: &str) -> bool {
    events.iter().any(|e| e["content"]["body"] == body)
}

async fn send(
    client: &Client,
    room: &str,
    event_type: &str,
    txn: &str,
    body: &str,
) -> (u16, Value) {
    client
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/send/{event_type}/{txn}"),
            json!({"msgtype": "m.text", "body": body}),
        )
        .await
}

/// The local Synapse as `scripts/synapse` sets it up without federation (server name
/// `localhost`, federation on the client port, loopback allowed) and the node as
/// `scripts/run` starts it with `MSGNODE_POLICY_SERVER__ENABLED=true`: a room in
/// `[policy_server] rooms` is protected by the sweep, and Synapse asks before it accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_scripts_setup_protects_the_configured_rooms() {
    let synapse = Synapse::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = node_config(
        &synapse,
        &common::shipped_policies(),
        &dir.path().join("ps"),
    );
    config.policy_server.servers = [("localhost".to_string(), synapse.url())].into();
    config.policy_server.rooms = vec!["*".to_string(), "#lobby:localhost".to_string()];
    config.policy_server.sweep_interval = Duration::from_millis(300);
    let alice = Client {
        http: reqwest::Client::new(),
        base: synapse.url(),
        token: synapse.register("alice"),
    };
    let (status, created) = alice
        .post(
            "/_matrix/client/v3/createRoom",
            json!({"preset": "private_chat", "room_alias_name": "lobby", "invite": ["@_msgnode:localhost"],
                   "power_level_content_override": {"users": {"@_msgnode:localhost": 100}}}),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let room = created["room_id"].as_str().expect("room_id").to_string();
    let node = start(config).await.expect("start node");
    let ps = node.policy_server.clone().expect("policy server");
    common::eventually("the sweep protects #lobby", WITHIN, || {
        let (alice, room) = (&alice, &room);
        async move {
            alice
                .get(&format!(
                    "/_matrix/client/v3/rooms/{room}/state/m.room.policy/"
                ))
                .await
                .0
                == 200
        }
    })
    .await;
    let (_, policy) = alice
        .get(&format!(
            "/_matrix/client/v3/rooms/{room}/state/m.room.policy/"
        ))
        .await;
    assert_eq!(policy, ps.policy_content());
    let (status, refused) = send(&alice, &room, "com.example.secret", "s1", "secret").await;
    assert_eq!(
        (status, refused["errcode"].as_str()),
        (400, Some("M_FORBIDDEN")),
        "{refused}"
    );
    let (status, sent) = send(&alice, &room, "m.room.message", "m1", "hello").await;
    assert_eq!(status, 200, "{sent}");
    // The node's own rooms ("*") are not put under the policy server.
    let bus_like = node_room(&synapse).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    let (status, _) = alice
        .get(&format!(
            "/_matrix/client/v3/rooms/{bus_like}/state/m.room.policy/"
        ))
        .await;
    assert_ne!(
        status, 200,
        "a room the node's own user created stays unprotected"
    );
    node.stop().await;
}

/// A room's admin does it without the node: invites the policy server's user directly (the
/// node's appservice user is never in the room, and the room is in no `[policy_server]
/// rooms`), the sweep has it join over federation, the admin writes `m.room.policy` with the
/// key from `/.well-known/matrix/policy_server` (README, "A room's admins can also do it
/// themselves"), and from then on Synapse asks the node about the room's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_whose_admin_invites_the_policy_server_directly_is_decided() {
    let synapse = Synapse::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = node_config(
        &synapse,
        &common::shipped_policies(),
        &dir.path().join("ps"),
    );
    config.policy_server.servers = [("localhost".to_string(), synapse.url())].into();
    config.policy_server.sweep_interval = Duration::from_millis(300);
    let via = config.policy_server.server_name.clone();
    let listen = config.policy_server.listen;
    let node = start(config).await.expect("start node");
    let ps = node.policy_server.clone().expect("policy server");
    let admin = Client {
        http: reqwest::Client::new(),
        base: synapse.url(),
        token: synapse.register("roomadmin"),
    };
    let (status, created) = admin
        .post(
            "/_matrix/client/v3/createRoom",
            json!({"preset": "private_chat", "invite": [ps.user_id()]}),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let room = created["room_id"].as_str().expect("room_id").to_string();
    let member_path = format!(
        "/_matrix/client/v3/rooms/{room}/state/m.room.member/{}",
        ps.user_id()
    );
    common::eventually("the invited policy server joins", WITHIN, || {
        let (admin, path) = (&admin, &member_path);
        async move {
            let (status, member) = admin.get(path).await;
            status == 200 && member["membership"] == "join"
        }
    })
    .await;
    // The node's user could not join this private room, so it wrote no m.room.policy.
    let (status, _) = admin
        .get(&format!(
            "/_matrix/client/v3/rooms/{room}/state/m.room.policy/"
        ))
        .await;
    assert_eq!(status, 404, "no m.room.policy until the admin writes it");
    let node_user =
        format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/@_msgnode:localhost");
    assert_ne!(admin.get(&node_user).await.1["membership"], "join");

    // The admin reads the key where the README says and writes m.room.policy.
    let tls = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .expect("client");
    let well_known: Value = tls
        .get(format!("https://{listen}/.well-known/matrix/policy_server"))
        .send()
        .await
        .expect("well-known")
        .json()
        .await
        .expect("json");
    let content = json!({"via": via, "public_keys": well_known["public_keys"]});
    assert_eq!(content, ps.policy_content(), "{well_known}");
    let (status, put) = admin
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.policy/"),
            content,
        )
        .await;
    assert_eq!(status, 200, "{put}");

    // Synapse now asks: denied is refused with the policy's reason and never stored ...
    let (status, refused) = send(&admin, &room, "com.example.secret", "d1", "secret").await;
    assert_eq!(
        (status, refused["errcode"].as_str()),
        (400, Some("M_FORBIDDEN")),
        "{refused}"
    );
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or("")
            .contains("event type 'com.example.secret' is not allowed"),
        "{refused}"
    );
    assert!(!has_body(&messages(&admin, &room).await, "secret"));
    // ... and allowed is delivered with the policy server's signature.
    let (status, sent) = send(&admin, &room, "m.room.message", "d2", "hello").await;
    assert_eq!(status, 200, "{sent}");
    let event_id = sent["event_id"].as_str().expect("event_id").to_string();
    assert!(has_body(&messages(&admin, &room).await, "hello"));
    let pdu = ps
        .homeserver_event(&event_id)
        .await
        .expect("event over federation");
    let policy: ruma::events::room::policy::RoomPolicyEventContent =
        serde_json::from_value(ps.policy_content()).expect("policy content");
    let rules = ruma::RoomVersionId::V12.rules().expect("v12");
    ruma::signatures::verify_policy_server_signature(&policy, &pdu, &rules)
        .expect("the stored event carries a valid policy signature");
    node.stop().await;
}

/// A room the node's appservice user creates (like the bus's storage rooms); alice is in it.
async fn node_room(synapse: &Synapse) -> String {
    let node = Client {
        http: reqwest::Client::new(),
        base: synapse.url(),
        token: synapse.token("as_token"),
    };
    let (status, created) = node
        .post(
            "/_matrix/client/v3/createRoom",
            json!({"preset": "public_chat"}),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    created["room_id"].as_str().expect("room_id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rego_decides_every_event_inside_synapse() {
    let synapse_a = Synapse::start_federating();
    let synapse_b = Synapse::start_federating();
    let dir = tempfile::tempdir().expect("tempdir");
    let policies = dir.path().join("policies");
    copy_dir(&common::shipped_policies(), &policies);
    // Users of the loopback homeservers (server names 127.0.0.1:<port>) are trusted.
    edit_data(&policies, |data| {
        data["trusted_domains"]
            .as_array_mut()
            .expect("trusted_domains")
            .push(json!("127.0.0.1"));
    });
    let node = start(node_config(&synapse_a, &policies, &dir.path().join("ps")))
        .await
        .expect("start node");
    let ps = node.policy_server.clone().expect("policy server");
    let http = reqwest::Client::new();
    let alice = Client {
        http: http.clone(),
        base: synapse_a.url(),
        token: synapse_a.register("alice"),
    };
    let bob = Client {
        http: http.clone(),
        base: synapse_b.url(),
        token: synapse_b.register("bob"),
    };
    let a_name = synapse_a.server_name();
    let node_user = format!("@_msgnode:{a_name}");

    // Alice's public room, with the node's user invited and given power.
    let (status, created) = alice
        .post(
            "/_matrix/client/v3/createRoom",
            json!({"preset": "public_chat", "invite": [node_user],
                   "power_level_content_override": {"users": {node_user.clone(): 100}, "invite": 0}}),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let room = created["room_id"].as_str().expect("room_id").to_string();

    // One step puts the room under the policy server.
    assert_eq!(ps.protect(&room).await.expect("protect"), room);
    let (status, policy) = alice
        .get(&format!(
            "/_matrix/client/v3/rooms/{room}/state/m.room.policy/"
        ))
        .await;
    assert_eq!(status, 200, "{policy}");
    assert_eq!(policy, ps.policy_content());
    let (status, member) = alice
        .get(&format!(
            "/_matrix/client/v3/rooms/{room}/state/m.room.member/{}",
            ps.user_id()
        ))
        .await;
    assert_eq!(
        (status, member["membership"].as_str()),
        (200, Some("join")),
        "{member}"
    );
    // Protecting again changes nothing.
    ps.protect(&room).await.expect("protect again");

    // Direct to Synapse, denied by the policy: refused with its reason, never stored.
    let (status, refused) = send(&alice, &room, "com.example.secret", "s1", "secret 1").await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["errcode"], "M_FORBIDDEN", "{refused}");
    let reason = refused["error"].as_str().unwrap_or("");
    assert!(
        reason.contains("event type 'com.example.secret' is not allowed"),
        "{refused}"
    );
    assert!(!has_body(&messages(&alice, &room).await, "secret 1"));

    // Allowed: delivered, carrying the policy server's signature over the event.
    let (status, sent) = send(&alice, &room, "m.room.message", "m1", "hello 1").await;
    assert_eq!(status, 200, "{sent}");
    let event_id = sent["event_id"].as_str().expect("event_id").to_string();
    assert!(has_body(&messages(&alice, &room).await, "hello 1"));
    let pdu = ps
        .homeserver_event(&event_id)
        .await
        .expect("event over federation");
    let content: ruma::events::room::policy::RoomPolicyEventContent =
        serde_json::from_value(ps.policy_content()).expect("policy content");
    let rules = ruma::RoomVersionId::V12.rules().expect("v12");
    ruma::signatures::verify_policy_server_signature(&content, &pdu, &rules)
        .expect("the stored event carries a valid policy signature");

    // A policy edit flips the decision, without a restart.
    let before = node.pdp.status().revision;
    edit_data(&policies, |data| {
        data["matrix"]["event_types"]["default"]
            .as_array_mut()
            .expect("default types")
            .push(json!("com.example.secret"));
    });
    new_revision(&node, before).await;
    let (status, sent) = send(&alice, &room, "com.example.secret", "s2", "secret 2").await;
    assert_eq!(status, 200, "now allowed: {sent}");
    assert!(has_body(&messages(&alice, &room).await, "secret 2"));

    // The second Synapse: Bob joins over federation (decided, allowed) ...
    let b_name = synapse_b.server_name();
    let bob_id = format!("@bob:{b_name}");
    let (status, joined) = bob
        .post(
            &format!("/_matrix/client/v3/join/{room}?server_name={a_name}"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{joined}");
    // ... and his allowed message, signed at his homeserver's request, arrives.
    let (status, sent) = send(&bob, &room, "m.room.message", "b1", "hello from b").await;
    assert_eq!(status, 200, "{sent}");
    common::eventually("bob's message reaches alice", WITHIN, || {
        let alice = &alice;
        let room = &room;
        async move { has_body(&messages(alice, room).await, "hello from b") }
    })
    .await;

    // His invite arrives over federation, so Synapse A asks the policy server, which
    // decides it with the room's members (bob is one): allowed, not soft-failed.
    let dave = format!("@dave:{b_name}");
    synapse_b.register("dave");
    let (status, invited) = bob
        .post(
            &format!("/_matrix/client/v3/rooms/{room}/invite"),
            json!({"user_id": dave}),
        )
        .await;
    assert_eq!(status, 200, "{invited}");
    common::eventually(
        "bob's invite is part of the room at synapse a",
        WITHIN,
        || {
            let alice = &alice;
            let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{dave}");
            async move {
                let (status, member) = alice.get(&path).await;
                status == 200 && member["membership"] == "invite"
            }
        },
    )
    .await;

    // Bob is blocked: his next member event (a display name, which his homeserver sends
    // without asking) is soft-failed where the room lives; his message is refused at home.
    let denied_before = common::metric(
        &http,
        &node,
        "msgnode_policy_server_sign_requests_total{outcome=\"denied\"}",
    )
    .await;
    let before = node.pdp.status().revision;
    edit_data(&policies, |data| {
        data["blocked_users"][bob_id.as_str()] = json!("test: blocked after joining");
    });
    new_revision(&node, before).await;
    let (status, answer) = bob
        .put(
            &format!("/_matrix/client/v3/profile/{bob_id}/displayname"),
            json!({"displayname": "Bob the Blocked"}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    common::eventually("synapse a asked about bob's member event", WITHIN, || {
        let (http, node) = (&http, &node);
        async move {
            common::metric(
                http,
                node,
                "msgnode_policy_server_sign_requests_total{outcome=\"denied\"}",
            )
            .await
                > denied_before
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = messages(&alice, &room).await;
    assert!(
        !events
            .iter()
            .any(|e| e["content"]["displayname"] == "Bob the Blocked"),
        "the soft-failed member event is not shown: {events:?}"
    );
    let (status, member) = alice
        .get(&format!(
            "/_matrix/client/v3/rooms/{room}/state/m.room.member/{bob_id}"
        ))
        .await;
    assert_eq!(status, 200, "{member}");
    assert_ne!(member["displayname"], "Bob the Blocked", "{member}");
    // Decided by the policy server already: the appservice does not redact it again.
    common::eventually(
        "the appservice leaves it to the policy server",
        WITHIN,
        || {
            let (http, node) = (&http, &node);
            async move {
                common::metric(
                    http,
                    node,
                    "msgnode_pep_appservice_redactions_total{outcome=\"policy_server\"}",
                )
                .await
                    > 0
            }
        },
    )
    .await;
    assert_eq!(
        common::metric(
            &http,
            &node,
            "msgnode_pep_appservice_redactions_total{outcome=\"redacted\"}"
        )
        .await,
        0
    );
    let (status, refused) = send(&bob, &room, "m.room.message", "b2", "blocked bob").await;
    assert_eq!(
        (status, refused["errcode"].as_str()),
        (400, Some("M_FORBIDDEN")),
        "{refused}"
    );
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or("")
            .contains("is blocked"),
        "{refused}"
    );

    // The policy server down: Synapse refuses (fails closed), nothing is stored.
    node.stop().await;
    let (status, refused) = send(&alice, &room, "m.room.message", "m2", "while down").await;
    assert_ne!(status, 200, "{refused}");
    assert!(!has_body(&messages(&alice, &room).await, "while down"));
}

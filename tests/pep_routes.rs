//! The proxy's allow-list against the real Synapse: every client-server write route the
//! installed Synapse (1.163.2) registers — read by running its own servlet registration
//! (`scripts/synapse routes`) and probed on the running server — in every spelling the proxy
//! normalises, is decided, allow-listed or refused; none that creates a room event or
//! changes a membership is forwarded undecided. Then the attacks a review demonstrated,
//! replayed through the proxy against that Synapse.

use std::path::Path;
use std::time::Duration;

mod common;

use axum::http::Method;
use common::matrix::Client;
use common::synapse::{copy_dir, Synapse};
use msgnode::cmd::run::{start, Running};
use msgnode::config::Config;
use msgnode::pep::route::{classify, Route};
use serde_json::{json, Value};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The servlets whose writes create room events, change memberships or carry traffic
/// between users — what must never be forwarded undecided (from Synapse's handlers; the
/// delayed-event servlets act on events decided when they were scheduled, and
/// registration joins rooms only where the operator configured `auto_join_rooms`).
const EVENT_SERVLETS: [&str; 11] = [
    "RoomStateEventRestServlet",
    "JoinRoomAliasServlet",
    "RoomMembershipRestServlet",
    "RoomSendEventRestServlet",
    "RoomRedactEventRestServlet",
    "RoomCreateRestServlet",
    "ProfileFieldRestServlet",
    "DeactivateAccountRestServlet",
    "RoomUpgradeRestServlet",
    "KnockRoomAliasServlet",
    "SendToDeviceRestServlet",
];

/// A sample value for a path parameter of Synapse's patterns.
fn sample(name: &str) -> &'static str {
    match name {
        "room_id" => "!r:localhost",
        "room_identifier" => "#a:localhost",
        "room_alias" => "#a:localhost",
        "user_id" | "target_user_id" => "@alice:localhost",
        "event_id" | "parent_id" => "$e1",
        "event_type" => "m.room.member",
        "state_key" => "@alice:localhost",
        "txn_id" => "t1",
        "message_type" => "m.room.encrypted",
        "field_name" => "displayname",
        "path" => "pushrules/global/override/x",
        "stagetype" => "m.login.dummy",
        _ => "x1",
    }
}

/// Every path `pattern` matches with sample values: one per alternative of each group,
/// with and without each optional group.
fn examples(pattern: &str) -> Vec<String> {
    let body = pattern.trim_start_matches('^').trim_end_matches('$');
    expand(body)
        .into_iter()
        .map(|p| p.replace("\\.", "."))
        .collect()
}

fn expand(pattern: &str) -> Vec<String> {
    // Find the first group; expand it and the rest.
    let Some(open) = pattern.find('(') else {
        return vec![pattern.to_string()];
    };
    let mut depth = 0;
    let mut close = open;
    for (i, c) in pattern[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    close = open + i;
                    break;
                }
            }
            _ => {}
        }
    }
    let inner = &pattern[open + 1..close];
    let mut rest = &pattern[close + 1..];
    let optional = rest.starts_with('?');
    if optional {
        rest = &rest[1..];
    }
    let mut choices: Vec<String> = match inner.strip_prefix("?P<") {
        Some(named) => {
            let (name, regex) = named.split_once('>').expect("named group");
            let literal_alternatives = regex
                .split('|')
                .all(|a| a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
            if literal_alternatives && !regex.is_empty() {
                regex.split('|').map(str::to_string).collect()
            } else if regex.contains('(') {
                expand(regex)
            } else {
                vec![sample(name).to_string()]
            }
        }
        None => inner.split('|').flat_map(expand).collect(),
    };
    if optional {
        choices.push(String::new());
    }
    let head = &pattern[..open];
    let tails = expand(rest);
    let mut out = Vec::new();
    for choice in &choices {
        for tail in &tails {
            out.push(format!("{head}{choice}{tail}"));
        }
    }
    out
}

/// The spellings of one path the proxy reads alike, and the prefix forms older Synapse
/// releases routed the same.
fn spellings(path: &str) -> Vec<String> {
    let encoded = path
        .replace('!', "%21")
        .replace('#', "%23")
        .replace('@', "%40")
        .replace('$', "%24")
        .replace(':', "%3A");
    vec![
        path.to_string(),
        encoded,
        format!("{path}/"),
        path.replacen("/_matrix/client/", "/_matrix/client//", 1),
        format!("/{path}"),
        format!("{path}/anything"),
        path.replace("m.room.member", "m.room.%6Dember"),
    ]
}

fn routes(synapse: &Synapse) -> Vec<Value> {
    let text = synapse.script(&["routes"]);
    serde_json::from_str(&text).expect("routes JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_route_of_synapse_is_decided_allow_listed_or_refused() {
    let synapse = Synapse::start();
    let routes = routes(&synapse);
    let http = reqwest::Client::new();
    let mut checked = 0;
    for route in &routes {
        let pattern = route["pattern"].as_str().expect("pattern");
        if !pattern.starts_with("^/_matrix/client/") {
            continue; // the admin servlets Synapse also registers here never match these paths
        }
        let regex = regex::Regex::new(pattern).expect("Synapse's pattern compiles");
        for (method, servlet) in route["methods"].as_object().expect("methods") {
            if method == "GET" {
                continue;
            }
            let servlet = servlet.as_str().expect("servlet");
            let method = Method::from_bytes(method.as_bytes()).expect("method");
            let creates_events = EVENT_SERVLETS.contains(&servlet)
                || (servlet == "ClientDirectoryServer" && method == Method::DELETE);
            for example in examples(pattern) {
                assert!(
                    regex.is_match(&example),
                    "{pattern} does not match {example}"
                );
                // The table knows the route as Synapse serves it: never "no such route".
                match classify(&method, &example) {
                    Route::Refused(refusal) => assert_eq!(
                        refusal.status,
                        axum::http::StatusCode::FORBIDDEN,
                        "{method} {example} ({servlet}) is a route msgnode does not know: {}",
                        refusal.reason
                    ),
                    Route::PassThrough => panic!("{method} {example} passes through undecided"),
                    Route::Decide(_) | Route::Allowed(_) => {}
                }
                for spelling in spellings(&example) {
                    match classify(&method, &spelling) {
                        Route::PassThrough => {
                            panic!("{method} {spelling} ({servlet}) passes through undecided")
                        }
                        Route::Allowed(reason) if creates_events => panic!(
                            "{method} {spelling} ({servlet}) creates events but is allow-listed: {reason}"
                        ),
                        _ => checked += 1,
                    }
                }
                // The running server serves it: anything but "unrecognized".
                let answer = http
                    .request(
                        reqwest::Method::from_bytes(method.as_str().as_bytes()).expect("method"),
                        format!("{}{}", synapse.url(), example.replace('#', "%23")),
                    )
                    .json(&json!({}))
                    .send()
                    .await
                    .expect("probe Synapse");
                let status = answer.status().as_u16();
                let body: Value = answer.json().await.unwrap_or(Value::Null);
                assert_ne!(
                    body["errcode"], "M_UNRECOGNIZED",
                    "{method} {example} ({servlet}): Synapse does not serve it ({status} {body})"
                );
            }
        }
    }
    assert!(checked > 500, "only {checked} spellings checked");
}

/// A proxy node in front of `synapse` deciding with `policies`.
async fn proxy(synapse: &Synapse, policies: &Path) -> Running {
    proxy_with(synapse, policies, |_| {}).await
}

async fn proxy_with(
    synapse: &Synapse,
    policies: &Path,
    adjust: impl FnOnce(&mut Config),
) -> Running {
    let mut config = Config::default();
    config.pdp.listen = "127.0.0.1:0".parse().expect("addr");
    config.pdp.policies = policies.to_path_buf();
    config.pdp.schema_dir = Path::new(REPO).join("schemas");
    config.pdp.decision_log.enabled = false;
    config.pep.enabled = true;
    config.pep.listen = "127.0.0.1:0".parse().expect("addr");
    config.pep.homeserver = synapse.url();
    adjust(&mut config);
    start(config).await.expect("start msgnode")
}

fn client(node: &Running, token: &str) -> Client {
    Client {
        http: reqwest::Client::new(),
        base: format!("http://{}", node.pep_addr.expect("proxy")),
        token: token.to_string(),
    }
}

fn assert_refused(answer: &(u16, Value), reason: &str, what: &str) {
    let (status, body) = answer;
    assert_eq!(
        (*status, body["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "{what}: {body}"
    );
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains(reason)),
        "{what}: expected {reason:?} in {body}"
    );
}

/// The rooms `token`'s user is joined to, straight from Synapse.
async fn joined_rooms(synapse: &Synapse, token: &str) -> Vec<Value> {
    let (_, joined) = direct(synapse, token)
        .get("/_matrix/client/v3/joined_rooms")
        .await;
    joined["joined_rooms"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacks_on_undecided_writes_are_refused_against_synapse() {
    let synapse = Synapse::start();
    // The shipped bundle, plus two rules a security team might add, so that derived
    // createRoom events have something to be decided on.
    let policies = tempfile::tempdir().expect("tempdir");
    copy_dir(&Path::new(REPO).join("policies"), policies.path());
    std::fs::write(
        policies.path().join("msgnode/room_rules.rego"),
        r##"package msgnode.matrix

event_deny contains "rooms may not be public" if {
	input.matrix.event_type == "m.room.join_rules"
	input.matrix.content.join_rule == "public"
}

event_deny contains "everyone must not be a moderator" if {
	input.matrix.event_type == "m.room.power_levels"
	input.matrix.content.users_default >= 50
}

event_deny contains "aliases in the lobby namespace are reserved" if {
	input.matrix.event_type == "m.room.canonical_alias"
	startswith(input.matrix.content.alias, "#lobby")
}
"##,
    )
    .expect("write rule");
    let node = proxy(&synapse, policies.path()).await;
    let mallory_token = synapse.register("mallory"); // blocked in the shipped data
    let alice_token = synapse.register("alice");
    let mallory = client(&node, &mallory_token);
    let alice = client(&node, &alice_token);

    // Critical: PUT createRoom/{txnId} was forwarded undecided.
    let before = joined_rooms(&synapse, &mallory_token).await.len();
    for (method, path) in [
        (reqwest::Method::PUT, "/_matrix/client/v3/createRoom/txn-1"),
        (reqwest::Method::POST, "/_matrix/client/v3/createRoom"),
        (reqwest::Method::PUT, "/_matrix/client/r0/createRoom/txn-2"),
    ] {
        let answer = mallory
            .call(
                method.clone(),
                path,
                Some(
                    json!({"initial_state": [{"type": "com.example.secret", "content": {}}],
                            "invite": ["@alice:localhost"]}),
                ),
            )
            .await;
        assert_refused(&answer, "user '@mallory:localhost' is blocked", path);
    }
    assert_eq!(
        joined_rooms(&synapse, &mallory_token).await.len(),
        before,
        "no room was created"
    );

    // Derived events: each field is decided as the event it makes.
    for (body, reason) in [
        (json!({"preset": "public_chat"}), "rooms may not be public"),
        (json!({"visibility": "public"}), "rooms may not be public"),
        (
            json!({"power_level_content_override": {"users_default": 50}}),
            "everyone must not be a moderator",
        ),
        (
            json!({"room_alias_name": "lobby-1"}),
            "aliases in the lobby namespace are reserved",
        ),
        (
            json!({"initial_state": [{"type": "com.example.secret", "content": {}}]}),
            "event type 'com.example.secret' is not allowed",
        ),
        (
            json!({"invite_3pid": [{"id_server": "is.example", "id_access_token": "t", "medium": "email", "address": "a@example.org"}]}),
            "invite_3pid is not supported",
        ),
    ] {
        let answer = alice
            .post("/_matrix/client/v3/createRoom", body.clone())
            .await;
        assert_refused(&answer, reason, &body.to_string());
    }
    assert!(joined_rooms(&synapse, &alice_token).await.is_empty());
    let (status, created) = alice
        .put(
            "/_matrix/client/v3/createRoom/ok-1",
            json!({"room_alias_name": "team", "name": "Team", "preset": "private_chat"}),
        )
        .await;
    assert_eq!(status, 200, "an allowed createRoom (PUT form): {created}");

    // Profile and alias deletions were undecided.
    let answer = mallory
        .call(
            reqwest::Method::DELETE,
            "/_matrix/client/v3/profile/@mallory:localhost/displayname",
            None,
        )
        .await;
    assert_refused(
        &answer,
        "user '@mallory:localhost' is blocked",
        "DELETE displayname",
    );
    let answer = mallory
        .put(
            "/_matrix/client/v3/profile/@mallory:localhost/displayname/anything",
            json!({"displayname": "M"}),
        )
        .await;
    assert_refused(
        &answer,
        "user '@mallory:localhost' is blocked",
        "prefix spelling",
    );
    let answer = mallory
        .call(
            reqwest::Method::DELETE,
            "/_matrix/client/v3/directory/room/%23team:localhost",
            None,
        )
        .await;
    assert_refused(
        &answer,
        "user '@mallory:localhost' is blocked",
        "DELETE alias",
    );
    let (status, body) = alice
        .get("/_matrix/client/v3/directory/room/%23team:localhost")
        .await;
    assert_eq!(status, 200, "the alias is still there: {body}");

    // Writes nobody decides never reach Synapse.
    let (status, body) = alice
        .post("/_matrix/client/v3/org.example.new_endpoint", json!({}))
        .await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (404, Some("M_UNRECOGNIZED")),
        "{body}"
    );
    node.stop().await;

    // With the PDP down (no bundle), the PUT form is refused too: fail closed.
    let empty = tempfile::tempdir().expect("tempdir");
    let node = proxy(&synapse, &empty.path().join("none")).await;
    let alice = client(&node, &alice_token);
    let before = joined_rooms(&synapse, &alice_token).await.len();
    let answer = alice
        .put("/_matrix/client/v3/createRoom/txn-down", json!({}))
        .await;
    assert_refused(&answer, "policy unavailable", "PDP down");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(joined_rooms(&synapse, &alice_token).await.len(), before);
    node.stop().await;

    // Decided requests per client address are limited: 429 with when to retry.
    let node = proxy_with(&synapse, &Path::new(REPO).join("policies"), |c| {
        c.pep.rate_limit = msgnode::config::RateLimit::new(1, 2);
    })
    .await;
    let mallory = client(&node, &mallory_token);
    let mut last = (0, Value::Null);
    for i in 0..3 {
        last = mallory
            .put(&format!("/_matrix/client/v3/createRoom/rl-{i}"), json!({}))
            .await;
    }
    assert_eq!(
        (last.0, last.1["errcode"].as_str()),
        (429, Some("M_LIMIT_EXCEEDED")),
        "{}",
        last.1
    );
    assert!(
        last.1["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0),
        "{}",
        last.1
    );
    node.stop().await;
}

/// A client straight to `synapse`, bypassing the proxy (to set a scene up).
fn direct(synapse: &Synapse, token: &str) -> Client {
    Client {
        http: reqwest::Client::new(),
        base: synapse.url(),
        token: token.to_string(),
    }
}

fn assert_error(answer: &(u16, Value), status: u16, errcode: &str, what: &str) {
    assert_eq!(
        (answer.0, answer.1["errcode"].as_str()),
        (status, Some(errcode)),
        "{what}: {}",
        answer.1
    );
}

/// The review's second round: bodies Synapse reads differently from what was decided, a
/// profile change decided without its rooms, a join decided on an alias, delayed sends, a
/// request worth thousands of decisions, a kick by a blocked user — each replayed through the
/// proxy against the real Synapse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_forwarded_as_they_were_decided_against_synapse() {
    let synapse = Synapse::start();
    let alice_token = synapse.register("alice");
    let bob_token = synapse.register("bob");
    let mallory_token = synapse.register("mallory"); // blocked in the shipped data
                                                     // The scene, set up directly on Synapse: a closed room and an open one, with aliases.
    let alice_direct = direct(&synapse, &alice_token);
    let mut room_ids = Vec::new();
    for alias in ["closed", "open"] {
        let (status, room) = alice_direct
            .post(
                "/_matrix/client/v3/createRoom",
                json!({"preset": "public_chat", "room_alias_name": alias}),
            )
            .await;
        assert_eq!(status, 200, "{room}");
        room_ids.push(room["room_id"].as_str().expect("room id").to_string());
    }
    let (closed, open) = (&room_ids[0], &room_ids[1]);
    let (status, joined) = direct(&synapse, &mallory_token)
        .post(&format!("/_matrix/client/v3/join/{open}"), json!({}))
        .await;
    assert_eq!(status, 200, "{joined}");

    let policies = tempfile::tempdir().expect("tempdir");
    copy_dir(&Path::new(REPO).join("policies"), policies.path());
    std::fs::write(
        policies.path().join("msgnode/room_rules.rego"),
        format!(
            r##"package msgnode.matrix

event_deny contains "rooms may not be public" if {{
	input.matrix.event_type == "m.room.join_rules"
	input.matrix.content.join_rule == "public"
}}

event_deny contains "this display name is refused in rooms" if {{
	input.matrix.event_type == "m.room.member"
	input.matrix.room_id != ""
	input.matrix.content.displayname == "Per Room"
}}

membership_deny contains "the closed room takes no one" if {{
	input.matrix.membership == "join"
	input.matrix.room_id == "{closed}"
}}
"##
        ),
    )
    .expect("write rule");
    let node = proxy_with(&synapse, policies.path(), |c| {
        c.pep.max_decisions_per_request = 100;
    })
    .await;
    let alice = client(&node, &alice_token);
    let bob = client(&node, &bob_token);
    let mallory = client(&node, &mallory_token);
    let before = joined_rooms(&synapse, &alice_token).await.len();

    // P1: a visibility Synapse reads as public was decided as private.
    for visibility in ["shared", "Public", ""] {
        let answer = alice
            .post(
                "/_matrix/client/v3/createRoom",
                json!({ "visibility": visibility }),
            )
            .await;
        assert_error(&answer, 400, "M_INVALID_PARAM", visibility);
    }
    // P2: an initial_state member event invited a blocked user with no membership decision.
    let answer = alice
        .post(
            "/_matrix/client/v3/createRoom",
            json!({"initial_state": [{"type": "m.room.member", "state_key": "@mallory:localhost",
                                      "content": {"membership": "invite"}}]}),
        )
        .await;
    assert_refused(&answer, "user '@mallory:localhost' is blocked", "P2");
    // P7: one request worth more decisions than allowed.
    let many: Vec<Value> = (0..200)
        .map(|i| json!({"type": "m.room.name", "state_key": format!("k{i}"), "content": {"name": "n"}}))
        .collect();
    let answer = alice
        .post(
            "/_matrix/client/v3/createRoom",
            json!({ "initial_state": many }),
        )
        .await;
    assert_error(&answer, 413, "M_TOO_LARGE", "P7");
    assert_eq!(
        joined_rooms(&synapse, &alice_token).await.len(),
        before,
        "no room was created"
    );

    // What is allowed still works, forwarded canonically.
    let (status, created) = alice
        .post(
            "/_matrix/client/v3/createRoom",
            json!({"name": "Team", "org.example.unknown": true}),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let team = created["room_id"].as_str().expect("room id").to_string();

    // P3: user_id beside 3PID fields, which Synapse executes as a third-party invite.
    let answer = alice
        .post(
            &format!("/_matrix/client/v3/rooms/{team}/invite"),
            json!({"user_id": "@bob:localhost", "medium": "email", "address": "v@example.org",
                   "id_server": "is.example", "id_access_token": "t"}),
        )
        .await;
    assert_refused(&answer, "third-party invites are not supported", "P3");

    // P6: a delayed send would be committed after its decision.
    let answer = alice
        .put(
            &format!("/_matrix/client/v3/rooms/{team}/send/m.room.message/d1?org.matrix.msc4140.delay=1000"),
            json!({"msgtype": "m.text", "body": "later"}),
        )
        .await;
    assert_refused(&answer, "delayed events are not supported", "P6");

    // P4: a profile change becomes a member event in each of alice's rooms.
    let answer = alice
        .put(
            "/_matrix/client/v3/profile/@alice:localhost/displayname",
            json!({"displayname": "Per Room"}),
        )
        .await;
    assert_refused(&answer, "this display name is refused in rooms", "P4");
    let (status, body) = alice
        .put(
            "/_matrix/client/v3/profile/@alice:localhost/displayname",
            json!({"displayname": "Alice"}),
        )
        .await;
    assert_eq!(status, 200, "an allowed profile change: {body}");

    // P5: a join by alias is decided on the room it names, and joins that room.
    let answer = bob
        .post("/_matrix/client/v3/join/%23closed:localhost", json!({}))
        .await;
    assert_refused(&answer, "the closed room takes no one", "P5 alias");
    let answer = bob
        .post(&format!("/_matrix/client/v3/join/{closed}"), json!({}))
        .await;
    assert_refused(&answer, "the closed room takes no one", "P5 id");
    let (status, body) = bob
        .post("/_matrix/client/v3/join/%23open:localhost", json!({}))
        .await;
    assert_eq!(
        (status, body["room_id"].as_str()),
        (200, Some(open.as_str())),
        "{body}"
    );
    let answer = bob
        .post("/_matrix/client/v3/join/%23nowhere:localhost", json!({}))
        .await;
    assert_error(&answer, 404, "M_NOT_FOUND", "unknown alias");

    // A blocked user's kick was always allowed as a "leave".
    let answer = mallory
        .post(
            &format!("/_matrix/client/v3/rooms/{open}/kick"),
            json!({"user_id": "@bob:localhost"}),
        )
        .await;
    assert_refused(&answer, "user '@mallory:localhost' is blocked", "kick");
    let (status, body) = mallory
        .post(&format!("/_matrix/client/v3/rooms/{open}/leave"), json!({}))
        .await;
    assert_eq!(status, 200, "a blocked user may still leave: {body}");

    // P8: the federation API is not served through the client proxy.
    let answer = alice
        .put("/_matrix/federation/v1/send/1", json!({"pdus": []}))
        .await;
    assert_eq!(answer.0, 404, "{}", answer.1);
    node.stop().await;

    // P9: decisions are charged to the user, one per decision, whatever the address.
    let node = proxy_with(&synapse, &Path::new(REPO).join("policies"), |c| {
        c.pep.user_rate_limit = msgnode::config::RateLimit::new(1, 8);
    })
    .await;
    let alice = client(&node, &alice_token);
    let bob = client(&node, &bob_token);
    let (status, body) = alice.post("/_matrix/client/v3/createRoom", json!({})).await;
    assert_eq!(status, 200, "six decisions fit in eight: {body}");
    let answer = alice.post("/_matrix/client/v3/createRoom", json!({})).await;
    assert_error(&answer, 429, "M_LIMIT_EXCEEDED", "alice's bucket is spent");
    let (status, body) = bob.post("/_matrix/client/v3/createRoom", json!({})).await;
    assert_eq!(status, 200, "bob has his own bucket: {body}");
    node.stop().await;
}

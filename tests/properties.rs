//! Property tests of the parsers and classifiers attackers reach first: the proxy's path
//! classification, the reTHINK frame parser, the URL/address parser, the routing table's
//! ownership, and the policy-input builders. No panic, no undecided write, no address of one
//! principal handed to another, every input within the schema.
//!
//! `scripts/test` runs the default number of cases (`PROPTEST_CASES`, 256 per property).
//! The on-demand run — a million cases over the six properties:
//! `PROPTEST_CASES=170000 cargo test --release --test properties`.

use std::sync::LazyLock;

use axum::http::Method;
use msgnode::bus::runtimes::Table;
use msgnode::pdp::schema::Schemas;
use msgnode::pep::route::table::{Action, ROUTES};
use msgnode::pep::route::{classify, Route};
use msgnode::persist::store::RuntimeRecord;
use msgnode::policy::input::{
    Claim, ClaimInput, Context, Input, MessageInput, Subject, Subscription, SubscriptionInput,
    Target, Totals,
};
use msgnode::rethink::address::{domain, is_clean, parent, NodeAddresses};
use msgnode::rethink::Message;
use proptest::prelude::*;
use serde_json::{json, Value};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// Path segments Synapse's client API is made of, identifiers, and what attackers add.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("rooms".to_string()),
        Just("send".to_string()),
        Just("state".to_string()),
        Just("redact".to_string()),
        Just("join".to_string()),
        Just("invite".to_string()),
        Just("kick".to_string()),
        Just("ban".to_string()),
        Just("knock".to_string()),
        Just("createRoom".to_string()),
        Just("profile".to_string()),
        Just("displayname".to_string()),
        Just("avatar_url".to_string()),
        Just("directory".to_string()),
        Just("room".to_string()),
        Just("account".to_string()),
        Just("deactivate".to_string()),
        Just("sendToDevice".to_string()),
        Just("typing".to_string()),
        Just("upgrade".to_string()),
        Just("m.room.member".to_string()),
        Just("m.room.message".to_string()),
        Just("!r:localhost".to_string()),
        Just("#a:localhost".to_string()),
        Just("@alice:localhost".to_string()),
        Just("$e1".to_string()),
        Just("..".to_string()),
        Just(".".to_string()),
        Just(String::new()),
        "[a-zA-Z0-9._~!$@:#%-]{0,12}",
    ]
}

/// A spelling of a segment: as is, or percent-encoded in parts.
fn spelled(segment: String, encode: Vec<bool>) -> String {
    segment
        .chars()
        .zip(encode.into_iter().chain(std::iter::repeat(false)))
        .map(|(c, e)| {
            if e && c.is_ascii() {
                format!("%{:02X}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn client_path() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            Just("v3"),
            Just("r0"),
            Just("unstable"),
            Just("api/v1"),
            Just("v1"),
            Just("v3/")
        ],
        prop::collection::vec(
            (segment(), prop::collection::vec(any::<bool>(), 0..4)),
            1..7,
        ),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(version, segments, double, trailing)| {
            let mut path = format!("/_matrix/client/{version}");
            for (segment, encode) in segments {
                path.push('/');
                if double {
                    path.push('/');
                }
                path.push_str(&spelled(segment, encode));
            }
            if trailing {
                path.push('/');
            }
            path
        })
}

fn write_method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::PUT),
        Just(Method::POST),
        Just(Method::DELETE),
        Just(Method::PATCH)
    ]
}

/// Synapse's own patterns for the decided routes, anchored as it matches them.
static DECIDED: LazyLock<Vec<(Method, regex::Regex)>> = LazyLock::new(|| {
    ROUTES
        .iter()
        .filter(|r| matches!(r.action, Action::Decide(_)))
        .filter_map(|r| Some((r.method.clone(), regex::Regex::new(&r.pattern).ok()?)))
        .collect()
});

proptest! {
    /// Any write under the client API is decided, allow-listed or refused — never passed
    /// through — and one Synapse routes to a decided endpoint is decided.
    #[test]
    fn writes_are_never_forwarded_undecided(method in write_method(), path in client_path()) {
        let route = classify(&method, &path);
        prop_assert!(!matches!(route, Route::PassThrough), "{method} {path}: {route:?}");
        let synapse_decides = DECIDED.iter().any(|(m, re)| *m == method && re.is_match(&path));
        if synapse_decides {
            prop_assert!(matches!(route, Route::Decide(_)), "{method} {path}: {route:?}");
        }
        if let Route::Decide(endpoint) = &route {
            // What is forwarded is a path Synapse reads as a decided route.
            let canonical = endpoint.canonical_path();
            prop_assert!(
                DECIDED.iter().any(|(_, re)| re.is_match(&canonical)),
                "{canonical} (from {path})"
            );
        }
    }

    /// Nothing a client can send makes classification panic.
    #[test]
    fn any_path_classifies(method in "[A-Z]{1,7}", path in "\\PC{0,80}") {
        if let Ok(method) = Method::from_bytes(method.as_bytes()) {
            let _ = classify(&method, &path);
        }
    }

    /// The frame parser answers every frame, and what it accepts routes only on clean URLs.
    #[test]
    fn frames_parse_or_say_why(frame in frame()) {
        match Message::parse(frame.clone()) {
            Ok(message) => {
                prop_assert!(is_clean(&message.from), "{frame}");
                prop_assert!(!message.to.is_empty());
                prop_assert!(message.to.iter().all(|t| is_clean(t)), "{frame}");
            }
            Err((error, _)) => prop_assert_eq!(error.code(), 400),
        }
    }

    /// URL parts: no panic, parents shrink and end, clean URLs have no dot segment in any
    /// spelling, a runtime URL accepted is canonical.
    #[test]
    fn urls_parse_safely(url in url()) {
        let _ = domain(&url);
        let mut steps = 0;
        let mut current = url.as_str();
        while let Some(up) = parent(current) {
            prop_assert!(up.len() < current.len());
            current = up;
            steps += 1;
            prop_assert!(steps < 64);
        }
        if is_clean(&url) {
            let path = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
            for segment in path.split('/').skip(1) {
                let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
                prop_assert!(decoded != "." && decoded != "..", "{url}");
            }
        }
        if NodeAddresses::new("localhost").runtime_url_problem(&url).is_none() {
            prop_assert!(url.starts_with("runtime://") || url.starts_with("hyperty-runtime://"));
            prop_assert!(is_clean(&url), "{url}");
        }
    }

    /// However binds, unbinds and removals interleave, an address is held by at most one
    /// runtime, and a bound address is never taken by another.
    #[test]
    fn no_address_is_handed_to_another_runtime(ops in prop::collection::vec((0u8..4, 0usize..4, 0usize..6), 1..60)) {
        let table = Table::default();
        let urls: Vec<String> = (0..4).map(|i| format!("runtime://localhost/r{i}")).collect();
        let addresses: Vec<String> = (0..6).map(|i| format!("hyperty://localhost/a{i}")).collect();
        let mut owner: Vec<Option<usize>> = vec![None; 6];
        for (op, r, a) in ops {
            let runtime = table.runtime(&urls[r], RuntimeRecord::default);
            match op {
                0 | 1 => {
                    let bound = table.bind_if_free(&addresses[a], &runtime);
                    match owner[a] {
                        Some(o) => prop_assert_eq!(bound, o == r, "bound to another"),
                        None => {
                            prop_assert!(bound);
                            owner[a] = Some(r);
                        }
                    }
                }
                2 => {
                    table.unbind(&addresses[a], &runtime);
                    if owner[a] == Some(r) {
                        owner[a] = None;
                    }
                }
                _ => {
                    table.remove_runtime(&urls[r]);
                    for o in owner.iter_mut() {
                        if *o == Some(r) {
                            *o = None;
                        }
                    }
                }
            }
            for (i, address) in addresses.iter().enumerate() {
                let holder = table.holder(address).map(|h| h.url.clone());
                prop_assert_eq!(holder, owner[i].map(|o| urls[o].clone()));
            }
        }
    }

    /// Every input the bus builds, whatever the values, is within the schema.
    #[test]
    fn inputs_stay_within_the_schema(
        from in url(),
        tos in prop::collection::vec(url(), 1..4),
        topic in prop_oneof![Just(None), Just(Some("changes")), Just(Some("registration")), Just(Some("children"))],
        held in any::<bool>(),
        counts in (0usize..10_000, 0usize..10_000, 0usize..10_000),
        with_user in any::<bool>(),
    ) {
        let message = json!({"id": 1, "type": "create", "from": from, "to": tos});
        let subject = Subject {
            user: with_user.then(|| "@alice:localhost".to_string()),
            runtime: "runtime://localhost/1".into(),
            holds_from: Some(held),
            authenticated: true,
            network_server: (!with_user).then(|| "gateway".to_string()),
            principal: Some(Totals { runtimes: counts.0, addresses: counts.1, foreign_routes: counts.2, registry_entries: None, subscriptions: None }),
            ..Subject::default()
        };
        let context = Context { node: "localhost".into(), time: "2026-11-25T09:00:00Z".into() };
        let targets: Vec<Target> = tos.iter().map(|t| Target { address: t.clone(), topic, held_by_sender: held }).collect();
        let inputs = [
            Input::Message(MessageInput { message: &message, subject: subject.clone(), context: context.clone(), targets, allocation: None }),
            Input::Subscription(SubscriptionInput {
                message: None,
                subscription: Subscription { resource: "comm://localhost/x/changes", subscriber: "runtime://localhost/1", topic, holder: held.then(|| "@bob:localhost".to_string()), held_by_subscriber: held },
                subject: subject.clone(),
                context: context.clone(),
            }),
            Input::Claim(ClaimInput { claim: Claim { address: "runtime://localhost/1".into(), kind: if held { "runtime" } else { "runtime_address" }, domain: Some("localhost".into()) }, subject, context }),
        ];
        // The message's own URLs are the schema's to judge: only the node's parts are checked.
        for input in inputs {
            let value = input.to_value();
            if input_urls_valid(&value) {
                prop_assert!(SCHEMAS.validate("input.schema.json", &value).is_ok(), "{value}");
            }
        }
    }
}

static SCHEMAS: LazyLock<Schemas> = LazyLock::new(|| {
    let dir = std::path::Path::new(REPO).join("schemas");
    let bindings: std::collections::BTreeMap<String, String> =
        [("msgnode".to_string(), "input.schema.json".to_string())].into();
    Schemas::load(&dir, &bindings).expect("schemas")
});

/// Whether the generated message's `from`/`to` are URLs the message schema accepts (the bus
/// refuses the others before any input is built).
fn input_urls_valid(value: &Value) -> bool {
    let message = &value["message"];
    let urls: Vec<&Value> = std::iter::once(&message["from"])
        .chain(message["to"].as_array().into_iter().flatten())
        .collect();
    urls.iter().all(|u| {
        u.as_str().is_none_or(|u| {
            Message::parse(json!({"id": 1, "type": "x", "from": u, "to": u}).to_string()).is_ok()
        })
    }) && value["targets"].as_array().is_none_or(|t| {
        t.iter()
            .all(|t| t["address"].as_str().is_some_and(|a| !a.is_empty()))
    })
}

fn url() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            Just("hyperty"),
            Just("runtime"),
            Just("hyperty-runtime"),
            Just("comm"),
            Just("mn"),
            Just("domain")
        ],
        prop_oneof![
            Just("://localhost"),
            Just("://Localhost:80"),
            Just("://a@b"),
            Just(":"),
            Just("://partner.example"),
            Just("://")
        ],
        prop::collection::vec(segment(), 0..4),
    )
        .prop_map(|(scheme, authority, segments)| {
            let mut url = format!("{scheme}{authority}");
            for s in segments {
                url.push('/');
                url.push_str(&s);
            }
            url
        })
}

fn frame() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,60}",
        (
            prop_oneof![
                Just(json!(1)),
                Just(json!("a")),
                Just(json!(null)),
                Just(json!(true))
            ],
            prop_oneof![Just(json!("create")), Just(json!("")), Just(json!(7))],
            url(),
            prop::collection::vec(url(), 0..3),
            prop_oneof![
                Just(json!({})),
                Just(json!([])),
                Just(json!("b")),
                Just(Value::Null)
            ],
        )
            .prop_map(|(id, kind, from, to, body)| {
                let mut m = json!({"id": id, "type": kind, "from": from, "to": to});
                if !body.is_null() {
                    m["body"] = body;
                }
                m.to_string()
            }),
    ]
}

#[test]
fn the_oracle_is_the_route_table() {
    // The properties above judge against the table's own Synapse patterns, which
    // tests/pep_routes.rs checks against what the installed Synapse registers.
    assert!(DECIDED.len() >= 20);
}

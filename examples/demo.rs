//! The reTHINK bus walkthrough in one command: two protocol stubs, Alice's and Bob's, against a
//! running node (`./scripts/run`). Each step is printed with what was sent (`→`) and received
//! (`←`); the exit code is 0 only when every step behaved as expected.
//!
//! ```sh
//! scripts/synapse register alice PW_A && scripts/synapse register bob PW_B   # once
//! cargo run --example demo -- --alice alice:PW_A --bob bob:PW_B
//! ```
//!
//! 1. both runtimes connect; each allocates a hyperty address, Alice also a data object;
//! 2. Alice's hyperty sends `create` to Bob's; Bob's stub gets it and answers 200;
//! 3. Bob subscribes to Alice's object; Alice publishes a change; Bob receives it;
//! 4. the shipped policy refuses, with its reasons: an unknown message type, a destination
//!    outside the trusted domains, a spoofed sender, a subscription to an untrusted object —
//!    and Bob receives none of them.

mod client;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use client::{code, describe, Stub};
use serde_json::{json, Value};

/// How long a step waits for a message to arrive.
const WAIT: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(about = "Two reTHINK protocol stubs walk through msgnode's message bus")]
struct Args {
    /// Alice's Matrix account, USER:PASSWORD.
    #[arg(long, env = "DEMO_ALICE", hide_env_values = true)]
    alice: Option<String>,
    /// Bob's Matrix account, USER:PASSWORD.
    #[arg(long, env = "DEMO_BOB", hide_env_values = true)]
    bob: Option<String>,
    /// One token for both stubs instead of logins (e.g. a [[bus.network_servers]] token when
    /// the node runs without Synapse).
    #[arg(long, env = "STUB_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The bus's WebSocket endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:9090/ws")]
    bus: String,
    /// The node's Matrix proxy, where the accounts log in.
    #[arg(long, default_value = "http://127.0.0.1:8009")]
    homeserver: String,
    /// The node's reTHINK domain.
    #[arg(long, default_value = "localhost")]
    domain: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(0) => {
            println!("\nevery step behaved as expected");
            ExitCode::SUCCESS
        }
        Ok(failed) => {
            println!("\n{failed} check(s) failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Counts the checks that failed, printing each outcome.
#[derive(Default)]
struct Checks {
    failed: usize,
}

impl Checks {
    fn check(&mut self, ok: bool, what: &str) {
        if ok {
            println!("   ok: {what}");
        } else {
            println!("   FAILED: {what}");
            self.failed += 1;
        }
    }
}

async fn token(args: &Args, account: Option<&str>, who: &str) -> Result<String> {
    if let Some(token) = &args.token {
        return Ok(token.clone());
    }
    let Some((user, password)) = account.and_then(|a| a.split_once(':')) else {
        bail!("give --{who} USER:PASSWORD (a Matrix account on the node), or --token");
    };
    client::login(&args.homeserver, user, password)
        .await
        .with_context(|| format!("{who}'s login"))
}

async fn run(args: &Args) -> Result<usize> {
    let mut checks = Checks::default();
    let domain = &args.domain;

    println!("1. connect two runtimes and allocate addresses");
    let alice_token = token(args, args.alice.as_deref(), "alice").await?;
    let bob_token = token(args, args.bob.as_deref(), "bob").await?;
    let alice_rt = format!("runtime://{domain}/{}", client::runtime_name("alice"));
    let bob_rt = format!("runtime://{domain}/{}", client::runtime_name("bob"));
    let mut alice = Stub::connect(&args.bus, &alice_rt, domain, &alice_token).await?;
    println!("   alice connected as {alice_rt}");
    let mut bob = Stub::connect(&args.bus, &bob_rt, domain, &bob_token).await?;
    println!("   bob connected as {bob_rt}");
    let alice_h = alice.allocate("hyperty", 1).await?.remove(0);
    println!("   alice allocated hyperty {alice_h}");
    let bob_h = bob.allocate("hyperty", 1).await?.remove(0);
    println!("   bob allocated hyperty {bob_h}");
    let object = alice.allocate("comm", 1).await?.remove(0);
    println!("   alice allocated data object {object}");
    let prefix = format!("hyperty://{domain}/");
    checks.check(
        alice_h.starts_with(&prefix) && bob_h.starts_with(&prefix) && alice_h != bob_h,
        "two distinct hyperty addresses of the node's domain",
    );
    checks.check(
        object.starts_with(&format!("comm://{domain}/")),
        "a comm:// object address",
    );

    println!("\n2. alice → bob: create, and bob's response");
    let create = json!({"type": "create", "from": alice_h, "to": bob_h,
        "body": {"value": {"name": "lunch", "resources": ["chat"]}}});
    let id = alice.send(create).await?;
    println!("   → alice sent create to {bob_h}");
    let got = bob.next(WAIT).await?;
    match &got {
        Some(m) => println!("   ← bob got {}", describe(m)),
        None => println!("   ← bob got nothing"),
    }
    let delivered = got
        .as_ref()
        .is_some_and(|m| m["type"] == "create" && m["id"] == id && m["from"] == alice_h.as_str());
    checks.check(delivered, "bob received alice's create, unchanged");
    if let Some(request) = got.filter(|_| delivered) {
        bob.respond(&request, &bob_h, 200, "created").await?;
        println!("   → bob sent response 200 to {alice_h}");
    }
    let answer = alice.response_to(&id, WAIT).await?;
    print_received("alice", answer.as_ref());
    checks.check(
        answer
            .as_ref()
            .is_some_and(|a| code(a) == 200 && a["from"] == bob_h.as_str()),
        "alice received bob's 200",
    );

    println!("\n3. bob subscribes to alice's object; alice publishes a change");
    let changes = format!("{object}/changes");
    let answer = bob
        .subscribe(std::slice::from_ref(&changes), &bob_h)
        .await?;
    println!("   → bob sent subscribe for {changes}");
    print_received("bob", Some(&answer));
    checks.check(code(&answer) == 200, "subscription allowed");
    let update = json!({"type": "update", "from": object, "to": changes,
        "body": {"value": {"lunch": "12:30"}}});
    alice.send(update).await?;
    println!("   → alice sent update to {changes}");
    let got = bob.next(WAIT).await?;
    match &got {
        Some(m) => println!("   ← bob got {}", describe(m)),
        None => println!("   ← bob got nothing"),
    }
    checks.check(
        got.as_ref()
            .is_some_and(|m| m["type"] == "update" && m["body"]["value"]["lunch"] == "12:30"),
        "bob received the change",
    );

    println!("\n4. what the shipped policy refuses (each answered 403 with the reason)");
    let refusals: [(&str, Value, &str); 3] = [
        (
            "a message type the policy does not know",
            json!({"type": "bogus", "from": alice_h, "to": bob_h}),
            "message type 'bogus' is not allowed",
        ),
        (
            "a destination outside the trusted domains",
            json!({"type": "create", "from": alice_h, "to": "hyperty://evil.example/x"}),
            "not in a trusted domain",
        ),
        (
            "a sender address alice does not hold",
            json!({"type": "create", "from": bob_h, "to": bob_h}),
            "spoofed",
        ),
    ];
    for (what, message, reason) in refusals {
        println!("   {what}:");
        let kind = message["type"].as_str().unwrap_or("?").to_string();
        let to = message["to"].as_str().unwrap_or("?").to_string();
        let id = alice.send(message).await?;
        println!("   → alice sent {kind} to {to}");
        let answer = alice.response_to(&id, WAIT).await?;
        print_received("alice", answer.as_ref());
        checks.check(
            answer.as_ref().is_some_and(|a| {
                code(a) == 403
                    && a["body"]["description"]
                        .as_str()
                        .is_some_and(|d| d.contains(reason))
            }),
            &format!("refused: 403 \"…{reason}…\""),
        );
    }
    println!("   a subscription to an object of an untrusted domain:");
    let answer = bob
        .subscribe(&["comm://evil.example/board/changes".to_string()], &bob_h)
        .await?;
    println!("   → bob sent subscribe for comm://evil.example/board/changes");
    print_received("bob", Some(&answer));
    checks.check(code(&answer) == 403, "subscription refused: 403");
    let leaked = bob.next(Duration::from_millis(300)).await?;
    if let Some(m) = &leaked {
        println!("   ← bob got {}", describe(m));
    }
    checks.check(
        leaked.is_none(),
        "bob received none of the refused messages",
    );

    println!("\n5. disconnect: both runtimes release their addresses");
    alice.disconnect().await;
    bob.disconnect().await;
    Ok(checks.failed)
}

fn print_received(who: &str, message: Option<&Value>) {
    match message {
        Some(m) => println!("   ← {who} got {}", describe(m)),
        None => println!(
            "   ← {who} got no response within {}",
            humantime::format_duration(WAIT)
        ),
    }
}

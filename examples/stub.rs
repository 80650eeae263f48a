//! A reTHINK protocol stub on the command line: connects one runtime to msgnode's message bus,
//! allocates a hyperty address for it, and then listens, sends one message, subscribes to a
//! data object's changes, or publishes changes of an object of its own.
//!
//! ```sh
//! cargo run --example stub -- --user bob --password PW listen
//! cargo run --example stub -- --user alice --password PW send --to hyperty://localhost/… --body '{"value":{"name":"lunch"}}'
//! cargo run --example stub -- --user alice --password PW publish
//! cargo run --example stub -- --user bob --password PW subscribe --object comm://localhost/…
//! ```
//!
//! Lines starting with `→` are what the stub sent, `←` what it received. See README.md,
//! "reTHINK bus".

mod client;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use client::{code, describe, destinations, Stub};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "A reTHINK protocol stub for msgnode's message bus")]
struct Args {
    /// The bus's WebSocket endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:9090/ws", global = true)]
    bus: String,
    /// The node's Matrix proxy, where --user/--password log in.
    #[arg(long, default_value = "http://127.0.0.1:8009", global = true)]
    homeserver: String,
    /// The node's reTHINK domain (the homeserver's server_name).
    #[arg(long, default_value = "localhost", global = true)]
    domain: String,
    /// Matrix user (localpart) to log in as.
    #[arg(long, global = true)]
    user: Option<String>,
    /// Its password.
    #[arg(long, env = "STUB_PASSWORD", global = true, hide_env_values = true)]
    password: Option<String>,
    /// An access token instead of logging in: a Matrix access token, or a
    /// `[[bus.network_servers]]` token.
    #[arg(long, env = "STUB_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Runtime name: the stub speaks for runtime://<domain>/<name>. Default: <user>-<random>.
    #[arg(long, global = true)]
    runtime: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print every message received; answer `create` requests to this stub's hyperty with 200.
    Listen,
    /// Send one message from this stub's hyperty; print the response.
    Send {
        /// Destination address (e.g. the hyperty a `listen` stub printed).
        #[arg(long)]
        to: String,
        /// Message type.
        #[arg(long = "type", default_value = "create")]
        kind: String,
        /// Message body (JSON object).
        #[arg(long, default_value = "{}")]
        body: String,
        /// How long to wait for the response.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        wait: Duration,
        /// The response code that counts as success (exit 0); default: any 2xx.
        #[arg(long)]
        expect: Option<u64>,
    },
    /// Subscribe to <object>/changes and print the changes until Ctrl-C (or --count).
    Subscribe {
        /// The data object (comm://…), as `publish` printed it.
        #[arg(long)]
        object: String,
        /// Exit after this many changes.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Allocate a data object (comm://…), print it, then send `update`s to <object>/changes.
    Publish {
        /// How many updates.
        #[arg(long, default_value_t = 5)]
        count: u64,
        /// Time between updates.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Start right away instead of waiting for Enter (the default when stdin is a terminal).
        #[arg(long)]
        now: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stub: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<ExitCode> {
    if let Command::Send { body, .. } = &args.command {
        serde_json::from_str::<Value>(body).context("--body is not JSON")?;
    }
    let token = match (&args.token, &args.user, &args.password) {
        (Some(token), _, _) => token.clone(),
        (None, Some(user), Some(password)) => {
            client::login(&args.homeserver, user, password).await?
        }
        _ => bail!("give --user and --password (a Matrix account on the node), or --token"),
    };
    let name = args
        .runtime
        .clone()
        .unwrap_or_else(|| client::runtime_name(args.user.as_deref().unwrap_or("stub")));
    let runtime = format!("runtime://{}/{name}", args.domain);
    let mut stub = Stub::connect(&args.bus, &runtime, &args.domain, &token).await?;
    println!("connected to {} as {runtime}", args.bus);
    let hyperty = stub.allocate("hyperty", 1).await?.remove(0);
    println!("allocated hyperty {hyperty}");
    let outcome = match args.command {
        Command::Listen => listen(&mut stub, &hyperty).await,
        Command::Send {
            to,
            kind,
            body,
            wait,
            expect,
        } => send(&mut stub, &hyperty, &to, &kind, &body, wait, expect).await,
        Command::Subscribe { object, count } => {
            subscribe(&mut stub, &hyperty, &object, count).await
        }
        Command::Publish {
            count,
            interval,
            now,
        } => publish(&mut stub, count, interval, now).await,
    };
    // Release the runtime's addresses, whatever happened (unless the socket is gone).
    stub.disconnect().await;
    outcome
}

/// Prints everything; answers `create` requests addressed to `hyperty`.
async fn listen(stub: &mut Stub, hyperty: &str) -> Result<ExitCode> {
    println!("listening (Ctrl-C to stop); send to {hyperty}");
    loop {
        let message = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            message = stub.next(Duration::from_secs(3600)) => message?,
        };
        let Some(message) = message else { continue };
        println!("← {}", describe(&message));
        let is_create = message["type"]
            .as_str()
            .is_some_and(|t| t.eq_ignore_ascii_case("create"));
        if is_create && destinations(&message).contains(&hyperty) {
            stub.respond(&message, hyperty, 200, "created").await?;
            println!(
                "→ sent response 200 to {}",
                message["from"].as_str().unwrap_or("?")
            );
        }
    }
}

/// Sends one message; prints its response and whatever else arrives meanwhile.
async fn send(
    stub: &mut Stub,
    hyperty: &str,
    to: &str,
    kind: &str,
    body: &str,
    wait: Duration,
    expect: Option<u64>,
) -> Result<ExitCode> {
    let body: Value = serde_json::from_str(body).context("--body is not JSON")?;
    let id = stub
        .send(json!({"type": kind, "from": hyperty, "to": to, "body": body}))
        .await?;
    println!("→ sent {kind} to {to}");
    let response = stub.response_to(&id, wait).await?;
    // Anything else that came in meanwhile.
    while let Some(other) = stub.next(Duration::ZERO).await? {
        println!("← {}", describe(&other));
    }
    let Some(response) = response else {
        println!(
            "no response within {} (the destination did not answer)",
            humantime::format_duration(wait)
        );
        return Ok(ExitCode::from(2));
    };
    println!("← {}", describe(&response));
    let code = code(&response);
    let ok = match expect {
        Some(expected) => code == expected,
        None => (200..300).contains(&code),
    };
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Subscribes `hyperty` to `<object>/changes` and prints the changes.
async fn subscribe(
    stub: &mut Stub,
    hyperty: &str,
    object: &str,
    count: Option<u64>,
) -> Result<ExitCode> {
    let changes = format!("{}/changes", object.trim_end_matches('/'));
    let answer = stub
        .subscribe(std::slice::from_ref(&changes), hyperty)
        .await?;
    println!(
        "→ sent subscribe to {} for {changes}",
        stub.node_address("sm")
    );
    println!("← {}", describe(&answer));
    if code(&answer) != 200 {
        return Ok(ExitCode::FAILURE);
    }
    println!("waiting for changes (Ctrl-C to stop)");
    let mut seen = 0;
    loop {
        let message = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            message = stub.next(Duration::from_secs(3600)) => message?,
        };
        let Some(message) = message else { continue };
        println!("← {}", describe(&message));
        if destinations(&message).contains(&changes.as_str()) {
            seen += 1;
            if count.is_some_and(|c| seen >= c) {
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
}

/// Allocates a data object and sends `count` updates to its `changes`.
async fn publish(stub: &mut Stub, count: u64, interval: Duration, now: bool) -> Result<ExitCode> {
    let object = stub.allocate("comm", 1).await?.remove(0);
    let changes = format!("{object}/changes");
    println!("allocated data object {object}");
    println!("subscribe to it with: cargo run --example stub -- --user USER --password PW subscribe --object {object}");
    if !now && std::io::stdin().is_terminal() {
        println!("press Enter to send {count} updates to {changes}");
        let mut line = String::new();
        let stdin = std::io::stdin();
        tokio::task::spawn_blocking(move || stdin.read_line(&mut line))
            .await
            .context("reading stdin")?
            .context("reading stdin")?;
    }
    let mut failed = false;
    for n in 1..=count {
        let id = stub
            .send(json!({"type": "update", "from": object, "to": changes,
                "body": {"value": {"n": n, "text": format!("change {n} of {count}")}}}))
            .await?;
        println!("→ sent update {n} to {changes}");
        // Routed messages get no response; a refused one gets a response with the reason.
        let wait = if n == count {
            Duration::from_millis(500)
        } else {
            interval
        };
        if let Some(refused) = stub.response_to(&id, wait).await? {
            println!("← {}", describe(&refused));
            failed = true;
        }
        while let Some(other) = stub.next(Duration::ZERO).await? {
            println!("← {}", describe(&other));
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

//! The command line: one clap `Command` enum, mirrored on OPA's verbs where they overlap.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// A policy-enforced reTHINK messaging node in front of Matrix.
#[derive(Debug, Parser)]
#[command(name = "msgnode", version, about, propagate_version = true)]
pub struct Cli {
    /// Configuration file (default: ./msgnode.toml when present). `MSGNODE_*` variables
    /// override it, e.g. MSGNODE_PDP__LISTEN=127.0.0.1:9000.
    #[arg(long, short = 'c', global = true, env = "MSGNODE_CONFIG")]
    pub config: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node: the policy decision service on its HTTP API, with hot reload.
    #[command(alias = "serve")]
    Run(RunArgs),
    /// Run the policy decision service alone (for enforcement points other than msgnode's).
    Pdp(RunArgs),
    /// Work with policies: test, evaluate, check.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Measure decision latency and throughput and print the figures.
    Bench(BenchArgs),
    /// Matrix application service: generate the registration file for the homeserver.
    #[command(subcommand)]
    Appservice(AppserviceCommand),
}

/// `msgnode appservice …`
#[derive(Debug, Subcommand)]
pub enum AppserviceCommand {
    /// Write a new registration (random as_token/hs_token, exclusive `@_msgnode_.*` users).
    Registration(RegistrationArgs),
}

/// `msgnode appservice registration`
#[derive(Debug, clap::Args)]
pub struct RegistrationArgs {
    /// Where the homeserver reaches msgnode's appservice endpoints.
    #[arg(long, default_value = "http://127.0.0.1:8009")]
    pub url: String,
    /// File to write (mode 0600); standard output when absent.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Replace an existing file (the homeserver must then be restarted with it).
    #[arg(long)]
    pub force: bool,
    /// Appservice id.
    #[arg(long, default_value = "msgnode")]
    pub id: String,
    /// Localpart prefix of the exclusive virtual-user and alias namespace.
    #[arg(long, default_value = "_msgnode_")]
    pub prefix: String,
    /// The homeserver's server name; the namespace covers its users only.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
}

/// Flags of `run` and `pdp`; each overrides the config file.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Policy bundle directory ([pdp] policies).
    #[arg(long)]
    pub policies: Option<PathBuf>,
    /// PDP API address ([pdp] listen).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
}

/// `msgnode policy …`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Run `test_*` rules and the fixtures of a bundle; exit 1 if any fails.
    Test(TestArgs),
    /// Evaluate a query against a bundle and print the result as JSON.
    Eval(EvalArgs),
    /// Parse and compile a bundle; print errors as file:line:col: message; exit 1 on error.
    Check(CheckArgs),
}

/// `msgnode policy test`
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Bundle directory.
    #[arg(default_value = "policies")]
    pub dir: PathBuf,
    /// Fixture directory (default: DIR/fixtures).
    #[arg(long)]
    pub fixtures: Option<PathBuf>,
    /// Schema directory used to validate fixture inputs.
    #[arg(long, default_value = "schemas")]
    pub schemas: PathBuf,
    /// Schema file (in --schemas) that fixture inputs must match.
    #[arg(long, default_value = "input.schema.json")]
    pub input_schema: String,
    /// Query of fixtures that name none.
    #[arg(long, default_value = "data.msgnode.authz.decision")]
    pub decision: String,
    /// Only run tests whose name contains this text.
    #[arg(long = "run", short = 'r')]
    pub filter: Option<String>,
    /// Report covered and uncovered lines per module.
    #[arg(long)]
    pub coverage: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// `msgnode policy eval`
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Bundle directory.
    #[arg(long = "data", short = 'd', default_value = "policies")]
    pub dir: PathBuf,
    /// Input document (JSON file; `-` for stdin).
    #[arg(long, short = 'i')]
    pub input: Option<PathBuf>,
    /// The document to evaluate, e.g. data.msgnode.authz.decision.
    pub query: String,
}

/// `msgnode policy check`
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Bundle directory.
    #[arg(default_value = "policies")]
    pub dir: PathBuf,
}

/// `msgnode bench`
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Which measurements.
    #[arg(long, value_enum, default_value_t = BenchMode::All)]
    pub mode: BenchMode,
    /// Bundle directory.
    #[arg(long, default_value = "policies")]
    pub policies: PathBuf,
    /// Measurement length per case, in seconds.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// HTTP connections kept alive by the load generator (`proxy`: Matrix clients).
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// `journal`: messages recorded per second.
    #[arg(long, default_value_t = 20_000)]
    pub rate: u64,
}

/// Which benchmark to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchMode {
    /// Everything.
    All,
    /// In-process evaluation, uncached and cached.
    Eval,
    /// HTTP decisions over loopback.
    Http,
    /// Matrix sends directly to a real Synapse vs through the proxy (starts its own Synapse;
    /// run from the repository root). Not part of `all`.
    Proxy,
    /// reTHINK messages routed between stubs over WebSocket, and their history reaching
    /// Matrix (starts its own Synapse and node; run from the repository root). Not part of
    /// `all`.
    Bus,
    /// The Matrix policy server: `/sign` over loopback TLS, and a real Synapse's sends
    /// without and with the policy server, same run (starts its own Synapse; run from the
    /// repository root). Not part of `all`.
    PolicyServer,
    /// The journal's group commit under a sustained offered rate (`--rate`, `--seconds`)
    /// against its own Synapse, then every record read back. Not part of `all`.
    Journal,
}

/// Output format of reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people.
    Text,
    /// For tools.
    Json,
}

//! The command line: one clap `Command` enum, mirrored on OPA's verbs where they overlap.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Run the policy decision service alone (for enforcement points other than msgnode's):
    /// no Matrix proxy, no bus, whatever the configuration says.
    Pdp(RunArgs),
    /// Work with policies: test, evaluate, check, build bundles.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Print msgnode's version, the versions of its policy engine and Matrix library, and
    /// the commit it was built from.
    Version(VersionArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(CompletionsArgs),
    /// Print the manual page (roff), or write one per command into a directory.
    Man(ManArgs),
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
    /// Where the homeserver reaches msgnode's appservice endpoints (default:
    /// http://<[pep] listen>).
    #[arg(long)]
    pub url: Option<String>,
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
    /// The homeserver's server name; the namespace covers its users only (default:
    /// [pep] server_name).
    #[arg(long)]
    pub server_name: Option<String>,
}

/// `msgnode version`
#[derive(Debug, clap::Args)]
pub struct VersionArgs {
    /// Output format.
    #[arg(long, short = 'f', value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// `msgnode completions`
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell.
    pub shell: clap_complete::Shell,
}

/// `msgnode man`
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Write `msgnode.1` and one page per subcommand (`msgnode-policy-test.1`, …) here
    /// instead of printing `msgnode.1`.
    #[arg(long, short = 'o')]
    pub out_dir: Option<PathBuf>,
}

/// Flags of `run` and `pdp`; each overrides the config file.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Policy bundle directory ([pdp] policies).
    #[arg(long)]
    pub policies: Option<PathBuf>,
    /// PDP API address ([pdp] listen): host:port, or OPA's :8181 for every interface.
    #[arg(long, value_parser = crate::config::parse_listen)]
    pub listen: Option<SocketAddr>,
}

/// `msgnode policy …`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Run `test_*` rules and the fixtures of a bundle; exit 1 if any fails.
    Test(TestArgs),
    /// Evaluate a query (a data reference or any Rego expression) against a bundle.
    Eval(EvalArgs),
    /// Parse and compile bundles; print every error as file:line:col: message on stderr;
    /// exit 1 on any error.
    Check(CheckArgs),
    /// Write an OPA bundle tarball (.manifest, optional .signatures.json) for bundle servers.
    Build(BuildArgs),
    /// Re-decide a recorded decision log with a candidate bundle and print what would change:
    /// allows that become denies and back, grouped by kind and reason, with examples.
    Replay(ReplayArgs),
}

/// `msgnode policy replay`
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Decision log: JSON lines in OPA's decision-log shape (`-` for stdin). Inputs are
    /// re-decided as logged: masked fields stay masked, and the report says which.
    #[arg(long)]
    pub log: PathBuf,
    /// The candidate: a bundle directory or a bundle tarball (.tar.gz).
    #[arg(long)]
    pub bundle: PathBuf,
    /// Exit 1 when any decision changes (for CI).
    #[arg(long)]
    pub fail_on_difference: bool,
    /// Time limit of one re-decision, e.g. 5s (offline: not the serving [pdp] eval_timeout,
    /// so a busy machine does not turn allows into timeouts).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Output format.
    #[arg(long, short = 'f', value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// `msgnode policy test`
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Bundle directory (default: [pdp] policies).
    pub dir: Option<PathBuf>,
    /// Fixture directory (default: DIR/fixtures).
    #[arg(long)]
    pub fixtures: Option<PathBuf>,
    /// Schema directory used to validate fixture inputs (default: DIR/schemas, then
    /// DIR/../schemas, then [pdp] schema_dir).
    #[arg(long)]
    pub schemas: Option<PathBuf>,
    /// Schema file (in --schemas) that fixture inputs must match.
    #[arg(long, default_value = "input.schema.json")]
    pub input_schema: String,
    /// Query of fixtures that name none (default: [pdp] decision).
    #[arg(long)]
    pub decision: Option<String>,
    /// Only run tests whose name matches this regular expression (as `opa test -r`).
    #[arg(long = "run", short = 'r')]
    pub filter: Option<String>,
    /// Report covered and uncovered lines per module, and the total.
    #[arg(long)]
    pub coverage: bool,
    /// Fail when total coverage is below this percentage (implies --coverage).
    #[arg(long, value_name = "PERCENT")]
    pub threshold: Option<f64>,
    /// Print every test, not only failures and the summary.
    #[arg(long, short = 'v')]
    pub verbose: bool,
    /// Time limit of one test's evaluation, e.g. 5s or 500ms.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Run again whenever a file of the bundle changes (until interrupted).
    #[arg(long, short = 'w')]
    pub watch: bool,
    /// The real OPA engine's C library (`scripts/opa path` installs it and prints where):
    /// every test rule, fixture and fixture variant must come out the same on it.
    #[arg(long, value_name = "LIB")]
    pub opa: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'f', value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// `msgnode policy eval`
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Bundle directory (default: [pdp] policies).
    #[arg(long = "data", short = 'd')]
    pub dir: Option<PathBuf>,
    /// Input document (JSON file; `-` for stdin).
    #[arg(long, short = 'i', conflicts_with = "fixture")]
    pub input: Option<PathBuf>,
    /// A fixture file: evaluates its `input` (with its `query`, else QUERY, else [pdp]
    /// decision) and compares the result with its `expect`; exit 1 on a mismatch.
    #[arg(long)]
    pub fixture: Option<PathBuf>,
    /// Output format: `json` (OPA's result document), `pretty` (the value, indented), `raw`
    /// (the value; strings unquoted).
    #[arg(long, short = 'f', value_enum, default_value_t = EvalFormat::Json)]
    pub format: EvalFormat,
    /// Exit 1 when the result is undefined (as `opa eval --fail`).
    #[arg(long)]
    pub fail: bool,
    /// Exit 1 when the result is defined (as `opa eval --fail-defined`).
    #[arg(long, conflicts_with = "fail")]
    pub fail_defined: bool,
    /// Time limit of the evaluation.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// What to evaluate: a data reference (data.msgnode.authz.decision) or any Rego
    /// expression (`count(data.config.blocked_users) > 0`); default: [pdp] decision.
    pub query: Option<String>,
}

/// Output formats of `policy eval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EvalFormat {
    /// `{"result": [{"expressions": [{"value", "text"}], "bindings"}]}`, as `opa eval`.
    Json,
    /// The value, indented; `undefined` when there is none.
    Pretty,
    /// The value on one line; strings without quotes.
    Raw,
}

/// `msgnode policy check`
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Bundle directories (default: [pdp] policies).
    pub dirs: Vec<PathBuf>,
    /// Also fail on what is probably a mistake: imports never used, the decision rule
    /// outside the bytecode VM.
    #[arg(long)]
    pub strict: bool,
}

/// `msgnode policy build`
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Bundle directory (default: [pdp] policies).
    pub dir: Option<PathBuf>,
    /// The tarball to write.
    #[arg(long, short = 'o', default_value = "bundle.tar.gz")]
    pub output: PathBuf,
    /// Revision in the manifest (default: the content hash).
    #[arg(long)]
    pub revision: Option<String>,
    /// Data roots the bundle owns (repeatable; default: its packages' and data's top-level
    /// names).
    #[arg(long = "root")]
    pub roots: Vec<String>,
    /// Leave the bundle's tests and fixtures out (they are kept by default, so that replicas
    /// can gate reloads on them).
    #[arg(long)]
    pub no_tests: bool,
    /// Private key (PEM; for HS*: the secret's file) that signs the bundle.
    #[arg(long)]
    pub signing_key: Option<PathBuf>,
    /// Signing algorithm: EdDSA (ed25519), RS256, PS256, ES256, HS256, …
    #[arg(long, default_value = "EdDSA")]
    pub signing_alg: String,
    /// Key id put in the signature (replicas may require it).
    #[arg(long)]
    pub key_id: Option<String>,
    /// Scope put in the signature.
    #[arg(long)]
    pub scope: Option<String>,
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
    /// `suite`: what the node keeps its state in.
    #[arg(long, value_enum, default_value_t = BenchBackend::Memory)]
    pub backend: BenchBackend,
    /// `suite`: the sizes of each shape (allocations, messages, subscribers).
    #[arg(long, value_delimiter = ',', default_values_t = [100, 1000, 10_000])]
    pub sizes: Vec<usize>,
    /// `suite`: which shapes to run.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [SuiteShape::Alloc, SuiteShape::Messages, SuiteShape::Publish])]
    pub shapes: Vec<SuiteShape>,
    /// `eval`: time another engine on the same bundle and inputs, alternating with msgnode.
    #[arg(long, value_enum)]
    pub against: Option<Against>,
    /// `--against opa`: the OPA engine's C library (default: what `scripts/opa path` prints).
    #[arg(long, value_name = "LIB")]
    pub opa: Option<PathBuf>,
}

/// Where `msgnode bench --mode suite` keeps the node's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchBackend {
    /// Memory only: no homeserver.
    Memory,
    /// Its own Synapse on SQLite (data on tmpfs).
    Sqlite,
    /// Its own Synapse on PostgreSQL (data on tmpfs).
    Postgres,
}

/// The shapes of `msgnode bench --mode suite`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SuiteShape {
    /// Allocations and releases, one stub, back to back.
    Alloc,
    /// Messages one by one between two hyperties.
    Messages,
    /// One update published to many subscribers.
    Publish,
}

/// The engines `bench --against` compares with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Against {
    /// The real OPA engine (Go, from the C library `scripts/opa` installs).
    Opa,
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
    /// The shapes of the reTHINK Messaging Node performance specs (allocations, messages
    /// one by one, publish to many subscribers) for `--sizes`, on `--backend` (run from the
    /// repository root). Not part of `all`.
    Suite,
}

/// Output format of reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people.
    Text,
    /// For tools.
    Json,
}

//! Node configuration: one TOML file (`msgnode.toml`) with `MSGNODE_*` environment overrides.
//!
//! Every field has a default, so the node starts with no file at all. Environment variables
//! override the file: `MSGNODE_PDP__LISTEN=127.0.0.1:9000` sets `[pdp] listen`, with `__`
//! separating nesting levels (`MSGNODE_PDP__CACHE__TTL=30s`). `msgnode.example.toml` in the
//! repository documents every key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// The top-level sections; environment variables name one of them first.
const SECTIONS: [&str; 6] = ["pdp", "pep", "bus", "log", "policy_server", "console"];

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named on the command line does not exist.
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    /// A key has the wrong type, an unknown value, or the file is not TOML: one line per
    /// problem, naming where it came from, the key and what is allowed.
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

impl From<figment::Error> for ConfigError {
    fn from(error: figment::Error) -> Self {
        ConfigError::Invalid(error.into_iter().map(|e| describe(&e)).collect())
    }
}

/// One figment error as people read it: `msgnode.toml: pdp.listen_addr: unknown key (allowed:
/// …)`, without figment's profile prefix (`default.`).
fn describe(error: &figment::Error) -> String {
    use figment::error::Kind;
    let mut path = error.path.clone();
    let what = match &error.kind {
        Kind::UnknownField(field, allowed) => {
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            format!("unknown key (allowed: {})", allowed.join(", "))
        }
        Kind::MissingField(field) => {
            if path.last().map(String::as_str) != Some(field.as_ref()) {
                path.push(field.to_string());
            }
            "missing".to_string()
        }
        other => other.to_string(),
    };
    let origin = match &error.metadata {
        Some(metadata) => match &metadata.source {
            Some(figment::Source::File(file)) => file.display().to_string(),
            _ if metadata.name.contains("environment") => {
                let var = path.iter().map(|k| k.to_uppercase()).collect::<Vec<_>>();
                format!("environment variable MSGNODE_{}", var.join("__"))
            }
            _ => metadata.name.to_string(),
        },
        None => "configuration".to_string(),
    };
    match path.is_empty() {
        true => format!("{origin}: {what}"),
        false => format!("{origin}: {}: {what}", path.join(".")),
    }
}

/// A listen address as people write it: `host:port`, `localhost:port`, or OPA's `:port`
/// (every interface).
///
/// # Errors
/// Anything else, with an example of what is accepted.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    let parsed = match text.strip_prefix(':') {
        Some(port) => port
            .parse::<u16>()
            .ok()
            .map(|port| SocketAddr::from(([0, 0, 0, 0], port))),
        None => match text.strip_prefix("localhost:") {
            Some(port) => port
                .parse::<u16>()
                .ok()
                .map(|port| SocketAddr::from(([127, 0, 0, 1], port))),
            None => text.parse().ok(),
        },
    };
    parsed.ok_or_else(|| {
        format!("{text:?} is not a listen address (expected e.g. 127.0.0.1:8181, [::1]:8181, localhost:8181 or :8181)")
    })
}

fn listen_addr<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_listen(&text).map_err(serde::de::Error::custom)
}

/// The whole configuration of one node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Policy decision service.
    pub pdp: PdpConfig,
    /// Matrix enforcement point (client-server proxy in front of the homeserver).
    pub pep: PepConfig,
    /// reTHINK message bus (protocol stubs over WebSocket).
    pub bus: BusConfig,
    /// Process logging (not decision logs).
    pub log: LogConfig,
    /// Matrix policy server (MSC4284): the homeserver asks it before accepting an event.
    pub policy_server: PolicyServerConfig,
    /// The security team's console on the PDP listener (`/console`).
    pub console: ConsoleConfig,
}

/// `[console]`: a page on the PDP listener for the security team: live decisions, counts,
/// reloads, coverage, shadow differences and a playground.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Serve `/console` (behind `[pdp] token`, like the API). Without a token the node
    /// refuses to start when `write` is on or `[pdp] listen` is not a loopback address.
    pub enabled: bool,
    /// Allow the console to change something: loading and unloading the shadow candidate.
    /// Off: read-only (the playground still evaluates, changing nothing). Needs `write_token`.
    pub write: bool,
    /// The credential of the console's writes (bearer, or Basic password), other than
    /// `[pdp] token` — which every PEP holds — so that the API token alone cannot load a
    /// candidate. It also opens the console's reads.
    pub write_token: Option<String>,
    /// Host names (`name` or `name:port`) the console answers to besides the listener's own
    /// address and `localhost`/`127.0.0.1`/`[::1]` with its port; any other `Host` is 403
    /// (DNS rebinding).
    pub hosts: Vec<String>,
    /// Live tails one client address may hold open at once.
    pub max_subscribers_per_client: usize,
    /// Longest life of one live tail; the page's `EventSource` reconnects on its own.
    #[serde(with = "humantime_serde")]
    pub tail_lifetime: Duration,
    /// Decisions kept for the tail and the playground (already masked), newest first.
    pub recent_decisions: usize,
    /// Bytes those decisions may take, serialised; the oldest go first.
    pub recent_bytes: usize,
    /// Live tails (server-sent event streams) open at once; more are refused with 503.
    pub max_subscribers: usize,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            write: false,
            write_token: None,
            hosts: Vec::new(),
            recent_decisions: 1000,
            recent_bytes: 8 * 1024 * 1024,
            max_subscribers: 8,
            max_subscribers_per_client: 2,
            tail_lifetime: Duration::from_secs(600),
        }
    }
}

impl ConsoleConfig {
    /// What makes this console unsafe to serve with `pdp`, one line each (none: it may start).
    pub fn problems(&self, pdp: &PdpConfig) -> Vec<String> {
        if !self.enabled {
            return Vec::new();
        }
        let set = |t: &Option<String>| t.as_deref().is_some_and(|t| !t.is_empty());
        let mut problems = Vec::new();
        if !set(&pdp.token) && !pdp.listen.ip().is_loopback() {
            problems.push(format!(
                "[console] enabled on {} (not loopback) needs [pdp] token: anyone who reaches the listener would read the decisions",
                pdp.listen
            ));
        }
        if self.write && !set(&pdp.token) {
            problems.push("[console] write needs [pdp] token: without it any page the browser opens could reach the console (DNS rebinding) and load a candidate".to_string());
        }
        if self.write && !set(&self.write_token) {
            problems.push("[console] write needs [console] write_token: [pdp] token is every PEP's credential and alone may not load a candidate".to_string());
        }
        if set(&self.write_token) && self.write_token == pdp.token {
            problems.push("[console] write_token must differ from [pdp] token".to_string());
        }
        problems
    }
}

/// `[pdp]`: the policy decision service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PdpConfig {
    /// Address of the OPA-compatible HTTP API (`host:port`; OPA's `:8181` means every
    /// interface).
    #[serde(deserialize_with = "listen_addr")]
    pub listen: SocketAddr,
    /// Bundle directory: `*.rego` modules and `data.json`/`data.yaml` files.
    pub policies: PathBuf,
    /// Directory of JSON Schemas (draft 2020-12) that `schemas` bindings refer to.
    pub schema_dir: PathBuf,
    /// Binds a data path (`msgnode/authz`) to a schema file name in `schema_dir`: inputs posted
    /// to that path (or below it) are validated before evaluation and rejected with 400.
    pub schemas: BTreeMap<String, String>,
    /// The rule the node's own enforcement points evaluate; it must yield
    /// `{"allow": bool, "reasons": [string]}`.
    pub decision: String,
    /// Bearer token required on every API request when set. Compared in constant time.
    pub token: Option<String>,
    /// Evaluation time limit (wall time); an evaluation that exceeds it is an error, and so a
    /// deny — unless its thread ran for less than half of it (starved of a core): then it is
    /// evaluated once more, within the same limit.
    #[serde(with = "humantime_serde")]
    pub eval_timeout: Duration,
    /// Most bytecode-VM instructions one decision may execute (a deterministic bound next to
    /// `eval_timeout`; the default is high enough that the time limit governs).
    pub max_instructions: usize,
    /// Largest accepted request body, in bytes (larger → 413).
    pub max_body_bytes: usize,
    /// Threads that evaluate policies (decisions the cache does not hold); unset: one per
    /// core. Evaluation never runs on the threads serving sockets and requests.
    pub eval_threads: Option<usize>,
    /// Evaluations that may wait for a thread; past it, callers wait (and slow down).
    pub eval_queue: usize,
    /// How long a caller waits for a place in a full `eval_queue`; past it the decision
    /// fails (refused, "the evaluation queue is full"), so waiting callers stay bounded.
    #[serde(with = "humantime_serde")]
    pub eval_queue_wait: Duration,
    /// Callers that may wait for a place in a full `eval_queue` at once; one more is refused
    /// at once (a failed decision; `503` on the PDP API), so what waits stays bounded
    /// whatever the number of connections.
    pub eval_waiters: usize,
    /// API requests per client address (429 with `Retry-After` past it).
    pub rate_limit: RateLimit,
    /// Quiet period after a file change before the bundle is reloaded.
    #[serde(with = "humantime_serde")]
    pub reload_debounce: Duration,
    /// Activate a new revision only when its own tests (`*_test.rego`, `fixtures/`) pass;
    /// otherwise the previous revision keeps serving. Unset: on when the bundle has tests.
    pub reload_requires_tests: Option<bool>,
    /// Pull bundles from an HTTP(S) server (OPA's bundle protocol) instead of reading
    /// `policies`; unset: the `policies` directory, watched.
    pub bundle: Option<BundleConfig>,
    /// Decision cache.
    pub cache: CacheConfig,
    /// Decision log.
    pub decision_log: DecisionLogConfig,
    /// A candidate bundle directory: every live decision is also decided by it, off the
    /// critical path and never enforced; differences are logged and counted
    /// (`msgnode_pdp_shadow_differences_total`). Re-read on SIGHUP.
    pub shadow: Option<PathBuf>,
}

impl Default for PdpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8181)),
            policies: PathBuf::from("policies"),
            schema_dir: PathBuf::from("schemas"),
            schemas: BTreeMap::from([("msgnode".to_string(), "input.schema.json".to_string())]),
            decision: "data.msgnode.authz.decision".to_string(),
            token: None,
            eval_timeout: Duration::from_millis(50),
            max_instructions: 10_000_000,
            max_body_bytes: 1024 * 1024,
            eval_threads: None,
            eval_queue: 1024,
            eval_queue_wait: Duration::from_secs(1),
            eval_waiters: 1024,
            rate_limit: RateLimit::new(100_000, 100_000),
            reload_debounce: Duration::from_millis(100),
            reload_requires_tests: None,
            bundle: None,
            cache: CacheConfig::default(),
            decision_log: DecisionLogConfig::default(),
            shadow: None,
        }
    }
}

/// `[pdp.bundle]`: where replicas get their bundle (OPA's bundle service).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BundleConfig {
    /// The bundle's URL (`https://bundles.example/msgnode.tar.gz`), from `msgnode policy build`
    /// or any OPA bundle server.
    pub url: String,
    /// The bundle's name (decision logs, `/health?bundles`, `/v1/status`).
    pub name: String,
    /// Bearer token sent to the bundle server.
    pub token: Option<String>,
    /// Shortest wait between two polls (each wait is random between the two, so that
    /// replicas spread out).
    #[serde(with = "humantime_serde")]
    pub min_delay: Duration,
    /// Longest wait between two polls.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Ask the server to hold each poll open until the bundle changes, up to this long
    /// (OPA's long polling, `Prefer: wait=<seconds>`); servers that do not support it answer
    /// at once and the node polls as usual.
    #[serde(default, with = "humantime_serde")]
    pub long_polling_timeout: Option<Duration>,
    /// How long one download may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Largest bundle accepted (compressed download and uncompressed content).
    pub max_bytes: u64,
    /// Directory where the last activated bundle is kept, so that the node starts with it
    /// when the server cannot be reached; unset: not kept.
    pub persist_dir: Option<PathBuf>,
    /// Verify the bundle's signature before activating it; unset: unsigned bundles accepted.
    pub verification: Option<VerificationConfig>,
}

impl Default for BundleConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            name: "msgnode".to_string(),
            token: None,
            min_delay: Duration::from_secs(60),
            max_delay: Duration::from_secs(120),
            long_polling_timeout: None,
            timeout: Duration::from_secs(30),
            max_bytes: 64 * 1024 * 1024,
            persist_dir: None,
            verification: None,
        }
    }
}

/// `[pdp.bundle.verification]`: the key bundles must be signed with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VerificationConfig {
    /// PEM public key file (for `HS*`: the shared secret's file).
    pub public_key: PathBuf,
    /// `EdDSA` (ed25519), `RS256`, … (as `policy build --signing-alg`).
    #[serde(default = "default_signing_alg")]
    pub algorithm: String,
    /// Key id the signature must name, if any.
    #[serde(default)]
    pub key_id: Option<String>,
    /// Scope the signature must carry, if any.
    #[serde(default)]
    pub scope: Option<String>,
}

fn default_signing_alg() -> String {
    "EdDSA".to_string()
}

/// `[pdp.cache]`: decisions cached per (revision, query, canonical input).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Turn the cache off entirely.
    pub enabled: bool,
    /// Most decisions kept.
    pub max_entries: u64,
    /// How long a decision may be served from the cache. Bounds how stale a decision that
    /// depends on an ignored field (such as the time) can get.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Input fields left out of the cache key (dotted paths below `input`): values that change
    /// on every request and that policies do not decide on at finer grain than `ttl`.
    pub ignore_fields: Vec<String>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_entries: 100_000,
            ttl: Duration::from_secs(10),
            ignore_fields: vec!["message.id".to_string(), "matrix.event_id".to_string()],
        }
    }
}

/// `[pdp.decision_log]`: one JSON line per decision, in OPA's decision-log shape.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DecisionLogConfig {
    /// Switch decision logging off.
    pub enabled: bool,
    /// `"stdout"`, `"stderr"`, `"off"` (upload only, or nothing), or a file path with a `/`
    /// or an extension (appended to; created readable by its owner only; reopened on SIGHUP,
    /// for log rotation). Anything else is refused at start.
    pub output: String,
    /// Input fields (dotted paths below `input`) replaced by `"**REDACTED**"` in the log. The
    /// default masks message values, Matrix event content, and identity assertions and
    /// tokens (`body.idToken`, `body.assertion`, `body.accessToken`, `body.identity.*`).
    pub mask: Vec<String>,
    /// Key names masked wherever they are in the input, case-insensitively; `*` matches any
    /// run of characters. The default masks tokens, assertions, passwords, secrets and
    /// credentials of any spelling, `auth` and `interworking` (reTHINK's access tokens of
    /// other domains).
    pub mask_keys: Vec<String>,
    /// Labels of every record (OPA's `labels`); `id` defaults to a random id per start (or
    /// the `[bus] replica` name) and `version` to msgnode's.
    pub labels: BTreeMap<String, String>,
    /// Also upload records to an HTTP endpoint, in gzip batches (OPA's decision-log service).
    pub upload: Option<DecisionUploadConfig>,
}

/// `[pdp.decision_log.upload]`: where and how decision records are shipped.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DecisionUploadConfig {
    /// Endpoint records are POSTed to, as a gzip-compressed JSON array
    /// (`https://logs.example/logs`, as OPA's `services` + `decision_logs`).
    pub url: String,
    /// Bearer token sent with each batch.
    pub token: Option<String>,
    /// Records sent in one batch at most.
    pub max_batch: usize,
    /// Longest a record waits before its batch is sent.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Records kept while the endpoint is down; past it the oldest are dropped (and counted).
    pub max_buffer: usize,
    /// How long one upload may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for DecisionUploadConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            token: None,
            max_batch: 1000,
            flush_interval: Duration::from_secs(5),
            max_buffer: 100_000,
            timeout: Duration::from_secs(10),
        }
    }
}

impl Default for DecisionLogConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            output: "stdout".to_string(),
            mask: [
                "message.body.value",
                "message.body.idToken",
                "message.body.assertion",
                "message.body.accessToken",
                "message.body.identity.assertion",
                "message.body.identity.idToken",
                "matrix.content",
            ]
            .map(str::to_string)
            .to_vec(),
            mask_keys: [
                "*token*",
                "*assertion*",
                "*password*",
                "*secret*",
                "*credential*",
                "auth",
                "interworking",
            ]
            .map(str::to_string)
            .to_vec(),
            labels: BTreeMap::new(),
            upload: None,
        }
    }
}

/// `[pep]`: the Matrix client-server proxy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PepConfig {
    /// Start the proxy (needs a homeserver).
    pub enabled: bool,
    /// Where Matrix clients connect.
    #[serde(deserialize_with = "listen_addr")]
    pub listen: SocketAddr,
    /// The homeserver's client-server API base URL.
    pub homeserver: String,
    /// The homeserver's `server_name` (the node's domain in policy inputs).
    pub server_name: String,
    /// What a request gets when the PDP cannot decide: `forbidden` (403) or `unavailable` (503).
    pub on_pdp_failure: PdpFailure,
    /// How long an access token's user id (from `/whoami`) is remembered.
    #[serde(with = "humantime_serde")]
    pub whoami_ttl: Duration,
    /// Largest body of an intercepted request (larger → 413 `M_TOO_LARGE`).
    pub max_body_bytes: usize,
    /// Appservice registration file (from `msgnode appservice registration`); when set, the
    /// proxy's listener also serves the application-service API the homeserver pushes to.
    pub registration: Option<PathBuf>,
    /// Room ids (regexes) where a pushed event the policy denies is redacted (with the
    /// reasons); elsewhere it is only logged. Needs the appservice's user in the room with
    /// redaction power.
    pub redact_denied_rooms: Vec<String>,
    /// A remote, OPA-compatible PDP (e.g. `http://127.0.0.1:8181`, another node's `[pdp]
    /// listen`) asked for every decision instead of this process's; the `[pdp] decision`
    /// rule is posted to. Unset: decide in-process.
    pub pdp_url: Option<String>,
    /// Bearer token for the remote PDP (its `[pdp] token`).
    pub pdp_token: Option<String>,
    /// How long one remote decision may take (connect included); past it the request is
    /// refused as `on_pdp_failure` says. In-process decisions are bounded by `[pdp]
    /// eval_timeout`.
    #[serde(with = "humantime_serde")]
    pub pdp_timeout: Duration,
    /// Decided requests (the writes the proxy intercepts) per client address: 429
    /// `M_LIMIT_EXCEEDED` with `retry_after_ms` past it. Synapse limits what it serves itself.
    pub rate_limit: RateLimit,
    /// Decisions per user (a request costs one per event or membership change it makes):
    /// 429 `M_LIMIT_EXCEEDED` past it. Checked once the access token names the user, so
    /// clients behind one address do not share a bucket.
    pub user_rate_limit: RateLimit,
    /// Most decisions one request may need (a `createRoom` with many invites or
    /// `initial_state` events, a profile change of a user in many rooms): past it 413
    /// `M_TOO_LARGE`, decided by no one. At most `user_rate_limit.burst`.
    pub max_decisions_per_request: usize,
}

impl Default for PepConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 8009)),
            homeserver: "http://127.0.0.1:8008".to_string(),
            server_name: "localhost".to_string(),
            on_pdp_failure: PdpFailure::Forbidden,
            whoami_ttl: Duration::from_secs(30),
            max_body_bytes: 1024 * 1024,
            registration: None,
            redact_denied_rooms: vec![".*".to_string()],
            pdp_url: None,
            pdp_token: None,
            pdp_timeout: Duration::from_millis(250),
            rate_limit: RateLimit::new(500, 1000),
            user_rate_limit: RateLimit::new(500, 2000),
            max_decisions_per_request: 1000,
        }
    }
}

/// Answer to a request the PDP could not decide.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PdpFailure {
    /// 403 `M_FORBIDDEN`, reason "policy unavailable".
    Forbidden,
    /// 503 `M_UNKNOWN`, reason "policy unavailable".
    Unavailable,
}

/// `[bus]`: the reTHINK message bus.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    /// Start the bus.
    pub enabled: bool,
    /// Where protocol stubs connect (`ws://<listen>/ws`, also `/stub/connect`), and where
    /// peer nodes post messages (`/bus/v1/messages`).
    #[serde(deserialize_with = "listen_addr")]
    pub listen: SocketAddr,
    /// The node's reTHINK domain; default: `[pep] server_name`.
    pub domain: Option<String>,
    /// `delivered`: deliver, then write history in the background; `persisted`: write the
    /// history first, then deliver.
    pub durability: Durability,
    /// Largest WebSocket message accepted (larger → close code 1009).
    pub max_frame_bytes: usize,
    /// Messages queued for one socket before it counts as full: senders to it wait (their
    /// sockets are not read meanwhile) until `slow_receiver_close_after`.
    pub outbound_queue: usize,
    /// Bytes queued for one socket before it counts as full (as `outbound_queue`): what a
    /// receiver that does not read can hold in the node's memory.
    pub outbound_queue_bytes: usize,
    /// How long a socket's queue may stay full before the socket is closed (1013; it resumes
    /// from its inbox on reconnect). Until then its senders are slowed down. Also how long
    /// a response or a resumed message may wait for room in that queue (past it, the socket
    /// is closed too).
    #[serde(with = "humantime_serde")]
    pub slow_receiver_close_after: Duration,
    /// How long a closing socket (taken over, too slow, refused, the node shutting down) has
    /// in all, from its close, to take what is still queued for it and the close frame; then
    /// it is dropped with the rest. A runtime has at most one socket closing: when another
    /// begins to close, the earlier one is dropped at once.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Largest answer the built-in registry gives to one `read` of a `user://` URL: past it
    /// the entries come in pages (`body.next`, asked for again with `body.after`).
    pub max_response_bytes: usize,
    /// Most `to` addresses one message may have (more → 400).
    pub max_destinations: usize,
    /// Hard per-principal limits, whatever the policy allows (the policy's own, lower ones
    /// are in `data.config.limits`).
    pub limits: BusLimits,
    /// Messages one principal may send per second, over all its sockets.
    pub rate_limit: RateLimit,
    /// How long a new socket has to say who it is (connect frame or `open` message); also
    /// how long any connection to the bus's listener has to send a request's headers, and a
    /// peer's post its body.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A runtime whose socket closed without `disconnect` keeps its addresses, subscriptions
    /// and inbox this long (counted from the node's start for runtimes restored from the
    /// homeserver); then they are released as if it had disconnected.
    #[serde(with = "humantime_serde")]
    pub away_release_after: Duration,
    /// Routed messages the history may be behind Synapse before new messages are refused
    /// (408, "retry"): bounds memory when the homeserver is down or slow.
    pub max_history_backlog: u64,
    /// Bytes of routed messages the history may hold in memory, not yet in Synapse, before
    /// new messages are refused (408, "retry").
    pub max_history_bytes: usize,
    /// Of `max_history_backlog` and `max_history_bytes`, what the messages one principal
    /// sent may take (past it that principal's messages are refused, 408), so that one
    /// principal cannot refuse everyone's.
    pub max_history_backlog_per_principal: u64,
    /// See `max_history_backlog_per_principal`.
    pub max_history_bytes_per_principal: usize,
    /// Bytes the inboxes of away runtimes may hold in memory (all of them, when the node
    /// has no homeserver; else what is not stored yet) before messages for away runtimes
    /// are refused (408, "retry").
    pub inbox_max_bytes: usize,
    /// Of `inbox_max_bytes`, what the messages one principal sent (to its own away runtimes
    /// or anyone's) may take before its messages for away runtimes are refused (408), so
    /// that one principal cannot refuse everyone's. Kept below `inbox_max_bytes_per_runtime`,
    /// one sender cannot fill a runtime's inbox for the others either while it is held in
    /// memory.
    pub inbox_max_bytes_per_principal: usize,
    /// Bytes one runtime's inbox may hold undelivered (in memory, or stored in Matrix)
    /// before messages to it are refused (408, "retry"). Counted from the node's start.
    pub inbox_max_bytes_per_runtime: usize,
    /// Messages waiting for one peer node (`[[bus.peers]]`) before more are refused (408).
    pub peer_queue: usize,
    /// Bytes waiting for one peer node before more are refused (408).
    pub peer_queue_bytes: usize,
    /// Sockets from one address block (an IPv4 address, an IPv6 /64) that have not
    /// authenticated yet (more: 429); a small share of `max_handshakes`.
    pub handshakes_per_ip: usize,
    /// Sockets from one network (an IPv4 /24, an IPv6 /48: many blocks of one customer) that
    /// have not authenticated yet (more: 429); never less than `handshakes_per_ip`.
    pub handshakes_per_network: usize,
    /// Sockets not yet authenticated, over all addresses (more: 503): what they may hold
    /// is `max_frame_bytes` each.
    pub max_handshakes: usize,
    /// New sockets one address block may open per second (past it: 429).
    pub handshake_rate: RateLimit,
    /// Connections the bus's listener serves at once (sockets and peer posts); more wait in
    /// the kernel's backlog until one closes.
    pub max_connections: usize,
    /// Of those, how many one address (an IPv4 address, an IPv6 /64) may hold at once;
    /// more are closed when accepted, so one address cannot take every place. Raise it for
    /// many runtimes behind one NAT address (or a load generator on loopback).
    pub max_connections_per_address: usize,
    /// Network Server connectors: services that connect with a static token instead of a
    /// Matrix access token.
    pub network_servers: Vec<NetworkServer>,
    /// Other domains' nodes: messages to their addresses are posted there.
    pub peers: Vec<Peer>,
    /// The domain registry.
    pub registry: RegistryConfig,
    /// Identity management: which asserted identities a user may use.
    pub idm: IdmConfig,
    /// History batching (`[bus.journal]`).
    pub journal: JournalConfig,
    /// This node's name when several replicas share the homeserver (`None`: the only one).
    /// Each replica follows the others through Matrix: runtimes connected elsewhere are
    /// reached through their inbox rooms, their allocations, subscriptions and registry
    /// entries through the state room. Names must differ; the journal uses it as its node
    /// name unless `[bus.journal] node` is set.
    pub replica: Option<String>,
}

/// `[bus.limits]`: backstops per principal (a Matrix user, a network server, a peer node)
/// over all its runtimes, enforced by the node whatever the policy says (403).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BusLimits {
    /// Live runtimes one principal owns (released ones are counted apart, against
    /// `tombstones_per_principal`).
    pub runtimes_per_principal: usize,
    /// Released runtimes one principal owns: their URLs stay its own for good (tombstones,
    /// kept as state). Past it, a new runtime URL is refused; reconnecting a released one
    /// is not.
    pub tombstones_per_principal: usize,
    /// Allocated addresses over its runtimes.
    pub addresses_per_principal: usize,
    /// Foreign return routes over its runtimes.
    pub foreign_routes_per_principal: usize,
    /// Built-in registry entries over its runtimes.
    pub registry_entries_per_principal: usize,
    /// Subscriptions over its runtimes (each is decided again on every new policy revision).
    pub subscriptions_per_principal: usize,
    /// Sockets connected at once over its runtimes (more: refused at the handshake).
    pub sockets_per_principal: usize,
}

impl Default for BusLimits {
    fn default() -> Self {
        Self {
            runtimes_per_principal: 10_000,
            tombstones_per_principal: 100_000,
            addresses_per_principal: 100_000,
            foreign_routes_per_principal: 10_000,
            registry_entries_per_principal: 10_000,
            subscriptions_per_principal: 10_000,
            sockets_per_principal: 64,
        }
    }
}

/// A token bucket: `per_second` sustained, `burst` at once. `per_second = 0` switches it off.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained rate.
    pub per_second: u32,
    /// Most at once.
    pub burst: u32,
}

impl RateLimit {
    /// A limit of `per_second` with bursts of `burst`.
    pub const fn new(per_second: u32, burst: u32) -> Self {
        Self { per_second, burst }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new(0, 0)
    }
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            domain: None,
            durability: Durability::Delivered,
            max_frame_bytes: 1024 * 1024,
            outbound_queue: 8192,
            outbound_queue_bytes: 8 * 1024 * 1024,
            max_destinations: 256,
            limits: BusLimits::default(),
            rate_limit: RateLimit::new(20_000, 40_000),
            handshake_timeout: Duration::from_secs(5),
            away_release_after: Duration::from_secs(24 * 3600),
            slow_receiver_close_after: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_history_backlog: 1_000_000,
            max_history_bytes: 256 * 1024 * 1024,
            max_history_backlog_per_principal: 125_000,
            max_history_bytes_per_principal: 32 * 1024 * 1024,
            inbox_max_bytes: 64 * 1024 * 1024,
            inbox_max_bytes_per_principal: 8 * 1024 * 1024,
            inbox_max_bytes_per_runtime: 16 * 1024 * 1024,
            max_response_bytes: 1024 * 1024,
            peer_queue: 1024,
            peer_queue_bytes: 16 * 1024 * 1024,
            handshakes_per_ip: 8,
            handshakes_per_network: 64,
            max_handshakes: 256,
            handshake_rate: RateLimit::new(50, 100),
            max_connections: 10_000,
            max_connections_per_address: 1_000,
            network_servers: Vec::new(),
            peers: Vec::new(),
            registry: RegistryConfig::default(),
            idm: IdmConfig::default(),
            journal: Default::default(),
            replica: None,
        }
    }
}

/// When a routed message is written to the history, relative to its delivery.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Deliver first; history follows within the journal's flush interval.
    Delivered,
    /// History first: a message is delivered only once the homeserver stored it.
    Persisted,
}

/// `[bus.journal]`: how the journal batches its writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JournalConfig {
    /// Longest a record waits for company before its batch is sent (when no send is in flight).
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Raw JSON bytes that make a batch big enough to send at once; also the most one batch
    /// takes from the queue (it may become several events).
    pub max_batch_raw_bytes: usize,
    /// Sends in flight at once: 1 keeps the room in sequence order; 2 overlaps encoding and
    /// round trips at the cost of possible reordering in the room.
    pub max_in_flight: usize,
    /// This node's name in batch events; nodes sharing a homeserver need distinct names.
    pub node: String,
    /// How long the writer keeps retrying after shutdown before giving up on what is queued.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_millis(5),
            max_batch_raw_bytes: 4 * 1024 * 1024,
            max_in_flight: 1,
            node: "msgnode".to_string(),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// `[[bus.network_servers]]`: a service connecting with a static token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkServer {
    /// Its name (logs, policy input `subject.network_server`).
    pub name: String,
    /// The bearer token it presents.
    pub token: String,
}

/// `[[bus.peers]]`: the node of another domain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Its reTHINK domain.
    pub domain: String,
    /// Over HTTP(S): its bus base URL (`https://node.example`); messages are posted to
    /// `/bus/v1/messages`.
    #[serde(default)]
    pub url: String,
    /// Over HTTP(S): the shared token, presented in both directions.
    #[serde(default)]
    pub token: String,
    /// Over Matrix federation (instead of `url`): the peer node's appservice user on its
    /// homeserver (`@_msgnode:b.example`). Messages go as events into a room this node
    /// shares with it; the peer's messages come the same way, as appservice transactions.
    #[serde(default)]
    pub matrix_user: Option<String>,
}

/// `[bus.registry]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// A reTHINK domain registry's REST API; unset: the built-in registry (Matrix state).
    pub url: Option<String>,
}

/// `[bus.idm]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct IdmConfig {
    /// An identity provider endpoint that verifies assertions (`POST` with
    /// `{user, identity, assertion}` → 200 `{identity}`); unset: the local validator.
    pub url: Option<String>,
    /// Local validator: Matrix user → identities (`user://idp/name`) it may assert. Every user
    /// may always assert `user://<node domain>/<localpart>`.
    pub identities: BTreeMap<String, Vec<String>>,
}

/// `[policy_server]`: msgnode as the Matrix policy server (MSC4284) of the node's rooms.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyServerConfig {
    /// Start the policy server (its TLS federation listener).
    pub enabled: bool,
    /// Where homeservers reach it (HTTPS: federation is always TLS).
    pub listen: SocketAddr,
    /// Its server name: `via` in `m.room.policy`, the domain of its user, the origin of its
    /// federation requests. A name with a port, so that homeservers reach
    /// `https://<server_name>` without `.well-known` or SRV lookups. (Synapse refuses IP
    /// literals in federation whatever its `ip_range_whitelist` says, hence `localhost:8448`
    /// on loopback rather than `127.0.0.1:8448`.)
    pub server_name: String,
    /// Localpart of the user that is the policy server's member of each room.
    pub user: String,
    /// Where its keys (federation and policy, ed25519) and its generated certificate are
    /// kept, created on first start, readable by the owner only.
    pub state_dir: PathBuf,
    /// PEM certificate chain for the listener; unset: a self-signed certificate for
    /// `server_name` is generated in `state_dir` (homeservers must be told to accept it).
    pub tls_certificate: Option<PathBuf>,
    /// PEM private key of `tls_certificate`.
    pub tls_private_key: Option<PathBuf>,
    /// Federation base URLs by server name, instead of discovery (`https://<name>`, port
    /// 8448 by default, after `/.well-known/matrix/server`). E.g. a homeserver named
    /// `localhost` serving federation on its client port: `localhost =
    /// "http://127.0.0.1:8008"`.
    pub servers: BTreeMap<String, String>,
    /// Verify the certificates of the homeservers it calls. Off only for loopback tests with
    /// self-signed certificates.
    pub verify_certificates: bool,
    /// Rooms it protects: room ids or aliases of `[pep] server_name`, and `"*"` for every
    /// room the node's appservice user is joined to (except rooms the node's own users
    /// created: the bus's storage). For each, the node's user joins, invites the policy
    /// server's user, which joins over federation, and writes `m.room.policy`. Needs `[pep]
    /// registration`, and the node's user with power to write state (50) in the room.
    pub rooms: Vec<String>,
    /// How often `rooms` are checked and protected again (new joined rooms, a removed
    /// `m.room.policy`).
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Answers remembered by event id (the homeserver may ask twice for one event).
    pub cache_max_entries: u64,
    /// How long a remembered answer serves (also bounded by the policy revision).
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// Largest request body accepted (a `/send` transaction is the largest: 50 PDUs).
    pub max_body_bytes: usize,
    /// Connections served at once; more wait.
    pub max_connections: usize,
    /// Longest one outgoing federation request (key fetch, join, event) may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for PolicyServerConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 8448)),
            server_name: "localhost:8448".to_string(),
            user: "policy".to_string(),
            state_dir: PathBuf::from(".state/policy-server"),
            tls_certificate: None,
            tls_private_key: None,
            servers: BTreeMap::new(),
            verify_certificates: true,
            rooms: vec!["*".to_string()],
            sweep_interval: Duration::from_secs(30),
            cache_max_entries: 10_000,
            cache_ttl: Duration::from_secs(60),
            max_body_bytes: 8 * 1024 * 1024,
            max_connections: 256,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// `[log]`: the process's own log (tracing).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `msgnode=debug,tower_http=info`; `RUST_LOG` wins.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_string(),
            format: LogFormat::Text,
        }
    }
}

/// Output format of the process log.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Config {
    /// Reads defaults, then the TOML file (when given, or `msgnode.toml` when present in the
    /// working directory), then `MSGNODE_*` environment variables.
    ///
    /// # Errors
    /// A named file that does not exist, a file that is not valid TOML, or a key of the wrong
    /// type (the message names the key and where it came from).
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) if !path.exists() => return Err(ConfigError::Missing(path.to_path_buf())),
            Some(path) => figment = figment.merge(Toml::file(path)),
            None => figment = figment.merge(Toml::file("msgnode.toml")),
        }
        // Only `MSGNODE_<SECTION>__…` are configuration: other MSGNODE_* variables belong to
        // the scripts (MSGNODE_STATE_DIR, MSGNODE_NO_SYNAPSE, …) or the CLI (MSGNODE_CONFIG).
        let env = Env::prefixed("MSGNODE_")
            .filter(|key| {
                let section = key.as_str().split("__").next().unwrap_or("");
                SECTIONS.iter().any(|s| section.eq_ignore_ascii_case(s))
            })
            .split("__");
        let figment = figment.merge(env);
        let mut config: Config = figment.extract()?;
        config.anchor_relative_paths(|key| source_dir(&figment, key));
        Ok(config)
    }

    /// Makes each relative path the file set relative to that file's directory, so a node
    /// started with `-c /etc/msgnode/msgnode.toml` reads the same files from any working
    /// directory (as Prometheus and nginx do). Paths from the environment and the defaults stay
    /// relative to the working directory. `dir_of(key)` is the directory of the file that set
    /// `key`, if a file did.
    fn anchor_relative_paths(&mut self, dir_of: impl Fn(&str) -> Option<PathBuf>) {
        let anchor = |key: &str, path: &mut PathBuf| {
            if let Some(dir) = dir_of(key).filter(|_| path.is_relative()) {
                *path = dir.join(&*path);
            }
        };
        let pdp = &mut self.pdp;
        anchor("pdp.policies", &mut pdp.policies);
        anchor("pdp.schema_dir", &mut pdp.schema_dir);
        if let Some(shadow) = pdp.shadow.as_mut() {
            anchor("pdp.shadow", shadow);
        }
        if let Some(bundle) = pdp.bundle.as_mut() {
            if let Some(dir) = bundle.persist_dir.as_mut() {
                anchor("pdp.bundle.persist_dir", dir);
            }
            if let Some(verification) = bundle.verification.as_mut() {
                anchor(
                    "pdp.bundle.verification.public_key",
                    &mut verification.public_key,
                );
            }
        }
        let output = &mut pdp.decision_log.output;
        if !matches!(output.as_str(), "stdout" | "-" | "stderr" | "off") {
            let mut path = PathBuf::from(&*output);
            anchor("pdp.decision_log.output", &mut path);
            *output = path.to_string_lossy().into_owned();
        }
        if let Some(registration) = self.pep.registration.as_mut() {
            anchor("pep.registration", registration);
        }
        let server = &mut self.policy_server;
        anchor("policy_server.state_dir", &mut server.state_dir);
        if let Some(certificate) = server.tls_certificate.as_mut() {
            anchor("policy_server.tls_certificate", certificate);
        }
        if let Some(key) = server.tls_private_key.as_mut() {
            anchor("policy_server.tls_private_key", key);
        }
    }
}

/// The directory of the file `key`'s value came from, when it came from a file.
fn source_dir(figment: &Figment, key: &str) -> Option<PathBuf> {
    match figment.find_metadata(key)?.source.as_ref()? {
        figment::Source::File(file) => file.parent().map(Path::to_path_buf),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closure signature
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_file() {
        figment::Jail::expect_with(|_jail| {
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config, Config::default());
            assert_eq!(config.pdp.listen.to_string(), "127.0.0.1:8181");
            Ok(())
        });
    }

    #[test]
    fn file_then_env_override() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "x.toml",
                "[pdp]\nlisten = \"127.0.0.1:9000\"\neval_timeout = \"20ms\"\n[pdp.cache]\nttl = \"3s\"\n",
            )?;
            jail.set_env("MSGNODE_PDP__CACHE__MAX_ENTRIES", "7");
            jail.set_env("MSGNODE_PDP__LISTEN", "127.0.0.1:9001");
            let config = Config::load(Some(Path::new("x.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.pdp.listen.to_string(), "127.0.0.1:9001");
            assert_eq!(config.pdp.eval_timeout, Duration::from_millis(20));
            assert_eq!(config.pdp.cache.ttl, Duration::from_secs(3));
            assert_eq!(config.pdp.cache.max_entries, 7);
            Ok(())
        });
    }

    #[test]
    fn remote_pdp_keys() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "x.toml",
                "[pep]\npdp_url = \"http://10.0.0.1:8181\"\npdp_token = \"t\"\npdp_timeout = \"1s\"\n",
            )?;
            let config = Config::load(Some(Path::new("x.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.pep.pdp_url.as_deref(), Some("http://10.0.0.1:8181"));
            assert_eq!(config.pep.pdp_token.as_deref(), Some("t"));
            assert_eq!(config.pep.pdp_timeout, Duration::from_secs(1));
            assert_eq!(Config::default().pep.pdp_url, None);
            Ok(())
        });
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("x.toml", "[pdp]\nlisten_addr = \"x\"\n")?;
            let err = Config::load(Some(Path::new("x.toml")))
                .unwrap_err()
                .to_string();
            assert!(err.contains("listen_addr"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn other_msgnode_variables_are_not_configuration() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("MSGNODE_NO_SYNAPSE", "1");
            jail.set_env("MSGNODE_STATE_DIR", "/tmp/x");
            jail.set_env("MSGNODE_BUS__ENABLED", "true");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert!(config.bus.enabled);
            Ok(())
        });
    }

    #[test]
    fn relative_paths_in_a_file_are_taken_from_its_directory() {
        figment::Jail::expect_with(|jail| {
            jail.create_dir("conf")?;
            jail.create_file(
                "conf/x.toml",
                "[pdp]\npolicies = \"bundle\"\nshadow = \"/abs/candidate\"\n\
                 [pdp.decision_log]\noutput = \"logs/decisions.log\"\n\
                 [policy_server]\ntls_certificate = \"tls/cert.pem\"\n",
            )?;
            jail.set_env("MSGNODE_PDP__SCHEMA_DIR", "env-schemas");
            let config = Config::load(Some(Path::new("conf/x.toml"))).map_err(|e| e.to_string())?;
            assert!(
                config.pdp.policies.ends_with("conf/bundle"),
                "{:?}",
                config.pdp.policies
            );
            assert!(
                config
                    .pdp
                    .decision_log
                    .output
                    .ends_with("conf/logs/decisions.log"),
                "{}",
                config.pdp.decision_log.output
            );
            let certificate = config.policy_server.tls_certificate.clone();
            assert!(
                certificate
                    .as_deref()
                    .is_some_and(|c| c.ends_with("conf/tls/cert.pem")),
                "{certificate:?}"
            );
            // Absolute paths, the environment's and the defaults' are left as they are.
            assert_eq!(config.pdp.shadow, Some(PathBuf::from("/abs/candidate")));
            assert_eq!(config.pdp.schema_dir, PathBuf::from("env-schemas"));
            assert_eq!(
                config.policy_server.state_dir,
                PathBuf::from(".state/policy-server")
            );
            jail.create_file("conf/y.toml", "[pdp.decision_log]\noutput = \"stderr\"\n")?;
            let config = Config::load(Some(Path::new("conf/y.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.pdp.decision_log.output, "stderr");
            Ok(())
        });
    }

    #[test]
    fn the_example_file_documents_the_defaults() {
        figment::Jail::expect_with(|_jail| {
            let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
            let mut config = Config::load(Some(&repo.join("msgnode.example.toml")))
                .map_err(|e| e.to_string())?;
            // The file's relative paths are taken from its directory.
            assert_eq!(config.pdp.policies, repo.join("policies"));
            assert_eq!(config.pdp.schema_dir, repo.join("schemas"));
            assert_eq!(
                config.policy_server.state_dir,
                repo.join(".state/policy-server")
            );
            let defaults = Config::default();
            config.pdp.policies = defaults.pdp.policies.clone();
            config.pdp.schema_dir = defaults.pdp.schema_dir.clone();
            config.policy_server.state_dir = defaults.policy_server.state_dir.clone();
            assert_eq!(config, defaults);
            Ok(())
        });
    }

    #[test]
    fn policy_server_keys_from_file_and_env() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "x.toml",
                "[policy_server]\nenabled = true\nrooms = [\"#lobby:localhost\"]\n",
            )?;
            jail.set_env("MSGNODE_POLICY_SERVER__SERVER_NAME", "127.0.0.1:9448");
            // As scripts/run sets it.
            jail.set_env(
                "MSGNODE_POLICY_SERVER__SERVERS",
                "{\"localhost\"=\"http://127.0.0.1:8008\"}",
            );
            let config = Config::load(Some(Path::new("x.toml"))).map_err(|e| e.to_string())?;
            let ps = &config.policy_server;
            assert!(ps.enabled);
            assert_eq!(ps.server_name, "127.0.0.1:9448");
            assert_eq!(ps.rooms, vec!["#lobby:localhost".to_string()]);
            assert_eq!(
                ps.servers.get("localhost").map(String::as_str),
                Some("http://127.0.0.1:8008")
            );
            assert!(!Config::default().policy_server.enabled);
            Ok(())
        });
    }

    #[test]
    fn config_errors_name_the_file_and_key_once_with_what_is_allowed() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("x.toml", "[pdp]\nlisten_addr = \"x\"\n")?;
            let err = Config::load(Some(Path::new("x.toml")))
                .unwrap_err()
                .to_string();
            assert!(!err.contains("default."), "{err}");
            assert_eq!(err.matches("listen_addr").count(), 1, "{err}");
            assert!(
                err.contains("x.toml: pdp.listen_addr: unknown key (allowed: listen, policies"),
                "{err}"
            );
            jail.set_env("MSGNODE_PDP__LISTEN", "nowhere");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("MSGNODE_PDP__LISTEN"), "{err}");
            assert!(err.contains("not a listen address"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn listen_addresses_take_opa_forms() {
        let check = |text: &str, expected: &str| {
            assert_eq!(
                parse_listen(text).map(|a| a.to_string()),
                Ok(expected.to_string()),
                "{text}"
            );
        };
        check(":8181", "0.0.0.0:8181");
        check("localhost:8181", "127.0.0.1:8181");
        check("127.0.0.1:9000", "127.0.0.1:9000");
        check("[::1]:9000", "[::1]:9000");
        for bad in ["8181", ":", ":x", "host:1", ""] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
        figment::Jail::expect_with(|jail| {
            jail.set_env("MSGNODE_PDP__LISTEN", ":8181");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.pdp.listen.to_string(), "0.0.0.0:8181");
            Ok(())
        });
    }

    #[test]
    fn missing_named_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/msgnode.toml"))).unwrap_err();
        assert!(err.to_string().contains("does not exist"));
    }

    #[test]
    fn journal_config_defaults_and_toml() {
        let config: JournalConfig =
            toml::from_str("flush_interval = \"20ms\"\nmax_in_flight = 2").expect("toml");
        assert_eq!(config.flush_interval, Duration::from_millis(20));
        assert_eq!(config.max_in_flight, 2);
        assert_eq!(
            config.max_batch_raw_bytes,
            JournalConfig::default().max_batch_raw_bytes
        );
        assert!(toml::from_str::<JournalConfig>("nope = 1").is_err());
    }
}

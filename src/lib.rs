//! msgnode: a policy-enforced reTHINK messaging node in front of Matrix.
//!
//! # Layout (lower floors first; no module imports one above it)
//! - [`config`], [`clock`], [`http_auth`], [`ratelimit`], [`retry`], [`batch`], [`counted`],
//!   [`sync`], [`telemetry`] — configuration (`msgnode.toml` + `MSGNODE_*` overrides), the
//!   wall clock, bearer tokens, keyed rate limits, retry delays, writer threads woken once per
//!   burst, counted places, locks that survive a panic, process logging.
//! - [`pdp`] — the policy decision point: Rego bundle loading and hot reload, evaluation on
//!   regorus, decision cache, decision log, metrics, policy tests, and the OPA-compatible
//!   HTTP API (`pdp::api`).
//! - [`policy`] — asking for decisions: the typed policy-input contract and the decider
//!   (in-process PDP or remote), used by every enforcement point.
//! - [`matrix`] — the homeserver client: `/whoami`, JSON calls, acting as the appservice's
//!   users, the registration file.
//! - [`rethink`] — the reTHINK message model and addresses.
//! - [`persist`] — what the bus keeps in Matrix: batch format, room logs, journal, inboxes,
//!   state, and following other replicas.
//! - [`plugins`] — the PDP's network plugins, as OPA's: bundles pulled from a bundle server,
//!   decision logs uploaded to a collector.
//! - [`connectors`] — registry, identity management and foreign domains.
//! - [`bus`] — the reTHINK message bus: protocol stubs over WebSocket, allocation, routing,
//!   pub/sub.
//! - [`pep`] — the Matrix enforcement point: client-server proxy and application service.
//! - [`policyserver`] — the Matrix policy server (MSC4284): the homeserver asks it about every
//!   event of a protected room before accepting it.
//! - [`cmd`] — one module per CLI verb (`run`, `pdp`, `policy test|eval|check|build`,
//!   `bench`, `appservice registration`, `version`, `completions`, `man`), wiring the rest;
//!   [`cli`] — the clap command line; [`version`] — what this binary is.
//!
//! `ARCHITECTURE.md` at the repository root maps the modules and the path of one decision.

pub mod batch;
pub mod bus;
pub mod cli;
pub mod clock;
pub mod cmd;
pub mod config;
pub mod connectors;
pub mod counted;
pub mod http_auth;
pub mod listen;
pub mod matrix;
pub mod pdp;
pub mod pep;
pub mod persist;
pub mod plugins;
pub mod policy;
pub mod policyserver;
pub mod ratelimit;
pub mod rethink;
pub mod retry;
pub mod sync;
pub mod telemetry;
pub mod version;

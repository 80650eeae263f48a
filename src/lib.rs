//! msgnode: a policy-enforced reTHINK messaging node in front of Matrix.
//!
//! # Layout
//! - [`pdp`] — the policy decision point: Rego bundle loading and hot reload, evaluation on
//!   regorus, decision cache, decision log, metrics, policy tests, and the OPA-compatible
//!   HTTP API (`pdp::api`).
//! - [`pep`] — the Matrix enforcement point: client-server proxy, application service, the
//!   decision client (local or remote PDP), and acting as the appservice's virtual users.
//! - [`bus`] — the reTHINK message bus: protocol stubs over WebSocket, address allocation,
//!   routing, pub/sub, and what it keeps in Matrix (journal, inboxes, state).
//! - [`connectors`] — registry, identity management and foreign domains.
//! - [`cmd`] — one module per CLI verb (`run`, `policy test|eval|check`, `bench`,
//!   `appservice registration`).
//! - [`cli`] — the clap command line; [`config`] — `msgnode.toml` + `MSGNODE_*` overrides;
//!   [`telemetry`] — process logging; [`http_auth`] — bearer tokens, read and compared once.
//!
//! `ARCHITECTURE.md` at the repository root maps the modules and the path of one decision.

pub mod bus;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod connectors;
pub mod http_auth;
pub mod pdp;
pub mod pep;
pub mod telemetry;

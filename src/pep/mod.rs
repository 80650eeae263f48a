//! Matrix policy enforcement point: the only code that talks to the homeserver.
//!
//! - `proxy` — the client-server proxy: intercepted requests are decided by the PDP and
//!   forwarded with their canonical path; everything else streams through.
//! - `body` — intercepted bodies (createRoom, membership) read through ruma's request types.
//! - `decider` — where decisions come from: the in-process PDP or a remote one over HTTP
//!   (`[pep] pdp_url`), failing closed.
//! - `route` — which requests are intercepted, whatever their spelling; identifier checks.
//! - `homeserver` — forwarding, `/whoami` (cached), joined members.
//! - `error` — Matrix `{"errcode", "error"}` responses.
//! - `appservice` — what the homeserver pushes (transactions, user/room queries, ping).
//! - `registration` — the appservice registration (`msgnode appservice registration`).
//! - `actor` — acting as the appservice's users (rooms, events, state) for the bus.

pub mod actor;
pub mod appservice;
pub mod body;
pub mod decider;
pub mod error;
pub mod homeserver;
pub mod proxy;
pub mod registration;
pub mod route;

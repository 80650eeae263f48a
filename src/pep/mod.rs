//! Matrix policy enforcement point: the only code that talks to the homeserver.
//!
//! - `proxy` — the client-server proxy: intercepted requests are decided by the PDP and
//!   forwarded with their canonical path; everything else streams through.
//! - `route` — which requests are intercepted, whatever their spelling.
//! - `homeserver` — forwarding, `/whoami` (cached), joined members.
//! - `error` — Matrix `{"errcode", "error"}` responses.
//! - `registration` — the appservice registration (`msgnode appservice registration`).
//!
//! Still to come (issue #3): the appservice endpoints (transactions, users, rooms, ping) and
//! after-the-fact enforcement of events that did not come through the proxy.

pub mod error;
pub mod homeserver;
pub mod proxy;
pub mod registration;
pub mod route;

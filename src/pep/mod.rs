//! Matrix policy enforcement point: the client-server proxy and the application service in
//! front of the homeserver (which `matrix` speaks to).
//!
//! - `proxy` — the client-server proxy: intercepted requests are decided by the PDP and
//!   forwarded with their canonical path; everything else streams through (`forward`).
//! - `route` — the allow-list: what each client request is (decided, forwarded as
//!   event-free, refused), whatever its spelling, as Synapse routes it; identifier checks.
//! - `body` — intercepted bodies (createRoom, membership) read through ruma's request types.
//! - `canonical` — what is forwarded for a decided request: body and query rebuilt from what
//!   was decided, aliases resolved.
//! - `inputs` — the policy inputs of an intercepted request; `create_room` — every event a
//!   `createRoom` request puts into its new room.
//! - `forward` — streaming a request to the homeserver and its answer back.
//! - `error` — Matrix `{"errcode", "error"}` responses: the only place they become HTTP.
//! - `appservice` — what the homeserver pushes (transactions, user/room queries, ping).

pub mod appservice;
pub mod body;
pub mod canonical;
pub mod create_room;
pub mod error;
pub mod forward;
pub mod inputs;
pub mod proxy;
pub mod route;

//! The reTHINK message bus's Matrix-side persistence: the homeserver is the system of record.
//!
//! - `journal` — the node's history of routed messages, batched into one Matrix room, and
//!   the batch event format the other parts share.
//! - `inbox` — messages for runtimes that are not connected, one Matrix room per runtime,
//!   with a delivery cursor in room state.
//! - `store` — the bus's durable state (runtimes, registry) as room state of one room.
//!
//! Each has a `memory()` variant with the same semantics for a node run without Matrix.
pub mod inbox;
pub mod journal;
pub mod store;

//! What the bus keeps in Matrix, as a layer of its own beneath it: rooms used as logs and
//! as key-value state, written as the appservice's own user (`matrix::Actor`).
//!
//! - `batch` — the batch event format (plain or deflate+base64, split under Synapse's event
//!   size limit), pure;
//! - `roomlog` — sending batches until stored, paging through them, recovering a writer's
//!   sequence: what the journal and the inboxes share;
//! - `journal` — the node's history of routed messages (group commit, one writer);
//! - `inbox` — messages for runtimes that are away, one room per runtime;
//! - `shares` — per-charge shares of a budget (what one principal may hold of it);
//! - `store` — durable state (runtime records, registry entries) as room state;
//! - `record` — how one runtime record is laid out over a head and parts, pure;
//! - `follower` — with several replicas, following what the others write.
//!
//! Each has a memory variant (or none is needed) for a node without a homeserver. Nothing
//! here knows reTHINK routing: entries are JSON texts, records are data.

pub mod batch;
pub mod follower;
pub mod inbox;
pub mod journal;
pub mod record;
pub mod roomlog;
pub mod shares;
pub mod store;

//! The homeserver, as msgnode speaks to it: the floor beneath `pep` and `bus`.
//!
//! - `client` — [`Homeserver`]: the connection pool, `/whoami` (cached), joined members and
//!   JSON requests, with typed errors ([`HomeserverError`]).
//! - `actor` — [`Actor`]: acting as the appservice's users (lazy registration, rooms by
//!   alias, joins, sends, state, history pages, `/sync`), with [`ActorError`].
//! - `registration` — the appservice registration file (generate, read, namespace).
//!
//! Nothing here knows reTHINK or policies; nothing here answers HTTP. Every call is bounded
//! in time (`actor::REQUEST_TIMEOUT`).

pub mod actor;
pub mod client;
pub mod registration;

pub use actor::{Actor, ActorError};
pub use client::{encode, with_user_id, Homeserver, HomeserverError};

/// The first 16 hex digits of sha256(`key`): short, stable names for URLs and addresses in
/// Matrix (virtual users, room aliases, transaction ids).
pub fn hash16(key: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

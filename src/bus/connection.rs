//! Who is on the other end of a socket: the authenticated [`Principal`] and the
//! [`Connection`] the bus hands every message of that socket with.

use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::outbound::Outbound;
use super::runtimes::Runtime;
use crate::counted::{Counted, Counts};

/// Most answers of one socket that may wait for the homeserver at once; the socket is not
/// read while that many wait. What waits is one write's worth: the runtime's next write
/// carries every change pending when it begins, so this many back-to-back requests share a
/// write (with 256, 10,000 allocations took 83 writes, each 60–800 ms on a busy Synapse);
/// each waiting answer holds its room in the socket's queue (`outbound_queue`, bytes too).
pub const MAX_PENDING_ANSWERS: usize = 2048;

/// Who a connection is, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A Matrix user (access token checked with the homeserver).
    User(String),
    /// A configured Network Server connector.
    NetworkServer(String),
    /// Another domain's node.
    Peer(String),
}

impl Principal {
    /// How a runtime's record names its owner: the Matrix user id, or
    /// `network-server:<name>` / `peer:<domain>`.
    pub fn owner(&self) -> String {
        match self {
            Principal::User(u) => u.clone(),
            Principal::NetworkServer(name) => format!("network-server:{name}"),
            Principal::Peer(domain) => format!("peer:{domain}"),
        }
    }
}

/// One connected socket.
pub struct Connection {
    /// Unique per node run.
    pub id: u64,
    /// The runtime it speaks for.
    pub runtime: Arc<Runtime>,
    /// Who authenticated.
    pub principal: Principal,
    /// Its outbound queue (responses and deliveries).
    pub tx: Outbound,
    /// Cancelled when the socket must close (taken over, too slow, shutting down).
    pub close: CancellationToken,
    /// Answers waiting for the homeserver to store what they acknowledge (see
    /// `Bus::answer_when_stored`): at most [`MAX_PENDING_ANSWERS`] at a time.
    pub(super) pending: Arc<tokio::sync::Semaphore>,
    /// The identity its messages asserted and the IdM verified.
    identity: Mutex<Option<String>>,
    /// A peer's: how long its messages may wait on their addressees' flow control, all
    /// together (one post, or one appservice transaction; see `bus::flow::PEER_WAIT`).
    pub(super) wait_until: Option<tokio::time::Instant>,
}

impl Connection {
    /// A connection of `principal` for `runtime`, writing to `tx`.
    pub(super) fn new(id: u64, runtime: Arc<Runtime>, principal: Principal, tx: Outbound) -> Self {
        Self {
            id,
            runtime,
            principal,
            tx,
            close: CancellationToken::new(),
            pending: Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_ANSWERS)),
            identity: Mutex::new(None),
            wait_until: None,
        }
    }

    /// The Matrix user, for a user's connection.
    pub(super) fn user(&self) -> Option<&str> {
        match &self.principal {
            Principal::User(u) => Some(u),
            _ => None,
        }
    }

    /// The verified identity, once one was asserted.
    pub(super) fn identity(&self) -> Option<String> {
        self.identity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Remembers a verified identity for the connection's later messages.
    pub(super) fn set_identity(&self, identity: String) {
        *self.identity.lock().unwrap_or_else(|p| p.into_inner()) = Some(identity);
    }
}

/// The sockets each principal has connected (authenticated), against
/// `[bus.limits] sockets_per_principal`: what one principal holds in memory is that many
/// sockets' budgets, whatever number of runtimes it owns.
#[derive(Default)]
pub(super) struct Sockets {
    by_owner: Counts<String>,
}

impl Sockets {
    /// A place for one more socket of `owner`, unless it has `limit` already (`Err` with
    /// how many it has). The place is given back when the [`SocketSlot`] is dropped.
    pub fn take(&self, owner: &str, limit: usize) -> Result<SocketSlot, usize> {
        self.by_owner.take(owner.to_string(), limit)
    }

    /// How many sockets `owner` has connected.
    #[cfg(test)]
    pub fn held(&self, owner: &str) -> usize {
        self.by_owner.held(&owner.to_string())
    }
}

/// One socket's place among its principal's (see [`Sockets`]); given back on drop.
pub type SocketSlot = Counted<String>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_principal_has_at_most_its_sockets_and_gets_places_back() {
        let sockets = Sockets::default();
        let first = sockets.take("@eve:l", 2).expect("first");
        let _second = sockets.take("@eve:l", 2).expect("second");
        assert_eq!(sockets.take("@eve:l", 2).err(), Some(2));
        assert!(sockets.take("@bob:l", 2).is_ok(), "per principal");
        drop(first);
        assert_eq!(sockets.held("@eve:l"), 1);
        assert!(sockets.take("@eve:l", 2).is_ok());
        assert_eq!(sockets.held("@bob:l"), 0, "forgotten once none is left");
    }
}

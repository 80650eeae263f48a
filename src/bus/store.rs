//! STUB (replaced by the bus-store branch): the bus's durable state.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::pep::actor::ActorError;

/// One runtime's durable state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeRecord {
    /// Matrix user.
    pub user: Option<String>,
    /// Allocation key → addresses.
    pub allocations: BTreeMap<String, Vec<String>>,
    /// Resource → subscriber.
    pub subscriptions: BTreeMap<String, String>,
    /// Foreign return routes.
    pub foreign: Vec<String>,
}

/// Everything stored.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Runtimes.
    pub runtimes: BTreeMap<String, RuntimeRecord>,
    /// Registry.
    pub registry: BTreeMap<String, serde_json::Value>,
}

/// Durable state.
#[derive(Clone, Default)]
pub struct Store;

impl Store {
    /// Memory only.
    pub fn memory() -> Store {
        Store
    }
    /// Loads.
    pub async fn load(&self) -> Result<Snapshot, ActorError> {
        Ok(Snapshot::default())
    }
    /// Stores a runtime.
    pub async fn put_runtime(
        &self,
        _runtime: &str,
        _record: &RuntimeRecord,
    ) -> Result<(), ActorError> {
        Ok(())
    }
    /// Stores a registry entry.
    pub async fn put_registry(
        &self,
        _url: &str,
        _entry: Option<&serde_json::Value>,
    ) -> Result<(), ActorError> {
        Ok(())
    }
}

impl Store {
    /// Opens.
    pub async fn open(
        _actor: std::sync::Arc<crate::pep::actor::Actor>,
    ) -> Result<Store, ActorError> {
        Ok(Store)
    }
}

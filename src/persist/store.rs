//! The bus's durable state as Matrix room state: what a restarted node needs to resume.
//!
//! Owns the state room (`#_msgnode_state:<server>`, created by the appservice's own user)
//! and two state event types in it:
//! - `org.msgnode.bus.runtime`, state key = runtime URL: a [`RuntimeRecord`] (its user,
//!   allocated and claimed addresses, subscriptions, foreign return routes; a released
//!   runtime keeps only its user and claimed addresses, marked `released`);
//! - `org.msgnode.registry`, state key = registered URL: `{"entry": <value>}`, or
//!   `{"entry_json": "<text>"}` when the homeserver refuses the value as non-canonical JSON
//!   (floats).
//!
//! Empty content (`{}`) means deleted. With replicas every event also names the replica that
//! wrote it (`"writer"`), so a replica can tell its own changes (and deletions) from others'. Writes to one key are coalesced: concurrent puts end
//! with the latest one stored (a put returns once its value or a newer one is stored). A
//! state event, like any event, must stay under 64 KiB.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::matrix::{Actor, ActorError};

/// State event type of a runtime's record.
pub const RUNTIME_EVENT_TYPE: &str = "org.msgnode.bus.runtime";
/// State event type of a registry entry.
pub const REGISTRY_EVENT_TYPE: &str = "org.msgnode.registry";
/// Alias localpart of the state room.
pub const STATE_ALIAS: &str = "_msgnode_state";

/// What the bus keeps about one runtime.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RuntimeRecord {
    /// The identity (user) the runtime authenticated as.
    pub user: Option<String>,
    /// Allocation key → allocated addresses.
    pub allocations: BTreeMap<String, Vec<String>>,
    /// Resource URL → subscriber address.
    pub subscriptions: BTreeMap<String, String>,
    /// Foreign addresses bound as return routes to this runtime.
    pub foreign: Vec<String>,
    /// Addresses of the node's domain claimed on first use as a `from` (under a runtime
    /// scheme, or hyperty addresses where the policy allows): its owner's for good, kept
    /// (and bound to the runtime) after a release, like the runtime URL itself.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub claimed: Vec<String>,
    /// The replica holding (or last holding) the runtime's socket. Only with `[bus]
    /// replica`. (The replica that wrote an event is its `writer`, outside the record.)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// When that replica's socket for the runtime attached (ms since the Unix epoch): the
    /// newest attach wins when two replicas claim the runtime.
    #[serde(skip_serializing_if = "is_zero")]
    pub attached_ms: u64,
    /// Released (`disconnect`, `close`, or away too long): nothing is bound to it any more,
    /// but its URL stays its owner's for good (a tombstone).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl RuntimeRecord {
    /// Nothing bound and no owner: the runtime is forgotten (stored as deleted). A released
    /// runtime keeps its owner: see [`RuntimeRecord::released`].
    pub fn is_empty(&self) -> bool {
        self.user.is_none()
            && self.allocations.is_empty()
            && self.subscriptions.is_empty()
            && self.foreign.is_empty()
            && self.claimed.is_empty()
    }
}

/// One state event of the store, read.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    /// A runtime's record (empty: released).
    Runtime {
        /// The runtime URL.
        url: String,
        /// Its record.
        record: RuntimeRecord,
    },
    /// A registry entry (`None`: removed).
    Registry {
        /// The registered URL.
        url: String,
        /// Its entry.
        entry: Option<Value>,
    },
}

impl Stored {
    /// Reads a state event of the store, with the replica that wrote it (when it says);
    /// `None` for other events and unreadable ones (logged).
    pub fn read(event: &Value) -> Option<(Stored, Option<String>)> {
        let kind = event.get("type").and_then(Value::as_str)?;
        let url = event.get("state_key").and_then(Value::as_str)?.to_string();
        let empty = Value::Object(serde_json::Map::new());
        let content = event.get("content").unwrap_or(&empty);
        let writer = content
            .get("writer")
            .and_then(Value::as_str)
            .map(str::to_string);
        let stored = match kind {
            RUNTIME_EVENT_TYPE => match serde_json::from_value::<RuntimeRecord>(content.clone()) {
                Ok(record) => Stored::Runtime { url, record },
                Err(error) => {
                    tracing::warn!(%error, runtime = %url, "store: unreadable runtime record skipped");
                    return None;
                }
            },
            REGISTRY_EVENT_TYPE => {
                let entry = match (content.get("entry"), content.get("entry_json")) {
                    (Some(entry), _) => Some(entry.clone()),
                    (None, Some(Value::String(text))) => match serde_json::from_str(text) {
                        Ok(entry) => Some(entry),
                        Err(error) => {
                            tracing::warn!(%error, %url, "store: unreadable registry entry skipped");
                            return None;
                        }
                    },
                    _ => None,
                };
                Stored::Registry { url, entry }
            }
            _ => return None,
        };
        Some((stored, writer))
    }
}

/// Everything the store holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Runtime URL → record.
    pub runtimes: BTreeMap<String, RuntimeRecord>,
    /// Registered URL → entry.
    pub registry: BTreeMap<String, Value>,
}

/// The bus's durable state; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

enum Inner {
    Memory(Mutex<Snapshot>),
    Matrix(MatrixStore),
}

struct MatrixStore {
    actor: Arc<Actor>,
    room: String,
    /// This replica's name, written into every event (only with `[bus] replica`).
    node: Option<String>,
    slots: Mutex<HashMap<(&'static str, String), Arc<Slot>>>,
}

/// One state key's latest wanted content and the version last stored.
#[derive(Default)]
struct Slot {
    latest: Mutex<(u64, Value)>,
    stored: tokio::sync::Mutex<u64>,
}

impl Store {
    /// The store in the state room (created on first use); `node` names this replica in
    /// what it writes (`None`: the only one).
    ///
    /// # Errors
    /// The homeserver is unavailable or refused to resolve or create the room.
    pub async fn open(actor: Arc<Actor>, node: Option<String>) -> Result<Store, ActorError> {
        let sender = actor.sender().to_string();
        let room = actor
            .ensure_room(STATE_ALIAS, &sender, "msgnode bus state")
            .await?;
        Ok(Store {
            inner: Arc::new(Inner::Matrix(MatrixStore {
                actor,
                room,
                node,
                slots: Mutex::new(HashMap::new()),
            })),
        })
    }

    /// The state room's id (`None` in memory).
    pub fn room(&self) -> Option<&str> {
        match &*self.inner {
            Inner::Memory(_) => None,
            Inner::Matrix(matrix) => Some(&matrix.room),
        }
    }

    /// A store in process memory (lost on exit).
    pub fn memory() -> Store {
        Store {
            inner: Arc::new(Inner::Memory(Mutex::new(Snapshot::default()))),
        }
    }

    /// Everything stored (deleted keys left out; unreadable records skipped with a warning).
    ///
    /// # Errors
    /// The homeserver is unavailable or refused.
    pub async fn load(&self) -> Result<Snapshot, ActorError> {
        let matrix = match &*self.inner {
            Inner::Memory(snapshot) => return Ok(lock(snapshot).clone()),
            Inner::Matrix(matrix) => matrix,
        };
        let sender = matrix.actor.sender().to_string();
        let events = matrix.actor.room_state(&sender, &matrix.room).await?;
        let mut snapshot = Snapshot::default();
        for event in &events {
            match Stored::read(event) {
                Some((Stored::Runtime { url, record }, _)) if !record.is_empty() => {
                    snapshot.runtimes.insert(url, record);
                }
                Some((
                    Stored::Registry {
                        url,
                        entry: Some(entry),
                    },
                    _,
                )) => {
                    snapshot.registry.insert(url, entry);
                }
                _ => {}
            }
        }
        Ok(snapshot)
    }

    /// Stores `record` for `runtime`; an empty (default) record deletes it.
    ///
    /// # Errors
    /// The homeserver is unavailable or refused.
    pub async fn put_runtime(
        &self,
        runtime: &str,
        record: &RuntimeRecord,
    ) -> Result<(), ActorError> {
        self.put_runtime_queued(runtime, record).await
    }

    /// As [`Store::put_runtime`], but placed in line now: whenever the returned future runs,
    /// it stores this record or a newer one (a put of the same runtime made later wins,
    /// however the futures are scheduled), and completes once one of them is stored.
    pub fn put_runtime_queued(
        &self,
        runtime: &str,
        record: &RuntimeRecord,
    ) -> BoxFuture<'static, Result<(), ActorError>> {
        let matrix = match &*self.inner {
            Inner::Memory(snapshot) => {
                let mut snapshot = lock(snapshot);
                if record.is_empty() {
                    snapshot.runtimes.remove(runtime);
                } else {
                    snapshot
                        .runtimes
                        .insert(runtime.to_string(), record.clone());
                }
                return Box::pin(std::future::ready(Ok(())));
            }
            Inner::Matrix(matrix) => matrix,
        };
        let content = if record.is_empty() {
            json!({})
        } else {
            match serde_json::to_value(record) {
                Ok(content) => content,
                Err(e) => {
                    return Box::pin(std::future::ready(Err(ActorError::Malformed(
                        e.to_string(),
                    ))))
                }
            }
        };
        let (slot, version) = matrix.queue(RUNTIME_EVENT_TYPE, runtime, content);
        let (store, key) = (self.clone(), runtime.to_string());
        Box::pin(async move {
            match &*store.inner {
                Inner::Matrix(matrix) => {
                    matrix.flush(RUNTIME_EVENT_TYPE, &key, &slot, version).await
                }
                Inner::Memory(_) => Ok(()),
            }
        })
    }

    /// Stores the registry entry for `url`; `None` deletes it.
    ///
    /// # Errors
    /// The homeserver is unavailable or refused.
    pub async fn put_registry(&self, url: &str, entry: Option<&Value>) -> Result<(), ActorError> {
        let matrix = match &*self.inner {
            Inner::Memory(snapshot) => {
                let mut snapshot = lock(snapshot);
                match entry {
                    Some(entry) => snapshot.registry.insert(url.to_string(), entry.clone()),
                    None => snapshot.registry.remove(url),
                };
                return Ok(());
            }
            Inner::Matrix(matrix) => matrix,
        };
        let content = match entry {
            Some(entry) => json!({ "entry": entry }),
            None => json!({}),
        };
        match matrix.put(REGISTRY_EVENT_TYPE, url, content).await {
            Err(error) if error.errcode() == Some("M_BAD_JSON") => {
                let text = entry.map(Value::to_string).unwrap_or_default();
                matrix
                    .put(REGISTRY_EVENT_TYPE, url, json!({ "entry_json": text }))
                    .await
            }
            other => other,
        }
    }
}

impl MatrixStore {
    /// Writes `content` as the state of (`kind`, `key`), coalescing concurrent writes.
    async fn put(&self, kind: &'static str, key: &str, content: Value) -> Result<(), ActorError> {
        let (slot, version) = self.queue(kind, key, content);
        self.flush(kind, key, &slot, version).await
    }

    /// Makes `content` the latest wanted state of (`kind`, `key`); its slot and version.
    fn queue(&self, kind: &'static str, key: &str, mut content: Value) -> (Arc<Slot>, u64) {
        // The writer, so replicas can tell their own changes (and deletions) from others'.
        if let (Some(node), Some(object)) = (&self.node, content.as_object_mut()) {
            object.insert("writer".to_string(), json!(node));
        }
        let slot = lock(&self.slots)
            .entry((kind, key.to_string()))
            .or_default()
            .clone();
        let version = {
            let mut latest = lock(&slot.latest);
            latest.0 += 1;
            latest.1 = content;
            latest.0
        };
        (slot, version)
    }

    /// Returns once `version` of the slot (or a newer one) is stored, writing the latest.
    async fn flush(
        &self,
        kind: &'static str,
        key: &str,
        slot: &Slot,
        version: u64,
    ) -> Result<(), ActorError> {
        let mut stored = slot.stored.lock().await;
        if *stored >= version {
            return Ok(()); // a newer put stored its value meanwhile
        }
        let (latest, content) = lock(&slot.latest).clone();
        let sender = self.actor.sender().to_string();
        self.actor
            .put_state(&sender, &self.room, kind, key, &content)
            .await?;
        *stored = latest;
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(address: &str) -> RuntimeRecord {
        RuntimeRecord {
            user: Some("@alice:localhost".to_string()),
            allocations: BTreeMap::from([("k1".to_string(), vec![address.to_string()])]),
            subscriptions: BTreeMap::from([(
                "context://example.com/x".to_string(),
                address.to_string(),
            )]),
            foreign: vec!["hyperty://other.example/1".to_string()],
            ..RuntimeRecord::default()
        }
    }

    #[tokio::test]
    async fn memory_store_puts_loads_and_deletes() {
        let store = Store::memory();
        store
            .put_runtime("rt://a", &record("hyperty://example.com/1"))
            .await
            .expect("put");
        store
            .put_runtime("rt://b", &record("hyperty://example.com/2"))
            .await
            .expect("put");
        store
            .put_registry(
                "hyperty://example.com/1",
                Some(&json!({"status": "live", "load": 0.5})),
            )
            .await
            .expect("put");
        let snapshot = store.load().await.expect("load");
        assert_eq!(snapshot.runtimes.len(), 2);
        assert_eq!(
            snapshot.runtimes["rt://a"],
            record("hyperty://example.com/1")
        );
        assert_eq!(snapshot.registry["hyperty://example.com/1"]["load"], 0.5);

        store
            .put_runtime("rt://a", &RuntimeRecord::default())
            .await
            .expect("delete");
        store
            .put_registry("hyperty://example.com/1", None)
            .await
            .expect("delete");
        let snapshot = store.load().await.expect("load");
        assert_eq!(snapshot.runtimes.keys().collect::<Vec<_>>(), vec!["rt://b"]);
        assert!(snapshot.registry.is_empty());
    }

    #[test]
    fn records_read_leniently() {
        let record: RuntimeRecord =
            serde_json::from_value(json!({"user": "@a:b"})).expect("partial record");
        assert_eq!(record.user.as_deref(), Some("@a:b"));
        assert!(record.allocations.is_empty());
    }
}

//! The bus's durable state as Matrix room state: what a restarted node needs to resume.
//!
//! Owns the state room (`#_msgnode_state:<server>`, created by the appservice's own user)
//! and two state event types in it:
//! - `org.msgnode.bus.runtime`, state key = runtime URL: a [`RuntimeRecord`] (its user,
//!   allocated addresses, subscriptions, foreign return routes);
//! - `org.msgnode.registry`, state key = registered URL: `{"entry": <value>}`, or
//!   `{"entry_json": "<text>"}` when the homeserver refuses the value as non-canonical JSON
//!   (floats).
//!
//! Empty content (`{}`) means deleted. Writes to one key are coalesced: concurrent puts end
//! with the latest one stored (a put returns once its value or a newer one is stored). A
//! state event, like any event, must stay under 64 KiB.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::pep::actor::{Actor, ActorError};

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
    slots: Mutex<HashMap<(&'static str, String), Arc<Slot>>>,
}

/// One state key's latest wanted content and the version last stored.
#[derive(Default)]
struct Slot {
    latest: Mutex<(u64, Value)>,
    stored: tokio::sync::Mutex<u64>,
}

impl Store {
    /// The store in the state room (created on first use).
    ///
    /// # Errors
    /// The homeserver is unavailable or refused to resolve or create the room.
    pub async fn open(actor: Arc<Actor>) -> Result<Store, ActorError> {
        let sender = actor.sender().to_string();
        let room = actor
            .ensure_room(STATE_ALIAS, &sender, "msgnode bus state")
            .await?;
        Ok(Store {
            inner: Arc::new(Inner::Matrix(MatrixStore {
                actor,
                room,
                slots: Mutex::new(HashMap::new()),
            })),
        })
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
        for event in events {
            let (Some(kind), Some(key)) = (
                event.get("type").and_then(Value::as_str),
                event.get("state_key").and_then(Value::as_str),
            ) else {
                continue;
            };
            let content = event.get("content").cloned().unwrap_or(Value::Null);
            if content.as_object().is_none_or(serde_json::Map::is_empty) {
                continue;
            }
            match kind {
                RUNTIME_EVENT_TYPE => match serde_json::from_value::<RuntimeRecord>(content) {
                    Ok(record) => {
                        snapshot.runtimes.insert(key.to_string(), record);
                    }
                    Err(error) => {
                        tracing::warn!(%error, runtime = %key, "store: unreadable runtime record skipped");
                    }
                },
                REGISTRY_EVENT_TYPE => {
                    let entry = match (content.get("entry"), content.get("entry_json")) {
                        (Some(entry), _) => Some(entry.clone()),
                        (None, Some(Value::String(text))) => serde_json::from_str(text).ok(),
                        _ => None,
                    };
                    match entry {
                        Some(entry) => {
                            snapshot.registry.insert(key.to_string(), entry);
                        }
                        None => {
                            tracing::warn!(url = %key, "store: unreadable registry entry skipped");
                        }
                    }
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
        let matrix = match &*self.inner {
            Inner::Memory(snapshot) => {
                let mut snapshot = lock(snapshot);
                if *record == RuntimeRecord::default() {
                    snapshot.runtimes.remove(runtime);
                } else {
                    snapshot
                        .runtimes
                        .insert(runtime.to_string(), record.clone());
                }
                return Ok(());
            }
            Inner::Matrix(matrix) => matrix,
        };
        let content = if *record == RuntimeRecord::default() {
            json!({})
        } else {
            serde_json::to_value(record).map_err(|e| ActorError::Malformed(e.to_string()))?
        };
        matrix.put(RUNTIME_EVENT_TYPE, runtime, content).await
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

//! The bus's durable state as Matrix room state: what a restarted node needs to resume.
//!
//! Owns the state room (`#_msgnode_state:<server>`, created by the appservice's own user)
//! and its state event types:
//! - `org.msgnode.bus.runtime`, state key = runtime URL: a [`RuntimeRecord`] (its user,
//!   allocated and claimed addresses, subscriptions, foreign return routes; a released
//!   runtime keeps only its user and claimed addresses, marked `released`) — the head of
//!   it, with `org.msgnode.bus.runtime.part` events under `<runtime>#<slot>` for what does
//!   not fit one event (layout and write order: [`super::record`]);
//! - `org.msgnode.registry`, state key = registered URL: `{"entry": <value>}`, or
//!   `{"entry_json": "<text>"}` when the homeserver refuses the value as non-canonical JSON
//!   (floats).
//!
//! - `org.msgnode.bus.runtimes`, state key = a slot number: a *pack*, the small records
//!   (at most [`PACK_ENTRY_BYTES`] each) of many runtimes written together — see below.
//!
//! **Packs (group commit across runtimes).** Without replicas one writer stores every
//! runtime record: the puts pending when it starts a write go out together, the small
//! records in as few pack events as hold them, the larger ones as heads and parts — so a
//! thousand runtimes opening at once cost the homeserver a few writes, not a thousand.
//! Every write has a sequence number (`seq`: in the pack, or in the head), higher than any
//! stored before (the clock's microseconds at open, then what [`Store::load`] found); a
//! runtime's record is its entry with the highest one (a `null` entry: deleted), so a
//! record that moved between a pack and a head needs no second write to stay right. A pack
//! none of whose entries is a runtime's latest any more is left as it is, and its slot is
//! the next pack's: the state room holds at most as many packs as there are packed
//! runtimes, never one per write. Heads without `seq` (written before packs) are older
//! than any pack. With replicas only heads are written (each replica's follower reads
//! heads), with `seq` too, so they win over packs written before.
//!
//! Empty content (`{}`) means deleted. With replicas every head also names the replica that
//! wrote it (`"writer"`), so a replica can tell its own changes (and deletions) from
//! others'. Writes to one key are coalesced: concurrent puts end with the latest one stored
//! (a put returns once its value or a newer one is stored); a key's slot is dropped once
//! nothing is pending for it. Sizes are checked before anything is written: an event's
//! content stays under [`record::MAX_CONTENT_BYTES`], a record under
//! [`record::MAX_RECORD_BYTES`] ([`StoreError::TooLarge`], in memory too).

use crate::sync::lock;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::record::{self, Layout, TooLarge, MAX_CONTENT_BYTES, PART_EVENT_TYPE};
use crate::matrix::{Actor, ActorError};

/// State event type of a runtime's record.
pub const RUNTIME_EVENT_TYPE: &str = "org.msgnode.bus.runtime";
/// State event type of a registry entry.
pub const REGISTRY_EVENT_TYPE: &str = "org.msgnode.registry";
/// Most bytes of a registry entry's event content: one event, its state key at most 255
/// bytes, under Synapse's 65,536 for the whole event (about 1 KiB left for the envelope).
pub const MAX_REGISTRY_CONTENT_BYTES: usize = 64_000;
/// State event type of a pack of small runtime records (see the module's doc).
pub const PACK_EVENT_TYPE: &str = "org.msgnode.bus.runtimes";
/// Most bytes of one runtime's record (as JSON) in a pack; a larger one is a head.
pub const PACK_ENTRY_BYTES: usize = 4_096;
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

/// Why a put was not stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The homeserver is unavailable or refused.
    #[error(transparent)]
    Homeserver(#[from] ActorError),
    /// Too large to store: refused before anything was written.
    #[error("too large to store: {0}")]
    TooLarge(String),
    /// The write this put went out with (with other runtimes' records) failed.
    #[error("the homeserver did not store it: {0}")]
    Batch(String),
}

impl From<TooLarge> for StoreError {
    fn from(e: TooLarge) -> Self {
        StoreError::TooLarge(e.0)
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
    /// The head of a runtime's record that has parts: the record is read with
    /// [`Store::fetch_runtime`].
    RuntimeInParts {
        /// The runtime URL.
        url: String,
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
    /// `None` for other events (parts too) and unreadable ones (logged).
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
            RUNTIME_EVENT_TYPE if !record::named_parts(content).0.is_empty() => {
                Stored::RuntimeInParts { url }
            }
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
    /// Runtime URL → an upper bound of its record's entries' bytes (see
    /// [`Store::put_runtime_live`]); kept for runtimes put since the start.
    sizes: Arc<Mutex<HashMap<String, usize>>>,
}

/// A runtime's record as it is now: a live put stores what this gives when its write
/// begins, so a put costs nothing that grows with the record, and the puts of one runtime
/// made while a write is under way become one copy in the next.
pub trait LiveRecord: Send + Sync {
    /// A copy of the record now.
    fn record(&self) -> RuntimeRecord;
}

enum Inner {
    Memory(Mutex<Memory>),
    Matrix(Box<MatrixStore>),
}

/// The store in process memory: what was put, the live records read when loaded.
#[derive(Default)]
struct Memory {
    snapshot: Snapshot,
    live: HashMap<String, Arc<dyn LiveRecord>>,
}

impl Memory {
    fn current(&self, runtime: &str) -> Option<RuntimeRecord> {
        match self.live.get(runtime) {
            Some(live) => Some(live.record()).filter(|r| !r.is_empty()),
            None => self.snapshot.runtimes.get(runtime).cloned(),
        }
    }

    fn snapshot(&self) -> Snapshot {
        let mut snapshot = self.snapshot.clone();
        for (runtime, live) in &self.live {
            let record = live.record();
            if record.is_empty() {
                snapshot.runtimes.remove(runtime);
            } else {
                snapshot.runtimes.insert(runtime.clone(), record);
            }
        }
        snapshot
    }
}

type Slots<T> = Mutex<HashMap<String, Arc<Slot<T>>>>;

/// A put waiting for the next write of the packs' writer.
struct Pending {
    record: RuntimeRecord,
    /// Read into `record` when the write begins (a live put).
    live: Option<Arc<dyn LiveRecord>>,
    waiters: Vec<tokio::sync::oneshot::Sender<Result<(), String>>>,
}

/// Which pack (slot) holds each runtime's latest record (runtimes whose latest is a head,
/// or that were never stored, are not here), how many latest records each pack holds, and
/// the slots free for the next packs (their packs hold none).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PackIndex {
    at: HashMap<String, u64>,
    live: HashMap<u64, usize>,
    free: BTreeSet<u64>,
    /// Above every slot in use or free.
    next: u64,
}

impl PackIndex {
    /// `runtime`'s latest record is now in the pack in `slot` (`None`: a head); a pack left
    /// holding no latest record frees its slot.
    fn moved(&mut self, runtime: &str, slot: Option<u64>) {
        let old = match slot {
            Some(slot) => {
                *self.live.entry(slot).or_default() += 1;
                self.at.insert(runtime.to_string(), slot)
            }
            None => self.at.remove(runtime),
        };
        let Some(old) = old else { return };
        let Some(left) = self.live.get_mut(&old) else {
            return;
        };
        *left = left.saturating_sub(1);
        if *left == 0 {
            self.live.remove(&old);
            self.free.insert(old);
        }
    }

    /// A slot for a new pack: a free one, else a new one.
    fn take(&mut self) -> u64 {
        self.free.pop_first().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        })
    }
}

/// The state room as the store reads and writes it: the homeserver's, through the
/// appservice's own user (a fake in the unit tests).
trait StateRoom: Send + Sync {
    /// One state event's content (`None`: none).
    fn state<'a>(
        &'a self,
        kind: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Value>, ActorError>>;
    /// Sets one state event.
    fn put_state<'a>(
        &'a self,
        kind: &'a str,
        key: &'a str,
        content: &'a Value,
    ) -> BoxFuture<'a, Result<(), ActorError>>;
    /// Every state event of the room.
    fn all(&self) -> BoxFuture<'_, Result<Vec<Value>, ActorError>>;
}

struct ActorRoom {
    actor: Arc<Actor>,
    room: String,
}

impl StateRoom for ActorRoom {
    fn state<'a>(
        &'a self,
        kind: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Value>, ActorError>> {
        Box::pin(async move {
            let sender = self.actor.sender().to_string();
            self.actor.state_event(&sender, &self.room, kind, key).await
        })
    }

    fn put_state<'a>(
        &'a self,
        kind: &'a str,
        key: &'a str,
        content: &'a Value,
    ) -> BoxFuture<'a, Result<(), ActorError>> {
        Box::pin(async move {
            let sender = self.actor.sender().to_string();
            self.actor
                .put_state(&sender, &self.room, kind, key, content)
                .await
                .map(drop)
        })
    }

    fn all(&self) -> BoxFuture<'_, Result<Vec<Value>, ActorError>> {
        Box::pin(async move {
            let sender = self.actor.sender().to_string();
            self.actor.room_state(&sender, &self.room).await
        })
    }
}

/// What the store knows of the records it writes.
#[derive(Default)]
struct Known {
    /// What the heads of records with parts name (only those: a record that fits its head
    /// keeps nothing here). Changed only by the key's writer (its slot's turn), in place,
    /// step by step: at every point of a write it says what is safe if the write stops
    /// there (never taken out while a write is under way).
    layouts: HashMap<String, Layout>,
    /// Runtimes another replica wrote last, each with the number of the `forget` that said
    /// so: their heads are read before the next write, and a write that began before that
    /// `forget` neither clears the mark nor keeps its layout.
    unknown: HashMap<String, u64>,
    /// `forget`s so far.
    forgets: u64,
}

struct MatrixStore {
    state_room: Box<dyn StateRoom>,
    room: String,
    /// This replica's name, written into every head (only with `[bus] replica`).
    node: Option<String>,
    /// Registry keys with a put under way.
    registry: Slots<Value>,
    /// Runtime records with a put under way.
    runtimes: Slots<RuntimeRecord>,
    /// Layouts, and the records another replica wrote last.
    known: Mutex<Known>,
    /// The next write's sequence number (see the module's doc).
    seq: std::sync::atomic::AtomicU64,
    /// Without replicas: puts waiting for the writer's next write.
    pending: Mutex<HashMap<String, Pending>>,
    /// Held by the one write under way.
    writer: Arc<tokio::sync::Mutex<()>>,
    /// Where the latest records are.
    packs: Mutex<PackIndex>,
    /// State events written and their content bytes (what a write of the writer cost).
    written: (std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64),
}

/// One state key's latest wanted content and the version last stored; dropped once the
/// last put holding it returns.
struct Slot<T> {
    latest: Mutex<(u64, T)>,
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
        let state_room = Box::new(ActorRoom {
            actor,
            room: room.clone(),
        });
        Ok(Store::in_room(state_room, room, node))
    }

    fn in_room(state_room: Box<dyn StateRoom>, room: String, node: Option<String>) -> Store {
        Store {
            sizes: Arc::default(),
            inner: Arc::new(Inner::Matrix(Box::new(MatrixStore {
                state_room,
                room,
                node,
                registry: Mutex::default(),
                runtimes: Mutex::default(),
                known: Mutex::default(),
                seq: std::sync::atomic::AtomicU64::new(now_us()),
                pending: Mutex::default(),
                writer: Arc::default(),
                packs: Mutex::default(),
                written: Default::default(),
            }))),
        }
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
            inner: Arc::new(Inner::Memory(Mutex::default())),
            sizes: Arc::default(),
        }
    }

    /// Everything stored (deleted keys left out; unreadable records skipped with a warning).
    ///
    /// # Errors
    /// The homeserver is unavailable or refused.
    pub async fn load(&self) -> Result<Snapshot, ActorError> {
        let matrix = match &*self.inner {
            Inner::Memory(memory) => return Ok(lock(memory).snapshot()),
            Inner::Matrix(matrix) => matrix,
        };
        let events = matrix.state_room.all().await?;
        let loaded = record::load(&events);
        if loaded.orphans > 0 {
            tracing::info!(
                parts = loaded.orphans,
                "store: parts of records no head names were ignored"
            );
        }
        lock(&matrix.known).layouts = loaded.layouts;
        let merged = merge_packs(&events, loaded.runtimes);
        matrix
            .seq
            .fetch_max(merged.next_seq, std::sync::atomic::Ordering::SeqCst);
        *lock(&matrix.packs) = merged.index;
        let mut snapshot = Snapshot {
            runtimes: merged.runtimes,
            ..Snapshot::default()
        };
        for event in &events {
            if let Some((
                Stored::Registry {
                    url,
                    entry: Some(entry),
                },
                _,
            )) = Stored::read(event)
            {
                snapshot.registry.insert(url, entry);
            }
        }
        Ok(snapshot)
    }

    /// The record of `runtime` as stored now (`None`: none, or its head names parts that
    /// are being replaced — a newer head follows). For what another replica wrote.
    ///
    /// # Errors
    /// The homeserver is unavailable or refused.
    pub async fn fetch_runtime(&self, runtime: &str) -> Result<Option<RuntimeRecord>, ActorError> {
        let matrix = match &*self.inner {
            Inner::Memory(memory) => return Ok(lock(memory).current(runtime)),
            Inner::Matrix(matrix) => matrix,
        };
        let Some(head) = matrix.state(RUNTIME_EVENT_TYPE, runtime).await? else {
            return Ok(None);
        };
        let mut parts = BTreeMap::new();
        for (slot, _) in record::named_parts(&head).0 {
            if let Some(part) = matrix
                .state(PART_EVENT_TYPE, &record::part_key(runtime, slot))
                .await?
            {
                parts.insert(slot, part);
            }
        }
        let (record, _, missing) = record::assemble(&head, |slot| parts.remove(&slot));
        Ok(missing.is_empty().then_some(record))
    }

    /// Another replica wrote `runtime`'s record: what this one knew of its layout is
    /// forgotten, and its head is read again before this replica writes it next.
    pub fn forget(&self, runtime: &str) {
        if let Inner::Matrix(matrix) = &*self.inner {
            let mut known = lock(&matrix.known);
            known.forgets += 1;
            let forget = known.forgets;
            known.unknown.insert(runtime.to_string(), forget);
            known.layouts.remove(runtime);
        }
    }

    /// Stores `record` for `runtime`; an empty (default) record deletes it.
    ///
    /// # Errors
    /// Too large (nothing written), or the homeserver is unavailable or refused.
    pub async fn put_runtime(
        &self,
        runtime: &str,
        record: &RuntimeRecord,
    ) -> Result<(), StoreError> {
        self.put_runtime_queued(runtime, record)?.await
    }

    /// As [`Store::put_runtime`], but checked and placed in line now: whenever the returned
    /// future runs, it stores this record or a newer one (a put of the same runtime made
    /// later wins, however the futures are scheduled), and completes once one of them is
    /// stored.
    ///
    /// # Errors
    /// [`TooLarge`]: the record cannot be stored; nothing was placed in line.
    pub fn put_runtime_queued(
        &self,
        runtime: &str,
        record: &RuntimeRecord,
    ) -> Result<BoxFuture<'static, Result<(), StoreError>>, TooLarge> {
        let bytes = record::check(record)?;
        {
            let mut sizes = lock(&self.sizes);
            match record.is_empty() {
                true => sizes.remove(runtime),
                false => sizes.insert(runtime.to_string(), bytes),
            };
        }
        let matrix = match &*self.inner {
            Inner::Memory(memory) => {
                let mut memory = lock(memory);
                memory.live.remove(runtime);
                if record.is_empty() {
                    memory.snapshot.runtimes.remove(runtime);
                } else {
                    memory
                        .snapshot
                        .runtimes
                        .insert(runtime.to_string(), record.clone());
                }
                return Ok(Box::pin(std::future::ready(Ok(()))));
            }
            Inner::Matrix(matrix) => matrix,
        };
        if matrix.node.is_none() {
            return Ok(Box::pin(self.clone().put_packed(
                runtime,
                record.clone(),
                None,
            )));
        }
        let (slot, version) = queue(&matrix.runtimes, runtime, record.clone());
        let (store, key) = (self.clone(), runtime.to_string());
        // In a task of its own: a caller that goes away (a socket taken over mid-resume, a
        // peer's post given up) does not stop a record's write halfway.
        let write = async move {
            let Inner::Matrix(matrix) = &*store.inner else {
                return Ok(());
            };
            let stored = matrix.flush_runtime(&key, &slot, version).await;
            release(&matrix.runtimes, &key, slot);
            stored
        };
        Ok(Box::pin(async move {
            tokio::spawn(write)
                .await
                .unwrap_or_else(|_| Err(StoreError::Batch("the write stopped".into())))
        }))
    }

    /// As [`Store::put_runtime_queued`] for a change that added `added` to the record (and
    /// removed anything), without a copy of the record: `live` is read when the write that
    /// stores it begins (it holds this change and any made before; a put of the same runtime
    /// made later still wins). The record's size is checked against an upper bound kept per
    /// runtime (the last record put, plus what live puts added since), so the check costs
    /// what the change added; only a bound past [`record::MAX_RECORD_BYTES`] reads the record
    /// to count it exactly. With replicas the record is read now (their heads are written
    /// one by one).
    ///
    /// # Errors
    /// [`TooLarge`]: an added entry or the record cannot be stored; nothing was placed in
    /// line.
    pub fn put_runtime_live(
        &self,
        runtime: &str,
        live: Arc<dyn LiveRecord>,
        added: &[record::Item],
    ) -> Result<BoxFuture<'static, Result<(), StoreError>>, TooLarge> {
        let grown = record::added(added)?;
        {
            let mut sizes = lock(&self.sizes);
            let bound = sizes
                .get(runtime)
                .map(|bytes| bytes.saturating_add(grown))
                .filter(|bound| *bound <= record::MAX_RECORD_BYTES);
            let bound = match bound {
                Some(bound) => bound,
                None => record::check(&live.record())?, // unknown, or near the limit
            };
            sizes.insert(runtime.to_string(), bound);
        }
        let matrix = match &*self.inner {
            Inner::Memory(memory) => {
                lock(memory).live.insert(runtime.to_string(), live);
                return Ok(Box::pin(std::future::ready(Ok(()))));
            }
            Inner::Matrix(matrix) => matrix,
        };
        if matrix.node.is_some() {
            return self.put_runtime_queued(runtime, &live.record());
        }
        Ok(Box::pin(self.clone().put_packed(
            runtime,
            RuntimeRecord::default(),
            Some(live),
        )))
    }

    /// Without replicas: `record` (or, when given, what `live` holds when the write begins)
    /// joins the writer's next write (replacing a put of the same runtime still waiting for
    /// it); completes once that write is stored. Whoever waits first while no write is under
    /// way carries the next one out; each put waits in a task of its own once its future
    /// first runs, and each write runs in one (a caller that goes away stops no one's write,
    /// nor leaves its record waiting for someone else's put).
    fn put_packed(
        self,
        runtime: &str,
        record: RuntimeRecord,
        live: Option<Arc<dyn LiveRecord>>,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        if let Inner::Matrix(matrix) = &*self.inner {
            let mut pending = lock(&matrix.pending);
            let entry = pending
                .entry(runtime.to_string())
                .or_insert_with(|| Pending {
                    record: RuntimeRecord::default(),
                    live: None,
                    waiters: Vec::new(),
                });
            entry.record = record;
            entry.live = live;
            entry.waiters.push(tx);
        }
        let wait = async move {
            let Inner::Matrix(matrix) = &*self.inner else {
                return Ok(());
            };
            loop {
                let turn = Arc::clone(&matrix.writer).lock_owned().await;
                match rx.try_recv() {
                    Ok(done) => return done.map_err(StoreError::Batch),
                    Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                        return Err(StoreError::Batch("the write was given up".into()))
                    }
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
                }
                let batch = std::mem::take(&mut *lock(&matrix.pending));
                if batch.is_empty() {
                    // Taken by a write that answered everyone it took: not this put.
                    return Err(StoreError::Batch("the write was given up".into()));
                }
                let store = self.clone();
                let written = tokio::spawn(async move {
                    if let Inner::Matrix(matrix) = &*store.inner {
                        matrix.write_batch(batch).await;
                    }
                    drop(turn);
                });
                if written.await.is_err() {
                    return Err(StoreError::Batch("the write stopped".into()));
                }
            }
        };
        async move {
            tokio::spawn(wait)
                .await
                .unwrap_or_else(|_| Err(StoreError::Batch("the write stopped".into())))
        }
    }

    /// Stores the registry entry for `url`; `None` deletes it.
    ///
    /// # Errors
    /// Too large for an event (nothing written), or the homeserver is unavailable or
    /// refused.
    pub async fn put_registry(&self, url: &str, entry: Option<&Value>) -> Result<(), StoreError> {
        let content = match entry {
            Some(entry) => json!({ "entry": entry }),
            None => json!({}),
        };
        let bytes = serde_json::to_vec(&content).map_or(usize::MAX, |v| v.len());
        if bytes > MAX_REGISTRY_CONTENT_BYTES {
            return Err(StoreError::TooLarge(format!(
                "a registry entry of {bytes} bytes (at most {MAX_REGISTRY_CONTENT_BYTES})"
            )));
        }
        let matrix = match &*self.inner {
            Inner::Memory(memory) => {
                let snapshot = &mut lock(memory).snapshot;
                match entry {
                    Some(entry) => snapshot.registry.insert(url.to_string(), entry.clone()),
                    None => snapshot.registry.remove(url),
                };
                return Ok(());
            }
            Inner::Matrix(matrix) => matrix,
        };
        match matrix.put_registry(url, content).await {
            Err(error) if error.errcode() == Some("M_BAD_JSON") => {
                let text = entry.map(Value::to_string).unwrap_or_default();
                Ok(matrix
                    .put_registry(url, json!({ "entry_json": text }))
                    .await?)
            }
            other => Ok(other?),
        }
    }
}

/// Makes `value` the latest wanted state of `key`; its slot and version.
fn queue<T: Default>(slots: &Slots<T>, key: &str, value: T) -> (Arc<Slot<T>>, u64) {
    let mut slots = lock(slots);
    let slot = slots
        .entry(key.to_string())
        .or_insert_with(|| {
            Arc::new(Slot {
                latest: Mutex::new((0, T::default())),
                stored: tokio::sync::Mutex::new(0),
            })
        })
        .clone();
    drop(slots);
    let mut latest = lock(&slot.latest);
    latest.0 += 1;
    latest.1 = value;
    let version = latest.0;
    drop(latest);
    (slot, version)
}

/// Drops `key`'s slot once no put holds it but the caller (its value is stored, or its
/// put failed and was answered so).
fn release<T>(slots: &Slots<T>, key: &str, slot: Arc<Slot<T>>) {
    let mut slots = lock(slots);
    if slots.get(key).is_some_and(|s| Arc::ptr_eq(s, &slot)) && Arc::strong_count(&slot) == 2 {
        slots.remove(key);
    }
}

impl MatrixStore {
    /// One state event's content (`None`: none).
    async fn state(&self, kind: &str, key: &str) -> Result<Option<Value>, ActorError> {
        self.state_room.state(kind, key).await
    }

    async fn put_state(&self, kind: &str, key: &str, content: &Value) -> Result<(), ActorError> {
        let bytes = serde_json::to_vec(content).map_or(0, |v| v.len() as u64);
        self.written
            .0
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.written
            .1
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        self.state_room.put_state(kind, key, content).await
    }

    /// State events written so far and their content bytes.
    fn written_so_far(&self) -> (u64, u64) {
        (
            self.written.0.load(std::sync::atomic::Ordering::Relaxed),
            self.written.1.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// The writer's name for a head.
    fn extra(&self) -> Map<String, Value> {
        let mut extra = Map::new();
        if let Some(node) = &self.node {
            extra.insert("writer".to_string(), json!(node));
        }
        extra
    }

    /// The next write's sequence number.
    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }

    /// One write of the packs' writer: the small records of `batch` into packs, the others
    /// as heads (all at once); then each put is answered.
    async fn write_batch(&self, mut batch: HashMap<String, Pending>) {
        let started = std::time::Instant::now();
        // Live puts: the record as it is now, one copy however many puts it stands for.
        for pending in batch.values_mut() {
            if let Some(live) = pending.live.take() {
                pending.record = live.record();
            }
        }
        let (events0, bytes0) = self.written_so_far();
        let waiters: usize = batch.values().map(|p| p.waiters.len()).sum();
        let mut packs: Vec<(u64, u64, Map<String, Value>, usize)> = Vec::new(); // slot, seq
        let mut index = lock(&self.packs).clone();
        let mut heads: Vec<&str> = Vec::new();
        let mut placed: Vec<(&str, usize)> = Vec::new(); // runtime, its pack
        for (runtime, pending) in &batch {
            let entry = match pending.record.is_empty() {
                true => Some(Value::Null),
                false => serde_json::to_value(&pending.record).ok(),
            };
            let bytes = entry
                .as_ref()
                .and_then(|e| serde_json::to_vec(e).ok())
                .map_or(usize::MAX, |v| v.len().saturating_add(runtime.len() + 8));
            let Some(entry) = entry.filter(|_| bytes <= PACK_ENTRY_BYTES) else {
                heads.push(runtime);
                continue;
            };
            let fits = packs
                .last()
                .is_some_and(|(_, _, _, size)| size + bytes <= MAX_CONTENT_BYTES - 200);
            if !fits {
                packs.push((index.take(), self.next_seq(), Map::new(), 0));
            }
            let at = packs.len() - 1;
            let (_, _, entries, size) = &mut packs[at];
            entries.insert(runtime.clone(), entry);
            *size += bytes;
            placed.push((runtime, at));
        }
        let seq = self.next_seq();
        drop(index); // only this writer takes slots: what it took is settled below
        let pack_writes = packs.iter().map(|(slot, seq, entries, _)| async move {
            let content = json!({ "seq": seq, "runtimes": entries });
            self.put_state(PACK_EVENT_TYPE, &slot.to_string(), &content)
                .await
                .map_err(|e| e.to_string())
        });
        let batch_ref = &batch;
        let head_writes = heads.iter().map(|runtime| async move {
            self.write_runtime(runtime, &batch_ref[*runtime].record, seq)
                .await
                .map_err(|e| e.to_string())
        });
        let (packed, headed) = futures_util::future::join(
            futures_util::future::join_all(pack_writes),
            futures_util::future::join_all(head_writes),
        )
        .await;
        let mut results: HashMap<String, Result<(), String>> = HashMap::new();
        {
            let mut index = lock(&self.packs);
            for (slot, _, _, _) in &packs {
                index.free.remove(slot);
                index.next = index.next.max(slot + 1);
            }
            for (runtime, written) in heads.iter().zip(headed) {
                if written.is_ok() {
                    index.moved(runtime, None);
                }
                results.insert((*runtime).to_string(), written);
            }
            for (runtime, at) in &placed {
                let written = packed[*at].clone();
                if written.is_ok() {
                    index.moved(runtime, Some(packs[*at].0));
                }
                results.insert((*runtime).to_string(), written);
            }
            for ((slot, _, _, _), written) in packs.iter().zip(&packed) {
                if written.is_err() && !index.live.contains_key(slot) {
                    index.free.insert(*slot); // holds nothing anyone's latest
                }
            }
        }
        let (events1, bytes1) = self.written_so_far();
        tracing::debug!(
            runtimes = batch.len(),
            waiters,
            events = events1 - events0,
            bytes = bytes1 - bytes0,
            ms = started.elapsed().as_millis() as u64,
            "store: one write of the writer"
        );
        for (runtime, pending) in batch {
            let result = results
                .remove(&runtime)
                .unwrap_or_else(|| Err("not written".into()));
            if let Err(error) = &result {
                tracing::warn!(%error, %runtime, "store: a runtime record is not stored");
            }
            for waiter in pending.waiters {
                let _ = waiter.send(result.clone());
            }
        }
    }

    /// Writes a registry entry, coalescing concurrent writes of one key.
    async fn put_registry(&self, url: &str, mut content: Value) -> Result<(), ActorError> {
        if let Some(object) = content.as_object_mut() {
            object.extend(self.extra());
        }
        let (slot, version) = queue(&self.registry, url, content);
        let stored = async {
            let mut stored = slot.stored.lock().await;
            if *stored >= version {
                return Ok(()); // a newer put stored its value meanwhile
            }
            let (latest, content) = lock(&slot.latest).clone();
            self.put_state(REGISTRY_EVENT_TYPE, url, &content).await?;
            *stored = latest;
            Ok(())
        }
        .await;
        release(&self.registry, url, slot);
        stored
    }

    /// Returns once `version` of the runtime's slot (or a newer one) is stored, writing the
    /// latest.
    async fn flush_runtime(
        &self,
        key: &str,
        slot: &Slot<RuntimeRecord>,
        version: u64,
    ) -> Result<(), StoreError> {
        let mut stored = slot.stored.lock().await;
        if *stored >= version {
            return Ok(()); // a newer put stored its value meanwhile
        }
        let (latest, record) = lock(&slot.latest).clone();
        self.write_runtime(key, &record, self.next_seq()).await?;
        *stored = latest;
        Ok(())
    }

    /// Writes `record` as `key`'s head (with sequence number `seq`) and parts, in the order
    /// [`record`] describes. The layout stays in place throughout, changed at each step to
    /// what is safe should the write stop there (a dropped future, a head that landed though
    /// its answer did not come): the slots about to be written are stale before they are
    /// written, and the new layout is kept only once its head is stored.
    async fn write_runtime(
        &self,
        key: &str,
        record: &RuntimeRecord,
        seq: u64,
    ) -> Result<(), StoreError> {
        let (mut layout, seen) = {
            let known = lock(&self.known);
            (
                known.layouts.get(key).cloned(),
                known.unknown.get(key).copied(),
            )
        };
        if seen.is_some() {
            // Another replica wrote it last: whatever its head names is neither written over
            // nor emptied (that replica may be storing a head that keeps them right now); this
            // store's own earlier parts, which no head of another names, are emptied.
            if let Some(head) = self.state(RUNTIME_EVENT_TYPE, key).await? {
                let (named, gen) = record::named_parts(&head);
                let mut known = layout.unwrap_or_default();
                known.gen = known.gen.max(gen);
                known.foreign = named.into_iter().map(|(slot, _)| slot).collect();
                let own = known.parts.drain(..).map(|p| p.slot);
                known.stale.extend(own);
                known.stale.retain(|slot| !known.foreign.contains(slot));
                layout = Some(known);
            }
        }
        self.write_planned(key, record, layout, seq, seen).await?;
        let mut known = lock(&self.known);
        if known.unknown.get(key).copied() == seen {
            known.unknown.remove(key);
        } // else: another replica wrote it meanwhile; its head is read next time
        Ok(())
    }

    async fn write_planned(
        &self,
        key: &str,
        record: &RuntimeRecord,
        layout: Option<Layout>,
        seq: u64,
        seen: Option<u64>,
    ) -> Result<(), StoreError> {
        let mut extra = self.extra();
        extra.insert("seq".to_string(), json!(seq));
        if record.is_empty() {
            // Deleted: the head first (its parts are then orphans), then the parts.
            self.put_state(RUNTIME_EVENT_TYPE, key, &Value::Object(extra))
                .await?;
            let slots: BTreeSet<u32> = layout
                .iter()
                .flat_map(|l| {
                    l.parts
                        .iter()
                        .map(|p| p.slot)
                        .chain(l.stale.iter().copied())
                        .filter(|slot| !l.foreign.contains(slot))
                })
                .collect();
            self.empty_parts(key, seen, slots, None).await;
            return Ok(());
        }
        let plan = record::plan(layout.as_ref(), record, &extra)?;
        if !plan.parts.is_empty() {
            // Until the head naming them is stored, the new slots are stale: if this write
            // stops anywhere, the next one neither writes over them (its head may have
            // landed) nor names them; the old parts stay as they are until the head is.
            let mut marked = layout.clone().unwrap_or_default();
            marked.gen = marked.gen.max(plan.layout.as_ref().map_or(0, |l| l.gen));
            marked
                .stale
                .extend(plan.parts.iter().map(|(slot, _)| *slot));
            self.keep_layout(key, seen, Some(marked));
        }
        // The parts first, each into a slot the current head does not name.
        let writes = plan.parts.iter().map(|(slot, content)| async move {
            self.put_state(PART_EVENT_TYPE, &record::part_key(key, *slot), content)
                .await
        });
        let written = futures_util::future::join_all(writes).await;
        if let Some(e) = written.into_iter().find_map(Result::err) {
            return Err(e.into()); // the old head stands; the new slots are stale
        }
        self.put_state(RUNTIME_EVENT_TYPE, key, &plan.head).await?;
        // Then the slots the new head does not name are emptied.
        self.empty_parts(key, seen, plan.empty.into_iter().collect(), plan.layout)
            .await;
        Ok(())
    }

    /// After a head is stored: empties `slots` of `key` (stale until emptied) and keeps
    /// `layout`, the head's (with the slots not emptied as stale, for the next write).
    async fn empty_parts(
        &self,
        key: &str,
        seen: Option<u64>,
        slots: BTreeSet<u32>,
        layout: Option<Layout>,
    ) {
        let with_stale = |stale: BTreeSet<u32>| match (layout.clone(), stale.is_empty()) {
            (Some(mut layout), _) => {
                layout.stale = stale;
                Some(layout)
            }
            (None, false) => Some(Layout {
                stale,
                ..Layout::default()
            }),
            (None, true) => None,
        };
        self.keep_layout(key, seen, with_stale(slots.clone()));
        let empties = slots.iter().map(|slot| async move {
            let emptied = self
                .put_state(PART_EVENT_TYPE, &record::part_key(key, *slot), &json!({}))
                .await;
            (*slot, emptied)
        });
        let mut left = BTreeSet::new();
        for (slot, emptied) in futures_util::future::join_all(empties).await {
            if let Err(error) = emptied {
                tracing::warn!(%error, runtime = %key, slot, "store: a part no head names is not emptied yet");
                left.insert(slot);
            }
        }
        self.keep_layout(key, seen, with_stale(left));
    }

    /// Keeps `layout` as `key`'s — unless another replica wrote the key since this write
    /// began (`seen`: the `forget` it began under): then its head is read next time.
    fn keep_layout(&self, key: &str, seen: Option<u64>, layout: Option<Layout>) {
        let mut known = lock(&self.known);
        if known.unknown.get(key).copied() != seen {
            return;
        }
        match layout {
            Some(layout) => known.layouts.insert(key.to_string(), layout),
            None => known.layouts.remove(key),
        };
    }
}

/// The clock in microseconds since the Unix epoch: where sequence numbers start.
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// What the packs add to the records read from heads.
#[derive(Debug, Default)]
struct Merged {
    runtimes: BTreeMap<String, RuntimeRecord>,
    index: PackIndex,
    /// Above every sequence number found.
    next_seq: u64,
}

/// Each runtime's record is its entry with the highest sequence number, over the heads
/// (`runtimes`, as [`record::load`] read them; a head without `seq` is 0) and the packs.
fn merge_packs(events: &[Value], mut runtimes: BTreeMap<String, RuntimeRecord>) -> Merged {
    let mut head_seq: HashMap<&str, u64> = HashMap::new();
    let mut best: HashMap<&str, (u64, u64, &Value)> = HashMap::new(); // seq, slot, entry
    let mut slots: BTreeSet<u64> = BTreeSet::new();
    let mut top = 0u64;
    for event in events {
        let Some((kind, key, content)) = record::state_event(event) else {
            continue;
        };
        let seq = content.get("seq").and_then(Value::as_u64).unwrap_or(0);
        top = top.max(seq);
        match kind {
            RUNTIME_EVENT_TYPE => {
                head_seq.insert(key, seq);
            }
            PACK_EVENT_TYPE => {
                let Ok(slot) = key.parse::<u64>() else {
                    continue;
                };
                slots.insert(slot);
                let Some(entries) = content.get("runtimes").and_then(Value::as_object) else {
                    continue;
                };
                for (runtime, entry) in entries {
                    if best.get(runtime.as_str()).is_none_or(|(s, _, _)| *s < seq) {
                        best.insert(runtime, (seq, slot, entry));
                    }
                }
            }
            _ => {}
        }
    }
    let mut index = PackIndex::default();
    for (runtime, (seq, slot, entry)) in best {
        if head_seq.get(runtime).is_some_and(|h| *h > seq) {
            continue; // a newer head
        }
        if entry.is_null() {
            runtimes.remove(runtime);
        } else {
            match serde_json::from_value::<RuntimeRecord>(entry.clone()) {
                Ok(record) => {
                    runtimes.insert(runtime.to_string(), record);
                }
                Err(error) => {
                    tracing::warn!(%error, %runtime, "store: unreadable packed runtime record skipped");
                    continue;
                }
            }
        }
        index.moved(runtime, Some(slot));
    }
    index.next = slots.last().map_or(0, |s| s + 1);
    index.free = slots
        .into_iter()
        .filter(|slot| !index.live.contains_key(slot))
        .collect();
    Merged {
        runtimes,
        index,
        next_seq: top + 1,
    }
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

    /// A runtime's record as the bus holds it.
    struct Held(Mutex<RuntimeRecord>);

    impl LiveRecord for Held {
        fn record(&self) -> RuntimeRecord {
            lock(&self.0).clone()
        }
    }

    #[tokio::test]
    async fn a_live_put_stores_the_record_as_it_is_then_and_checks_what_it_added() {
        let store = Store::memory();
        let held = Arc::new(Held(Mutex::new(record("hyperty://example.com/1"))));
        let live = || Arc::clone(&held) as Arc<dyn LiveRecord>;
        let put = store
            .put_runtime_live("rt://a", live(), &[])
            .expect("placed");
        put.await.expect("stored");
        lock(&held.0)
            .allocations
            .insert("k2".into(), vec!["hyperty://example.com/2".into()]);
        let snapshot = store.load().await.expect("load");
        assert_eq!(snapshot.runtimes["rt://a"], held.record(), "as it is now");

        // An added entry too big for an event of its own: refused, nothing placed in line.
        let huge = record::Item::Allocation("k".repeat(70_000), "hyperty://example.com/3".into());
        assert!(store.put_runtime_live("rt://a", live(), &[huge]).is_err());
        // Past the bound the record itself is counted: while it is small, accepted...
        let big = |i: usize| record::Item::Allocation(format!("b{i}"), "a".repeat(50_000));
        for i in 0..400 {
            assert!(store.put_runtime_live("rt://a", live(), &[big(i)]).is_ok());
        }
        // ...and refused once it would be too large, as it grows put by put.
        let mut refused = None;
        for i in 0..400 {
            lock(&held.0)
                .allocations
                .insert(format!("b{i}"), vec!["a".repeat(50_000)]);
            if store.put_runtime_live("rt://a", live(), &[big(i)]).is_err() {
                refused = Some(i);
                break;
            }
        }
        let refused = refused.expect("refused past the record's limit");
        assert!((300..340).contains(&refused), "refused at {refused}");
        // An explicit put of a smaller record counts from it again.
        store
            .put_runtime("rt://a", &record("hyperty://example.com/1"))
            .await
            .expect("put");
        *lock(&held.0) = record("hyperty://example.com/1");
        assert!(store.put_runtime_live("rt://a", live(), &[big(0)]).is_ok());
    }

    fn event(kind: &str, key: &str, content: Value) -> Value {
        json!({"type": kind, "state_key": key, "content": content})
    }

    #[test]
    fn the_entry_with_the_highest_sequence_number_is_the_record() {
        let owner = |user: &str| json!({"user": user});
        let events = vec![
            // An old head (no seq) and a pack that supersedes it.
            event(RUNTIME_EVENT_TYPE, "rt://old", owner("@a:l")),
            event(
                PACK_EVENT_TYPE,
                "0",
                json!({"seq": 5, "runtimes": {
                    "rt://old": {"user": "@a:l", "released": true},
                    "rt://moved": owner("@b:l"),
                    "rt://gone": owner("@c:l"),
                }}),
            ),
            // Newer than pack 5 for one runtime, older for another.
            event(
                RUNTIME_EVENT_TYPE,
                "rt://moved",
                json!({"user": "@b:l", "seq": 7, "foreign": ["x://y/1"]}),
            ),
            event(
                RUNTIME_EVENT_TYPE,
                "rt://gone",
                json!({"user": "@c:l", "seq": 3}),
            ),
            event(
                PACK_EVENT_TYPE,
                "3",
                json!({"seq": 8, "runtimes": {"rt://gone": null}}),
            ),
            // Every entry superseded, or none: free slots.
            event(
                PACK_EVENT_TYPE,
                "1",
                json!({"seq": 2, "runtimes": {"rt://old": owner("@z:l")}}),
            ),
            event(PACK_EVENT_TYPE, "2", json!({})),
        ];
        let heads = record::load(&events).runtimes;
        let merged = merge_packs(&events, heads);
        assert!(merged.runtimes["rt://old"].released);
        assert_eq!(merged.runtimes["rt://old"].user.as_deref(), Some("@a:l"));
        assert_eq!(
            merged.runtimes["rt://moved"].foreign,
            vec!["x://y/1".to_string()]
        );
        assert!(!merged.runtimes.contains_key("rt://gone"));
        assert_eq!(merged.next_seq, 9);
        assert_eq!(merged.index.free, BTreeSet::from([1, 2]));
        assert_eq!(merged.index.next, 4);
        assert_eq!(merged.index.at.get("rt://old"), Some(&0));
        assert_eq!(merged.index.at.get("rt://gone"), Some(&3));
        assert!(!merged.index.at.contains_key("rt://moved"));
    }

    #[test]
    fn a_packs_slot_is_free_once_its_last_latest_record_moved() {
        let mut index = PackIndex::default();
        assert_eq!(index.take(), 0);
        index.moved("a", Some(0));
        index.moved("b", Some(0));
        assert_eq!(index.take(), 1);
        index.moved("a", Some(1));
        index.moved("b", None); // b is a head now
        assert_eq!(index.free, BTreeSet::from([0]));
        assert_eq!(index.take(), 0);
        index.moved("a", Some(0));
        assert_eq!(index.free, BTreeSet::from([1]));
        assert_eq!(index.live.get(&0), Some(&1));
    }

    #[test]
    fn records_read_leniently() {
        let record: RuntimeRecord =
            serde_json::from_value(json!({"user": "@a:b"})).expect("partial record");
        assert_eq!(record.user.as_deref(), Some("@a:b"));
        assert!(record.allocations.is_empty());
    }

    /// A state room in memory: puts are stored at once; one put chosen by `hold` is
    /// stored, then not answered until `release` (never, if the test drops the write);
    /// puts of `fail`'s event type fail.
    #[derive(Default)]
    struct FakeRoom {
        events: Mutex<BTreeMap<(String, String), Value>>,
        puts: std::sync::atomic::AtomicUsize,
        hold: Mutex<Option<HoldIf>>,
        held: tokio::sync::Notify,
        release: tokio::sync::Notify,
        fail: Mutex<Option<&'static str>>,
        /// One put chosen by `gate` waits, before it is stored, until `open`.
        gate: Mutex<Option<HoldIf>>,
        gated: tokio::sync::Notify,
        open: tokio::sync::Notify,
    }

    type HoldIf = Box<dyn Fn(usize, &str, &Value) -> bool + Send>;

    impl FakeRoom {
        fn hold(&self, when: impl Fn(usize, &str, &Value) -> bool + Send + 'static) {
            *lock(&self.hold) = Some(Box::new(when));
        }

        fn gate(&self, when: impl Fn(usize, &str, &Value) -> bool + Send + 'static) {
            *lock(&self.gate) = Some(Box::new(when));
        }

        fn puts(&self) -> usize {
            self.puts.load(std::sync::atomic::Ordering::SeqCst)
        }

        /// The runtimes as a restarted node loads them, and how many are damaged.
        fn loaded(&self) -> (BTreeMap<String, RuntimeRecord>, usize) {
            let events: Vec<Value> = lock(&self.events)
                .iter()
                .map(|((kind, key), content)| event(kind, key, content.clone()))
                .collect();
            let loaded = record::load(&events);
            (loaded.runtimes, loaded.damaged)
        }
    }

    impl StateRoom for Arc<FakeRoom> {
        fn state<'a>(
            &'a self,
            kind: &'a str,
            key: &'a str,
        ) -> BoxFuture<'a, Result<Option<Value>, ActorError>> {
            let found = lock(&self.events)
                .get(&(kind.to_string(), key.to_string()))
                .cloned();
            Box::pin(std::future::ready(Ok(found)))
        }

        fn put_state<'a>(
            &'a self,
            kind: &'a str,
            key: &'a str,
            content: &'a Value,
        ) -> BoxFuture<'a, Result<(), ActorError>> {
            Box::pin(async move {
                if *lock(&self.fail) == Some(kind) {
                    return Err(ActorError::Unavailable);
                }
                let n = self.puts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                let gated = {
                    let mut gate = lock(&self.gate);
                    let now = gate.as_ref().is_some_and(|when| when(n, kind, content));
                    if now {
                        *gate = None;
                    }
                    now
                };
                if gated {
                    self.gated.notify_one();
                    self.open.notified().await;
                }
                lock(&self.events).insert((kind.to_string(), key.to_string()), content.clone());
                let hold = {
                    let mut hold = lock(&self.hold);
                    let now = hold.as_ref().is_some_and(|when| when(n, kind, content));
                    if now {
                        *hold = None;
                    }
                    now
                };
                if hold {
                    self.held.notify_one();
                    self.release.notified().await;
                }
                Ok(())
            })
        }

        fn all(&self) -> BoxFuture<'_, Result<Vec<Value>, ActorError>> {
            let events = lock(&self.events)
                .iter()
                .map(|((kind, key), content)| event(kind, key, content.clone()))
                .collect();
            Box::pin(std::future::ready(Ok(events)))
        }
    }

    const RUNTIME: &str = "runtime://localhost/big";

    fn in_fake(room: &Arc<FakeRoom>, node: &str) -> Store {
        Store::in_room(
            Box::new(Arc::clone(room)),
            "!state:localhost".into(),
            Some(node.into()),
        )
    }

    fn matrix(store: &Store) -> &MatrixStore {
        match &*store.inner {
            Inner::Matrix(matrix) => matrix,
            Inner::Memory(_) => unreachable!("a store in a fake room"),
        }
    }

    /// A record holding claimed addresses `from..to` (some 50 bytes each: about 1,200 a
    /// part).
    fn claiming(from: usize, to: usize) -> RuntimeRecord {
        RuntimeRecord {
            user: Some("@alice:localhost".into()),
            claimed: (from..to)
                .map(|n| format!("hyperty://localhost/claimed-address-number-{n:08}"))
                .collect(),
            ..RuntimeRecord::default()
        }
    }

    fn without(mut record: RuntimeRecord, from: usize, to: usize) -> RuntimeRecord {
        let gone: Vec<String> = claiming(from, to).claimed;
        record.claimed.retain(|c| !gone.contains(c));
        record
    }

    fn with(mut record: RuntimeRecord, from: usize, to: usize) -> RuntimeRecord {
        record.claimed.extend(claiming(from, to).claimed);
        record
    }

    /// What a record holds, whatever the order its parts give it back in.
    fn entries(record: &RuntimeRecord) -> (Option<String>, BTreeSet<record::Item>) {
        (
            record.user.clone(),
            record::items(record).into_iter().collect(),
        )
    }

    fn parts_named(room: &FakeRoom) -> usize {
        let events = lock(&room.events);
        let head = &events[&(RUNTIME_EVENT_TYPE.to_string(), RUNTIME.to_string())];
        record::named_parts(head).0.len()
    }

    /// N4: a write stopped after any of its puts (the future dropped; the put stored but
    /// not answered) leaves a layout the next writes keep the stored record whole with —
    /// also when the next write's head fails.
    #[tokio::test]
    async fn a_write_dropped_mid_plan_never_writes_over_named_parts() {
        let first = claiming(0, 5_000);
        let second = with(without(first.clone(), 0, 600), 5_000, 6_500);
        let third = with(without(second.clone(), 2_000, 2_800), 6_500, 8_000);
        let fourth = without(third.clone(), 4_000, 4_500);
        let mut dropped = 0;
        for k in 1.. {
            let room = Arc::new(FakeRoom::default());
            let store = in_fake(&room, "a");
            let m = matrix(&store);
            m.write_runtime(RUNTIME, &first, m.next_seq())
                .await
                .expect("first write");
            assert!(parts_named(&room) >= 3, "the record has parts");
            let before = room.puts();
            room.hold(move |n, _, _| n == before + k);
            let completed = tokio::select! {
                written = m.write_runtime(RUNTIME, &second, m.next_seq()) => {
                    written.expect("second write");
                    true
                }
                () = room.held.notified() => false, // the write is dropped here
            };
            if completed {
                break; // every put of the second write was tried
            }
            dropped += 1;
            *lock(&room.fail) = Some(RUNTIME_EVENT_TYPE);
            assert!(m
                .write_runtime(RUNTIME, &third, m.next_seq())
                .await
                .is_err());
            *lock(&room.fail) = None;
            let (stored, damaged) = room.loaded();
            assert_eq!(
                damaged, 0,
                "stopped after put {k}: named parts were written over"
            );
            let stored = entries(&stored[RUNTIME]);
            assert!(
                stored == entries(&first) || stored == entries(&second),
                "stopped after put {k}: the first or the second record is stored"
            );
            m.write_runtime(RUNTIME, &fourth, m.next_seq())
                .await
                .expect("fourth write");
            let (stored, damaged) = room.loaded();
            assert_eq!(damaged, 0);
            assert_eq!(entries(&stored[RUNTIME]), entries(&fourth));
        }
        assert!(
            dropped >= 3,
            "the second write has parts, a head and empties"
        );
    }

    /// Releasing a runtime's entries a few at a time writes its head with the removals,
    /// not the parts that held them; a restarted node never reads a released entry back.
    #[tokio::test]
    async fn releases_cost_a_head_not_the_parts_that_held_them() {
        let room = Arc::new(FakeRoom::default());
        let store = Store::in_room(Box::new(Arc::clone(&room)), "!state:localhost".into(), None);
        let m = matrix(&store);
        let all = claiming(0, 8_000);
        m.write_runtime(RUNTIME, &all, m.next_seq())
            .await
            .expect("first write");
        let parts = parts_named(&room);
        assert!(parts >= 5, "{parts} parts");
        let (mut puts, mut bytes, mut writes) = (0, 0, 0);
        for end in (100..8_000).step_by(100) {
            let (puts0, (_, bytes0)) = (room.puts(), m.written_so_far());
            let left = without(all.clone(), 0, end);
            m.write_runtime(RUNTIME, &left, m.next_seq())
                .await
                .expect("release");
            puts += room.puts() - puts0;
            bytes += m.written_so_far().1 - bytes0;
            writes += 1;
            let (stored, damaged) = room.loaded();
            assert_eq!(damaged, 0);
            assert_eq!(entries(&stored[RUNTIME]), entries(&left), "after {end}");
        }
        // A head each, now and then a part emptied or rewritten — not a part each time.
        assert!(
            puts <= writes + writes / 4,
            "{puts} events for {writes} writes"
        );
        assert!(
            bytes <= (writes * (record::TAIL_BYTES + record::REMOVED_BYTES)) as u64,
            "{bytes} bytes for {writes} writes"
        );
    }

    /// N4: a `forget` (another replica wrote the record) that arrives while this replica's
    /// write is under way wins over it: the next write reads the other replica's head
    /// instead of planning against the layout of its own write.
    #[tokio::test]
    async fn a_forget_during_a_write_makes_the_next_write_read_the_head() {
        let room = Arc::new(FakeRoom::default());
        let (a, b) = (in_fake(&room, "a"), in_fake(&room, "b"));
        let first = claiming(0, 5_000);
        matrix(&a)
            .write_runtime(RUNTIME, &first, matrix(&a).next_seq())
            .await
            .expect("first write");
        // The second write drops the first part (all it held is gone) and empties its slot
        // (its only empty), then waits there for its answer.
        let second = without(first.clone(), 0, 1_500);
        room.hold(|_, kind, content| kind == PART_EVENT_TYPE && content == &json!({}));
        let second_write = matrix(&a).write_runtime(RUNTIME, &second, matrix(&a).next_seq());
        tokio::pin!(second_write);
        tokio::select! {
            written = &mut second_write => panic!("the write did not wait: {written:?}"),
            () = room.held.notified() => {}
        }
        // Meanwhile the other replica writes the runtime (having read this one's head), and
        // this replica's follower tells it so.
        b.forget(RUNTIME);
        let other = with(claiming(10_000, 12_000), 0, 100);
        matrix(&b)
            .write_runtime(RUNTIME, &other, matrix(&b).next_seq())
            .await
            .expect("the other replica's write");
        a.forget(RUNTIME);
        room.release.notify_one();
        second_write.await.expect("second write");
        // This replica writes it next: over nothing the other replica's head names.
        let third = with(second.clone(), 5_000, 7_000);
        matrix(&a)
            .write_runtime(RUNTIME, &third, matrix(&a).next_seq())
            .await
            .expect("third write");
        let (stored, damaged) = room.loaded();
        assert_eq!(damaged, 0, "parts the head names were written over");
        assert_eq!(entries(&stored[RUNTIME]), entries(&third));
    }

    /// M1: two replicas writing one record at once (the runtime moving between them, each
    /// planning against the head it knows) never leave a head naming the other's parts as
    /// its own. The interleaving: all of a's parts, then all of b's (and b's head), then a's
    /// head. With their own slot ranges the last head loads whole; with ranges that meet,
    /// the writer in each part makes the mix counted damage.
    #[tokio::test]
    async fn two_replicas_writing_one_record_never_mix_parts() {
        let same_range = (0..)
            .map(|n| format!("b{n}"))
            .find(|b| record::first_slot(Some(b)) == record::first_slot(Some("a")))
            .expect("a name in a's range");
        for b_name in ["b".to_string(), same_range] {
            assert!(
                b_name == "b" || record::first_slot(Some(&b_name)) != record::first_slot(Some("b"))
            );
            let room = Arc::new(FakeRoom::default());
            let (a, b) = (in_fake(&room, "a"), in_fake(&room, &b_name));
            matrix(&a)
                .write_runtime(RUNTIME, &claiming(0, 5_000), matrix(&a).next_seq())
                .await
                .expect("first write");
            // b's follower saw a's head: b reads it before it writes.
            b.forget(RUNTIME);
            let (a_record, b_record) = (claiming(10_000, 15_000), claiming(20_000, 24_000));
            room.gate(|_, kind, content| {
                kind == RUNTIME_EVENT_TYPE && content.get("writer") == Some(&json!("a"))
            });
            let a_write = matrix(&a).write_runtime(RUNTIME, &a_record, matrix(&a).next_seq());
            tokio::pin!(a_write);
            tokio::select! {
                written = &mut a_write => panic!("a's head was not held: {written:?}"),
                () = room.gated.notified() => {} // a's parts are all stored
            }
            matrix(&b)
                .write_runtime(RUNTIME, &b_record, matrix(&b).next_seq())
                .await
                .expect("b's write");
            room.open.notify_one();
            a_write.await.expect("a's write");
            let (stored, damaged) = room.loaded();
            let got = stored.get(RUNTIME).map(entries);
            if b_name == "b" {
                assert_eq!(damaged, 0, "each writer's parts are its own");
                assert_eq!(got, Some(entries(&a_record)), "the last head, whole");
            } else {
                assert!(
                    damaged > 0
                        || got == Some(entries(&a_record))
                        || got == Some(entries(&b_record)),
                    "a mix of the two writes was loaded as a record"
                );
            }
        }
    }

    /// Fifth review P1: a replica that read another's head emptied the slots that head named,
    /// while the other's concurrent write kept most of them (a small change): when the other's
    /// head landed last, it named emptied parts, and the claims in them were lost.
    #[tokio::test]
    async fn a_replica_never_empties_parts_another_replicas_head_keeps() {
        let room = Arc::new(FakeRoom::default());
        let (a, b) = (in_fake(&room, "a"), in_fake(&room, "b"));
        matrix(&a)
            .write_runtime(RUNTIME, &claiming(0, 5_000), matrix(&a).next_seq())
            .await
            .expect("first write");
        b.forget(RUNTIME);
        // a's change is small: it keeps its parts and adds one claim.
        let a_record = claiming(0, 5_001);
        room.gate(|_, kind, content| {
            kind == RUNTIME_EVENT_TYPE && content.get("writer") == Some(&json!("a"))
        });
        let a_write = matrix(&a).write_runtime(RUNTIME, &a_record, matrix(&a).next_seq());
        tokio::pin!(a_write);
        tokio::select! {
            written = &mut a_write => panic!("a's head was not held: {written:?}"),
            () = room.gated.notified() => {}
        }
        // b's whole write, its empties included, before a's head lands.
        matrix(&b)
            .write_runtime(RUNTIME, &claiming(20_000, 24_000), matrix(&b).next_seq())
            .await
            .expect("b's write");
        room.open.notify_one();
        a_write.await.expect("a's write");
        let (stored, damaged) = room.loaded();
        assert_eq!(damaged, 0, "a's head names only parts that are there");
        assert_eq!(stored.get(RUNTIME).map(entries), Some(entries(&a_record)));
    }

    /// A put whose caller goes away while it waits for the packs' writer is still stored by
    /// that writer's next write, with no other put to carry it.
    #[tokio::test]
    async fn a_packed_put_whose_caller_went_away_is_still_stored() {
        let room = Arc::new(FakeRoom::default());
        let store = Store::in_room(Box::new(Arc::clone(&room)), "!state:localhost".into(), None);
        room.hold(|n, _, _| n == 1);
        let (one, two) = (
            record("hyperty://localhost/1"),
            record("hyperty://localhost/2"),
        );
        let first = store.put_runtime("runtime://localhost/1", &one);
        tokio::pin!(first);
        tokio::select! {
            written = &mut first => panic!("the write did not wait: {written:?}"),
            () = room.held.notified() => {}
        }
        {
            // Joins the next write, waits for the writer once, and is dropped.
            let second = store.put_runtime("runtime://localhost/2", &two);
            tokio::pin!(second);
            tokio::select! {
                biased;
                written = &mut second => panic!("stored before the writer was free: {written:?}"),
                () = std::future::ready(()) => {}
            }
        }
        room.release.notify_one();
        first.await.expect("first put");
        // The writer's turn is taken in order: once this one gets it, the second put's
        // write is done.
        drop(Arc::clone(&matrix(&store).writer).lock_owned().await);
        let snapshot = store.load().await.expect("load");
        assert_eq!(
            snapshot.runtimes.get("runtime://localhost/2"),
            Some(&record("hyperty://localhost/2"))
        );
    }
}

//! Messages for runtimes that are not connected, kept in Matrix until they are delivered.
//! (One concern: the file is past 600 lines only with its tests.)
//!
//! Owns one room per runtime (`#_msgnode_inbox.<hash16 of the runtime URL>:<server>`,
//! created by the appservice's own user on first use). Every node (replica) writing to it
//! has its own message sequence there (u64 from 1, continued after a restart from the
//! room's newest batch of that writer); the delivery cursor is room state
//! `org.msgnode.bus.cursor` (state key `""`), `{"upto": {"<writer>": <highest seq
//! delivered>, …}}`.
//!
//! [`Inbox::push`] only queues; one writer task per runtime (started on its first push)
//! sends whatever is queued whenever its previous send is done, as `org.msgnode.inbox.batch`
//! events in the journal's batch format (`{"runtime", "writer", "first_seq", "count",
//! "messages"}` or compressed, see `persist::batch`) — in order, retried until stored, drained
//! at shutdown. [`Inbox::take`] waits until every push of this node so far is stored, then
//! reads the messages after the cursor back from the room (so it works right after a
//! restart, and sees what other replicas wrote); [`Inbox::ack`] moves the cursor.
//!
//! Whatever is taken is a prefix of the room's timeline (each writer's batches are in its
//! sequence order), so a take pages back from the newest event only to the first batch
//! already delivered — once: it remembers where it left off, and the next take (after an
//! ack) reads on forward from there, so a page costs about its own size to read, not the
//! inbox's. Messages come back as equivalent JSON (whitespace
//! and key order may differ; text that is not JSON comes back as given).

use crate::sync::lock;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::registry::Registry;
use serde_json::{json, Map, Value};
use tokio::sync::{watch, Notify, OnceCell};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::batch::{
    decode_batch, encode_batch, fits_one_event, raw_or_string, DecodedBatch, MAX_EVENT_CONTENT,
    OVERSIZE_KEY,
};
use super::roomlog::{recover_next_seq, send_batches, Counters};
use super::shares::{free_all, Charge, Shares};
use crate::matrix::{hash16, Actor, ActorError};
use crate::retry::Backoff;

/// Event type of inbox batches.
pub const INBOX_EVENT_TYPE: &str = "org.msgnode.inbox.batch";
/// State event type of a runtime's delivery cursor.
pub const CURSOR_EVENT_TYPE: &str = "org.msgnode.bus.cursor";
/// How long [`Inbox::take`] waits for earlier pushes to be stored.
const STORE_WAIT: Duration = Duration::from_secs(30);
/// How much one page of a discarded inbox may hold.
const DISCARD_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// How long a writer keeps retrying after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Messages taken from an inbox, one page: hand them to the runtime, then [`Inbox::ack`],
/// then take the next page while `more`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Taken {
    /// The messages' JSON texts, in order.
    pub messages: Vec<String>,
    /// Per writer, the sequence number of the last of them (the cursor when there are none).
    pub upto: BTreeMap<String, u64>,
    /// What `messages` hold, in bytes.
    pub bytes: usize,
    /// More messages wait after these (the page was full).
    pub more: bool,
}

impl Taken {
    /// How far `writer`'s messages are taken (0: none ever).
    pub fn upto_of(&self, writer: &str) -> u64 {
        self.upto.get(writer).copied().unwrap_or(0)
    }

    /// Adds the messages of `writer`'s `batch` past what is taken, while they fit in
    /// `max_bytes` (at least one); false when the page is full before the batch's end.
    fn add(&mut self, writer: String, batch: DecodedBatch, max_bytes: usize) -> bool {
        let upto = self.upto.entry(writer).or_insert(0);
        for (i, entry) in batch.entries.into_iter().enumerate() {
            let seq = batch.first_seq + i as u64;
            if seq <= *upto {
                continue; // before the cursor, or a duplicate
            }
            // A message that was not JSON was stored as a JSON string.
            let text = match serde_json::from_str::<Value>(entry.get()) {
                Ok(Value::String(text)) => text,
                _ => entry.get().to_string(),
            };
            if self.bytes + text.len() > max_bytes && !self.messages.is_empty() {
                return false;
            }
            self.bytes += text.len();
            *upto = seq;
            self.messages.push(text);
        }
        true
    }
}

/// The writer name of the in-memory inbox.
const MEMORY_WRITER: &str = "memory";

/// Per-runtime inboxes; cheap to clone.
#[derive(Clone)]
pub struct Inbox {
    inner: Arc<Inner>,
    /// What the inboxes hold in the node's memory (in memory: everything not delivered; in
    /// Matrix: what is not stored yet), against the limit.
    budget: Arc<Budget>,
}

/// Bytes held in memory, and how many may be; what each charge (the sender's principal)
/// holds of them, and how many it may; and how many one runtime's inbox may hold
/// undelivered (in memory or in Matrix). A message is counted in all three when its room is
/// reserved ([`Inbox::reserve`]), before the sender waits for anything, so senders racing
/// for the same room never take a budget past its limit.
#[derive(Debug)]
struct Budget {
    held: AtomicUsize,
    max: AtomicUsize,
    shares: Shares,
    per_runtime: AtomicUsize,
    /// Per runtime, the bytes reserved for it and not pushed yet; the lock also makes each
    /// reservation's checks and counts one step.
    reserved: Mutex<HashMap<String, usize>>,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            held: AtomicUsize::new(0),
            max: AtomicUsize::new(DEFAULT_MAX_BYTES),
            shares: Shares::new(DEFAULT_MAX_BYTES_PER_CHARGE, u64::MAX),
            per_runtime: AtomicUsize::new(DEFAULT_MAX_BYTES_PER_RUNTIME),
            reserved: Mutex::new(HashMap::new()),
        }
    }
}

impl Budget {
    /// The room reserved for `runtime` is pushed (or given back): no longer reserved.
    fn unreserve(&self, runtime: &str, bytes: usize) {
        let mut reserved = lock(&self.reserved);
        if let Some(r) = reserved.get_mut(runtime) {
            *r = r.saturating_sub(bytes);
            if *r == 0 {
                reserved.remove(runtime);
            }
        }
    }

    /// Frees what `entries` (charge, bytes) held.
    fn free_entries<'a>(&self, entries: impl IntoIterator<Item = (&'a str, usize)> + Clone) {
        self.free(entries.clone().into_iter().map(|(_, bytes)| bytes).sum());
        free_all(&self.shares, entries);
    }

    fn free(&self, bytes: usize) {
        let _ = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                Some(h.saturating_sub(bytes))
            });
    }
}

/// Room for one message in one runtime's inbox, counted in every budget (the inboxes' memory,
/// the charge's share, the runtime's inbox) since [`Inbox::reserve`]: [`Inbox::push`] uses
/// it; dropped unused, it is given back.
#[derive(Debug)]
#[must_use = "room not pushed into is given back when dropped"]
pub struct Reservation {
    budget: Arc<Budget>,
    runtime: String,
    charge: Charge,
    bytes: usize,
}

impl Reservation {
    /// The bytes it holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whom it is charged to.
    pub fn charge(&self) -> &Charge {
        &self.charge
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.unreserve(&self.runtime, self.bytes);
            self.budget.free(self.bytes);
            self.budget.shares.free(&self.charge, self.bytes, 1);
        }
    }
}

/// Which budget has no room for a message ([`Inbox::reserve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoom {
    /// The inboxes' memory (`inbox_max_bytes`).
    Inboxes,
    /// The charge's share of it (`inbox_max_bytes_per_principal`).
    Share,
    /// The runtime's inbox (`inbox_max_bytes_per_runtime`).
    Runtime,
}

/// What inboxes may hold in memory unless [`Inbox::limit_bytes`] says otherwise.
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;
/// What one runtime's inbox may hold undelivered unless [`Inbox::limit_bytes`] says
/// otherwise.
pub const DEFAULT_MAX_BYTES_PER_RUNTIME: usize = 16 * 1024 * 1024;
/// What one charge may hold in memory unless [`Inbox::limit_bytes`] says otherwise.
pub const DEFAULT_MAX_BYTES_PER_CHARGE: usize = DEFAULT_MAX_BYTES / 8;

enum Inner {
    Memory(Mutex<HashMap<String, MemoryBox>>),
    Matrix(MatrixInbox),
}

#[derive(Default)]
struct MemoryBox {
    next_seq: u64,
    cursor: u64,
    messages: VecDeque<(u64, String, Charge)>,
    /// What `messages` hold.
    bytes: usize,
}

struct MatrixInbox {
    actor: Arc<Actor>,
    budget: Arc<Budget>,
    /// With replicas: the user they follow inboxes as, joined to every inbox room.
    follower: Option<String>,
    /// This node's name in the batches it writes.
    writer: String,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    boxes: Mutex<HashMap<String, Arc<RuntimeBox>>>,
    counters: Counters,
}

/// One runtime's inbox in Matrix.
struct RuntimeBox {
    runtime: String,
    queue: Mutex<Pushes>,
    wake: Notify,
    /// How many pushes are stored (or given up on at shutdown).
    stored: watch::Sender<u64>,
    /// The room and the sequence number after its newest batch when first opened.
    room: OnceCell<(String, u64)>,
    /// The cursor as last read or written; the lock also serialises take and ack.
    cursor: tokio::sync::Mutex<Option<BTreeMap<String, u64>>>,
    /// No room exists for it unless this node creates one (a new runtime, or a look-up
    /// found none): a take before the first push reads nothing from the homeserver.
    roomless: std::sync::atomic::AtomicBool,
    /// Bytes pushed here and not acknowledged yet (counted from the node's start: what an
    /// earlier run left is not known until it is taken).
    undelivered: AtomicUsize,
    /// Where the last take left off: the next take reads on from there (forward) instead of
    /// paging back from the newest batch, so handing an inbox over page by page reads it
    /// about once, not once per page.
    position: Mutex<Option<Position>>,
}

/// A place in a runtime's room: every batch with a message past `upto` (per writer) lies
/// after `from` (`None`: the room's start). It holds for any cursor at or past `upto`.
#[derive(Debug, Clone)]
struct Position {
    upto: BTreeMap<String, u64>,
    from: Option<String>,
}

impl Position {
    /// Whether it holds for `cursor`.
    fn holds_for(&self, cursor: &BTreeMap<String, u64>) -> bool {
        self.upto
            .iter()
            .all(|(writer, upto)| cursor.get(writer).copied().unwrap_or(0) >= *upto)
    }
}

#[derive(Default)]
struct Pushes {
    /// Each with its charge.
    pending: Vec<(Charge, String)>,
    pushed: u64,
    writer: bool,
}

impl Inbox {
    /// Inboxes in Matrix, written as `writer` (this node's name, distinct per replica) and,
    /// with replicas, followed as `follower`; writers run on `tracker` and drain what is
    /// queued on `shutdown`.
    pub fn new(
        actor: Arc<Actor>,
        writer: &str,
        follower: Option<String>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Inbox {
        let budget = Arc::new(Budget::default());
        Inbox {
            budget: Arc::clone(&budget),
            inner: Arc::new(Inner::Matrix(MatrixInbox {
                actor,
                budget,
                follower,
                writer: writer.to_string(),
                shutdown,
                tracker: tracker.clone(),
                boxes: Mutex::new(HashMap::new()),
                counters: Counters::default(),
            })),
        }
    }

    /// Inboxes in process memory, with the same semantics (lost on exit).
    pub fn memory() -> Inbox {
        Inbox {
            inner: Arc::new(Inner::Memory(Mutex::new(HashMap::new()))),
            budget: Arc::default(),
        }
    }

    /// Lets the inboxes hold at most `bytes` in memory (see [`Inbox::has_room`]), of which
    /// one charge `per_charge` (see [`Inbox::charge_has_room`]), and one runtime's inbox
    /// `per_runtime` undelivered (see [`Inbox::runtime_has_room`]).
    pub fn limit_bytes(&self, bytes: usize, per_charge: usize, per_runtime: usize) {
        self.budget.max.store(bytes, Ordering::Relaxed);
        self.budget.shares.limit(per_charge, u64::MAX);
        self.budget
            .per_runtime
            .store(per_runtime, Ordering::Relaxed);
    }

    /// Whether `bytes` more fit in `runtime`'s inbox (beside what is reserved for it): when
    /// not, the message is refused (the sender retries) rather than stored — in memory or in
    /// Matrix.
    pub fn runtime_has_room(&self, runtime: &str, bytes: usize) -> bool {
        let reserved = lock(&self.budget.reserved).get(runtime).copied();
        self.undelivered(runtime) + reserved.unwrap_or(0) + bytes
            <= self.budget.per_runtime.load(Ordering::Relaxed)
    }

    /// Bytes pushed for `runtime` and not delivered yet.
    fn undelivered(&self, runtime: &str) -> usize {
        match &*self.inner {
            Inner::Memory(boxes) => lock(boxes).get(runtime).map_or(0, |b| b.bytes),
            Inner::Matrix(matrix) => lock(&matrix.boxes)
                .get(runtime)
                .map_or(0, |b| b.undelivered.load(Ordering::Relaxed)),
        }
    }

    /// Reserves room for a message of `bytes` to `runtime` charged to `charge` in every budget
    /// at once ([`Inbox::has_room`], [`Inbox::charge_has_room`], [`Inbox::runtime_has_room`]),
    /// or none: the checks and the counts are one step, so concurrent senders never take a
    /// budget past its limit, however long each waits before it pushes.
    ///
    /// # Errors
    /// [`NoRoom`]: the budget that is full (nothing reserved).
    pub fn reserve(
        &self,
        runtime: &str,
        charge: &Charge,
        bytes: usize,
    ) -> Result<Reservation, NoRoom> {
        let budget = &self.budget;
        let mut reserved = lock(&budget.reserved);
        let for_runtime = reserved.get(runtime).copied().unwrap_or(0);
        if self.undelivered(runtime) + for_runtime + bytes
            > budget.per_runtime.load(Ordering::Relaxed)
        {
            return Err(NoRoom::Runtime);
        }
        // Other reservations count under this lock; frees only make room.
        if budget.held.load(Ordering::Relaxed) + bytes > budget.max.load(Ordering::Relaxed) {
            return Err(NoRoom::Inboxes);
        }
        if !budget.shares.try_add(charge, bytes) {
            return Err(NoRoom::Share);
        }
        budget.held.fetch_add(bytes, Ordering::Relaxed);
        *reserved.entry(runtime.to_string()).or_default() += bytes;
        Ok(Reservation {
            budget: Arc::clone(budget),
            runtime: runtime.to_string(),
            charge: Arc::clone(charge),
            bytes,
        })
    }

    /// Room for a message to `runtime` that may not be refused (one this node already holds
    /// for it, handed back from a socket that could not take it): counted like any, past the
    /// limits if need be.
    pub fn reserve_anyway(&self, runtime: &str, charge: &Charge, bytes: usize) -> Reservation {
        let budget = &self.budget;
        let mut reserved = lock(&budget.reserved);
        budget.shares.add(charge, bytes);
        budget.held.fetch_add(bytes, Ordering::Relaxed);
        *reserved.entry(runtime.to_string()).or_default() += bytes;
        Reservation {
            budget: Arc::clone(budget),
            runtime: runtime.to_string(),
            charge: Arc::clone(charge),
            bytes,
        }
    }

    /// Whether `text` can wait in `runtime`'s inbox as it is: always in memory; in Matrix when
    /// it fits one inbox event (plain or compressed). One that does not is refused to its
    /// sender before it is accepted (413), never stored as a placeholder.
    pub fn fits(&self, runtime: &str, text: &str) -> bool {
        let Inner::Matrix(matrix) = &*self.inner else {
            return true;
        };
        // The header's fields and the batch's own: well under 512 bytes more.
        if text.len() + runtime.len() + matrix.writer.len() + 512 <= MAX_EVENT_CONTENT {
            return true;
        }
        let mut header = Map::new();
        header.insert("runtime".to_string(), Value::String(runtime.to_string()));
        header.insert("writer".to_string(), Value::String(matrix.writer.clone()));
        fits_one_event(&header, raw_or_string(text.to_string()).get())
    }

    /// Whether `bytes` more fit in memory now: when not, a message for an away runtime is
    /// refused (the sender retries) rather than held.
    pub fn has_room(&self, bytes: usize) -> bool {
        self.budget.held.load(Ordering::Relaxed) + bytes <= self.budget.max.load(Ordering::Relaxed)
    }

    /// Whether `bytes` more charged to `charge` fit in its share of the memory now (the
    /// node's own charge always does).
    pub fn charge_has_room(&self, charge: &str, bytes: usize) -> bool {
        self.budget.shares.has_room(charge, bytes)
    }

    /// How many messages were pushed for `runtime` by this node so far: a take after which
    /// this has not changed saw everything (see `Runtime::go_online`).
    pub fn pushed(&self, runtime: &str) -> u64 {
        match &*self.inner {
            Inner::Memory(boxes) => lock(boxes).get(runtime).map_or(0, |b| b.next_seq),
            Inner::Matrix(matrix) => lock(&matrix.boxes)
                .get(runtime)
                .map_or(0, |b| lock(&b.queue).pushed),
        }
    }

    /// Bytes the inboxes hold in memory now.
    pub fn held_bytes(&self) -> usize {
        self.budget.held.load(Ordering::Relaxed)
    }

    /// Registers the inboxes' counters (`bus_inbox_*`: events and bytes sent, send
    /// failures, lost), summed over runtimes. Nothing for the memory variant.
    pub fn register_metrics(&self, registry: &mut Registry) {
        if let Inner::Matrix(matrix) = &*self.inner {
            matrix
                .counters
                .register(registry, "bus_inbox", "runtime inboxes");
        }
    }

    /// Queues `message_json` for `runtime`, charged to `charge`, whatever the budgets hold
    /// ([`Inbox::reserve_anyway`]): for what this node holds already and may not refuse.
    pub fn push(&self, runtime: &str, message_json: &str, charge: &Charge) {
        let reserved = self.reserve_anyway(runtime, charge, message_json.len());
        self.push_reserved(runtime, message_json, reserved);
    }

    /// Queues `message_json` for `runtime` (in order per runtime) in the room `reserved` for
    /// it ([`Inbox::reserve`]), held in memory charged to its charge until stored (in memory:
    /// until delivered); stored in the background.
    pub fn push_reserved(&self, runtime: &str, message_json: &str, mut reserved: Reservation) {
        let charge = &Arc::clone(&reserved.charge);
        // What the reservation counted stays counted, now as pushed: the runtime's inbox
        // holds it below, then the reservation for it ends.
        let (len, held) = (message_json.len(), std::mem::take(&mut reserved.bytes));
        if len != held {
            // Reserved for another size (never by the bus, which reserves what it pushes).
            self.budget.held.fetch_add(len, Ordering::Relaxed);
            self.budget.shares.add(charge, len);
            self.budget.free(held);
            self.budget.shares.free(charge, held, 1);
        }
        let unreserve = |budget: &Budget| budget.unreserve(&reserved.runtime, held);
        match &*self.inner {
            Inner::Memory(boxes) => {
                let mut boxes = lock(boxes);
                let inbox = boxes.entry(runtime.to_string()).or_default();
                inbox.next_seq += 1;
                let seq = inbox.next_seq;
                inbox.bytes += message_json.len();
                inbox
                    .messages
                    .push_back((seq, message_json.to_string(), Arc::clone(charge)));
                drop(boxes);
                unreserve(&self.budget);
            }
            Inner::Matrix(matrix) => {
                let inbox = matrix.runtime_box(runtime);
                inbox
                    .undelivered
                    .fetch_add(message_json.len(), Ordering::Relaxed);
                unreserve(&self.budget);
                let start_writer = {
                    let mut queue = lock(&inbox.queue);
                    queue
                        .pending
                        .push((Arc::clone(charge), message_json.to_string()));
                    queue.pushed += 1;
                    !std::mem::replace(&mut queue.writer, true)
                };
                if start_writer {
                    let writer = Writer {
                        actor: matrix.actor.clone(),
                        writer: matrix.writer.clone(),
                        follower: matrix.follower.clone(),
                        inbox: inbox.clone(),
                        shutdown: matrix.shutdown.clone(),
                        counters: matrix.counters.clone(),
                        budget: Arc::clone(&matrix.budget),
                    };
                    matrix.tracker.spawn(writer.run());
                } else {
                    inbox.wake.notify_one();
                }
            }
        }
    }

    /// The first messages for `runtime` after its cursor, in order, up to `max_bytes` (at
    /// least one) — after waiting until every push for it so far is stored. What one take
    /// holds in memory stays near `max_bytes` however much the inbox holds: hand a page
    /// over, ack it, take the next.
    ///
    /// # Errors
    /// The homeserver is unavailable (also: earlier pushes not stored within 30 s) or
    /// refused, or the room holds an unreadable batch.
    pub async fn take(&self, runtime: &str, max_bytes: usize) -> Result<Taken, ActorError> {
        match &*self.inner {
            Inner::Memory(boxes) => {
                let boxes = lock(boxes);
                let Some(inbox) = boxes.get(runtime) else {
                    return Ok(Taken::default());
                };
                let mut taken = Taken::default();
                let mut upto = inbox.cursor;
                for (seq, m, _) in inbox
                    .messages
                    .iter()
                    .filter(|(seq, ..)| *seq > inbox.cursor)
                {
                    if taken.bytes + m.len() > max_bytes && !taken.messages.is_empty() {
                        taken.more = true;
                        break;
                    }
                    taken.bytes += m.len();
                    taken.messages.push(m.clone());
                    upto = *seq;
                }
                taken.upto = BTreeMap::from([(MEMORY_WRITER.to_string(), upto)]);
                Ok(taken)
            }
            Inner::Matrix(matrix) => matrix.take(runtime, max_bytes).await,
        }
    }

    /// Records that `taken` was delivered: a later take returns none of its messages.
    ///
    /// # Errors
    /// The homeserver is unavailable or refused to store the cursor.
    pub async fn ack(&self, runtime: &str, taken: &Taken) -> Result<(), ActorError> {
        match &*self.inner {
            Inner::Memory(boxes) => {
                let mut boxes = lock(boxes);
                if let Some(inbox) = boxes.get_mut(runtime) {
                    inbox.cursor = inbox.cursor.max(taken.upto_of(MEMORY_WRITER));
                    let cursor = inbox.cursor;
                    // Delivered: the oldest, up to the cursor.
                    let end = inbox.messages.partition_point(|(seq, ..)| *seq <= cursor);
                    let delivered: Vec<_> = inbox.messages.drain(..end).collect();
                    let entries = delivered.iter().map(|(_, m, c)| (&**c, m.len()));
                    inbox.bytes -= entries.clone().map(|(_, b)| b).sum::<usize>();
                    self.budget.free_entries(entries);
                }
                Ok(())
            }
            Inner::Matrix(matrix) => matrix.ack(runtime, taken).await,
        }
    }

    /// Tells the inboxes that `runtime` is new (this node just gave it out and shares it with
    /// no replica): no room exists for it until a message has to wait, so taking from it
    /// before then reads nothing from the homeserver.
    pub fn is_new(&self, runtime: &str) {
        if let Inner::Matrix(matrix) = &*self.inner {
            matrix
                .runtime_box(runtime)
                .roomless
                .store(true, Ordering::Relaxed);
        }
    }

    /// Discards every message for `runtime` (it was released): what is stored is marked
    /// delivered, so no later take returns any of it. How many messages that was.
    ///
    /// # Errors
    /// As [`Inbox::take`] and [`Inbox::ack`].
    pub async fn discard(&self, runtime: &str) -> Result<usize, ActorError> {
        if let Inner::Memory(boxes) = &*self.inner {
            let removed = lock(boxes).remove(runtime);
            self.budget.free_entries(
                removed
                    .iter()
                    .flat_map(|b| &b.messages)
                    .map(|(_, m, c)| (&**c, m.len())),
            );
            return Ok(removed.map_or(0, |b| b.messages.len()));
        }
        if let Inner::Matrix(matrix) = &*self.inner {
            let inbox = matrix.runtime_box(runtime);
            let never_written = inbox.room.get().is_none() && lock(&inbox.queue).pushed == 0;
            if never_written
                && ((matrix.follower.is_none() && inbox.roomless.load(Ordering::Relaxed))
                    || matrix.actor.find_room(&inbox.alias()).await?.is_none())
            {
                return Ok(0); // no room: nothing ever waited for it
            }
        }
        let mut discarded = 0;
        loop {
            let taken = self.take(runtime, DISCARD_PAGE_BYTES).await?;
            self.ack(runtime, &taken).await?;
            discarded += taken.messages.len();
            if !taken.more {
                return Ok(discarded);
            }
        }
    }
}

impl MatrixInbox {
    fn runtime_box(&self, runtime: &str) -> Arc<RuntimeBox> {
        lock(&self.boxes)
            .entry(runtime.to_string())
            .or_insert_with(|| {
                let (stored, _) = watch::channel(0);
                Arc::new(RuntimeBox {
                    runtime: runtime.to_string(),
                    queue: Mutex::new(Pushes::default()),
                    wake: Notify::new(),
                    stored,
                    room: OnceCell::new(),
                    cursor: tokio::sync::Mutex::new(None),
                    roomless: std::sync::atomic::AtomicBool::new(false),
                    undelivered: AtomicUsize::new(0),
                    position: Mutex::new(None),
                })
            })
            .clone()
    }

    async fn take(&self, runtime: &str, max_bytes: usize) -> Result<Taken, ActorError> {
        let inbox = self.runtime_box(runtime);
        let pushed = lock(&inbox.queue).pushed;
        if pushed == 0 && inbox.room.get().is_none() {
            // Nothing pushed here and no room opened: look before creating one — a runtime
            // that never had to wait costs no room. (With replicas another one may create
            // it any time: never remembered as roomless then.)
            let alone = self.follower.is_none();
            if (alone && inbox.roomless.load(Ordering::Relaxed))
                || self.actor.find_room(&inbox.alias()).await?.is_none()
            {
                if alone {
                    inbox.roomless.store(true, Ordering::Relaxed);
                }
                return Ok(Taken::default());
            }
        }
        let mut stored = inbox.stored.subscribe();
        match tokio::time::timeout(STORE_WAIT, stored.wait_for(|s| *s >= pushed)).await {
            Ok(Ok(_)) => {}
            _ => return Err(ActorError::Unavailable),
        }
        let (room, _) = inbox
            .open(&self.actor, &self.writer, self.follower.as_deref())
            .await?;
        let mut cursor_guard = inbox.cursor.lock().await;
        let cursor = self.current_cursor(&mut cursor_guard, room).await?;
        let filter = json!({"types": [INBOX_EVENT_TYPE]});
        let sender = self.actor.sender().to_string();
        let position = lock(&inbox.position)
            .clone()
            .filter(|p| p.holds_for(&cursor));
        if let Some(position) = position {
            let read = Forward {
                actor: &self.actor,
                sender: &sender,
                room,
                filter: &filter,
            };
            if let Some((taken, next)) = read.take(position.from, &cursor, max_bytes).await? {
                *lock(&inbox.position) = Some(next);
                return Ok(taken);
            }
        }
        // Newest first, back past the newest delivered batch of every writer met on the way
        // (and one page more: batches created at the same moment may be ordered either way).
        // Newest first; only the oldest undelivered batches are kept, about `max_bytes` of
        // them: the newer ones are a later page's (read again then).
        let mut batches: VecDeque<(String, DecodedBatch, usize)> = VecDeque::new();
        let mut kept = 0usize;
        let mut newer_left = false;
        let mut seen = BTreeSet::new();
        let mut reached = BTreeSet::new();
        let mut done_before = false;
        let mut token: Option<String> = None;
        // The end of the last page read: before every batch past the cursor.
        let mut oldest: Option<String> = None;
        loop {
            let (events, next) = self
                .actor
                .messages_filtered(&sender, room, token.as_deref(), true, 50, Some(&filter))
                .await?;
            for event in &events {
                let Some((writer, batch)) = inbox_batch(event)? else {
                    continue;
                };
                let end = batch.first_seq + batch.entries.len() as u64;
                seen.insert(writer.clone());
                if end <= cursor.get(&writer).copied().unwrap_or(0) + 1 {
                    reached.insert(writer); // delivered
                } else {
                    let bytes = batch.entries.iter().map(|e| e.get().len()).sum();
                    kept += bytes;
                    batches.push_back((writer, batch, bytes));
                    while batches
                        .front()
                        .is_some_and(|(_, _, newest)| kept - newest >= max_bytes)
                    {
                        if let Some((_, _, newest)) = batches.pop_front() {
                            kept -= newest;
                            newer_left = true;
                        }
                    }
                }
            }
            let done = !reached.is_empty() && seen.is_subset(&reached);
            let Some(next) = next else { break };
            oldest = Some(next.clone());
            if done && done_before {
                break;
            }
            done_before = done;
            token = Some(next);
        }
        // Oldest first: the room's order across writers, each writer's own in sequence.
        let mut by_writer: BTreeMap<String, Vec<DecodedBatch>> = BTreeMap::new();
        let order: Vec<String> = batches
            .into_iter()
            .rev()
            .map(|(writer, batch, _)| {
                by_writer.entry(writer.clone()).or_default().push(batch);
                writer
            })
            .collect();
        for own in by_writer.values_mut() {
            own.sort_by_key(|b| std::cmp::Reverse(b.first_seq)); // popped lowest first
        }
        // The next take reads on from before everything read here.
        *lock(&inbox.position) = Some(Position {
            upto: cursor.clone(),
            from: oldest,
        });
        let mut taken = Taken {
            upto: cursor,
            ..Taken::default()
        };
        for writer in order {
            let Some(batch) = by_writer.get_mut(&writer).and_then(Vec::pop) else {
                continue;
            };
            if !taken.add(writer, batch, max_bytes) {
                taken.more = true;
                break;
            }
        }
        taken.more |= newer_left;
        Ok(taken)
    }

    async fn ack(&self, runtime: &str, taken: &Taken) -> Result<(), ActorError> {
        let inbox = self.runtime_box(runtime);
        let _ = inbox
            .undelivered
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                Some(held.saturating_sub(taken.bytes))
            });
        let (room, _) = inbox
            .open(&self.actor, &self.writer, self.follower.as_deref())
            .await?;
        let mut cursor = inbox.cursor.lock().await;
        let current = self.current_cursor(&mut cursor, room).await?;
        let mut next = current.clone();
        merge(&mut next, &taken.upto);
        // Kept even when the write fails: what was delivered is not handed over again here.
        *cursor = Some(next.clone());
        if next != current {
            let sender = self.actor.sender().to_string();
            self.actor
                .put_state(&sender, room, CURSOR_EVENT_TYPE, "", &json!({"upto": next}))
                .await?;
        }
        Ok(())
    }

    /// The cursor: as last known here, or — with replicas, which move it too — as stored,
    /// never behind what is known here.
    async fn current_cursor(
        &self,
        known: &mut Option<BTreeMap<String, u64>>,
        room: &str,
    ) -> Result<BTreeMap<String, u64>, ActorError> {
        match known {
            Some(cursor) if self.follower.is_none() => Ok(cursor.clone()),
            _ => {
                let mut cursor = read_cursor(&self.actor, room).await?;
                if let Some(local) = known.as_ref() {
                    merge(&mut cursor, local);
                }
                *known = Some(cursor.clone());
                Ok(cursor)
            }
        }
    }
}

/// Reading a runtime's room forward from a [`Position`].
struct Forward<'a> {
    actor: &'a Actor,
    sender: &'a str,
    room: &'a str,
    filter: &'a Value,
}

impl Forward<'_> {
    /// The messages past `cursor` from `from` on, up to `max_bytes` (at least one), and
    /// where the next take goes on; `None` when a writer's batches are not in sequence here
    /// (one lost at a shutdown leaves a gap): then only paging back from the newest sees all.
    async fn take(
        &self,
        from: Option<String>,
        cursor: &BTreeMap<String, u64>,
        max_bytes: usize,
    ) -> Result<Option<(Taken, Position)>, ActorError> {
        let mut taken = Taken {
            upto: cursor.clone(),
            ..Taken::default()
        };
        let mut token = from;
        loop {
            let page_from = token.clone();
            let (events, next) = self
                .actor
                .messages_filtered(
                    self.sender,
                    self.room,
                    token.as_deref(),
                    false,
                    50,
                    Some(self.filter),
                )
                .await?;
            for event in &events {
                let Some((writer, batch)) = inbox_batch(event)? else {
                    continue;
                };
                if batch.first_seq > taken.upto_of(&writer) + 1 {
                    return Ok(None); // not the next of this writer's: a gap
                }
                if !taken.add(writer, batch, max_bytes) {
                    // Full: the next take reads this page again (what it took is skipped).
                    taken.more = true;
                    let position = Position {
                        upto: taken.upto.clone(),
                        from: page_from,
                    };
                    return Ok(Some((taken, position)));
                }
            }
            // No token: the newest event is read (an empty page that would not move on
            // gives none either).
            match next {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        let position = Position {
            upto: taken.upto.clone(),
            from: token,
        };
        Ok(Some((taken, position)))
    }
}

/// Moves each writer's position in `cursor` up to the one in `other`.
fn merge(cursor: &mut BTreeMap<String, u64>, other: &BTreeMap<String, u64>) {
    for (writer, upto) in other {
        let seq = cursor.entry(writer.clone()).or_insert(0);
        *seq = (*seq).max(*upto);
    }
}

/// The stored cursor (a plain number: written before inboxes had several writers).
async fn read_cursor(actor: &Actor, room: &str) -> Result<BTreeMap<String, u64>, ActorError> {
    let sender = actor.sender().to_string();
    let content = actor
        .state_event(&sender, room, CURSOR_EVENT_TYPE, "")
        .await?;
    Ok(parse_cursor(content.as_ref()))
}

fn parse_cursor(content: Option<&Value>) -> BTreeMap<String, u64> {
    match content.and_then(|c| c.get("upto")) {
        Some(Value::Number(n)) => BTreeMap::from([(String::new(), n.as_u64().unwrap_or(0))]),
        Some(upto) => serde_json::from_value(upto.clone()).unwrap_or_default(),
        None => BTreeMap::new(),
    }
}

/// The node that wrote an inbox batch (`""`: written before inboxes had several writers).
/// The writer and the decoded batch of an inbox event; `None` for any other event (or an
/// emptied one: redacted or cleared).
fn inbox_batch(event: &Value) -> Result<Option<(String, DecodedBatch)>, ActorError> {
    let content = &event["content"];
    if event["type"] != INBOX_EVENT_TYPE || content.as_object().is_none_or(Map::is_empty) {
        return Ok(None);
    }
    let batch = decode_batch(content).map_err(ActorError::Malformed)?;
    Ok(Some((batch_writer(content), batch)))
}

fn batch_writer(content: &Value) -> String {
    content
        .get("writer")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

impl RuntimeBox {
    /// The alias localpart of the runtime's room.
    fn alias(&self) -> String {
        format!("_msgnode_inbox.{}", hash16(&self.runtime))
    }

    /// The runtime's room (created on first use) and the sequence number its next batch
    /// starts at when first opened.
    async fn open(
        &self,
        actor: &Actor,
        writer: &str,
        follower: Option<&str>,
    ) -> Result<&(String, u64), ActorError> {
        self.room
            .get_or_try_init(|| async {
                let sender = actor.sender().to_string();
                let alias = self.alias();
                let name = format!("msgnode inbox {}", self.runtime);
                let room = actor.ensure_room(&alias, &sender, &name).await?;
                if let Some(follower) = follower {
                    actor.join(follower, &room).await?;
                }
                let header = [("runtime", self.runtime.as_str()), ("writer", writer)];
                let next = recover_next_seq(actor, &room, INBOX_EVENT_TYPE, &header)
                    .await?
                    .unwrap_or(1);
                Ok((room, next))
            })
            .await
    }
}

/// The writer task of one runtime's inbox.
struct Writer {
    actor: Arc<Actor>,
    writer: String,
    follower: Option<String>,
    inbox: Arc<RuntimeBox>,
    shutdown: CancellationToken,
    counters: Counters,
    budget: Arc<Budget>,
}

impl Writer {
    async fn run(self) {
        let runtime = self.inbox.runtime.clone();
        let (room, mut next_seq) = match self.open().await {
            Some((room, next)) => (room, next),
            None => {
                // Given up at shutdown: count everything as done so no take waits forever.
                let (pushed, pending) = {
                    let mut queue = lock(&self.inbox.queue);
                    (queue.pushed, std::mem::take(&mut queue.pending))
                };
                self.budget
                    .free_entries(pending.iter().map(|(c, m)| (&**c, m.len())));
                tracing::error!(%runtime, pushed, "inbox: room unavailable at shutdown; messages not stored");
                self.counters.lost.inc_by(pushed);
                self.inbox.stored.send_replace(pushed);
                return;
            }
        };
        let mut header = Map::new();
        header.insert("runtime".to_string(), Value::String(runtime.clone()));
        header.insert("writer".to_string(), Value::String(self.writer.clone()));
        let prefix = format!("i.{}.{}", hash16(&runtime), hash16(&self.writer));
        let sender = self.actor.sender().to_string();
        let mut stored_count = 0u64;
        loop {
            let pending = std::mem::take(&mut lock(&self.inbox.queue).pending);
            if pending.is_empty() {
                if self.shutdown.is_cancelled() {
                    break;
                }
                tokio::select! {
                    () = self.inbox.wake.notified() => {}
                    () = self.shutdown.cancelled() => {}
                }
                continue;
            }
            let count = pending.len() as u64;
            let (charges, pending): (Vec<(Charge, usize)>, Vec<String>) = pending
                .into_iter()
                .map(|(charge, m)| ((charge, m.len()), m))
                .unzip();
            let first_seq = next_seq;
            let header = header.clone();
            let encoded = tokio::task::spawn_blocking(move || {
                let entries = pending
                    .into_iter()
                    .map(|m| raw_or_string(m).get().to_string())
                    .collect();
                encode_batch(&header, first_seq, entries, true, &|_, bytes| {
                    json!({ OVERSIZE_KEY: bytes }).to_string()
                })
            })
            .await;
            let ok = match encoded {
                Ok(events) => {
                    send_batches(
                        &self.actor,
                        &sender,
                        &room,
                        INBOX_EVENT_TYPE,
                        &prefix,
                        events,
                        &self.shutdown,
                        SHUTDOWN_GRACE,
                        &self.counters,
                    )
                    .await
                }
                Err(error) => {
                    tracing::error!(%error, %runtime, "inbox: encoding task failed");
                    false
                }
            };
            self.budget
                .free_entries(charges.iter().map(|(c, bytes)| (&**c, *bytes)));
            if !ok {
                tracing::error!(%runtime, count, "inbox: messages not stored");
                self.counters.lost.inc_by(count);
            }
            next_seq += count;
            stored_count += count;
            self.inbox.stored.send_replace(stored_count);
        }
        tracing::debug!(%runtime, "inbox writer stopped");
    }

    /// Opens the room, retrying while the homeserver is unavailable (until shutdown + grace).
    async fn open(&self) -> Option<(String, u64)> {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let mut give_up_at = None;
        loop {
            match self
                .inbox
                .open(&self.actor, &self.writer, self.follower.as_deref())
                .await
            {
                Ok(opened) => return Some(opened.clone()),
                Err(error) => {
                    tracing::warn!(%error, runtime = %self.inbox.runtime, "inbox: cannot open the room; retrying");
                    if self.shutdown.is_cancelled() {
                        let at = *give_up_at
                            .get_or_insert_with(|| tokio::time::Instant::now() + SHUTDOWN_GRACE);
                        if tokio::time::Instant::now() >= at {
                            return None;
                        }
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Charge {
        Arc::from(super::super::shares::NODE)
    }

    #[test]
    fn cursors_of_one_writer_and_of_several_are_read() {
        let legacy = json!({"upto": 7});
        assert_eq!(
            parse_cursor(Some(&legacy)),
            BTreeMap::from([(String::new(), 7)]),
            "written before inboxes had several writers: the batches without a writer"
        );
        let current = json!({"upto": {"a": 3, "b": 9}});
        assert_eq!(
            parse_cursor(Some(&current)),
            BTreeMap::from([("a".to_string(), 3), ("b".to_string(), 9)])
        );
        assert!(parse_cursor(None).is_empty());
        let mut cursor = BTreeMap::from([("a".to_string(), 5)]);
        merge(
            &mut cursor,
            &BTreeMap::from([("a".to_string(), 4), ("b".to_string(), 1)]),
        );
        assert_eq!(
            cursor,
            BTreeMap::from([("a".to_string(), 5), ("b".to_string(), 1)]),
            "never moves back"
        );
    }

    #[tokio::test]
    async fn memory_inbox_keeps_order_and_forgets_what_was_acked() {
        let inbox = Inbox::memory();
        assert_eq!(
            inbox.take("rt://a", usize::MAX).await.expect("take"),
            Taken::default()
        );
        inbox.push("rt://a", r#"{"n":1}"#, &node());
        inbox.push("rt://b", r#"{"n":"b"}"#, &node());
        inbox.push("rt://a", r#"{"n":2}"#, &node());
        let taken = inbox.take("rt://a", usize::MAX).await.expect("take");
        assert_eq!(taken.messages, vec![r#"{"n":1}"#, r#"{"n":2}"#]);
        assert_eq!(taken.upto_of(MEMORY_WRITER), 2);
        // Not acked: taken again, with what came since.
        inbox.push("rt://a", r#"{"n":3}"#, &node());
        let again = inbox.take("rt://a", usize::MAX).await.expect("take");
        assert_eq!(again.messages.len(), 3);
        inbox.ack("rt://a", &taken).await.expect("ack");
        let rest = inbox.take("rt://a", usize::MAX).await.expect("take");
        assert_eq!(rest.messages, vec![r#"{"n":3}"#]);
        assert_eq!(rest.upto_of(MEMORY_WRITER), 3);
        inbox.ack("rt://a", &rest).await.expect("ack");
        // An old ack never moves the cursor back.
        inbox.ack("rt://a", &taken).await.expect("ack");
        assert_eq!(
            inbox.take("rt://a", usize::MAX).await.expect("take"),
            Taken {
                upto: BTreeMap::from([(MEMORY_WRITER.to_string(), 3)]),
                ..Taken::default()
            }
        );
        assert_eq!(
            inbox
                .take("rt://b", usize::MAX)
                .await
                .expect("take")
                .messages
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn a_take_is_one_page_and_the_per_runtime_cap_counts_what_waits() {
        let inbox = Inbox::memory();
        inbox.limit_bytes(1 << 20, 1 << 20, 10);
        for n in 0..4 {
            assert!(inbox.runtime_has_room("rt://a", 3), "{n}");
            inbox.push("rt://a", &format!("m{n}"), &node());
        }
        assert!(inbox.runtime_has_room("rt://a", 2));
        assert!(!inbox.runtime_has_room("rt://a", 3), "8 + 3 > 10 bytes");
        assert!(inbox.runtime_has_room("rt://b", 10), "per runtime");
        let mut got = Vec::new();
        loop {
            let page = inbox.take("rt://a", 5).await.expect("take");
            assert!(page.bytes <= 5 && !page.messages.is_empty(), "{page:?}");
            got.extend(page.messages.clone());
            inbox.ack("rt://a", &page).await.expect("ack");
            if !page.more {
                break;
            }
        }
        assert_eq!(got, ["m0", "m1", "m2", "m3"]);
        assert!(
            inbox.runtime_has_room("rt://a", 10),
            "delivered: room again"
        );
        inbox.push("rt://a", &"x".repeat(9), &node());
        let big = inbox.take("rt://a", 5).await.expect("take");
        assert_eq!(
            big.messages.len(),
            1,
            "a message bigger than a page is one page"
        );
    }

    #[test]
    fn reservations_count_at_once_and_are_given_back_unused() {
        let inbox = Inbox::memory();
        inbox.limit_bytes(100, 60, 30);
        let eve: Charge = Arc::from("@eve:l");
        let first = inbox.reserve("rt://a", &eve, 20).expect("room");
        assert_eq!(
            inbox.reserve("rt://a", &eve, 20).err(),
            Some(NoRoom::Runtime),
            "20 reserved + 20 > 30: the second sender waits for nothing it cannot have"
        );
        let second = inbox.reserve("rt://b", &eve, 30).expect("room");
        assert_eq!(inbox.reserve("rt://c", &eve, 20).err(), Some(NoRoom::Share));
        let bob: Charge = Arc::from("@bob:l");
        let third = inbox.reserve("rt://c", &bob, 30).expect("room");
        assert_eq!(
            inbox.reserve("rt://d", &bob, 30).err(),
            Some(NoRoom::Inboxes)
        );
        assert_eq!(inbox.held_bytes(), 80);
        inbox.push_reserved("rt://a", &"x".repeat(20), first);
        assert_eq!(inbox.held_bytes(), 80, "pushed: counted once");
        assert!(!inbox.runtime_has_room("rt://a", 11));
        drop((second, third));
        assert_eq!(inbox.held_bytes(), 20, "unused: given back");
        assert!(inbox.runtime_has_room("rt://b", 30) && inbox.charge_has_room("@bob:l", 60));
        assert!(lock(&inbox.budget.reserved).is_empty());
    }

    #[tokio::test]
    async fn what_waits_is_charged_to_its_sender_until_delivered() {
        let inbox = Inbox::memory();
        inbox.limit_bytes(100, 10, 100);
        let eve: Charge = Arc::from("@eve:l");
        let bob: Charge = Arc::from("@bob:l");
        inbox.push("rt://eve", "eeeeeeee", &eve);
        assert!(!inbox.charge_has_room("@eve:l", 3), "8 + 3 > 10");
        assert!(inbox.charge_has_room("@bob:l", 10), "bob's share is his");
        inbox.push("rt://alice", "bb", &bob);
        let page = inbox.take("rt://eve", usize::MAX).await.expect("take");
        inbox.ack("rt://eve", &page).await.expect("ack");
        assert!(inbox.charge_has_room("@eve:l", 10), "delivered: freed");
        assert!(!inbox.charge_has_room("@bob:l", 9));
        inbox.discard("rt://alice").await.expect("discard");
        assert!(inbox.charge_has_room("@bob:l", 10), "discarded: freed");
        assert_eq!(inbox.held_bytes(), 0);
    }
}

//! The node's history of routed reTHINK messages, kept in Matrix; and the batch event format
//! the bus's Matrix persistence shares.
//!
//! Owns the journal room (`#_msgnode_journal:<server>`, created by the appservice's own
//! user), the node's global message sequence (u64 from 1, continued after a restart from the
//! newest journal event of this node) and the writer task that stores recorded messages.
//!
//! **Group commit.** [`Journal::record`] only appends to an in-memory queue (one short lock)
//! and returns the message's sequence number. One writer task takes everything queued once
//! no more than `max_in_flight - 1` sends are under way and either `flush_interval` has
//! passed since the oldest queued record, the queue holds `max_batch_raw_bytes`, or a flush
//! was asked for. While a send is in flight, records pile up and form the next batch, so a
//! homeserver doing ~30 events/s still stores tens of thousands of messages per second.
//!
//! **Batch events** (`org.msgnode.rethink.batch`, also used by `bus::inbox` with its own type):
//! content is either plain `{"node", "first_seq", "count", "messages": [entries]}` or, when
//! that exceeds [`MAX_EVENT_CONTENT`] bytes (Synapse refuses events over 65,536 bytes) or
//! the homeserver refuses it as non-canonical JSON (floats, huge integers),
//! `{"node", "encoding": "deflate+base64", "data", "first_seq", "count"}` where `data` is the
//! base64 of the raw-deflated JSON array of entries. A batch too big for one event even
//! compressed is split into several events, in order. Entries of an event have the
//! consecutive sequence numbers `first_seq ..first_seq + count`. The transaction id of an
//! event names its node, first sequence number, count and encoding, so a retried send is
//! idempotent. A single entry too big for an event even compressed is replaced by
//! `{"org.msgnode.oversize": <bytes>}` (logged), keeping the sequence gapless.
//!
//! **Never dropped.** A failed send is retried with backoff (logged, counted in
//! [`JournalStats::send_failures`]) until it succeeds; after shutdown the writer keeps trying
//! for `shutdown_grace`, then gives up (logged with the number of messages lost). With
//! `max_in_flight = 1` (the default) events reach the room in sequence order; with 2 a
//! later batch may land before an earlier one's retry, and [`Journal::read_all`] sorts.
//!
//! Messages are stored as the JSON text the caller gave (`JournalEntry::message` is a
//! `RawValue`); text that is not JSON is stored as a JSON string. Read back from plain events
//! they are equivalent JSON (whitespace and key order may differ).

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::pep::actor::{hash16, Actor, ActorError};

/// Event type of journal batches.
pub const BATCH_EVENT_TYPE: &str = "org.msgnode.rethink.batch";
/// Alias localpart of the journal room.
pub const JOURNAL_ALIAS: &str = "_msgnode_journal";
/// Largest event content msgnode writes, in bytes of JSON (Synapse's limit is 65,536 for the
/// whole event, signatures and ids included).
pub const MAX_EVENT_CONTENT: usize = 60_000;
/// The `encoding` of compressed batch events.
pub const ENCODING_DEFLATE_BASE64: &str = "deflate+base64";
/// Largest decompressed batch accepted when reading (a bound against deflate bombs).
const MAX_INFLATED: u64 = 64 * 1024 * 1024;
/// Key of the placeholder standing for an entry too big to store.
pub const OVERSIZE_KEY: &str = "org.msgnode.oversize";

/// `[bus.journal]`: how the journal batches its writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JournalConfig {
    /// Longest a record waits for company before its batch is sent (when no send is in flight).
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Raw JSON bytes that make a batch big enough to send at once; also the most one batch
    /// takes from the queue (it may become several events).
    pub max_batch_raw_bytes: usize,
    /// Sends in flight at once: 1 keeps the room in sequence order; 2 overlaps encoding and
    /// round trips at the cost of possible reordering in the room.
    pub max_in_flight: usize,
    /// This node's name in batch events; nodes sharing a homeserver need distinct names.
    pub node: String,
    /// How long the writer keeps retrying after shutdown before giving up on what is queued.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_millis(5),
            max_batch_raw_bytes: 4 * 1024 * 1024,
            max_in_flight: 1,
            node: "msgnode".to_string(),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Why a recorded message may not have been stored.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The writer stopped (shutdown) before the message was stored.
    #[error("journal closed before the message was stored")]
    Closed,
}

/// One routed message as the journal keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalEntry {
    /// The node's sequence number of the message.
    pub seq: u64,
    /// When it was recorded (ms since the Unix epoch).
    pub ts_ms: u64,
    /// The message's JSON text as routed (a JSON string if the text was not JSON).
    pub message: Box<RawValue>,
    /// Runtime URLs it was delivered or queued to.
    pub to: Vec<String>,
}

/// Counters of a journal, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JournalStats {
    /// Messages recorded since start.
    pub recorded: u64,
    /// Of those, stored in the homeserver (the count of the gapless prefix).
    pub persisted: u64,
    /// Batch events sent.
    pub events_sent: u64,
    /// Bytes of event content sent.
    pub bytes_sent: u64,
    /// Sends that failed (and were retried).
    pub send_failures: u64,
    /// Messages given up on at shutdown.
    pub lost: u64,
    /// Age of the oldest message recorded but not yet stored.
    pub oldest_unpersisted: Option<Duration>,
    /// Messages recorded but not yet stored.
    pub lag: u64,
}

/// The journal: cheap to clone, all clones share one writer.
#[derive(Clone)]
pub struct Journal {
    shared: Arc<Shared>,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Notify,
    /// Every sequence number below `stored` is stored (or given up on at shutdown).
    stored: watch::Sender<Progress>,
    /// The sequence number of the first record of this run.
    first_seq: u64,
    /// No homeserver: records are counted, not kept.
    memory: bool,
    max_batch_raw_bytes: usize,
    counters: Counters,
    recorded: Counter,
    persisted: Counter,
}

#[derive(Debug, Clone, Copy)]
struct Progress {
    stored: u64,
    /// The writer ended: nothing more will be stored.
    closed: bool,
}

#[derive(Default)]
struct Queue {
    next_seq: u64,
    records: Vec<Record>,
    bytes: usize,
    /// When the oldest queued record came (for the flush interval).
    oldest: Option<Instant>,
    flush_requested: bool,
    /// Records taken by the writer but not yet stored: (first seq, when the oldest came).
    in_flight: Vec<(u64, Instant)>,
    closed: bool,
}

struct Record {
    seq: u64,
    ts_ms: u64,
    message: String,
    to: Vec<String>,
}

impl Journal {
    /// Opens the journal room (creating it on first use), continues this node's sequence
    /// from its newest journal event and starts the writer task on `tracker`. The writer
    /// stores everything queued before it ends on `shutdown`.
    ///
    /// # Errors
    /// The homeserver is unavailable or refused to resolve/create the room or read it.
    pub async fn start(
        actor: Arc<Actor>,
        config: JournalConfig,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Journal, ActorError> {
        let sender = actor.sender().to_string();
        let room = actor
            .ensure_room(JOURNAL_ALIAS, &sender, "msgnode journal")
            .await?;
        let next_seq = recover_next_seq(&actor, &room, BATCH_EVENT_TYPE, &[("node", &config.node)])
            .await?
            .unwrap_or(1);
        tracing::info!(%room, next_seq, node = %config.node, "journal open");
        let journal = Journal::with_start(next_seq, false, config.max_batch_raw_bytes);
        let writer = Writer {
            shared: journal.shared.clone(),
            actor,
            room,
            config,
        };
        tracker.spawn(writer.run(shutdown));
        Ok(journal)
    }

    /// A journal without homeserver: sequence numbers and counts only, nothing kept.
    pub fn memory() -> Journal {
        Journal::with_start(1, true, usize::MAX)
    }

    fn with_start(next_seq: u64, memory: bool, max_batch_raw_bytes: usize) -> Journal {
        let (stored, _) = watch::channel(Progress {
            stored: next_seq,
            closed: false,
        });
        Journal {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue {
                    next_seq,
                    ..Queue::default()
                }),
                wake: Notify::new(),
                stored,
                first_seq: next_seq,
                memory,
                max_batch_raw_bytes,
                counters: Counters::default(),
                recorded: Counter::default(),
                persisted: Counter::default(),
            }),
        }
    }

    /// Records a routed message (its JSON text) and the runtimes it went to; returns its
    /// sequence number. Never blocks on I/O: the message is stored in the background.
    pub fn record(&self, message_json: &str, to: Vec<String>) -> u64 {
        let shared = &self.shared;
        let mut queue = shared.lock_queue();
        let seq = queue.next_seq;
        queue.next_seq += 1;
        shared.recorded.inc();
        if shared.memory || queue.closed {
            drop(queue);
            shared.stored.send_modify(|p| p.stored = seq + 1);
            shared.persisted.inc();
            return seq;
        }
        let was_empty = queue.records.is_empty();
        let was_small = queue.bytes < shared.max_batch_raw_bytes;
        queue.bytes += message_json.len() + 64;
        queue.records.push(Record {
            seq,
            ts_ms: now_ms(),
            message: message_json.to_string(),
            to,
        });
        if was_empty {
            queue.oldest = Some(Instant::now());
        }
        let wake = was_empty || (was_small && queue.bytes >= shared.max_batch_raw_bytes);
        drop(queue);
        if wake {
            shared.wake.notify_one();
        }
        seq
    }

    /// [`Journal::record`], resolving once the batch holding the message is stored.
    ///
    /// # Errors
    /// The journal shut down and gave up before storing it.
    pub async fn record_persisted(
        &self,
        message_json: &str,
        to: Vec<String>,
    ) -> Result<u64, JournalError> {
        let seq = self.record(message_json, to);
        self.wait_stored(seq + 1).await?;
        Ok(seq)
    }

    /// Sends what is queued without waiting for the flush interval and waits until
    /// everything recorded so far is stored (or given up on at shutdown).
    pub async fn flush(&self) {
        let upto = {
            let mut queue = self.shared.lock_queue();
            queue.flush_requested = true;
            queue.next_seq
        };
        self.shared.wake.notify_one();
        if let Err(error) = self.wait_stored(upto).await {
            tracing::warn!(%error, "journal flush incomplete");
        }
    }

    async fn wait_stored(&self, upto: u64) -> Result<(), JournalError> {
        let mut stored = self.shared.stored.subscribe();
        let reached = stored
            .wait_for(|p| p.stored >= upto || p.closed)
            .await
            .is_ok_and(|p| p.stored >= upto);
        let lost = self.shared.counters.lost.get() > 0;
        if reached && !lost {
            return Ok(());
        }
        // Given up at shutdown: whether this very record was lost is not tracked per
        // record, so report it conservatively.
        Err(JournalError::Closed)
    }

    /// Counters and lag.
    pub fn stats(&self) -> JournalStats {
        let shared = &self.shared;
        let (next_seq, oldest) = {
            let queue = shared.lock_queue();
            let oldest = queue.in_flight.first().map(|(_, at)| *at).or(queue.oldest);
            (queue.next_seq, oldest)
        };
        let stored = shared.stored.borrow().stored;
        let lost = shared.counters.lost.get();
        let recorded = next_seq - shared.first_seq;
        let persisted = stored.saturating_sub(shared.first_seq).saturating_sub(lost);
        JournalStats {
            recorded,
            persisted,
            events_sent: shared.counters.events_sent.get(),
            bytes_sent: shared.counters.bytes_sent.get(),
            send_failures: shared.counters.send_failures.get(),
            lost,
            oldest_unpersisted: oldest
                .filter(|_| recorded > persisted)
                .map(|at| at.elapsed()),
            lag: recorded.saturating_sub(persisted),
        }
    }

    /// Registers the journal's counters (`bus_journal_*`: recorded, persisted, events and
    /// bytes sent, send failures, lost); lag is `recorded - persisted`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let shared = &self.shared;
        registry.register(
            "bus_journal_recorded",
            "Messages recorded in the journal",
            shared.recorded.clone(),
        );
        registry.register(
            "bus_journal_persisted",
            "Journal messages stored in the homeserver",
            shared.persisted.clone(),
        );
        shared
            .counters
            .register(registry, "bus_journal", "the journal");
    }

    /// Every entry in the journal room (all nodes), ordered by sequence number (stable, so
    /// each node's entries keep their order).
    ///
    /// # Errors
    /// The homeserver is unavailable or refused, or an event is not a readable batch.
    pub async fn read_all(actor: &Actor) -> Result<Vec<JournalEntry>, ActorError> {
        let sender = actor.sender().to_string();
        let room = actor
            .ensure_room(JOURNAL_ALIAS, &sender, "msgnode journal")
            .await?;
        let mut entries = Vec::new();
        for_each_batch(actor, &room, BATCH_EVENT_TYPE, None, |batch| {
            for raw in batch.entries {
                let entry: JournalEntry = serde_json::from_str(raw.get())
                    .map_err(|e| ActorError::Malformed(format!("journal entry: {e}")))?;
                entries.push(entry);
            }
            Ok(true)
        })
        .await?;
        entries.sort_by_key(|e| e.seq);
        Ok(entries)
    }
}

impl Shared {
    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The writer task of a journal.
struct Writer {
    shared: Arc<Shared>,
    actor: Arc<Actor>,
    room: String,
    config: JournalConfig,
}

impl Writer {
    async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let max_in_flight = this.config.max_in_flight.max(1);
        let mut sends: JoinSet<(u64, u64, bool)> = JoinSet::new();
        // Completed ranges [first, end) not yet contiguous with the stored mark.
        let mut done: std::collections::BTreeMap<u64, u64> = Default::default();
        let mut stopping = false;
        loop {
            let now = Instant::now();
            let (ready, due, empty) = {
                let queue = this.shared.lock_queue();
                let due = queue.oldest.map(|at| at + this.config.flush_interval);
                let ready = !queue.records.is_empty()
                    && (stopping
                        || queue.flush_requested
                        || queue.bytes >= this.config.max_batch_raw_bytes
                        || due.is_some_and(|d| d <= now));
                (ready, due, queue.records.is_empty())
            };
            if ready && sends.len() < max_in_flight {
                let records = this.take_batch();
                if let (Some(first), Some(last)) = (records.first(), records.last()) {
                    let range = (first.seq, last.seq + 1);
                    let writer = this.clone();
                    let shutdown = shutdown.clone();
                    sends.spawn(async move {
                        let ok = writer.store(records, &shutdown).await;
                        (range.0, range.1, ok)
                    });
                }
                continue;
            }
            if stopping && empty && sends.is_empty() {
                break;
            }
            let can_send = sends.len() < max_in_flight;
            tokio::select! {
                Some(result) = sends.join_next(), if !sends.is_empty() => {
                    match result {
                        Ok((first, end, ok)) => {
                            if !ok {
                                this.shared.counters.lost.inc_by(end - first);
                            }
                            done.insert(first, end);
                            this.advance(&mut done);
                        }
                        Err(error) => tracing::error!(%error, "journal send task failed"),
                    }
                }
                () = this.shared.wake.notified() => {}
                () = sleep_until_opt(due), if can_send && due.is_some() => {}
                () = shutdown.cancelled(), if !stopping => {
                    stopping = true;
                    tracing::debug!("journal: shutdown, storing what is queued");
                }
            }
        }
        this.shared.lock_queue().closed = true;
        let stats_lost = this.shared.counters.lost.get();
        // Wake any waiter: nothing more will be stored.
        this.shared.stored.send_modify(|p| p.closed = true);
        if stats_lost > 0 {
            tracing::error!(
                lost = stats_lost,
                "journal stopped with messages not stored"
            );
        }
        tracing::debug!("journal writer stopped");
    }

    fn take_batch(&self) -> Vec<Record> {
        let mut queue = self.shared.lock_queue();
        queue.flush_requested = false;
        let mut bytes = 0;
        let mut n = 0;
        for record in &queue.records {
            if n > 0 && bytes + record.message.len() + 64 > self.config.max_batch_raw_bytes {
                break;
            }
            bytes += record.message.len() + 64;
            n += 1;
        }
        let rest = queue.records.split_off(n);
        let batch = std::mem::replace(&mut queue.records, rest);
        queue.bytes = queue.bytes.saturating_sub(bytes);
        if let (Some(first), Some(oldest)) = (batch.first(), queue.oldest) {
            queue.in_flight.push((first.seq, oldest));
        }
        if queue.records.is_empty() {
            queue.oldest = None;
            queue.bytes = 0;
        }
        batch
    }

    fn advance(&self, done: &mut std::collections::BTreeMap<u64, u64>) {
        let before = self.shared.stored.borrow().stored;
        let mut stored = before;
        while let Some(end) = done.remove(&stored) {
            stored = end;
        }
        self.shared.persisted.inc_by(stored - before);
        self.shared
            .lock_queue()
            .in_flight
            .retain(|(first, _)| *first >= stored);
        self.shared.stored.send_modify(|p| p.stored = stored);
    }

    /// Encodes and sends one batch, retrying until stored; false when given up at shutdown.
    async fn store(&self, records: Vec<Record>, shutdown: &CancellationToken) -> bool {
        let Some(first_seq) = records.first().map(|r| r.seq) else {
            return true;
        };
        let node = self.config.node.clone();
        let encoded = tokio::task::spawn_blocking(move || {
            let entries: Vec<String> = records.into_iter().map(entry_json).collect();
            let mut header = Map::new();
            header.insert("node".to_string(), Value::String(node));
            encode_batch(&header, first_seq, entries, true, &journal_oversize)
        })
        .await;
        let events = match encoded {
            Ok(events) => events,
            Err(error) => {
                tracing::error!(%error, first_seq, "journal: encoding task failed");
                return false;
            }
        };
        let prefix = format!("j.{}", hash16(&self.config.node));
        let sender = self.actor.sender().to_string();
        send_batches(
            &self.actor,
            &sender,
            &self.room,
            BATCH_EVENT_TYPE,
            &prefix,
            events,
            shutdown,
            self.config.shutdown_grace,
            &self.shared.counters,
        )
        .await
    }
}

async fn sleep_until_opt(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}

/// One journal record as its entry's JSON text.
fn entry_json(record: Record) -> String {
    let entry = JournalEntry {
        seq: record.seq,
        ts_ms: record.ts_ms,
        message: raw_or_string(record.message),
        to: record.to,
    };
    serde_json::to_string(&entry).unwrap_or_else(|_| journal_oversize(record.seq, 0))
}

/// `text` as a raw JSON value when it is JSON, else as a JSON string holding it.
pub(crate) fn raw_or_string(text: String) -> Box<RawValue> {
    if serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok() {
        if let Ok(raw) = RawValue::from_string(text.trim().to_string()) {
            return raw;
        }
    }
    tracing::warn!("bus: message is not JSON; kept as a JSON string");
    serde_json::value::to_raw_value(&text).unwrap_or_else(|_| oversize_raw(text.len()))
}

fn oversize_raw(bytes: usize) -> Box<RawValue> {
    serde_json::value::to_raw_value(&json!({ OVERSIZE_KEY: bytes }))
        .unwrap_or_else(|_| RawValue::NULL.to_owned())
}

fn journal_oversize(seq: u64, bytes: usize) -> String {
    json!({"seq": seq, "ts_ms": now_ms(), "message": { OVERSIZE_KEY: bytes }, "to": []}).to_string()
}

// ---------------------------------------------------------------------------------------
// Batch events, shared with bus::inbox.

/// One event's worth of a batch, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EncodedEvent {
    pub first_seq: u64,
    pub count: u64,
    pub compressed: bool,
    /// The event content as JSON text (at most [`MAX_EVENT_CONTENT`] bytes).
    pub content: String,
}

/// A decoded batch event.
pub(crate) struct DecodedBatch {
    pub first_seq: u64,
    pub entries: Vec<Box<RawValue>>,
}

/// Encodes `entries` (each a JSON text; consecutive sequence numbers from `first_seq`) as
/// batch events with the fields of `header`, plain when allowed and small enough, else
/// compressed, split as needed. An entry too big for any event is replaced by
/// `oversize(seq, bytes)`.
pub(crate) fn encode_batch(
    header: &Map<String, Value>,
    first_seq: u64,
    entries: Vec<String>,
    allow_plain: bool,
    oversize: &dyn Fn(u64, usize) -> String,
) -> Vec<EncodedEvent> {
    let mut out = Vec::new();
    if entries.is_empty() {
        return out;
    }
    if allow_plain {
        if let Some(event) = plain_event(header, first_seq, &entries) {
            out.push(event);
            return out;
        }
    }
    // Split by a raw-size budget guessed from a compressed sample, then bisect what still
    // does not fit.
    let payload =
        (MAX_EVENT_CONTENT - compressed_overhead(header, first_seq, entries.len())) / 4 * 3;
    let ratio = sample_ratio(&entries).max(0.02);
    let budget = ((payload as f64 / ratio) * 0.85) as usize;
    let mut start = 0;
    let mut parts = Vec::new();
    while start < entries.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < entries.len() && (end == start || bytes + entries[end].len() < budget) {
            bytes += entries[end].len() + 1;
            end += 1;
        }
        parts.push((start, end));
        start = end;
    }
    // Process parts in order; a part that does not fit is replaced by its halves.
    parts.reverse();
    while let Some((start, end)) = parts.pop() {
        let seq = first_seq + start as u64;
        let slice = &entries[start..end];
        if allow_plain {
            if let Some(event) = plain_event(header, seq, slice) {
                out.push(event);
                continue;
            }
        }
        match compressed_event(header, seq, slice) {
            Some(event) => out.push(event),
            None if end - start > 1 => {
                let mid = start + (end - start) / 2;
                parts.push((mid, end));
                parts.push((start, mid));
            }
            None => {
                tracing::error!(
                    seq,
                    bytes = slice[0].len(),
                    "message too big for a Matrix event even compressed; stored as a placeholder"
                );
                let placeholder = vec![oversize(seq, slice[0].len())];
                if let Some(event) = plain_event(header, seq, &placeholder)
                    .or_else(|| compressed_event(header, seq, &placeholder))
                {
                    out.push(event);
                }
            }
        }
    }
    out
}

fn header_with(header: &Map<String, Value>, first_seq: u64, count: usize) -> Map<String, Value> {
    let mut content = header.clone();
    content.insert("first_seq".to_string(), json!(first_seq));
    content.insert("count".to_string(), json!(count));
    content
}

fn plain_event(
    header: &Map<String, Value>,
    first_seq: u64,
    entries: &[String],
) -> Option<EncodedEvent> {
    let head = Value::Object(header_with(header, first_seq, entries.len())).to_string();
    let size = head.len() + 14 + entries.iter().map(|e| e.len() + 1).sum::<usize>();
    if size > MAX_EVENT_CONTENT {
        return None;
    }
    // `head` is a non-empty object: splice the messages array in before its closing brace.
    let mut content = String::with_capacity(size);
    content.push_str(head.strip_suffix('}').unwrap_or(&head));
    content.push_str(",\"messages\":[");
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            content.push(',');
        }
        content.push_str(entry);
    }
    content.push_str("]}");
    Some(EncodedEvent {
        first_seq,
        count: entries.len() as u64,
        compressed: false,
        content,
    })
}

fn compressed_overhead(header: &Map<String, Value>, first_seq: u64, count: usize) -> usize {
    let mut content = header_with(header, first_seq, count);
    content.insert("encoding".to_string(), json!(ENCODING_DEFLATE_BASE64));
    content.insert("data".to_string(), json!(""));
    Value::Object(content).to_string().len()
}

fn deflate(entries: &[String]) -> Vec<u8> {
    let mut encoder =
        flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(b"[");
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            let _ = encoder.write_all(b",");
        }
        let _ = encoder.write_all(entry.as_bytes());
    }
    let _ = encoder.write_all(b"]");
    encoder.finish().unwrap_or_default()
}

fn compressed_event(
    header: &Map<String, Value>,
    first_seq: u64,
    entries: &[String],
) -> Option<EncodedEvent> {
    let overhead = compressed_overhead(header, first_seq, entries.len());
    let deflated = deflate(entries);
    if overhead + deflated.len().div_ceil(3) * 4 > MAX_EVENT_CONTENT {
        return None;
    }
    let mut content = header_with(header, first_seq, entries.len());
    content.insert("encoding".to_string(), json!(ENCODING_DEFLATE_BASE64));
    content.insert(
        "data".to_string(),
        json!(base64::engine::general_purpose::STANDARD.encode(deflated)),
    );
    Some(EncodedEvent {
        first_seq,
        count: entries.len() as u64,
        compressed: true,
        content: Value::Object(content).to_string(),
    })
}

/// Compressed/raw size of the first ~128 KiB of `entries`.
fn sample_ratio(entries: &[String]) -> f64 {
    let mut bytes = 0;
    let mut n = 0;
    while n < entries.len() && bytes < 128 * 1024 {
        bytes += entries[n].len() + 1;
        n += 1;
    }
    let compressed = deflate(&entries[..n]).len();
    compressed as f64 / bytes.max(1) as f64
}

/// Decodes a batch event's content (plain or compressed).
pub(crate) fn decode_batch(content: &Value) -> Result<DecodedBatch, String> {
    let first_seq = content
        .get("first_seq")
        .and_then(Value::as_u64)
        .ok_or("batch without first_seq")?;
    let count = content
        .get("count")
        .and_then(Value::as_u64)
        .ok_or("batch without count")?;
    let entries: Vec<Box<RawValue>> = match content.get("encoding").and_then(Value::as_str) {
        None => content
            .get("messages")
            .and_then(Value::as_array)
            .ok_or("plain batch without messages")?
            .iter()
            .map(serde_json::value::to_raw_value)
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?,
        Some(ENCODING_DEFLATE_BASE64) => {
            let data = content
                .get("data")
                .and_then(Value::as_str)
                .ok_or("compressed batch without data")?;
            let deflated = base64::engine::general_purpose::STANDARD
                .decode(data)
                .map_err(|e| format!("batch data: {e}"))?;
            let mut json = Vec::new();
            flate2::read::DeflateDecoder::new(deflated.as_slice())
                .take(MAX_INFLATED)
                .read_to_end(&mut json)
                .map_err(|e| format!("batch data: {e}"))?;
            serde_json::from_slice(&json).map_err(|e| format!("batch data: {e}"))?
        }
        Some(other) => return Err(format!("unknown batch encoding {other:?}")),
    };
    if entries.len() as u64 != count {
        return Err(format!(
            "batch says {count} entries, holds {}",
            entries.len()
        ));
    }
    Ok(DecodedBatch { first_seq, entries })
}

/// Transaction id of a batch event: idempotent for the same first entry, count and encoding.
pub(crate) fn txn_id(prefix: &str, event: &EncodedEvent) -> String {
    format!(
        "{prefix}.{}.{}.{}",
        event.first_seq,
        event.count,
        if event.compressed { "z" } else { "p" }
    )
}

/// Where a writer counts its sends (Prometheus counters, so they can be registered).
#[derive(Clone, Default)]
pub(crate) struct Counters {
    pub events_sent: Counter,
    pub bytes_sent: Counter,
    pub send_failures: Counter,
    pub lost: Counter,
}

impl Counters {
    /// Registers the counters as `<prefix>_events_sent` etc.
    pub fn register(&self, registry: &mut Registry, prefix: &str, what: &str) {
        registry.register(
            format!("{prefix}_events_sent"),
            format!("Batch events of {what} sent to the homeserver"),
            self.events_sent.clone(),
        );
        registry.register(
            format!("{prefix}_event_bytes_sent"),
            format!("Bytes of batch event content of {what} sent"),
            self.bytes_sent.clone(),
        );
        registry.register(
            format!("{prefix}_send_failures"),
            format!("Failed (retried) batch sends of {what}"),
            self.send_failures.clone(),
        );
        registry.register(
            format!("{prefix}_lost"),
            format!("Messages of {what} given up on at shutdown"),
            self.lost.clone(),
        );
    }
}

/// Sends `events` in order as `user`, each retried with backoff until stored; false when
/// given up (`shutdown_grace` after shutdown). A plain event refused as bad JSON (Synapse's
/// canonical JSON forbids floats) is sent compressed instead.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn send_batches(
    actor: &Actor,
    user: &str,
    room: &str,
    event_type: &str,
    txn_prefix: &str,
    events: Vec<EncodedEvent>,
    shutdown: &CancellationToken,
    shutdown_grace: Duration,
    counters: &Counters,
) -> bool {
    let mut queue: std::collections::VecDeque<EncodedEvent> = events.into();
    let mut backoff = Duration::from_millis(50);
    let mut give_up_at: Option<Instant> = None;
    while let Some(event) = queue.pop_front() {
        let content: Value = match serde_json::from_str(&event.content) {
            Ok(content) => content,
            Err(error) => {
                // Cannot happen for what encode_batch makes; never loop on it.
                tracing::error!(%error, first_seq = event.first_seq, "batch content is not JSON");
                return false;
            }
        };
        let txn = txn_id(txn_prefix, &event);
        match actor
            .send_event(user, room, event_type, &txn, &content)
            .await
        {
            Ok(_) => {
                counters.events_sent.inc();
                counters.bytes_sent.inc_by(event.content.len() as u64);
                backoff = Duration::from_millis(50);
            }
            Err(error) if !event.compressed && error.errcode() == Some("M_BAD_JSON") => {
                tracing::debug!(
                    first_seq = event.first_seq,
                    "plain batch refused as non-canonical JSON; compressing"
                );
                match redo_compressed(&event) {
                    Ok(again) => {
                        for e in again.into_iter().rev() {
                            queue.push_front(e);
                        }
                    }
                    Err(why) => {
                        tracing::error!(%why, "cannot re-encode a refused batch");
                        return false;
                    }
                }
            }
            Err(error) => {
                counters.send_failures.inc();
                tracing::warn!(%error, first_seq = event.first_seq, count = event.count, retry_in = ?backoff, "batch send failed; retrying");
                if shutdown.is_cancelled() {
                    let at = *give_up_at.get_or_insert_with(|| Instant::now() + shutdown_grace);
                    if Instant::now() >= at {
                        let lost: u64 = event.count + queue.iter().map(|e| e.count).sum::<u64>();
                        tracing::error!(
                            lost,
                            first_seq = event.first_seq,
                            "giving up storing batches after shutdown"
                        );
                        return false;
                    }
                }
                queue.push_front(event);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    true
}

fn redo_compressed(event: &EncodedEvent) -> Result<Vec<EncodedEvent>, String> {
    let content: Value = serde_json::from_str(&event.content).map_err(|e| e.to_string())?;
    let batch = decode_batch(&content)?;
    let mut header = match content {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    for key in ["messages", "first_seq", "count", "encoding", "data"] {
        header.remove(key);
    }
    let entries = batch.entries.iter().map(|e| e.get().to_string()).collect();
    Ok(encode_batch(
        &header,
        batch.first_seq,
        entries,
        false,
        &|_, bytes| json!({ OVERSIZE_KEY: bytes }).to_string(),
    ))
}

/// Pages through the room's batch events of `event_type`, oldest first (`from: None`) and
/// hands each decoded batch to `each` until it returns false.
pub(crate) async fn for_each_batch(
    actor: &Actor,
    room: &str,
    event_type: &str,
    from: Option<String>,
    mut each: impl FnMut(DecodedBatch) -> Result<bool, ActorError>,
) -> Result<(), ActorError> {
    let filter = json!({"types": [event_type]});
    let sender = actor.sender().to_string();
    let mut token = from;
    loop {
        let (events, next) = actor
            .messages_filtered(&sender, room, token.as_deref(), false, 100, Some(&filter))
            .await?;
        for event in &events {
            if event.get("type").and_then(Value::as_str) != Some(event_type) {
                continue;
            }
            let content = event.get("content").cloned().unwrap_or(Value::Null);
            if content.as_object().is_none_or(|c| c.is_empty()) {
                continue; // redacted
            }
            let batch = decode_batch(&content).map_err(ActorError::Malformed)?;
            if !each(batch)? {
                return Ok(());
            }
        }
        match next {
            Some(next) => token = Some(next),
            None => return Ok(()),
        }
    }
}

/// The sequence number after the highest of the batches of `event_type` whose header fields
/// have the given values, from the newest events back (`None` for a room without such
/// batches). Looks at the newest few such batches, as concurrent sends may have reordered the
/// last ones.
pub(crate) async fn recover_next_seq(
    actor: &Actor,
    room: &str,
    event_type: &str,
    header: &[(&str, &str)],
) -> Result<Option<u64>, ActorError> {
    let filter = json!({"types": [event_type]});
    let sender = actor.sender().to_string();
    let mut token: Option<String> = None;
    let mut best: Option<u64> = None;
    let mut seen = 0;
    loop {
        let (events, next) = actor
            .messages_filtered(&sender, room, token.as_deref(), true, 20, Some(&filter))
            .await?;
        for event in &events {
            let content = &event["content"];
            if event["type"] != event_type
                || header
                    .iter()
                    .any(|(field, value)| content[*field] != *value)
            {
                continue;
            }
            if let (Some(first), Some(count)) =
                (content["first_seq"].as_u64(), content["count"].as_u64())
            {
                best = best.max(Some(first + count));
                seen += 1;
            }
        }
        if seen >= 4 {
            return Ok(best);
        }
        match next {
            Some(next) => token = Some(next),
            None => return Ok(best),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(i: u64) -> String {
        json!({
            "id": i,
            "type": "create",
            "from": format!("hyperty://example.com/{}", i % 7),
            "to": "domain://registry.example.com",
            "body": {"value": {"name": "alice", "status": "online", "counter": i * 3}},
        })
        .to_string()
    }

    fn entries(n: u64, pad: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let mut m: Value = serde_json::from_str(&message(i)).expect("json");
                m["pad"] = json!("x".repeat(pad));
                json!({"seq": i + 10, "ts_ms": 1, "message": m, "to": ["rt://a"]}).to_string()
            })
            .collect()
    }

    fn header() -> Map<String, Value> {
        let mut header = Map::new();
        header.insert("node".to_string(), json!("n1"));
        header
    }

    fn round_trip(events: &[EncodedEvent]) -> Vec<Value> {
        let mut out = Vec::new();
        let mut next = None;
        for event in events {
            assert!(
                event.content.len() <= MAX_EVENT_CONTENT,
                "{}",
                event.content.len()
            );
            let content: Value = serde_json::from_str(&event.content).expect("json");
            assert_eq!(content["node"], "n1");
            let batch = decode_batch(&content).expect("decode");
            if let Some(next) = next {
                assert_eq!(batch.first_seq, next, "gapless, in order");
            }
            next = Some(batch.first_seq + batch.entries.len() as u64);
            out.extend(
                batch
                    .entries
                    .iter()
                    .map(|e| serde_json::from_str::<Value>(e.get()).expect("entry")),
            );
        }
        out
    }

    fn as_values(entries: &[String]) -> Vec<Value> {
        entries
            .iter()
            .map(|e| serde_json::from_str(e).expect("json"))
            .collect()
    }

    #[test]
    fn small_batches_are_plain() {
        let entries = entries(5, 0);
        let events = encode_batch(&header(), 10, entries.clone(), true, &journal_oversize);
        assert_eq!(events.len(), 1);
        assert!(!events[0].compressed);
        let content: Value = serde_json::from_str(&events[0].content).expect("json");
        assert_eq!(content["first_seq"], 10);
        assert_eq!(content["count"], 5);
        assert_eq!(content["messages"][2]["seq"], 12);
        assert_eq!(round_trip(&events), as_values(&entries));
    }

    #[test]
    fn big_batches_are_compressed_and_split_in_order() {
        let entries = entries(20_000, 200);
        let raw: usize = entries.iter().map(String::len).sum();
        let events = encode_batch(&header(), 10, entries.clone(), true, &journal_oversize);
        assert!(events.len() > 1, "{raw} raw bytes in one event?");
        assert!(events.iter().all(|e| e.compressed));
        assert_eq!(events[0].first_seq, 10);
        assert_eq!(round_trip(&events), as_values(&entries));
        // Compression pays: far fewer events than plain would need.
        assert!(
            events.len() < raw / MAX_EVENT_CONTENT / 3,
            "{} events for {raw} bytes",
            events.len()
        );
    }

    #[test]
    fn incompressible_entries_are_bisected_and_oversize_replaced() {
        // Random-looking entries compress badly: the guessed budget is too big at first.
        let noisy: Vec<String> = (0..400u64)
            .map(|i| {
                let noise: String = (0..300)
                    .map(|j| {
                        let h = hash16(&format!("{i}-{j}"));
                        h.chars().next().unwrap_or('0')
                    })
                    .collect();
                json!({"seq": i, "noise": noise, "more": hash16(&i.to_string())}).to_string()
            })
            .collect();
        let events = encode_batch(&header(), 0, noisy.clone(), false, &journal_oversize);
        assert!(events.iter().all(|e| e.compressed));
        assert_eq!(round_trip(&events), as_values(&noisy));

        let huge: String = (0..40_000u64).map(|i| hash16(&i.to_string())).collect();
        let entries = vec![
            json!({"seq": 0}).to_string(),
            json!({"seq": 1, "message": huge}).to_string(),
            json!({"seq": 2}).to_string(),
        ];
        let events = encode_batch(&header(), 0, entries, true, &journal_oversize);
        let back = round_trip(&events);
        assert_eq!(back.len(), 3);
        assert_eq!(back[1]["seq"], 1);
        assert!(back[1]["message"][OVERSIZE_KEY].as_u64().unwrap_or(0) > 600_000);
        assert_eq!(back[2]["seq"], 2);
    }

    #[test]
    fn txn_ids_name_first_seq_count_and_encoding() {
        let events = encode_batch(&header(), 42, entries(3, 0), true, &journal_oversize);
        assert_eq!(txn_id("j.abc", &events[0]), "j.abc.42.3.p");
        let again = encode_batch(&header(), 42, entries(3, 0), true, &journal_oversize);
        assert_eq!(
            txn_id("j.abc", &again[0]),
            "j.abc.42.3.p",
            "a retry is the same transaction"
        );
        let compressed = redo_compressed(&events[0]).expect("recompress");
        assert_eq!(txn_id("j.abc", &compressed[0]), "j.abc.42.3.z");
        assert_eq!(round_trip(&compressed), round_trip(&events));
    }

    #[test]
    fn malformed_batches_are_errors() {
        assert!(decode_batch(&json!({"first_seq": 1})).is_err());
        assert!(decode_batch(&json!({"first_seq": 1, "count": 2, "messages": [1]})).is_err());
        assert!(
            decode_batch(&json!({"first_seq": 1, "count": 1, "encoding": "zip", "data": ""}))
                .is_err()
        );
        assert!(decode_batch(
            &json!({"first_seq": 1, "count": 1, "encoding": ENCODING_DEFLATE_BASE64, "data": "!!"})
        )
        .is_err());
    }

    #[tokio::test]
    async fn memory_journal_counts_and_never_waits() {
        let journal = Journal::memory();
        assert_eq!(journal.record(&message(1), vec![]), 1);
        assert_eq!(journal.record(&message(2), vec!["rt://a".into()]), 2);
        assert_eq!(
            journal
                .record_persisted(&message(3), vec![])
                .await
                .expect("stored"),
            3
        );
        journal.flush().await;
        let stats = journal.stats();
        assert_eq!((stats.recorded, stats.persisted, stats.lag), (3, 3, 0));
        assert_eq!(stats.oldest_unpersisted, None);

        let mut registry = Registry::default();
        journal.register_metrics(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains("bus_journal_recorded_total 3"), "{text}");
        assert!(text.contains("bus_journal_persisted_total 3"), "{text}");
        assert!(text.contains("bus_journal_send_failures_total 0"), "{text}");
    }

    #[test]
    fn config_defaults_and_toml() {
        let config: JournalConfig =
            toml::from_str("flush_interval = \"20ms\"\nmax_in_flight = 2").expect("toml");
        assert_eq!(config.flush_interval, Duration::from_millis(20));
        assert_eq!(config.max_in_flight, 2);
        assert_eq!(
            config.max_batch_raw_bytes,
            JournalConfig::default().max_batch_raw_bytes
        );
        assert!(toml::from_str::<JournalConfig>("nope = 1").is_err());
    }
}

//! The node's history of routed reTHINK messages, kept in Matrix.
//!
//! Owns the journal room (`#_msgnode_journal:<server>`, created by the appservice's own
//! user), the node's global message sequence (u64 from 1, continued after a restart from the
//! newest journal event of this node) and the writer task that stores recorded messages as
//! `org.msgnode.rethink.batch` events (`persist::batch`, header `{"node"}`).
//!
//! **Group commit.** [`Journal::record`] only appends to an in-memory queue (one short lock)
//! and returns the message's sequence number. One writer task takes everything queued once
//! no more than `max_in_flight - 1` sends are under way and either `flush_interval` has
//! passed since the oldest queued record, the queue holds `max_batch_raw_bytes`, or a flush
//! was asked for. While a send is in flight, records pile up and form the next batch, so a
//! homeserver doing ~30 events/s still stores tens of thousands of messages per second.
//!
//! **Never dropped.** A failed send is retried (`persist::roomlog::send_batches`) until it
//! succeeds; after shutdown the writer keeps trying for `shutdown_grace`, then gives up
//! (counted in [`JournalStats::lost`]). With `max_in_flight = 1` (the default) events reach
//! the room in sequence order; with 2 a later batch may land before an earlier one's retry,
//! and [`Journal::read_all`] sorts.
//!
//! Messages are stored as the JSON text the caller gave (`JournalEntry::message` is a
//! `RawValue`); text that is not JSON is stored as a JSON string. Read back from plain events
//! they are equivalent JSON (whitespace and key order may differ).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::batch::{encode_batch, raw_or_string, OVERSIZE_KEY};
use super::roomlog::{for_each_batch, recover_next_seq, send_batches, Counters};
use super::shares::{free_all, Charge, Shares};
use crate::clock::now_ms;
use crate::config::JournalConfig;
use crate::matrix::{hash16, Actor, ActorError};

/// Event type of journal batches.
pub const BATCH_EVENT_TYPE: &str = "org.msgnode.rethink.batch";
/// Alias localpart of the journal room.
pub const JOURNAL_ALIAS: &str = "_msgnode_journal";
/// What a record holds beside its message, as counted against the budgets.
const RECORD_OVERHEAD: usize = 64;

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
    /// Bytes of records not yet stored (queued or in flight): what the journal holds in
    /// memory.
    held: std::sync::atomic::AtomicUsize,
    /// What each charge (the sender's principal) holds of `held`, in bytes and records.
    shares: Shares,
}

/// Room for one record, counted in the history's budgets since [`Journal::reserve`]:
/// [`Journal::record_reserved`] uses it; dropped unused, it is given back.
#[must_use = "room not recorded into is given back when dropped"]
pub struct HistoryRoom {
    shared: Arc<Shared>,
    charge: Charge,
    bytes: usize,
}

impl Drop for HistoryRoom {
    fn drop(&mut self) {
        self.shared.free_counted(&self.charge, self.bytes);
    }
}

/// Which of the history's budgets has no room ([`Journal::reserve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryFull {
    /// What the node holds not stored yet (`max_history_bytes`).
    Node,
    /// The charge's share (`max_history_bytes_per_principal`, `…backlog_per_principal`).
    Share,
}

impl Shared {
    /// Gives back `bytes` counted for one record of `charge` that will not hold them.
    fn free_counted(&self, charge: &str, bytes: usize) {
        if bytes > 0 {
            let _ = self.held.fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |h| Some(h.saturating_sub(bytes)),
            );
            self.shares.free(charge, bytes, 1);
        }
    }
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
    charge: Charge,
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
                held: std::sync::atomic::AtomicUsize::new(0),
                shares: Shares::default(),
            }),
        }
    }

    /// Lets one charge hold at most `bytes` and `records` of what is not stored yet (see
    /// [`Journal::charge_has_room`]).
    pub fn limit_shares(&self, bytes: usize, records: u64) {
        self.shared.shares.limit(bytes, records);
    }

    /// Whether one more record of `bytes` charged to `charge` fits in its share now (the
    /// node's own charge always does).
    pub fn charge_has_room(&self, charge: &str, bytes: usize) -> bool {
        self.shared.shares.has_room(charge, bytes + RECORD_OVERHEAD)
    }

    /// Reserves room for one record of a message of `bytes` charged to `charge`, in its
    /// share and within `max_held` bytes not stored yet over all — checked and counted at
    /// once, so senders racing for the last room never take the history past either, however
    /// long each waits before it records.
    ///
    /// # Errors
    /// [`HistoryFull`]: which budget has no room (nothing reserved).
    pub fn reserve(
        &self,
        charge: &Charge,
        bytes: usize,
        max_held: usize,
    ) -> Result<HistoryRoom, HistoryFull> {
        let shared = &self.shared;
        let bytes = bytes + RECORD_OVERHEAD;
        // The queue's lock makes the check and the count one step for every reserver.
        let _queue = shared.lock_queue();
        if !shared.memory {
            let held = shared.held.load(std::sync::atomic::Ordering::Relaxed);
            if held + bytes > max_held {
                return Err(HistoryFull::Node);
            }
        }
        if !shared.shares.try_add(charge, bytes) {
            return Err(HistoryFull::Share);
        }
        shared
            .held
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        Ok(HistoryRoom {
            shared: Arc::clone(shared),
            charge: Arc::clone(charge),
            bytes,
        })
    }

    /// [`Journal::record`] in the room `room` reserved for it ([`Journal::reserve`]).
    pub fn record_reserved(
        &self,
        message_json: &str,
        to: Vec<String>,
        mut room: HistoryRoom,
    ) -> u64 {
        let counted = std::mem::take(&mut room.bytes);
        self.record_counted(message_json, to, &Arc::clone(&room.charge), counted)
    }

    /// Records a routed message (its JSON text) and the runtimes it went to, held in memory
    /// charged to `charge` until stored; returns its sequence number. Never blocks on I/O:
    /// the message is stored in the background.
    pub fn record(&self, message_json: &str, to: Vec<String>, charge: &Charge) -> u64 {
        self.record_counted(message_json, to, charge, 0)
    }

    /// [`Journal::record`], of which `counted` bytes are counted already (reserved).
    fn record_counted(
        &self,
        message_json: &str,
        to: Vec<String>,
        charge: &Charge,
        counted: usize,
    ) -> u64 {
        let shared = &self.shared;
        let mut queue = shared.lock_queue();
        let seq = queue.next_seq;
        queue.next_seq += 1;
        shared.recorded.inc();
        if shared.memory || queue.closed {
            drop(queue);
            shared.free_counted(charge, counted);
            shared.stored.send_modify(|p| p.stored = seq + 1);
            shared.persisted.inc();
            return seq;
        }
        let was_empty = queue.records.is_empty();
        let was_small = queue.bytes < shared.max_batch_raw_bytes;
        let bytes = message_json.len() + RECORD_OVERHEAD;
        queue.bytes += bytes;
        // Under the queue's lock, as reservations count: the reserved bytes become the
        // record's.
        if counted != bytes {
            shared.free_counted(charge, counted);
            shared
                .held
                .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
            shared.shares.add(charge, bytes);
        }
        queue.records.push(Record {
            seq,
            ts_ms: now_ms(),
            message: message_json.to_string(),
            to,
            charge: Arc::clone(charge),
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

    /// [`Journal::record_reserved`], resolving once the batch holding the message is stored.
    ///
    /// # Errors
    /// The journal shut down and gave up before storing it.
    pub async fn record_persisted(
        &self,
        message_json: &str,
        to: Vec<String>,
        room: HistoryRoom,
    ) -> Result<u64, JournalError> {
        let seq = self.record_reserved(message_json, to, room);
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

    /// Bytes of records recorded but not stored yet, held in memory.
    pub fn held_bytes(&self) -> usize {
        self.shared.held.load(std::sync::atomic::Ordering::Relaxed)
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

    /// Stores one batch ([`Writer::send`]), then counts its bytes as no longer held.
    async fn store(&self, records: Vec<Record>, shutdown: &CancellationToken) -> bool {
        let bytes: usize = records
            .iter()
            .map(|r| r.message.len() + RECORD_OVERHEAD)
            .sum();
        let charges: Vec<(Charge, usize)> = records
            .iter()
            .map(|r| (Arc::clone(&r.charge), r.message.len() + RECORD_OVERHEAD))
            .collect();
        let stored = self.send(records, shutdown).await;
        free_all(
            &self.shared.shares,
            charges.iter().map(|(c, bytes)| (&**c, *bytes)),
        );
        let _ = self.shared.held.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |held| Some(held.saturating_sub(bytes)),
        );
        stored
    }

    /// Encodes and sends one batch, retrying until stored; false when given up at shutdown.
    async fn send(&self, records: Vec<Record>, shutdown: &CancellationToken) -> bool {
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

fn journal_oversize(seq: u64, bytes: usize) -> String {
    json!({"seq": seq, "ts_ms": now_ms(), "message": { OVERSIZE_KEY: bytes }, "to": []}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(i: u64) -> String {
        json!({"id": i, "type": "create", "from": "hyperty://example.com/a", "to": "hyperty://example.com/b"}).to_string()
    }

    #[test]
    fn reserved_room_counts_at_once_and_is_given_back_unused() {
        let journal = Journal::with_start(1, false, usize::MAX);
        journal.limit_shares(usize::MAX, 2);
        let eve: Charge = Arc::from("@eve:l");
        let max = 2 * (100 + RECORD_OVERHEAD);
        let first = journal.reserve(&eve, 100, max).expect("room");
        let second = journal.reserve(&eve, 100, max).expect("room");
        assert_eq!(
            journal.reserve(&Arc::from("@bob:l"), 1, max).err(),
            Some(HistoryFull::Node),
            "two reserved fill the history before either is recorded"
        );
        assert_eq!(
            journal.reserve(&eve, 1, usize::MAX).err(),
            Some(HistoryFull::Share)
        );
        journal.record_reserved(&"x".repeat(100), vec![], first);
        assert_eq!(journal.held_bytes(), max, "recorded: counted once");
        drop(second);
        assert_eq!(journal.held_bytes(), max / 2, "unused: given back");
        assert!(journal.reserve(&eve, 100, max).is_ok());
    }

    #[tokio::test]
    async fn memory_journal_counts_and_never_waits() {
        let journal = Journal::memory();
        assert_eq!(journal.record(&message(1), vec![], &Arc::from("")), 1);
        assert_eq!(
            journal.record(&message(2), vec!["rt://a".into()], &Arc::from("")),
            2
        );
        let room = journal
            .reserve(&Arc::from(""), message(3).len(), 0)
            .expect("in memory: nothing held");
        assert_eq!(
            journal
                .record_persisted(&message(3), vec![], room)
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
}

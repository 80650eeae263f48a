//! The runtimes the node knows and their delivery state; who holds which address.
//!
//! The [`Table`] maps every bound address (a runtime's URL, the addresses allocated to it,
//! foreign addresses it uses as return routes) to its [`Runtime`]. Each runtime is either
//! online — a connected socket with a bounded outbound queue, delivered to directly — or
//! away, when messages go to its inbox in Matrix and are handed over, in order, when it
//! reconnects. A reconnect drains the inbox while new messages keep going to the inbox
//! (within its budgets: nothing is buffered beside it), and goes online only once a take
//! found nothing new, so nothing is lost, reordered or delivered twice; after a few takes
//! that each found something new the hand-over is held ([`Runtime::hold`]): deliveries that
//! can wait wait for it, so a steady sender cannot keep it from going online. A socket whose queue is full makes its senders wait
//! (`bus::flow`); one that stays full too long is treated as away: the message goes to the
//! inbox and the socket is closed, to resume on reconnect.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use super::outbound::{Outbound, Refused};
use super::owners::{counts, Claims, Counts, Owner, Owners, Turns};
use crate::persist::inbox::{Inbox, Reservation};
use crate::persist::shares::Charge;
use crate::persist::store::RuntimeRecord;
use crate::policy::input::Subject;

/// One runtime the node knows: connected now or away with its bindings kept.
pub struct Runtime {
    /// Its runtime URL.
    pub url: String,
    state: Mutex<RuntimeState>,
    /// Held while the inbox is handed to the socket (take, send, ack): one hand-over at a
    /// time, so nothing is handed over twice.
    handover: tokio::sync::Mutex<()>,
    /// Told whenever a held hand-over ends (online, taken over, gone): deliveries waiting
    /// behind it offer again.
    settled: tokio::sync::Notify,
    /// Cancelled to drop the socket of this runtime that is still closing (handing over
    /// what was queued for it), once another one begins to close: one at a time.
    closing: Mutex<Option<CancellationToken>>,
}

struct RuntimeState {
    record: RuntimeRecord,
    /// What `record` counts, kept with it (so a count costs nothing however much it holds).
    counts: Counts,
    delivery: Delivery,
    /// The policy input's `subject` without the per-connection identity; rebuilt after every
    /// change of the record.
    subject: Option<Arc<Subject>>,
    /// Since when no socket holds the runtime (`None` while one does).
    away_since: Option<Instant>,
    /// Its principal's holdings, which every change of the record updates.
    owner: Option<Arc<Owner>>,
    /// Since when its socket's queue has been full (`None`: it keeps up).
    behind_since: Option<Instant>,
    /// Allocated address → its allocation key, built on the first release by address and
    /// kept by allocations and releases (dropped by any other change), so a release costs
    /// what it releases, not what the runtime holds.
    keys: Option<HashMap<String, String>>,
}

impl RuntimeState {
    /// The record changed to what counts `after`: its principal's holdings follow, and the
    /// cached subject is rebuilt when next asked for.
    fn counted(&mut self, after: Counts) {
        if let Some(owner) = &self.owner {
            owner.changed(self.counts, after);
        }
        self.counts = after;
        self.subject = None;
    }
}

impl crate::persist::store::LiveRecord for Runtime {
    fn record(&self) -> RuntimeRecord {
        Runtime::record(self)
    }
}

enum Delivery {
    Online {
        conn: u64,
        tx: Outbound,
        close: CancellationToken,
    },
    /// A socket is taking the inbox over; what arrives meanwhile goes to the inbox too —
    /// unless the hand-over is `held` (since then): its last rounds, which deliveries that
    /// can wait wait behind (see [`Runtime::hold`]).
    Draining {
        conn: u64,
        close: CancellationToken,
        held: Option<Instant>,
    },
    Away,
}

/// What [`Runtime::offer`] found.
pub enum Offer {
    /// Handed over (or into the inbox).
    Done(Delivered),
    /// The runtime's hand-over is in its last rounds ([`Runtime::hold`]), held since
    /// `since`: wait until it is online ([`Runtime::settled`]), then offer again.
    Held {
        /// When the hold began.
        since: Instant,
    },
    /// The queue of socket `conn` is full; room may come on `tx`. Behind since `since`.
    Full {
        /// The connection holding the runtime.
        conn: u64,
        /// Its queue.
        tx: Outbound,
        /// When its queue was first found full (without room since).
        since: Instant,
    },
}

/// Where one delivery went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Into the socket's queue.
    Direct,
    /// Into the inbox (runtime away, reconnecting, or too slow).
    Queued,
    /// Nowhere: it had to wait in the inbox, which had no room for it (and none was
    /// reserved for it).
    Missed,
}

/// Where one delivery may wait if the runtime cannot take it now: the room reserved for it
/// in the runtime's inbox (reserved while its sender was checked, see `Inbox::reserve`), or
/// — none reserved, the runtime was online then — room reserved at the moment it has to
/// wait, within the same budgets.
pub struct Slot {
    charge: Charge,
    reserved: Option<Reservation>,
    anyway: bool,
}

impl Slot {
    /// For a delivery charged to `charge`, with the room `reserved` for it, if any.
    pub fn new(charge: &Charge, reserved: Option<Reservation>) -> Self {
        Self {
            charge: Arc::clone(charge),
            reserved,
            anyway: false,
        }
    }

    /// For what this node holds already and may not refuse (another replica's inbox handed
    /// over): waits in the inbox whatever its budgets hold.
    pub fn anyway(charge: &Charge) -> Self {
        Self {
            charge: Arc::clone(charge),
            reserved: None,
            anyway: true,
        }
    }

    /// Pushes `text` into `runtime`'s inbox, in the room reserved, else in room reserved now;
    /// missed when there is none.
    fn push(&mut self, inbox: &Inbox, runtime: &str, text: &Utf8Bytes) -> Delivered {
        let reserved = match self.reserved.take() {
            Some(reserved) => reserved,
            None if self.anyway => inbox.reserve_anyway(runtime, &self.charge, text.len()),
            None => match inbox.reserve(runtime, &self.charge, text.len()) {
                Ok(reserved) => reserved,
                Err(full) => {
                    tracing::info!(%runtime, ?full, "a message had to wait in an inbox without room: missed");
                    return Delivered::Missed;
                }
            },
        };
        inbox.push_reserved(runtime, text.as_str(), reserved);
        Delivered::Queued
    }
}

impl Runtime {
    fn new(url: &str, record: RuntimeRecord) -> Self {
        Self {
            url: url.to_string(),
            state: Mutex::new(RuntimeState {
                counts: counts(&record),
                record,
                delivery: Delivery::Away,
                subject: None,
                away_since: Some(Instant::now()),
                owner: None,
                behind_since: None,
                keys: None,
            }),
            handover: tokio::sync::Mutex::new(()),
            settled: tokio::sync::Notify::new(),
            closing: Mutex::new(None),
        }
    }

    /// A socket of this runtime begins to close (`drop_it` ends what it still writes): the
    /// one that was closing before, if any, is dropped now — a runtime has at most one
    /// socket closing beside the one that holds it.
    pub fn closing(&self, drop_it: CancellationToken) {
        let previous = self
            .closing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(drop_it);
        if let Some(previous) = previous {
            previous.cancel();
        }
    }

    /// Waits for the right to hand the inbox over to the socket.
    pub async fn handover(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.handover.lock().await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RuntimeState> {
        crate::sync::lock(&self.state)
    }

    /// Reads the durable record without copying it.
    pub fn with_record<R>(&self, read: impl FnOnce(&RuntimeRecord) -> R) -> R {
        read(&self.lock().record)
    }

    /// A copy of the durable record.
    pub fn record(&self) -> RuntimeRecord {
        self.lock().record.clone()
    }

    /// The Matrix user that owns the runtime, once one connected.
    pub fn user(&self) -> Option<String> {
        self.lock().record.user.clone()
    }

    /// Changes the record; returns the new copy (to persist).
    pub fn update(&self, change: impl FnOnce(&mut RuntimeRecord)) -> RuntimeRecord {
        let mut state = self.lock();
        change(&mut state.record);
        let after = counts(&state.record);
        state.counted(after);
        state.keys = None;
        state.record.clone()
    }

    /// Changes the record without copying it (it is stored as it is when its write begins:
    /// see [`Store::put_runtime_live`](crate::persist::store::Store::put_runtime_live)).
    pub fn change(&self, change: impl FnOnce(&mut RuntimeRecord)) {
        let mut state = self.lock();
        change(&mut state.record);
        let after = counts(&state.record);
        state.counted(after);
        state.keys = None;
    }

    /// Adds `addresses` to the block under `key`, without copying the record or counting it
    /// again: what an allocation costs does not grow with what the runtime holds.
    pub fn allocated(&self, key: &str, addresses: &[String]) {
        let mut state = self.lock();
        let block = match state.record.allocations.get_mut(key) {
            Some(block) => block,
            None => state.record.allocations.entry(key.to_string()).or_default(),
        };
        block.extend(addresses.iter().cloned());
        if let Some(keys) = &mut state.keys {
            keys.extend(addresses.iter().map(|a| (a.clone(), key.to_string())));
        }
        let after = Counts {
            addresses: state.counts.addresses + addresses.len(),
            ..state.counts
        };
        state.counted(after);
    }

    /// Takes `addresses` (each an allocated address, in whatever block) and the block under
    /// `key` out of the record; what was held of them. Costs what it takes out (the blocks
    /// it touches), not what the runtime holds: the address → key index is built once.
    pub fn release(&self, addresses: &[String], key: Option<&str>) -> Vec<String> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut released = Vec::new();
        let mut gone = 0;
        if let Some(key) = key {
            released.extend(state.record.allocations.remove(key).unwrap_or_default());
            gone = released.len();
            if let Some(keys) = &mut state.keys {
                for address in &released {
                    keys.remove(address);
                }
            }
        } else {
            let record = &state.record;
            let keys = state.keys.get_or_insert_with(|| {
                record
                    .allocations
                    .iter()
                    .flat_map(|(k, block)| block.iter().map(|a| (a.clone(), k.clone())))
                    .collect()
            });
            for address in addresses {
                let Some(key) = keys.remove(address) else {
                    continue;
                };
                let Some(block) = state.record.allocations.get_mut(&key) else {
                    continue;
                };
                let before = block.len();
                block.retain(|a| a != address);
                if block.len() < before {
                    gone += before - block.len();
                    released.push(address.clone());
                }
                if block.is_empty() {
                    state.record.allocations.remove(&key);
                }
            }
        }
        let after = Counts {
            addresses: state.counts.addresses.saturating_sub(gone),
            ..state.counts
        };
        state.counted(after);
        released
    }

    /// The holdings of the principal that owns the runtime (once one does).
    pub fn owner(&self) -> Option<Arc<Owner>> {
        self.lock().owner.clone()
    }

    /// How many allocated addresses the runtime holds (what allocation quotas count).
    pub fn held(&self) -> usize {
        let state = self.lock();
        state
            .counts
            .addresses
            .saturating_sub(state.record.claimed.len())
    }

    /// The policy input's `subject` for this runtime (cached until the record changes): the
    /// same few fields however many addresses it holds.
    pub fn subject(&self) -> Arc<Subject> {
        let mut state = self.lock();
        if let Some(subject) = &state.subject {
            return Arc::clone(subject);
        }
        let subject = Arc::new(Subject {
            runtime: self.url.clone(),
            authenticated: true,
            // Only a Matrix user is a `subject.user`; network servers and peers own runtimes
            // too.
            user: state.record.user.clone().filter(|u| u.starts_with('@')),
            ..Subject::default()
        });
        state.subject = Some(Arc::clone(&subject));
        subject
    }

    /// Hands `text` to the runtime now: into its socket queue when online, else into its
    /// inbox (charged to `charge`, see `Inbox::push`); a full queue closes the socket (it
    /// resumes from the inbox). The bus's routing waits for room first (`bus::flow`); this
    /// is for what cannot wait.
    pub fn deliver(&self, text: &Utf8Bytes, inbox: &Inbox, slot: &mut Slot) -> Delivered {
        match self.offer_now(text, inbox, slot) {
            Offer::Done(delivered) => delivered,
            Offer::Full { conn, .. } => self.too_slow(conn, text, inbox, slot),
            // Never from `offer_now`; what cannot wait goes to the inbox.
            Offer::Held { .. } => slot.push(inbox, &self.url, text),
        }
    }

    /// [`Runtime::offer`] for what cannot wait (a fan-out, a notification): during a held
    /// hand-over it goes to the inbox as during any other (the hand-over takes it, one round
    /// more), never [`Offer::Held`].
    pub fn offer_now(&self, text: &Utf8Bytes, inbox: &Inbox, slot: &mut Slot) -> Offer {
        self.offer_with(text, inbox, slot, false)
    }

    /// A future told when a held hand-over ends; `enable` it before offering, so that an end
    /// in between is not missed.
    pub fn settled(&self) -> tokio::sync::futures::Notified<'_> {
        self.settled.notified()
    }

    /// The hand-over to `conn` goes into its last rounds: deliveries that can wait
    /// ([`Runtime::offer`], flow-controlled ones) wait until it is online instead of adding to
    /// the inbox, so a steady sender cannot keep the runtime off-line (each round finding a
    /// new push); what cannot wait still goes to the inbox. False when `conn` no longer
    /// holds it.
    pub fn hold(&self, conn: u64) -> bool {
        let mut state = self.lock();
        match &mut state.delivery {
            Delivery::Draining { conn: c, held, .. } if *c == conn => {
                held.get_or_insert_with(Instant::now);
                true
            }
            _ => false,
        }
    }

    /// The held hand-over to `conn` (if it is one) is not held any longer: waiting
    /// deliveries go to the inbox again.
    pub fn unhold(&self, conn: u64) {
        let mut state = self.lock();
        if let Delivery::Draining { conn: c, held, .. } = &mut state.delivery {
            if *c == conn && held.take().is_some() {
                drop(state);
                self.settled.notify_waiters();
            }
        }
    }

    /// Tries to hand `text` over without waiting: done (direct, buffered during a reconnect,
    /// or into the inbox), or the socket's queue is full.
    pub fn offer(&self, text: &Utf8Bytes, inbox: &Inbox, slot: &mut Slot) -> Offer {
        self.offer_with(text, inbox, slot, true)
    }

    fn offer_with(&self, text: &Utf8Bytes, inbox: &Inbox, slot: &mut Slot, wait: bool) -> Offer {
        let mut guard = self.lock();
        let state = &mut *guard;
        match &mut state.delivery {
            Delivery::Online { tx, close, conn } => match tx.try_send(text.clone()) {
                Ok(()) => {
                    state.behind_since = None;
                    Offer::Done(Delivered::Direct)
                }
                Err(Refused::Full(_)) => Offer::Full {
                    conn: *conn,
                    tx: tx.clone(),
                    since: *state.behind_since.get_or_insert_with(Instant::now),
                },
                Err(Refused::Closed(_)) => {
                    // Gone: the socket resumes from the inbox.
                    close.cancel();
                    state.delivery = Delivery::Away;
                    state.away_since = Some(Instant::now());
                    Offer::Done(slot.push(inbox, &self.url, text))
                }
            },
            Delivery::Draining {
                held: Some(since), ..
            } if wait => Offer::Held { since: *since },
            Delivery::Draining { .. } | Delivery::Away => {
                Offer::Done(slot.push(inbox, &self.url, text))
            }
        }
    }

    /// A delivery that waited found room in the queue of `conn`: no longer behind.
    pub fn caught_up(&self, conn: u64) {
        let mut state = self.lock();
        if matches!(&state.delivery, Delivery::Online { conn: c, .. } if *c == conn) {
            state.behind_since = None;
        }
    }

    /// The socket of `conn` stayed behind too long (or went away): it is told to close, and
    /// `text` — like everything after it — goes to the inbox. If another socket holds the
    /// runtime by now, `text` is handed to that one as any delivery.
    pub fn too_slow(
        &self,
        conn: u64,
        text: &Utf8Bytes,
        inbox: &Inbox,
        slot: &mut Slot,
    ) -> Delivered {
        let mut state = self.lock();
        match &state.delivery {
            Delivery::Online { conn: c, close, .. } if *c == conn => {
                close.cancel();
                tracing::warn!(runtime = %self.url, "runtime cannot keep up or is gone; queueing in its inbox until it reconnects");
                state.delivery = Delivery::Away;
                state.away_since = Some(Instant::now());
                state.behind_since = None;
                slot.push(inbox, &self.url, text)
            }
            _ => {
                drop(state);
                self.deliver(text, inbox, slot)
            }
        }
    }

    /// The queue of `conn` has been full only a short while, but `text` cannot wait longer
    /// (a peer node's message, see `bus::flow::PEER_WAIT`): the socket stays open and keeps
    /// what it holds, `text` — like everything after it — goes to the inbox, and the inbox
    /// is handed to the same socket again ([`Delivery::Draining`], as on a reconnect), in
    /// order after what its queue holds. The socket's queue and close token, for that
    /// hand-over; `None` when `conn` no longer holds the runtime (then `text` was handed over
    /// as any delivery).
    pub fn overflow(
        &self,
        conn: u64,
        text: &Utf8Bytes,
        inbox: &Inbox,
        slot: &mut Slot,
    ) -> (Delivered, Option<(Outbound, CancellationToken)>) {
        let mut state = self.lock();
        match &state.delivery {
            Delivery::Online {
                conn: c, tx, close, ..
            } if *c == conn => {
                let again = (tx.clone(), close.clone());
                state.delivery = Delivery::Draining {
                    conn,
                    close: close.clone(),
                    held: None,
                };
                (slot.push(inbox, &self.url, text), Some(again))
            }
            _ => {
                drop(state);
                (self.deliver(text, inbox, slot), None)
            }
        }
    }

    /// A new connection takes the runtime over; deliveries go to the inbox until
    /// [`Runtime::go_online`]. The previous connection (if any) is told to close (`close` of
    /// its own attach is cancelled).
    pub fn begin_attach(&self, conn: u64, close: CancellationToken) {
        let mut state = self.lock();
        state.away_since = None;
        let previous = std::mem::replace(
            &mut state.delivery,
            Delivery::Draining {
                conn,
                close,
                held: None,
            },
        );
        drop(state);
        match previous {
            Delivery::Online { close, .. } | Delivery::Draining { close, .. } => close.cancel(),
            Delivery::Away => {}
        }
        self.settled.notify_waiters();
    }

    /// After the inbox was handed to `tx` up to its `pushed`-th push ([`Inbox::pushed`]
    /// before the last take, which found no more): online, unless more was pushed since
    /// (`Some(false)`: take again). `None` when another connection took over meanwhile.
    /// Deliveries push under the same lock, so none falls between the check and the switch.
    pub fn go_online(&self, conn: u64, tx: &Outbound, pushed: u64, inbox: &Inbox) -> Option<bool> {
        let mut state = self.lock();
        let Delivery::Draining { conn: c, close, .. } = &state.delivery else {
            return None;
        };
        if *c != conn {
            return None;
        }
        if inbox.pushed(&self.url) != pushed {
            return Some(false);
        }
        let close = close.clone();
        state.delivery = Delivery::Online {
            conn,
            tx: tx.clone(),
            close,
        };
        // Whatever the queue held before was taken (the hand-over's pages were queued).
        state.behind_since = None;
        drop(state);
        self.settled.notify_waiters();
        Some(true)
    }

    /// The connection `conn` is gone; messages go to the inbox from now on.
    pub fn detach(&self, conn: u64) {
        let mut state = self.lock();
        let ours = match &state.delivery {
            Delivery::Online { conn: c, .. } | Delivery::Draining { conn: c, .. } => *c == conn,
            Delivery::Away => false,
        };
        if ours {
            state.away_since = Some(Instant::now());
            state.delivery = Delivery::Away;
            drop(state);
            self.settled.notify_waiters();
        }
    }

    /// Whether a socket currently holds the runtime.
    pub fn is_online(&self) -> bool {
        matches!(self.lock().delivery, Delivery::Online { .. })
    }

    /// Whether a socket holds the runtime or is attaching to it.
    pub fn is_attached(&self) -> bool {
        !matches!(self.lock().delivery, Delivery::Away)
    }

    /// Tells the socket holding the runtime (or attaching) to close.
    pub fn close_socket(&self) {
        match &self.lock().delivery {
            Delivery::Online { close, .. } | Delivery::Draining { close, .. } => close.cancel(),
            Delivery::Away => {}
        }
    }

    /// The runtime is in use without a socket (a peer node's stand-in, at each of its
    /// messages): it counts as away from now, so it is released only once unused for
    /// `away_release_after`.
    pub fn touch(&self) {
        let mut state = self.lock();
        if state.away_since.is_some() {
            state.away_since = Some(Instant::now());
        }
    }

    /// How long no socket has held the runtime (`None` while one does).
    pub fn away_for(&self) -> Option<Duration> {
        self.lock().away_since.map(|since| since.elapsed())
    }
}

/// Address → runtime, and runtime URL → runtime.
#[derive(Default)]
pub struct Table {
    runtimes: RwLock<HashMap<String, Arc<Runtime>>>,
    addresses: RwLock<HashMap<String, Arc<Runtime>>>,
    owners: Owners,
    /// Runtime URLs and claimed addresses, whose principal holds them for good.
    pub claims: Claims,
    /// Each principal's changes to its holdings, one at a time.
    pub turns: Turns,
}

impl Table {
    /// Counts `runtime` among its principal's holdings (its record names the owner); once.
    pub fn own(&self, runtime: &Arc<Runtime>) {
        let mut state = runtime.lock();
        if state.owner.is_some() {
            return;
        }
        let Some(user) = state.record.user.clone() else {
            return;
        };
        for url in std::iter::once(&runtime.url).chain(&state.record.claimed) {
            if let Err(other) = self.claims.take(url, &user) {
                tracing::warn!(%url, %other, "stored claim overlaps another principal's; kept as stored");
            }
        }
        state.owner = Some(self.owners.add(&user, &runtime.url, &state.record));
    }

    /// The holdings of the principal `owner`, if it owns any runtime.
    pub fn owner(&self, owner: &str) -> Option<Arc<Owner>> {
        self.owners.find(owner)
    }

    /// The runtime with this URL, created (away, with `record`) when new.
    pub fn runtime(&self, url: &str, record: impl FnOnce() -> RuntimeRecord) -> Arc<Runtime> {
        self.insert(url, record, true)
    }

    /// A peer node's stand-in runtime `url`, created (with `record`, which names the peer as
    /// its owner) when new: in the table, so that what it holds counts for the peer as for
    /// any principal and is released once unused for `away_release_after`, but with its URL
    /// unbound — what is addressed to the peer's domain goes to the peer.
    pub fn stand_in(&self, url: &str, record: impl FnOnce() -> RuntimeRecord) -> Arc<Runtime> {
        self.insert(url, record, false)
    }

    fn insert(
        &self,
        url: &str,
        record: impl FnOnce() -> RuntimeRecord,
        bind_url: bool,
    ) -> Arc<Runtime> {
        if let Some(r) = self.get_runtime(url) {
            return r;
        }
        let mut runtimes = self.runtimes.write().unwrap_or_else(|p| p.into_inner());
        let runtime = runtimes
            .entry(url.to_string())
            .or_insert_with(|| Arc::new(Runtime::new(url, record())))
            .clone();
        drop(runtimes);
        if bind_url {
            self.bind_if_free(url, &runtime);
        }
        self.bind_record(&runtime);
        self.own(&runtime);
        runtime
    }

    /// Binds the addresses in `runtime`'s record to it: first come, first served, also for
    /// state restored from the homeserver. Its claimed addresses are taken for its principal
    /// in [`Claims`] first (a record another replica wrote brings claims this one has not
    /// seen), and one over or under another principal's is not bound.
    pub fn bind_record(&self, runtime: &Arc<Runtime>) {
        let record = runtime.record();
        let claimed = record.claimed.iter().filter(|address| {
            let Some(owner) = record.user.as_deref() else {
                return true;
            };
            match self.claims.take(address, owner) {
                Ok(()) => true,
                Err(other) => {
                    tracing::warn!(%address, %other, runtime = %runtime.url, "stored claim overlaps another principal's; not bound");
                    false
                }
            }
        });
        for address in record
            .allocations
            .values()
            .flatten()
            .chain(&record.foreign)
            .chain(claimed)
        {
            if !self.bind_if_free(address, runtime) {
                tracing::warn!(%address, runtime = %runtime.url, "address held by another runtime; not bound");
            }
        }
    }

    /// Releases the addresses in `runtime`'s record (not its URL); with `keep_claimed`, not
    /// its claimed addresses either (a release: they stay its, like the URL).
    pub fn unbind_record(&self, runtime: &Arc<Runtime>, keep_claimed: bool) {
        let record = runtime.record();
        let claimed = (!keep_claimed)
            .then_some(&record.claimed)
            .into_iter()
            .flatten();
        for address in record
            .allocations
            .values()
            .flatten()
            .chain(&record.foreign)
            .chain(claimed)
        {
            self.unbind(address, runtime);
        }
    }

    /// The runtime with this URL, if known.
    pub fn get_runtime(&self, url: &str) -> Option<Arc<Runtime>> {
        self.runtimes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(url)
            .cloned()
    }

    /// Forgets a runtime and every address bound to it.
    pub fn remove_runtime(&self, url: &str) {
        let removed = self
            .runtimes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(url);
        if let Some(runtime) = removed {
            self.addresses
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|_, r| !Arc::ptr_eq(r, &runtime));
            let mut state = runtime.lock();
            if let (Some(_), Some(user)) = (state.owner.take(), &state.record.user) {
                self.owners.remove(user, &runtime.url, &state.record);
                for url in std::iter::once(&runtime.url).chain(&state.record.claimed) {
                    self.claims.forget(url);
                }
            }
        }
    }

    /// Binds `address` to `runtime` (a later binding of the same address wins).
    pub fn bind(&self, address: &str, runtime: &Arc<Runtime>) {
        self.addresses
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(address.to_string(), Arc::clone(runtime));
    }

    /// Binds `address` to `runtime` unless another runtime holds it; whether it is bound to
    /// `runtime` now.
    pub fn bind_if_free(&self, address: &str, runtime: &Arc<Runtime>) -> bool {
        let mut addresses = self.addresses.write().unwrap_or_else(|p| p.into_inner());
        let holder = addresses
            .entry(address.to_string())
            .or_insert_with(|| Arc::clone(runtime));
        Arc::ptr_eq(holder, runtime)
    }

    /// Releases `address` if `runtime` holds it.
    pub fn unbind(&self, address: &str, runtime: &Arc<Runtime>) {
        let mut addresses = self.addresses.write().unwrap_or_else(|p| p.into_inner());
        if addresses
            .get(address)
            .is_some_and(|r| Arc::ptr_eq(r, runtime))
        {
            addresses.remove(address);
        }
    }

    /// The runtime holding exactly `address`.
    pub fn holder(&self, address: &str) -> Option<Arc<Runtime>> {
        self.addresses
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(address)
            .cloned()
    }

    /// The runtime holding `address` or the nearest address it is a sub-resource of
    /// (`<runtime>/registry` → the runtime; `<object>/subscription` → the object's holder).
    pub fn holder_of(&self, address: &str) -> Option<Arc<Runtime>> {
        let addresses = self.addresses.read().unwrap_or_else(|p| p.into_inner());
        let mut url = address;
        loop {
            if let Some(r) = addresses.get(url) {
                return Some(Arc::clone(r));
            }
            url = crate::rethink::address::parent(url)?;
        }
    }

    /// Every runtime, for re-deciding subscriptions.
    pub fn runtimes(&self) -> Vec<Arc<Runtime>> {
        self.runtimes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// `runtimes` without repeats (one delivery per runtime).
    pub fn distinct(runtimes: Vec<Arc<Runtime>>) -> Vec<Arc<Runtime>> {
        let mut seen = BTreeSet::new();
        runtimes
            .into_iter()
            .filter(|r| seen.insert(r.url.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Utf8Bytes {
        Utf8Bytes::from(s.to_string())
    }

    fn node() -> Charge {
        Charge::from(crate::persist::shares::NODE)
    }

    /// What a resume does: takes, hands over, acks, then goes online once nothing new came.
    async fn resume(rt: &Runtime, conn: u64, tx: &Outbound, inbox: &Inbox) -> Option<bool> {
        loop {
            let pushed = inbox.pushed(&rt.url);
            let taken = inbox.take(&rt.url, usize::MAX).await.unwrap();
            for m in &taken.messages {
                tx.try_send(Utf8Bytes::from(m.clone())).unwrap();
            }
            inbox.ack(&rt.url, &taken).await.unwrap();
            match rt.go_online(conn, tx, pushed, inbox) {
                Some(false) => continue,
                done => return done,
            }
        }
    }

    #[test]
    fn a_release_by_address_takes_what_it_names_and_counts_follow() {
        let rt = Runtime::new("runtime://example.com/1", RuntimeRecord::default());
        let a = |i: usize| format!("hyperty://example.com/{i}");
        for i in 0..100 {
            rt.allocated(&format!("k{}", i / 3), &[a(i)]);
        }
        let check = |rt: &Runtime| {
            let state = rt.lock();
            assert_eq!(state.counts, counts(&state.record));
        };
        // By address, the index built on the first; unknown and repeated ones are skipped.
        let released = rt.release(&[a(4), a(50), a(50), a(1000)], None);
        assert_eq!(released, vec![a(4), a(50)]);
        check(&rt);
        rt.allocated("k99", &[a(200)]);
        assert_eq!(rt.release(&[a(200), a(3)], None), vec![a(200), a(3)]);
        assert!(
            rt.with_record(|r| !r.allocations.contains_key("k99")),
            "empty block gone"
        );
        check(&rt);
        // By key, then the index is still right; any other change drops it.
        assert_eq!(rt.release(&[], Some("k2")), vec![a(6), a(7), a(8)]);
        assert!(rt.release(&[a(7)], None).is_empty());
        rt.change(|r| {
            r.allocations.insert("moved".into(), vec![a(9)]);
            if let Some(block) = r.allocations.get_mut("k3") {
                block.retain(|x| *x != a(9));
            }
        });
        assert_eq!(rt.release(&[a(9)], None), vec![a(9)]);
        assert!(rt.with_record(|r| !r.allocations.contains_key("moved")));
        check(&rt);
        assert_eq!(rt.held(), 101 - 8);
    }

    #[tokio::test]
    async fn away_queues_then_reconnect_drains_in_order() {
        let table = Table::default();
        let inbox = Inbox::memory();
        let rt = table.runtime("runtime://d/1", RuntimeRecord::default);
        assert_eq!(
            rt.deliver(&text("a"), &inbox, &mut Slot::anyway(&node())),
            Delivered::Queued
        );
        // Reconnect: into the inbox during the drain, then online.
        rt.begin_attach(7, CancellationToken::new());
        assert_eq!(
            rt.deliver(&text("b"), &inbox, &mut Slot::anyway(&node())),
            Delivered::Queued
        );
        let (tx, mut rx) = super::super::outbound::channel(16, 1 << 20);
        let pushed = inbox.pushed(&rt.url);
        let taken = inbox.take(&rt.url, usize::MAX).await.unwrap();
        for m in &taken.messages {
            tx.try_send(Utf8Bytes::from(m.clone())).unwrap();
        }
        inbox.ack(&rt.url, &taken).await.unwrap();
        assert_eq!(
            rt.deliver(&text("c"), &inbox, &mut Slot::anyway(&node())),
            Delivered::Queued,
            "after the take"
        );
        assert_eq!(
            rt.go_online(7, &tx, pushed, &inbox),
            Some(false),
            "take again"
        );
        assert_eq!(resume(&rt, 7, &tx, &inbox).await, Some(true));
        assert_eq!(
            rt.deliver(&text("d"), &inbox, &mut Slot::anyway(&node())),
            Delivered::Direct
        );
        let got: Vec<String> =
            std::iter::from_fn(|| rx.try_recv().map(|t| t.to_string())).collect();
        assert_eq!(got, ["a", "b", "c", "d"]);
    }

    #[tokio::test]
    async fn slow_socket_falls_back_to_the_inbox() {
        let table = Table::default();
        let inbox = Inbox::memory();
        let rt = table.runtime("runtime://d/1", RuntimeRecord::default);
        let (tx, _rx) = super::super::outbound::channel(1, 1 << 20);
        let close = CancellationToken::new();
        rt.begin_attach(1, close.clone());
        assert_eq!(resume(&rt, 1, &tx, &inbox).await, Some(true));
        assert_eq!(
            rt.deliver(&text("a"), &inbox, &mut Slot::anyway(&node())),
            Delivered::Direct
        );
        assert_eq!(
            rt.deliver(&text("b"), &inbox, &mut Slot::anyway(&node())),
            Delivered::Queued
        );
        assert!(!rt.is_online());
        assert!(close.is_cancelled(), "the slow socket is told to close");
        assert_eq!(
            inbox
                .take("runtime://d/1", usize::MAX)
                .await
                .unwrap()
                .messages,
            ["b"]
        );
    }

    #[tokio::test]
    async fn a_failed_resume_loses_nothing() {
        let table = Table::default();
        let inbox = Inbox::memory();
        let rt = table.runtime("runtime://d/1", RuntimeRecord::default);
        rt.begin_attach(1, CancellationToken::new());
        rt.deliver(&text("m1"), &inbox, &mut Slot::anyway(&node()));
        rt.deliver(&text("m2"), &inbox, &mut Slot::anyway(&node()));
        // Taken over before it went online: the new socket gets everything.
        rt.begin_attach(2, CancellationToken::new());
        let (old, _old_rx) = super::super::outbound::channel(4, 1 << 20);
        assert_eq!(rt.go_online(1, &old, inbox.pushed(&rt.url), &inbox), None);
        rt.detach(1);
        rt.deliver(&text("m3"), &inbox, &mut Slot::anyway(&node()));
        rt.detach(2);
        rt.deliver(&text("m4"), &inbox, &mut Slot::anyway(&node()));
        assert_eq!(
            inbox
                .take("runtime://d/1", usize::MAX)
                .await
                .unwrap()
                .messages,
            ["m1", "m2", "m3", "m4"]
        );
    }

    #[test]
    fn sub_resources_route_to_their_holder() {
        let table = Table::default();
        let rt = table.runtime("runtime://d/1", RuntimeRecord::default);
        table.bind("comm://d/x", &rt);
        assert!(table
            .holder_of("runtime://d/1/registry/allocation")
            .is_some());
        assert!(table.holder_of("comm://d/x/subscription").is_some());
        assert!(table.holder_of("comm://d/y").is_none());
        table.unbind("comm://d/x", &rt);
        assert!(table.holder("comm://d/x").is_none());
    }
}

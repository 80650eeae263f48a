//! What this replica does with what the other replicas write (`persist::follower` reads
//! it from the homeserver):
//! - a runtime record another replica wrote (its head, and the parts it names, read once
//!   the head arrives: one read per runtime at a time, once more if heads came meanwhile,
//!   never adopted over a head that came later) replaces this replica's view of that
//!   runtime (its addresses and subscriptions); when that replica's socket attached later
//!   than the one here, the one here is closed: the runtime moved;
//! - a registry entry another replica wrote updates the built-in registry;
//! - an inbox batch another replica wrote for a runtime connected here is handed to its
//!   socket — take, send, ack: the same hand-over as a reconnect, so nothing is handed over
//!   twice.

use crate::sync::lock;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use backon::Retryable;

use super::runtimes::Runtime;
use super::Bus;
use crate::matrix::ActorError;
use crate::persist::follower::Followed;
use crate::persist::store::{RuntimeRecord, Stored};
use crate::retry;

/// Other replicas' records being read in parts (N14 of the third review): one read per
/// runtime at a time, run once more when heads came meanwhile (however many), and a record
/// read is adopted only if no head that came after its read began was adopted first — so a
/// slow read never puts an older record over a newer one. Holds only runtimes being read.
#[derive(Default)]
pub(super) struct Fetches(Mutex<FetchState>);

#[derive(Default)]
struct FetchState {
    /// Heads followed so far: numbers them.
    heads: u64,
    /// Runtime URL → its read under way.
    running: HashMap<String, Fetch>,
}

#[derive(Default)]
struct Fetch {
    /// A head naming parts came meanwhile: read once more.
    again: bool,
    /// The number of the latest head without parts adopted meanwhile (0: none).
    adopted: u64,
}

impl Fetches {
    /// A head without parts, its record in it: `adopt` runs under the lock, so no read that
    /// began before it is adopted after it.
    pub(super) fn adopt(&self, url: &str, adopt: impl FnOnce()) {
        let mut state = lock(&self.0);
        state.heads += 1;
        let head = state.heads;
        if let Some(fetch) = state.running.get_mut(url) {
            fetch.adopted = head;
        }
        adopt();
    }

    /// A head naming parts: whether a read of `url` must start (`false`: the one under way
    /// runs once more).
    pub(super) fn begin(&self, url: &str) -> bool {
        let mut state = lock(&self.0);
        state.heads += 1;
        match state.running.get_mut(url) {
            Some(fetch) => {
                fetch.again = true;
                false
            }
            None => {
                state.running.insert(url.to_string(), Fetch::default());
                true
            }
        }
    }

    /// Reads `url`'s record (`fetch`) until no head came during a read, adopting each one
    /// read unless a head that came after its read began was adopted first.
    pub(super) async fn run<F, R>(&self, url: &str, mut fetch: F, adopt: impl Fn(RuntimeRecord))
    where
        F: FnMut() -> R,
        R: Future<Output = Option<RuntimeRecord>>,
    {
        // A read that stops otherwise (a panic, its task aborted) must not leave `url` marked
        // as read for ever, or every later head of it would be skipped.
        let mut under_way = UnderWay {
            fetches: self,
            url,
            ended: false,
        };
        loop {
            let began = lock(&self.0).heads;
            let fetched = fetch().await;
            let mut state = lock(&self.0);
            let Some(running) = state.running.get_mut(url) else {
                under_way.ended = true;
                return;
            };
            if let Some(record) = fetched.filter(|_| running.adopted <= began) {
                adopt(record);
            }
            if !std::mem::take(&mut running.again) {
                state.running.remove(url);
                under_way.ended = true;
                return;
            }
        }
    }
}

/// A read of [`Fetches::run`]: ends its mark when dropped before it ended it.
struct UnderWay<'a> {
    fetches: &'a Fetches,
    url: &'a str,
    ended: bool,
}

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        if !self.ended {
            lock(&self.fetches.0).running.remove(self.url);
        }
    }
}

impl Bus {
    /// Takes what the follower saw, in order.
    pub(super) fn followed(&self, seen: Vec<Followed>) {
        for followed in seen {
            match followed {
                Followed::Stored(Stored::Runtime { url, record }) => {
                    self.inner.persistence.store.forget(&url);
                    self.inner.fetches.adopt(&url, || self.adopt(&url, record));
                }
                Followed::Stored(Stored::RuntimeInParts { url }) => {
                    // Its parts are read from the state room; a head naming parts already
                    // replaced is skipped (the newer head follows).
                    self.inner.persistence.store.forget(&url);
                    if !self.inner.fetches.begin(&url) {
                        continue; // the read under way runs once more
                    }
                    let bus = self.clone();
                    self.inner.tracker.spawn(async move {
                        let fetch = || async {
                            let fetched = bus.inner.persistence.store.fetch_runtime(&url).await;
                            fetched.unwrap_or_else(|error| {
                                tracing::warn!(%error, runtime = %url, "cannot read another replica's record of a runtime");
                                None
                            })
                        };
                        let adopt = |record| bus.adopt(&url, record);
                        bus.inner.fetches.run(&url, fetch, adopt).await;
                    });
                }
                Followed::Stored(Stored::Registry { url, entry }) => {
                    if let Some(registry) = &self.inner.connectors.builtin_registry {
                        registry.apply(&url, entry);
                    }
                }
                Followed::Inbox { runtime } => {
                    let bus = self.clone();
                    self.inner
                        .tracker
                        .spawn(async move { bus.hand_over(&runtime).await });
                }
            }
        }
    }

    /// Takes another replica's record of runtime `url` as the truth about it.
    fn adopt(&self, url: &str, record: RuntimeRecord) {
        let Some(runtime) = self.inner.table.get_runtime(url) else {
            if !record.is_empty() {
                self.restore(url, record);
            }
            return;
        };
        if runtime.is_attached() {
            let here = runtime.with_record(|r| (r.attached_ms, r.node.clone()));
            if (record.attached_ms, record.node.clone()) <= here {
                // Written by a socket that has left (or a stale writer): the store must
                // say where the runtime is now.
                let bus = self.clone();
                self.inner.tracker.spawn(async move {
                    let record = runtime.record();
                    if let Err(error) = bus.persist(&runtime.url, &record).await {
                        tracing::warn!(%error, runtime = %runtime.url, "cannot restate where the runtime is");
                    }
                });
                return;
            }
            tracing::info!(runtime = %url, node = ?record.node, "runtime connected to another replica: closing its socket here");
            runtime.close_socket();
        }
        if record.is_empty() {
            self.inner.subscriptions.remove_runtime(url);
            self.inner.table.remove_runtime(url);
        } else {
            self.rebind(&runtime, record);
        }
    }

    /// Whether another replica holds (or last held) the runtime's socket: that replica
    /// releases it when away too long and re-decides its subscriptions.
    pub(super) fn held_elsewhere(&self, runtime: &Runtime) -> bool {
        let Some(me) = &self.inner.config.replica else {
            return false;
        };
        runtime.with_record(|r| r.node.as_ref().is_some_and(|node| node != me))
    }

    /// Hands what the inbox of `url` holds to its socket, when the runtime is online here.
    /// Retried for about a minute while the homeserver cannot be read; after that the
    /// runtime's next reconnect (or the next batch) hands it over.
    async fn hand_over(&self, url: &str) {
        let handed = (|| self.try_hand_over(url))
            .retry(retry::policy(Duration::from_millis(500), Duration::from_secs(16)).with_max_times(6))
            .notify(|error, delay| {
                tracing::warn!(%error, runtime = %url, retry_in = ?delay, "cannot read the inbox of a connected runtime; retrying");
            });
        tokio::select! {
            () = self.inner.shutdown.cancelled() => {}
            handed = handed => if handed.is_err() {
                tracing::warn!(runtime = %url, "gave up handing over the inbox of a connected runtime; its next reconnect does");
            }
        }
    }

    async fn try_hand_over(&self, url: &str) -> Result<(), ActorError> {
        let Some(runtime) = self.inner.table.get_runtime(url) else {
            return Ok(());
        };
        let _turn = runtime.handover().await;
        if !runtime.is_online() {
            return Ok(()); // away: its reconnect takes the inbox
        }
        let inbox = &self.inner.persistence.inbox;
        let page_bytes = self.config().outbound_queue_bytes;
        // Another replica's sender was charged for it already: what goes back is the node's.
        let node = crate::persist::shares::Charge::from(crate::persist::shares::NODE);
        loop {
            let taken = inbox.take(url, page_bytes).await?;
            if taken.messages.is_empty() {
                return Ok(());
            }
            for text in &taken.messages {
                // A socket too slow for it sends the rest back to the inbox, under a new number.
                // Already held for it: never refused for room.
                let mut slot = super::runtimes::Slot::anyway(&node);
                runtime.deliver(&Utf8Bytes::from(text.clone()), inbox, &mut slot);
            }
            self.inner
                .metrics
                .delivered("relayed", taken.messages.len() as u64);
            if let Err(error) = inbox.ack(url, &taken).await {
                tracing::warn!(%error, runtime = %url, "cannot record the inbox cursor; a reconnect may repeat messages");
            }
            if !taken.more || !runtime.is_online() {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "runtime://localhost/1";

    fn owned_by(user: &str) -> RuntimeRecord {
        RuntimeRecord {
            user: Some(user.to_string()),
            ..RuntimeRecord::default()
        }
    }

    #[tokio::test]
    async fn heads_that_come_during_a_read_make_one_more_read() {
        let fetches = Fetches::default();
        assert!(fetches.begin(URL));
        let (reads, adopted) = (Mutex::new(0), Mutex::new(Vec::new()));
        let fetch = || {
            let n = {
                let mut reads = lock(&reads);
                *reads += 1;
                *reads
            };
            if n == 1 {
                for _ in 0..5 {
                    assert!(!fetches.begin(URL), "one read of a runtime at a time");
                }
            }
            std::future::ready(Some(owned_by(&format!("@read{n}:localhost"))))
        };
        fetches
            .run(URL, fetch, |record| lock(&adopted).push(record))
            .await;
        assert_eq!(*lock(&reads), 2, "five heads during a read: one more read");
        assert_eq!(
            *lock(&adopted),
            vec![owned_by("@read1:localhost"), owned_by("@read2:localhost")]
        );
        assert!(lock(&fetches.0).running.is_empty());
        assert!(fetches.begin(URL), "a later head starts a read again");
    }

    #[tokio::test]
    async fn a_read_that_stops_halfway_does_not_block_later_reads() {
        let fetches = std::sync::Arc::new(Fetches::default());
        assert!(fetches.begin(URL));
        let reading = std::sync::Arc::clone(&fetches);
        let stopped = tokio::spawn(async move {
            let fetch = || async { panic!("a read that fails inside") };
            reading.run(URL, fetch, |_| {}).await;
        })
        .await;
        assert!(stopped.is_err(), "the read panicked");
        assert!(fetches.begin(URL), "a later head starts a read again");
        // Aborted while it waits.
        let reading = std::sync::Arc::clone(&fetches);
        let waiting = tokio::spawn(async move {
            let fetch = || std::future::pending::<Option<RuntimeRecord>>();
            reading.run(URL, fetch, |_| {}).await;
        });
        tokio::task::yield_now().await;
        waiting.abort();
        assert!(waiting.await.is_err_and(|e| e.is_cancelled()));
        assert!(fetches.begin(URL), "a later head starts a read again");
    }

    #[tokio::test]
    async fn a_read_that_began_before_a_newer_record_was_adopted_is_not_adopted() {
        let fetches = Fetches::default();
        let adopted = Mutex::new(Vec::new());
        assert!(fetches.begin(URL));
        let fetch = || {
            // While the read is under way, a newer head that fits one event is adopted.
            fetches.adopt(URL, || lock(&adopted).push(owned_by("@newer:localhost")));
            std::future::ready(Some(owned_by("@older:localhost")))
        };
        fetches
            .run(URL, fetch, |record| lock(&adopted).push(record))
            .await;
        assert_eq!(*lock(&adopted), vec![owned_by("@newer:localhost")]);
        // A head naming parts that comes after it is read and adopted.
        assert!(fetches.begin(URL));
        let fetch = || std::future::ready(Some(owned_by("@latest:localhost")));
        fetches
            .run(URL, fetch, |record| lock(&adopted).push(record))
            .await;
        assert_eq!(lock(&adopted).last(), Some(&owned_by("@latest:localhost")));
    }
}

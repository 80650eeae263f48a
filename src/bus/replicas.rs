//! What this replica does with what the other replicas write (`persist::follower` reads
//! it from the homeserver):
//! - a runtime record another replica wrote (its head, and the parts it names, read once
//!   the head arrives) replaces this replica's view of that runtime
//!   (its addresses and subscriptions); when that replica's socket attached later than the
//!   one here, the one here is closed: the runtime moved;
//! - a registry entry another replica wrote updates the built-in registry;
//! - an inbox batch another replica wrote for a runtime connected here is handed to its
//!   socket — take, send, ack: the same hand-over as a reconnect, so nothing is handed over
//!   twice.

use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use backon::Retryable;

use super::runtimes::Runtime;
use super::Bus;
use crate::matrix::ActorError;
use crate::persist::follower::Followed;
use crate::persist::store::{RuntimeRecord, Stored};
use crate::retry;

impl Bus {
    /// Takes what the follower saw, in order.
    pub(super) fn followed(&self, seen: Vec<Followed>) {
        for followed in seen {
            match followed {
                Followed::Stored(Stored::Runtime { url, record }) => {
                    self.inner.persistence.store.forget(&url);
                    self.adopt(&url, record);
                }
                Followed::Stored(Stored::RuntimeInParts { url }) => {
                    // Its parts are read from the state room; a head naming parts already
                    // replaced is skipped (the newer head follows).
                    self.inner.persistence.store.forget(&url);
                    let bus = self.clone();
                    self.inner.tracker.spawn(async move {
                        match bus.inner.persistence.store.fetch_runtime(&url).await {
                            Ok(Some(record)) => bus.adopt(&url, record),
                            Ok(None) => {}
                            Err(error) => {
                                tracing::warn!(%error, runtime = %url, "cannot read another replica's record of a runtime");
                            }
                        }
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

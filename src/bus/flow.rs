//! Flow control between a sender and the runtimes it reaches: slow senders first, close
//! receivers last.
//!
//! A delivery that finds the receiver's socket queue full (`[bus] outbound_queue` messages
//! or `outbound_queue_bytes` bytes) waits for room — and since a socket's messages are
//! handled one at a time, the sender's socket is not read meanwhile: its TCP window fills
//! and it slows down. The wait is bounded in time: once the receiver's queue has been full
//! for `[bus] slow_receiver_close_after` without room, the receiver is closed (1013) and the
//! message waits in its inbox (it resumes from there). Both are counted
//! (`bus_senders_slowed`, `bus_receivers_closed`). What a receiver holds in memory stays
//! within its queue's bytes meanwhile.

use axum::extract::ws::Utf8Bytes;

use super::outbound::Refused;
use super::runtimes::{Delivered, Offer, Runtime};
use super::Bus;

impl Bus {
    /// Hands `text` to `runtime`, waiting (bounded) for room in a full socket queue.
    pub(super) async fn deliver(&self, runtime: &Runtime, text: &Utf8Bytes) -> Delivered {
        let inbox = &self.inner.persistence.inbox;
        let (conn, tx, since) = match runtime.offer(text, inbox) {
            Offer::Done(delivered) => return delivered,
            Offer::Full { conn, tx, since } => (conn, tx, since),
        };
        let metrics = &self.inner.metrics;
        metrics.senders_slowed.inc();
        let deadline =
            tokio::time::Instant::from_std(since + self.config().slow_receiver_close_after);
        match tx.send_until(text.clone(), deadline).await {
            Ok(()) => {
                runtime.caught_up(conn);
                Delivered::Direct
            }
            Err(Refused::Full(_)) => {
                metrics.receivers_closed.inc();
                runtime.too_slow(conn, text, inbox)
            }
            Err(Refused::Closed(_)) => runtime.too_slow(conn, text, inbox),
        }
    }
}

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
//!
//! Responses go through the same queue and budget ([`Bus::respond`]): a socket that sends
//! requests but does not read its answers is not read further until there is room, and is
//! closed once it has made none for `slow_receiver_close_after` (`bus_refused{reason=
//! "slow_socket"}`). A closing socket that takes no write for `[bus] write_timeout` is
//! dropped with what is still queued for it (`bus::socket`).

use axum::extract::ws::Utf8Bytes;

use super::connection::Connection;
use super::metrics::refused;
use super::outbound::{Outbound, Refused};
use super::runtimes::{Delivered, Offer, Runtime, Slot};
use super::Bus;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Longest a peer node's messages wait on their local addressees (room in a full queue, a
/// held hand-over), however long `[bus] slow_receiver_close_after` is, counted from when
/// their post or appservice transaction began — all the messages of one transaction
/// together, so that slow addressees do not add up within it (a transaction holds the
/// homeserver's next one back): a peer's post carries a whole domain's traffic, which one
/// slow addressee must not hold up beyond this, and it is answered well within the peer's
/// own timeout.
pub const PEER_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

impl Bus {
    /// Hands `text` to `runtime`, waiting (bounded) for room in a full socket queue, and no
    /// later than `until` if given (a peer node's message: see [`PEER_WAIT`]); what goes to
    /// its inbox waits in `slot` (room reserved for it, or reserved then). The receiver's
    /// close rule is the same for every sender: closed once its queue has stayed full for
    /// `[bus] slow_receiver_close_after`. A peer's message that cannot wait until then waits
    /// in the inbox, which is handed to the same socket after what its queue holds
    /// ([`Runtime::overflow`]): never closed at once, so a receiver that reads is not closed
    /// by a burst (review bus-4 M3); a held hand-over not over by then takes it from the
    /// inbox too.
    pub(super) async fn deliver(
        &self,
        runtime: &Arc<Runtime>,
        text: &Utf8Bytes,
        slot: &mut Slot,
        until: Option<tokio::time::Instant>,
    ) -> Delivered {
        let inbox = &self.inner.persistence.inbox;
        let within = self.config().slow_receiver_close_after;
        let closes = |since| tokio::time::Instant::from_std(since + within);
        let deadline_from = |since| until.map_or(closes(since), |until| until.min(closes(since)));
        let (conn, tx, since) = loop {
            let settled = runtime.settled();
            tokio::pin!(settled);
            settled.as_mut().enable();
            match runtime.offer(text, inbox, slot) {
                Offer::Done(delivered) => return delivered,
                Offer::Full { conn, tx, since } => break (conn, tx, since),
                // Behind a hand-over's last rounds (bounded): direct once it is online; past
                // the wait, into the inbox (the hand-over takes it).
                Offer::Held { since } => {
                    if tokio::time::timeout_at(deadline_from(since), settled)
                        .await
                        .is_err()
                    {
                        return runtime.deliver(text, inbox, slot);
                    }
                }
            }
        };
        let metrics = &self.inner.metrics;
        metrics.senders_slowed.inc();
        match tx.send_until(text.clone(), deadline_from(since)).await {
            Ok(()) => {
                runtime.caught_up(conn);
                Delivered::Direct
            }
            // Still full once a peer's message may wait no longer, but not behind for
            // `slow_receiver_close_after` yet: not closed for it, nor does the peer wait —
            // the message waits in the inbox, which goes to the same socket after what it
            // holds (review bus-4 M3).
            Err(Refused::Full(_)) if until.is_some_and(|until| until < closes(since)) => {
                let (delivered, again) = runtime.overflow(conn, text, inbox, slot);
                if let Some((tx, close)) = again {
                    self.catch_up(Arc::clone(runtime), conn, tx, close);
                }
                delivered
            }
            Err(Refused::Full(_)) => {
                metrics.receivers_closed.inc();
                runtime.too_slow(conn, text, inbox, slot)
            }
            Err(Refused::Closed(_)) => runtime.too_slow(conn, text, inbox, slot),
        }
    }
}

impl Bus {
    /// Hands `text` to `runtime` without waiting (a topic's fan-out, a notification): into
    /// its socket queue, else — the queue full — the receiver is closed (1013) and `text`
    /// waits in its inbox; missed only when that inbox has no room either. `when_full`
    /// counts a full queue.
    pub(super) fn deliver_now(
        &self,
        runtime: &Runtime,
        text: &Utf8Bytes,
        slot: &mut Slot,
        when_full: impl FnOnce(),
    ) -> Delivered {
        let inbox = &self.inner.persistence.inbox;
        match runtime.offer_now(text, inbox, slot) {
            Offer::Done(delivered) => delivered,
            Offer::Full { conn, .. } => {
                when_full();
                runtime.too_slow(conn, text, inbox, slot)
            }
            Offer::Held { .. } => runtime.deliver(text, inbox, slot),
        }
    }

    /// Queues a response (or a resumed message) for `conn` within its socket's budget,
    /// waiting for room no longer than `[bus] slow_receiver_close_after`, nor past the
    /// socket's close or the node's shutdown. False when the socket is done: gone, closing,
    /// or too slow (then told to close; it resumes from its inbox on reconnect).
    pub(super) async fn respond(&self, conn: &Connection, text: Utf8Bytes) -> bool {
        self.send_within(&conn.tx, &conn.close, &conn.runtime.url, text)
            .await
    }

    /// [`Bus::respond`] for the socket of `runtime` with queue `tx` and `close`.
    pub(super) async fn send_within(
        &self,
        tx: &Outbound,
        close: &CancellationToken,
        runtime: &str,
        text: Utf8Bytes,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + self.config().slow_receiver_close_after;
        tokio::select! {
            sent = tx.send_until(text, deadline) => match sent {
                Ok(()) => true,
                Err(Refused::Full(_)) => {
                    self.inner.metrics.refuse(refused::SLOW_SOCKET);
                    tracing::info!(%runtime, "socket does not read what is queued for it: closed");
                    close.cancel();
                    false
                }
                Err(Refused::Closed(_)) => false,
            },
            () = close.cancelled() => false,
            () = self.inner.shutdown.cancelled() => false,
        }
    }
}

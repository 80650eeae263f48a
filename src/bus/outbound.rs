//! One socket's outbound queue, bounded in messages and in bytes: what a receiver that does
//! not read can hold in the node's memory. Everything queued for a socket — deliveries,
//! responses, the inbox handed over on resume — counts against the same budget, and nothing
//! waits for room without a deadline. Full means slow: a sender waits for room (see
//! `bus::flow`), and a receiver that stays full too long is closed, to resume from its inbox.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{mpsc, Notify};

/// The sending side (cheap to clone).
#[derive(Clone, Debug)]
pub struct Outbound {
    tx: mpsc::Sender<Utf8Bytes>,
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
    /// Told whenever the writer takes a message out (room again).
    room: Arc<Notify>,
}

/// The receiving side, read by the socket's writer.
pub struct OutboundRx {
    rx: mpsc::Receiver<Utf8Bytes>,
    queued: Arc<AtomicUsize>,
    room: Arc<Notify>,
}

/// A queue of at most `messages` messages and `max_bytes` bytes.
pub fn channel(messages: usize, max_bytes: usize) -> (Outbound, OutboundRx) {
    let (tx, rx) = mpsc::channel(messages.max(1));
    let queued = Arc::new(AtomicUsize::new(0));
    let room = Arc::new(Notify::new());
    (
        Outbound {
            tx,
            queued: Arc::clone(&queued),
            max_bytes: max_bytes.max(1),
            room: Arc::clone(&room),
        },
        OutboundRx { rx, queued, room },
    )
}

/// Bytes held in a queue's budget for a message not written yet ([`Outbound::reserve`]);
/// given back when dropped unsent.
#[derive(Debug)]
pub struct Reserved {
    outbound: Outbound,
    len: usize,
}

impl Reserved {
    /// Queues `text` in the room held (its own length counted from now on), waiting until
    /// `deadline` at most for room in messages.
    ///
    /// # Errors
    /// [`Refused`], with the text.
    pub async fn send(
        mut self,
        mut text: Utf8Bytes,
        deadline: tokio::time::Instant,
    ) -> Result<(), Refused> {
        let out = self.outbound.clone();
        let len = text.len();
        out.queued.fetch_add(len, Ordering::Relaxed);
        out.queued
            .fetch_sub(std::mem::take(&mut self.len), Ordering::Relaxed);
        loop {
            let room = out.room();
            tokio::pin!(room);
            room.as_mut().enable();
            match out.tx.try_send(text) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(back)) => text = back,
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    out.queued.fetch_sub(len, Ordering::Relaxed);
                    return Err(Refused::Closed(back));
                }
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                out.queued.fetch_sub(len, Ordering::Relaxed);
                out.room.notify_waiters();
                return Err(Refused::Full(text));
            }
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if self.len > 0 {
            self.outbound.queued.fetch_sub(self.len, Ordering::Relaxed);
            self.outbound.room.notify_waiters();
        }
    }
}

/// Why [`Outbound::reserve`] holds no room.
#[derive(Debug, PartialEq, Eq)]
pub enum NoRoom {
    /// Still full at the deadline.
    Full,
    /// The socket is gone.
    Closed,
}

/// Why a message was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue holds its limit of messages or bytes.
    Full(Utf8Bytes),
    /// The socket is gone.
    Closed(Utf8Bytes),
}

impl Outbound {
    /// Queues `text` now, unless the queue is full or gone.
    ///
    /// # Errors
    /// [`Refused`], with the text.
    pub fn try_send(&self, text: Utf8Bytes) -> Result<(), Refused> {
        let len = text.len();
        if self.queued.load(Ordering::Relaxed) + len > self.max_bytes
            && self.queued.load(Ordering::Relaxed) > 0
        {
            return Err(Refused::Full(text));
        }
        self.queued.fetch_add(len, Ordering::Relaxed);
        self.tx.try_send(text).map_err(|e| {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            match e {
                mpsc::error::TrySendError::Full(text) => Refused::Full(text),
                mpsc::error::TrySendError::Closed(text) => Refused::Closed(text),
            }
        })
    }

    /// Queues `text` as soon as there is room in messages and bytes, waiting until
    /// `deadline` at most.
    ///
    /// # Errors
    /// [`Refused::Full`] at the deadline, [`Refused::Closed`] once the socket is gone; with
    /// the text.
    pub async fn send_until(
        &self,
        mut text: Utf8Bytes,
        deadline: tokio::time::Instant,
    ) -> Result<(), Refused> {
        loop {
            let room = self.room();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_send(text) {
                Err(Refused::Full(back)) => text = back,
                done => return done,
            }
            // A socket that goes away ends the wait at once: nothing waits for room that
            // can no longer come.
            tokio::select! {
                waited = tokio::time::timeout_at(deadline, room) => {
                    if waited.is_err() {
                        return Err(Refused::Full(text));
                    }
                }
                () = self.tx.closed() => return Err(Refused::Closed(text)),
            }
        }
    }

    /// Told when the writer next takes a message out (room again); `enable` it before
    /// trying, so that room made in between is not missed.
    pub fn room(&self) -> tokio::sync::futures::Notified<'_> {
        self.room.notified()
    }

    /// Resolves once the socket's writer is gone (it failed, or took longer than its
    /// deadline to write): nothing queued now reaches the runtime.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    /// Waits (until `deadline` at most) for `len` bytes of room and holds them for a message
    /// written later — an answer waiting for the homeserver — so that what waits outside the
    /// queue counts against its budget too. An empty queue always has room.
    ///
    /// # Errors
    /// [`NoRoom`]: still full at the deadline, or the socket is gone.
    pub async fn reserve(
        &self,
        len: usize,
        deadline: tokio::time::Instant,
    ) -> Result<Reserved, NoRoom> {
        loop {
            let room = self.room();
            tokio::pin!(room);
            room.as_mut().enable();
            if self.tx.is_closed() {
                return Err(NoRoom::Closed);
            }
            let queued = self.queued.load(Ordering::Relaxed);
            if queued == 0 || queued + len <= self.max_bytes {
                self.queued.fetch_add(len, Ordering::Relaxed);
                return Ok(Reserved {
                    outbound: self.clone(),
                    len,
                });
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return Err(NoRoom::Full);
            }
        }
    }

    /// A queue closed from the start (a peer node's stand-in connection, whose answers go
    /// back as HTTP responses or Matrix events): every send and reservation is refused at
    /// once as closed, so nothing is ever held or waited for in it. Nothing a peer may ask
    /// (it only routes) answers through it.
    pub fn detached() -> Outbound {
        channel(1, 1).0
    }
}

impl OutboundRx {
    /// The next message, waiting for one; `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<Utf8Bytes> {
        let text = self.rx.recv().await?;
        self.queued.fetch_sub(text.len(), Ordering::Relaxed);
        self.room.notify_waiters();
        Some(text)
    }

    /// The next message if one is queued.
    pub fn try_recv(&mut self) -> Option<Utf8Bytes> {
        let text = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(text.len(), Ordering::Relaxed);
        self.room.notify_waiters();
        Some(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Utf8Bytes {
        Utf8Bytes::from("x".repeat(n))
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_and_frees_what_is_read() {
        let (tx, mut rx) = channel(100, 10);
        assert!(tx.try_send(text(6)).is_ok());
        assert!(
            matches!(tx.try_send(text(6)), Err(Refused::Full(_))),
            "12 > 10 bytes"
        );
        assert!(tx.try_send(text(4)).is_ok());
        assert_eq!(rx.recv().await.map(|t| t.len()), Some(6));
        assert!(tx.try_send(text(6)).is_ok(), "read: room again");
        // A single message bigger than the budget still goes into an empty queue.
        let (big, _rx) = channel(10, 4);
        assert!(big.try_send(text(9)).is_ok());
        drop(rx);
        let (gone, rx) = channel(10, 10);
        drop(rx);
        assert!(matches!(gone.try_send(text(1)), Err(Refused::Closed(_))));
        drop(tx);
    }

    #[tokio::test]
    async fn a_sender_waits_for_room_until_its_deadline() {
        let (tx, mut rx) = channel(1, 1000);
        assert!(tx.try_send(text(1)).is_ok());
        let soon = tokio::time::Instant::now() + std::time::Duration::from_millis(20);
        assert!(matches!(
            tx.send_until(text(2), soon).await,
            Err(Refused::Full(_))
        ));
        let waiting = {
            let tx = tx.clone();
            let later = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
            tokio::spawn(async move { tx.send_until(text(3), later).await })
        };
        assert_eq!(rx.recv().await.map(|t| t.len()), Some(1));
        assert_eq!(waiting.await.ok(), Some(Ok(())), "room made: queued");
        assert_eq!(rx.recv().await.map(|t| t.len()), Some(3));
    }

    #[tokio::test]
    async fn reserved_room_counts_until_it_is_used_or_given_back() {
        let (tx, mut rx) = channel(100, 10);
        let soon = || tokio::time::Instant::now() + std::time::Duration::from_millis(20);
        let held = tx.reserve(8, soon()).await.expect("room");
        assert!(
            matches!(tx.try_send(text(4)), Err(Refused::Full(_))),
            "8 held + 4 > 10"
        );
        assert_eq!(tx.reserve(4, soon()).await.err(), Some(NoRoom::Full));
        held.send(text(6), soon())
            .await
            .expect("sent in the room held");
        assert!(tx.try_send(text(4)).is_ok(), "6 + 4 queued");
        let held = tx.reserve(1, soon()).await;
        assert_eq!(held.err(), Some(NoRoom::Full));
        assert_eq!(rx.recv().await.map(|t| t.len()), Some(6));
        let held = tx.reserve(6, soon()).await.expect("read: room again");
        drop(held);
        assert!(tx.try_send(text(6)).is_ok(), "given back unsent");
        drop(rx);
        assert_eq!(tx.reserve(1, soon()).await.err(), Some(NoRoom::Closed));
    }

    #[tokio::test]
    async fn a_waiting_sender_is_let_go_when_the_socket_goes() {
        let (tx, rx) = channel(1, 1000);
        assert!(tx.try_send(text(1)).is_ok());
        let waiting = {
            let tx = tx.clone();
            let later = tokio::time::Instant::now() + std::time::Duration::from_secs(3600);
            tokio::spawn(async move { tx.send_until(text(2), later).await })
        };
        tokio::task::yield_now().await;
        drop(rx);
        assert!(matches!(waiting.await, Ok(Err(Refused::Closed(_)))));
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_messages() {
        let (tx, _rx) = channel(1, 1000);
        assert!(tx.try_send(text(1)).is_ok());
        assert!(matches!(tx.try_send(text(1)), Err(Refused::Full(_))));
    }
}

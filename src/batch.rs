//! A thread of its own fed through a bounded queue, taking what is queued in batches: after
//! a batch it waits [`LINGER`] for more before it parks, and a sender wakes it (a system
//! call) only when it is parked — once per burst, not once per item. What the decision log
//! and the process log write goes through one each, so a deciding or logging thread never
//! waits on I/O, nor, but once per burst, on waking the writer.

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

/// How long the thread waits for more after a batch before it parks: under load it wakes
/// itself this often instead of being woken for every item.
pub const LINGER: Duration = Duration::from_millis(2);

/// The sending side. Dropping it ends the thread once it has handled what is queued.
pub struct Batched<T> {
    /// `None` once dropped.
    queue: Option<SyncSender<T>>,
    parked: Arc<AtomicBool>,
    thread: std::thread::Thread,
}

impl<T: Send + 'static> Batched<T> {
    /// Starts the thread `name`, which calls `handle` with every item in the order queued,
    /// and with `None` whenever the queue runs dry (to flush); at most `capacity` items wait.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn spawn(
        name: &str,
        capacity: usize,
        handle: impl FnMut(Option<T>) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (queue, rx) = sync_channel(capacity);
        let parked = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&parked);
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run(&rx, &flag, handle))?
            .thread()
            .clone();
        Ok(Self {
            queue: Some(queue),
            parked,
            thread,
        })
    }

    /// Queues `item`, or gives it back when the queue is full.
    pub fn send(&self, item: T) -> Result<(), T> {
        let Some(queue) = &self.queue else {
            return Err(item);
        };
        queue.try_send(item).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(item)
            | std::sync::mpsc::TrySendError::Disconnected(item) => item,
        })?;
        // Orders the queued item before reading the flag; the thread's fence pairs with it
        // (it sets the flag, then looks at the queue), so one of the two sees the other.
        fence(Ordering::SeqCst);
        if self.parked.load(Ordering::Relaxed) && self.parked.swap(false, Ordering::AcqRel) {
            self.thread.unpark();
        }
        Ok(())
    }

    /// Whether the thread is parked (idle, waiting to be woken).
    #[cfg(test)]
    pub fn is_parked(&self) -> bool {
        self.parked.load(Ordering::Acquire)
    }
}

impl<T> Drop for Batched<T> {
    fn drop(&mut self) {
        // Disconnects the queue, then wakes the thread to handle what is left and end.
        self.queue = None;
        self.thread.unpark();
    }
}

fn run<T>(rx: &Receiver<T>, parked: &AtomicBool, mut handle: impl FnMut(Option<T>)) {
    let mut lingered = false;
    let mut next = None;
    loop {
        match next.take().map_or_else(|| rx.try_recv(), Ok) {
            Ok(item) => {
                lingered = false;
                handle(Some(item));
            }
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {
                handle(None);
                if !lingered {
                    // More may come soon: take it as one batch, unwoken.
                    std::thread::sleep(LINGER);
                    lingered = true;
                    continue;
                }
                // Say so before the last look at the queue: an item queued after that look
                // sees the flag and unparks this thread (park returns at once if it did).
                parked.store(true, Ordering::Relaxed);
                fence(Ordering::SeqCst);
                match rx.try_recv() {
                    Err(TryRecvError::Empty) => std::thread::park(),
                    Err(TryRecvError::Disconnected) => break,
                    Ok(item) => next = Some(item),
                }
                parked.store(false, Ordering::Relaxed);
                lingered = false;
            }
        }
    }
    handle(None);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn within(what: impl Fn() -> bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !what() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        what()
    }

    #[test]
    fn every_queued_item_is_handled_in_order_after_idle_from_threads_and_at_drop() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handled = Arc::clone(&seen);
        let batched = Batched::spawn("t", 1 << 16, move |n: Option<u64>| {
            handled.lock().unwrap().extend(n)
        })
        .expect("spawn");
        let count = || seen.lock().unwrap().len();
        for n in 0..500 {
            batched.send(n).expect("room");
        }
        assert!(within(|| count() == 500));
        assert_eq!(*seen.lock().unwrap(), (0..500).collect::<Vec<_>>());
        // Idle: the thread parks, and the next item wakes it.
        assert!(within(|| batched.is_parked()), "the idle thread parks");
        batched.send(500).expect("room");
        assert!(within(|| count() == 501));
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| (0..1000).for_each(|n| batched.send(n).expect("room")));
            }
        });
        drop(batched);
        assert!(within(|| count() == 4501), "{}", count());
    }

    #[test]
    fn a_full_queue_gives_the_item_back() {
        let (unblock, blocked) = std::sync::mpsc::channel::<()>();
        let blocked = Mutex::new(blocked);
        let batched = Batched::spawn("t", 1, move |item: Option<u32>| {
            if item.is_some() {
                let _ = blocked.lock().unwrap().recv();
            }
        })
        .expect("spawn");
        // At most one item is being handled (stuck) and one waits; the rest do not fit.
        let refused = (0..10).filter(|&n| batched.send(n).is_err()).count();
        assert!(refused >= 8, "{refused}");
        drop(unblock);
    }
}

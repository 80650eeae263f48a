//! The threads policies are evaluated on: a fixed, bounded pool, so that evaluation never
//! runs on the async workers that serve sockets and HTTP (a burst of expensive decisions
//! slows the decisions, not the node), and every pool thread keeps its own prepared engine.
//!
//! Jobs wait in a bounded queue; a caller finding it full waits asynchronously, which slows
//! the callers (sockets, requests) down rather than growing memory — for a bounded time (past
//! it the caller is told the pool is busy: a failed decision, refused), and only so many
//! callers at once: one that finds every waiting place taken is told at once. So what waits,
//! each with its input, is at most the queue plus the waiters.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, Semaphore};

type Job = Box<dyn FnOnce() + Send>;

/// Why a job did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// The queue stayed full for as long as a caller may wait, or was full with every
    /// waiting place taken.
    #[error("the evaluation queue is full")]
    Busy,
    /// The threads are gone (the node is stopping).
    #[error("the evaluation threads are gone")]
    Gone,
}

/// A handle to the pool; the threads end when the last handle is dropped.
#[derive(Clone)]
pub struct EvalPool {
    jobs: mpsc::Sender<Job>,
    /// Longest wait for a place in the queue.
    max_wait: Duration,
    /// Places for callers waiting for a place in the full queue.
    waiters: Arc<Semaphore>,
}

impl EvalPool {
    /// `threads` evaluation threads (at least one) behind a queue of `queue` jobs, at most
    /// `waiters` callers waiting at most `max_wait` for a place in it.
    ///
    /// # Errors
    /// A thread could not be started.
    pub fn new(
        threads: usize,
        queue: usize,
        waiters: usize,
        max_wait: Duration,
    ) -> std::io::Result<EvalPool> {
        let (jobs, rx) = mpsc::channel::<Job>(queue.max(1));
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = std::sync::Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("msgnode-eval-{i}"))
                .spawn(move || loop {
                    // One thread waits for the next job at a time; the others run theirs.
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).blocking_recv();
                    match job {
                        Some(job) => job(),
                        None => return,
                    }
                })?;
        }
        Ok(EvalPool {
            jobs,
            max_wait,
            waiters: Arc::new(Semaphore::new(waiters)),
        })
    }

    /// Runs `work` on a pool thread and waits for its result.
    ///
    /// # Errors
    /// No place in the queue within the pool's wait, or none and no place to wait for one;
    /// or the pool is gone.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PoolError> {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(work());
        });
        let job = match self.jobs.try_send(job) {
            Ok(()) => return result.await.map_err(|_| PoolError::Gone),
            Err(TrySendError::Closed(_)) => return Err(PoolError::Gone),
            Err(TrySendError::Full(job)) => job,
        };
        // The queue is full: wait for a place, if there is a place to wait in.
        let Ok(_waiting) = self.waiters.try_acquire() else {
            return Err(PoolError::Busy);
        };
        match tokio::time::timeout(self.max_wait, self.jobs.send(job)).await {
            Err(_) => return Err(PoolError::Busy),
            Ok(Err(_)) => return Err(PoolError::Gone),
            Ok(Ok(())) => {}
        }
        result.await.map_err(|_| PoolError::Gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_the_pool_threads() {
        let pool = EvalPool::new(2, 4, 20, Duration::from_secs(5)).expect("pool");
        let name = pool
            .run(|| std::thread::current().name().map(str::to_string))
            .await
            .ok()
            .flatten();
        assert!(name.is_some_and(|n| n.starts_with("msgnode-eval-")));
        let sums =
            futures_util::future::join_all((0..20u64).map(|i| pool.run(move || i * 2))).await;
        assert_eq!(sums.into_iter().flatten().sum::<u64>(), 380);
    }

    #[tokio::test]
    async fn a_caller_waits_for_a_place_only_so_long() {
        let pool = EvalPool::new(1, 1, 4, Duration::from_millis(50)).expect("pool");
        let (release, held) = std::sync::mpsc::channel::<()>();
        let busy = pool.clone();
        // One job runs (and blocks), one waits in the queue: the next caller finds it full.
        let running = tokio::spawn(async move { busy.run(move || held.recv().ok()).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let queued = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(|| 1).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(pool.run(|| 2).await, Err(PoolError::Busy));
        release.send(()).expect("release");
        assert!(running.await.expect("join").is_ok());
        assert_eq!(queued.await.expect("join"), Ok(1));
    }

    /// Polls `future` once: whether it waits.
    fn pending<F: std::future::Future>(future: std::pin::Pin<&mut F>) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        future.poll(&mut cx).is_pending()
    }

    #[tokio::test]
    async fn callers_past_the_waiting_places_are_told_busy_at_once() {
        // Waits long enough that only the waiting places can answer `Busy` here.
        let pool = EvalPool::new(1, 1, 1, Duration::from_secs(3600)).expect("pool");
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, running_now) = oneshot::channel::<()>();
        let running = tokio::spawn({
            let pool = pool.clone();
            async move {
                pool.run(move || {
                    let _ = started.send(());
                    held.recv().ok()
                })
                .await
            }
        });
        running_now.await.expect("the first job runs");
        let mut queued = std::pin::pin!(pool.run(|| 1)); // the queue's one place, once polled
        assert!(pending(queued.as_mut()));
        let mut waiting = std::pin::pin!(pool.run(|| 2)); // the one waiting place
        assert!(pending(waiting.as_mut()));
        assert_eq!(pool.waiters.available_permits(), 0);
        assert_eq!(
            pool.run(|| 3).await,
            Err(PoolError::Busy),
            "no place to wait"
        );
        release.send(()).expect("release");
        assert!(running.await.expect("join").is_ok());
        assert_eq!(queued.await, Ok(1));
        assert_eq!(waiting.await, Ok(2));
        assert_eq!(
            pool.waiters.available_permits(),
            1,
            "the place is free again"
        );
    }
}

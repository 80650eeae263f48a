//! The threads policies are evaluated on: a fixed, bounded pool, so that evaluation never
//! runs on the async workers that serve sockets and HTTP (a burst of expensive decisions
//! slows the decisions, not the node), and every pool thread keeps its own prepared engine.
//!
//! Jobs wait in a bounded queue; a caller finding it full waits asynchronously, which slows
//! the callers (sockets, requests) down rather than growing memory.

use tokio::sync::{mpsc, oneshot};

type Job = Box<dyn FnOnce() + Send>;

/// A handle to the pool; the threads end when the last handle is dropped.
#[derive(Clone)]
pub struct EvalPool {
    jobs: mpsc::Sender<Job>,
}

impl EvalPool {
    /// `threads` evaluation threads (at least one) behind a queue of `queue` jobs.
    ///
    /// # Errors
    /// A thread could not be started.
    pub fn new(threads: usize, queue: usize) -> std::io::Result<EvalPool> {
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
        Ok(EvalPool { jobs })
    }

    /// Runs `work` on a pool thread and waits for its result; `None` when the pool is gone.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(work());
        });
        self.jobs.send(job).await.ok()?;
        result.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_the_pool_threads() {
        let pool = EvalPool::new(2, 4).expect("pool");
        let name = pool
            .run(|| std::thread::current().name().map(str::to_string))
            .await
            .flatten();
        assert!(name.is_some_and(|n| n.starts_with("msgnode-eval-")));
        let sums =
            futures_util::future::join_all((0..20u64).map(|i| pool.run(move || i * 2))).await;
        assert_eq!(sums.into_iter().flatten().sum::<u64>(), 380);
    }
}

//! The bus's housekeeping, every [`REVISION_POLL`]: re-deciding every subscription when a
//! new policy revision is active; noting whether the history is too far behind to accept
//! more messages; and, now and then, releasing runtimes away longer than
//! `[bus] away_release_after` and forgetting the rate-limit state of idle principals.
//!
//! A revision is never kept waiting by the reaper (N12 of the third review, M5 of the
//! fourth): the reaper's work is cut into *steps* — a release (the tombstone written, the
//! inbox discarded; registry entries kept), or the removal of at most [`REGISTRY_CHUNK`] of
//! a released runtime's registry entries — and a poll takes at most [`REAP_STEPS`] of them,
//! none once a new revision is active, which is re-decided first. So a mass expiry, or one
//! runtime with a thousand registry entries, delays a revocation by one step, not by
//! thousands of homeserver writes. The runtimes due are collected once per round and worked
//! through with a cursor: each is reached once per round, a failing one is left for the next
//! round (not retried at every poll), and the table is not scanned again while they last.
//! One task does both, one after the other, so a revocation's record write never races a
//! release of the same runtime.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Bus;
use crate::pdp::Pdp;

/// How often the bus checks for a new policy revision to re-decide subscriptions.
const REVISION_POLL: Duration = Duration::from_millis(100);
/// Runtimes away too long are looked for every this many polls (~10 s).
const REAP_EVERY_TICKS: u64 = 100;
/// Most reaping steps per poll; while more are due, the next poll goes on.
const REAP_STEPS: usize = 8;
/// Most registry entries of a released runtime removed in one step.
const REGISTRY_CHUNK: usize = 16;

/// One step of reaping a due runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Release it (registry entries kept).
    Release,
    /// Remove some of its registry entries (it is released).
    Unregister,
}

/// What the reaper works on: the bus (a fake in the tests).
trait Reap {
    /// A due runtime.
    type Due: Clone;
    /// The runtimes due now: one scan of the table, once per round.
    fn due(&self) -> Vec<Self::Due>;
    /// What is left to do with `due` now (`None`: nothing, or it is back or gone).
    fn step(&self, due: &Self::Due) -> Option<Step>;
    /// Releases `due`, its registry entries kept.
    async fn release(&self, due: &Self::Due) -> Result<(), String>;
    /// Removes at most `at_most` of `due`'s registry entries.
    async fn unregister(&self, due: &Self::Due, at_most: usize) -> Result<(), String>;
}

/// One round of the reaper: the runtimes due when it began, not reached yet (the first is
/// the cursor's).
struct Round<T>(std::collections::VecDeque<T>);

impl<T: Clone> Round<T> {
    /// Works on the round: at most [`REAP_STEPS`] steps, and none once `revised`. Whether
    /// the round goes on (the next poll takes the next steps).
    async fn work<R: Reap<Due = T>>(&mut self, reap: &R, revised: impl Fn() -> bool) -> bool {
        let mut steps = 0;
        while let Some(due) = self.0.front().cloned() {
            if steps == REAP_STEPS || revised() {
                return true;
            }
            let Some(step) = reap.step(&due) else {
                self.0.pop_front();
                continue;
            };
            steps += 1;
            match step {
                Step::Release => {
                    if let Err(e) = reap.release(&due).await {
                        // The homeserver is in trouble: the rest wait for the next round.
                        tracing::warn!(%e, "cannot release a runtime away too long; will retry");
                        self.0.clear();
                        return false;
                    }
                }
                Step::Unregister => {
                    if let Err(e) = reap.unregister(&due, REGISTRY_CHUNK).await {
                        // Left for the next round (the others are still reached in this one),
                        // so a refusing homeserver is not asked again at every poll.
                        tracing::warn!(%e, "a released runtime's registry entries could not all be removed; will retry");
                        self.0.pop_front();
                    }
                }
            }
        }
        false
    }
}

impl Bus {
    /// Runs the housekeeping until `shutdown`.
    pub(super) async fn maintain(self, shutdown: CancellationToken) {
        let generation = |pdp: &Pdp| pdp.active().map(|a| a.generation);
        let mut seen = generation(&self.inner.policy.pdp);
        let mut ticks: u64 = 0;
        let mut round = Round(std::collections::VecDeque::new());
        // Look for long-away runtimes every ~10 s, or twice per grace period when shorter.
        let reap_every =
            (self.inner.config.away_release_after.as_millis() / REVISION_POLL.as_millis() / 2)
                .clamp(1, u128::from(REAP_EVERY_TICKS)) as u64;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(REVISION_POLL) => {}
            }
            ticks += 1;
            let now = generation(&self.inner.policy.pdp);
            if now != seen {
                seen = now;
                self.revalidate().await;
            }
            let revised = || generation(&self.inner.policy.pdp) != seen;
            let lag = self.inner.persistence.journal.stats().lag;
            let behind = lag > self.inner.config.max_history_backlog;
            if behind != self.inner.history_behind.swap(behind, Ordering::Relaxed) {
                if behind {
                    tracing::warn!(
                        lag,
                        "history is behind; refusing new messages until the homeserver catches up"
                    );
                } else {
                    tracing::info!(lag, "history caught up; accepting messages again");
                }
            }
            if round.0.is_empty() && ticks.is_multiple_of(reap_every) {
                round.0 = self.due().into();
            }
            if !round.0.is_empty() && !round.work(&self, revised).await {
                round.0.clear();
            }
            if ticks.is_multiple_of(REAP_EVERY_TICKS) {
                self.inner.rate.forget_idle();
                self.inner.handshakes.forget_idle();
            }
        }
    }
}

/// The reaper's runtimes: those no socket has held for `[bus] away_release_after` (also one
/// released by its own goodbye that still has registry entries: they go now).
impl Reap for Bus {
    type Due = std::sync::Arc<super::runtimes::Runtime>;

    fn due(&self) -> Vec<Self::Due> {
        let mut due = self.inner.table.runtimes();
        due.retain(|runtime| self.step(runtime).is_some());
        due
    }

    fn step(&self, runtime: &Self::Due) -> Option<Step> {
        let current = self.inner.table.get_runtime(&runtime.url);
        if !current.is_some_and(|c| std::sync::Arc::ptr_eq(&c, runtime))
            || runtime
                .away_for()
                .is_none_or(|away| away < self.inner.config.away_release_after)
            || self.held_elsewhere(runtime)
        {
            return None; // gone, back, or another replica's to reap
        }
        let registered = self
            .inner
            .connectors
            .builtin_registry
            .as_ref()
            .is_some_and(|r| r.registered_by(std::slice::from_ref(&runtime.url)) > 0);
        match runtime.with_record(|r| r.released) {
            false => Some(Step::Release),
            true => registered.then_some(Step::Unregister),
        }
    }

    async fn release(&self, runtime: &Self::Due) -> Result<(), String> {
        self.release_runtime(runtime)
            .await
            .map_err(|e| format!("{}: {e}", runtime.url))?;
        let limit = self.inner.config.away_release_after;
        tracing::info!(runtime = %runtime.url, ?limit, "runtime away too long: released");
        Ok(())
    }

    async fn unregister(&self, runtime: &Self::Due, at_most: usize) -> Result<(), String> {
        let Some(registry) = &self.inner.connectors.builtin_registry else {
            return Ok(());
        };
        registry
            .remove_runtime(&runtime.url, at_most)
            .await
            .map(|_| ())
            .map_err(|e| format!("{}: {e}", runtime.url))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    use super::*;

    /// Due runtimes (each with its registry entries), and what was done to them, in order.
    #[derive(Default)]
    struct FakeReap {
        runtimes: Mutex<Vec<(bool, usize)>>, // released, entries left
        events: Mutex<Vec<String>>,
        /// A registry put that fails, always.
        refusing: bool,
        /// Set by the registry put with this number (a new revision is active then).
        revise_at: Option<usize>,
        revised: AtomicBool,
    }

    impl FakeReap {
        fn with(runtimes: usize, entries: usize) -> Self {
            Self {
                runtimes: Mutex::new(vec![(false, entries); runtimes]),
                ..Self::default()
            }
        }

        fn event(&self, event: String) {
            self.events.lock().expect("events").push(event);
        }

        fn events(&self) -> Vec<String> {
            self.events.lock().expect("events").clone()
        }

        fn puts(&self) -> usize {
            self.events()
                .iter()
                .filter(|e| e.starts_with("put"))
                .count()
        }
    }

    impl Reap for FakeReap {
        type Due = usize;

        fn due(&self) -> Vec<usize> {
            (0..self.runtimes.lock().expect("runtimes").len()).collect()
        }

        fn step(&self, due: &usize) -> Option<Step> {
            match self.runtimes.lock().expect("runtimes")[*due] {
                (false, _) => Some(Step::Release),
                (true, 0) => None,
                (true, _) => Some(Step::Unregister),
            }
        }

        async fn release(&self, due: &usize) -> Result<(), String> {
            self.event(format!("release {due}"));
            self.runtimes.lock().expect("runtimes")[*due].0 = true;
            Ok(())
        }

        async fn unregister(&self, due: &usize, at_most: usize) -> Result<(), String> {
            for _ in 0..at_most {
                if self.runtimes.lock().expect("runtimes")[*due].1 == 0 {
                    break;
                }
                // A slow homeserver: every put is a turn of the runtime.
                tokio::task::yield_now().await;
                self.event(format!("put {due}"));
                if self.revise_at == Some(self.puts()) {
                    self.revised.store(true, Ordering::SeqCst);
                }
                if self.refusing {
                    return Err("refused".into());
                }
                self.runtimes.lock().expect("runtimes")[*due].1 -= 1;
            }
            Ok(())
        }
    }

    /// M5 (fourth review): one release was up to 1,000 registry writes in a row, and a new
    /// revision waited for all of them. A revision that becomes active during a runtime's
    /// registry removal is re-decided after that chunk at most: the reaper gives way with
    /// the release still in progress, and goes on after the revocation.
    #[tokio::test]
    async fn a_revocation_waits_for_one_chunk_of_a_big_release_at_most() {
        let reap = FakeReap {
            revise_at: Some(REGISTRY_CHUNK + 3),
            ..FakeReap::with(1, 1_000)
        };
        let mut round = Round(reap.due().into());
        let revised = || reap.revised.load(Ordering::SeqCst);
        assert!(round.work(&reap, revised).await, "the release goes on");
        // What the maintaining task does next: the revision is re-decided, then the reap
        // goes on.
        reap.event("revalidate".into());
        reap.revised.store(false, Ordering::SeqCst);
        while round.work(&reap, || false).await {}
        let events = reap.events();
        let revalidated = events
            .iter()
            .position(|e| e == "revalidate")
            .expect("revalidated");
        let revised_at = events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.starts_with("put"))
            .nth(REGISTRY_CHUNK + 2)
            .map(|(at, _)| at)
            .expect("the put the revision came at");
        assert!(
            revalidated - revised_at <= REGISTRY_CHUNK,
            "{} registry writes after the revision before it was re-decided",
            revalidated - revised_at - 1
        );
        assert!(
            revalidated < events.len() - 1,
            "while the release was in progress"
        );
        assert_eq!(events[0], "release 0");
        assert_eq!(reap.puts(), 1_000, "every entry removed in the end");
        assert!(reap.step(&0).is_none());
    }

    /// M5: a registry whose writes fail left the same first runtimes released again at every
    /// poll, and the others never reached. Each due runtime is tried once per round now.
    #[tokio::test]
    async fn a_refusing_registry_is_asked_once_per_runtime_per_round() {
        let reap = FakeReap {
            refusing: true,
            ..FakeReap::with(9, 3)
        };
        let mut round = Round(reap.due().into());
        let mut polls = 0;
        while round.work(&reap, || false).await {
            polls += 1;
            assert!(polls < 100, "the round ends");
        }
        let events = reap.events();
        for n in 0..9 {
            let released = events
                .iter()
                .filter(|e| **e == format!("release {n}"))
                .count();
            let puts = events.iter().filter(|e| **e == format!("put {n}")).count();
            assert_eq!((released, puts), (1, 1), "runtime {n}: {events:?}");
        }
        // The next round tries each again, once.
        let mut round = Round(reap.due().into());
        while round.work(&reap, || false).await {}
        assert_eq!(reap.puts(), 18);
        assert!(
            reap.events()
                .iter()
                .filter(|e| e.starts_with("release"))
                .count()
                == 9
        );
    }
}

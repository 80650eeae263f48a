//! The bus's housekeeping, every [`REVISION_POLL`]: re-deciding every subscription when a
//! new policy revision is active; noting whether the history is too far behind to accept
//! more messages; and, now and then, releasing runtimes away longer than
//! `[bus] away_release_after` and forgetting the rate-limit state of idle principals.
//!
//! A revision is never kept waiting by the reaper (N12 of the third review): the reaper
//! releases at most [`REAP_BATCH`] runtimes per poll (the rest at the next poll), and stops
//! early when a new revision is active, which is re-decided first. So a mass expiry (a
//! principal's thousands of runtimes away together) delays a revocation by one release,
//! not by thousands of homeserver writes. One task does both, one after the other, so a
//! revocation's record write never races a release of the same runtime.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Bus;
use crate::pdp::Pdp;

/// How often the bus checks for a new policy revision to re-decide subscriptions.
const REVISION_POLL: Duration = Duration::from_millis(100);
/// Runtimes away too long are looked for every this many polls (~10 s).
const REAP_EVERY_TICKS: u64 = 100;
/// Most runtimes released per poll; while more are due, the next poll releases the next ones.
const REAP_BATCH: usize = 8;

impl Bus {
    /// Runs the housekeeping until `shutdown`.
    pub(super) async fn maintain(self, shutdown: CancellationToken) {
        let generation = |pdp: &Pdp| pdp.active().map(|a| a.generation);
        let mut seen = generation(&self.inner.policy.pdp);
        let mut ticks: u64 = 0;
        let mut more_due = false;
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
            if more_due || ticks.is_multiple_of(reap_every) {
                more_due = self.release_long_away(revised).await;
            }
            if ticks.is_multiple_of(REAP_EVERY_TICKS) {
                self.inner.rate.forget_idle();
                self.inner.handshakes.forget_idle();
            }
        }
    }

    /// Releases runtimes that no socket has held for `[bus] away_release_after` (also one
    /// released by its own goodbye that still has registry entries: they go now): at most
    /// [`REAP_BATCH`], and none once `revised` (a new revision waits to be re-decided);
    /// whether some may be left (`false` too after a release failed: the next round retries).
    async fn release_long_away(&self, revised: impl Fn() -> bool) -> bool {
        let limit = self.inner.config.away_release_after;
        let registry = self.inner.connectors.builtin_registry.as_ref();
        let mut released = 0;
        for runtime in self.inner.table.runtimes() {
            if released == REAP_BATCH || revised() {
                return true;
            }
            let registered = || {
                registry.is_some_and(|r| r.registered_by(std::slice::from_ref(&runtime.url)) > 0)
            };
            let pending = !runtime.with_record(|r| r.released) || registered();
            if runtime.away_for().is_some_and(|away| away >= limit)
                && pending
                && !self.held_elsewhere(&runtime)
            {
                released += 1;
                match self.release_runtime(&runtime, false).await {
                    // Its registry entries could not all be removed (only logged by the
                    // release): like a failed release, the rest wait for the next round, so
                    // a refusing homeserver is not asked again at every poll.
                    Ok(()) if registered() => {
                        tracing::warn!(runtime = %runtime.url, "a released runtime's registry entries could not all be removed; will retry");
                        return false;
                    }
                    Ok(()) => {
                        tracing::info!(runtime = %runtime.url, ?limit, "runtime away too long: released")
                    }
                    Err(e) => {
                        // The homeserver is in trouble: the rest wait for the next round.
                        tracing::warn!(%e, runtime = %runtime.url, "cannot release a runtime away too long; will retry");
                        return false;
                    }
                }
            }
        }
        false
    }
}

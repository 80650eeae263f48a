//! Retry delays: exponential backoff with random jitter (backon), one shape for every loop
//! that waits for the homeserver, a peer or a bundle server to come back.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// The backoff policy from `min` doubling up to `max`, with jitter, retrying forever: what
/// `backon::Retryable::retry` takes (add `with_max_times` to bound it).
pub fn policy(min: Duration, max: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
}

/// The delays of [`policy`] for loops that retry by hand (a queue to keep, a shutdown to
/// watch): [`Backoff::next_delay`] after a failure, [`Backoff::reset`] after a success.
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
    failing: bool,
}

impl Backoff {
    /// Delays from `min`, doubling up to `max`, with jitter.
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = policy(min, max);
        Self {
            delays: builder.build(),
            builder,
            max,
            failing: false,
        }
    }

    /// After a failure: how long to wait, and whether it is the first failure since the
    /// last success (log that one loudly, the repeats quietly).
    pub fn failure(&mut self) -> (Duration, bool) {
        let first = !self.failing;
        self.failing = true;
        (self.next_delay(), first)
    }

    /// After a success: starts over; whether it ended a run of failures (worth saying).
    pub fn success(&mut self) -> bool {
        let recovered = self.failing;
        self.failing = false;
        self.reset();
        recovered
    }

    /// How long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        std::iter::Iterator::next(&mut self.delays).unwrap_or(self.max)
    }

    /// Starts over from the shortest delay (after a success).
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_maximum_and_start_over_after_a_reset() {
        let (min, max) = (Duration::from_millis(10), Duration::from_millis(80));
        let mut backoff = Backoff::new(min, max);
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        // Jitter adds up to as much again on top of each step.
        assert!(delays[0] >= min && delays[0] <= min * 2, "{delays:?}");
        assert!(delays.iter().all(|d| *d <= max * 2), "{delays:?}");
        assert!(delays[7] >= max, "{delays:?}");
        backoff.reset();
        assert!(backoff.next_delay() <= min * 2);
    }

    #[test]
    fn the_first_failure_and_the_recovery_are_told_apart() {
        let mut backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(4));
        assert!(!backoff.success(), "nothing to recover from");
        assert!(backoff.failure().1, "first failure");
        assert!(!backoff.failure().1, "a repeat");
        assert!(backoff.success(), "recovered");
        assert!(backoff.failure().1, "first again");
    }
}

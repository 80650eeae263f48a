//! Rate limits keyed by who asks (a principal, a client address): token buckets
//! (`governor`), one per key, forgotten once idle. What is over its limit is told when to
//! retry; the edges answer 429 with that (`Retry-After`, `retry_after_ms`, reTHINK 429).

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::RateLimit;

/// A keyed rate limiter; off when the configured rate is 0.
pub struct Limiter {
    buckets: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
    /// Tokens per second.
    rate: u32,
}

impl Limiter {
    /// A limiter of `limit` per key.
    pub fn new(limit: &RateLimit) -> Self {
        let buckets = NonZeroU32::new(limit.per_second).map(|rate| {
            let burst = NonZeroU32::new(limit.burst).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Self {
            buckets,
            clock: DefaultClock::default(),
            rate: limit.per_second,
        }
    }

    /// Takes one token of `key`'s bucket.
    ///
    /// # Errors
    /// How long to wait before the next one would be granted.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        let Some(buckets) = &self.buckets else {
            return Ok(());
        };
        buckets
            .check_key(&key.to_string())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Takes `n` tokens of `key`'s bucket at once (none when `n` is 0). More than a burst
    /// holds is never granted: the wait is then as long as `n` tokens take to accrue.
    ///
    /// # Errors
    /// How long to wait before `n` would be granted.
    pub fn check_n(&self, key: &str, n: usize) -> Result<(), Duration> {
        let Some(buckets) = &self.buckets else {
            return Ok(());
        };
        let Some(wanted) = NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)) else {
            return Ok(());
        };
        match buckets.check_key_n(&key.to_string(), wanted) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(self.clock.now())),
            Err(_insufficient) => Err(Duration::from_secs_f64(
                f64::from(wanted.get()) / f64::from(self.rate.max(1)),
            )),
        }
    }

    /// Forgets the buckets of keys that have been idle long enough to be full again (call
    /// now and then: keys are principals and addresses, unbounded over time).
    pub fn forget_idle(&self) {
        if let Some(buckets) = &self.buckets {
            buckets.retain_recent();
            buckets.shrink_to_fit();
        }
    }
}

/// Whole milliseconds to wait, rounded up (what clients are told).
pub fn millis(wait: Duration) -> u64 {
    u64::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_gets_its_burst_then_waits() {
        let limiter = Limiter::new(&RateLimit::new(1, 3));
        for _ in 0..3 {
            assert!(limiter.check("a").is_ok());
        }
        let wait = limiter.check("a").expect_err("over");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(limiter.check("b").is_ok(), "another key has its own bucket");
        assert!(millis(Duration::from_micros(1)) == 1);
    }

    #[test]
    fn many_tokens_at_once_are_taken_together() {
        let limiter = Limiter::new(&RateLimit::new(10, 20));
        assert!(limiter.check_n("a", 15).is_ok());
        assert!(limiter.check_n("a", 15).is_err(), "5 left");
        assert!(limiter.check_n("a", 0).is_ok());
        assert!(
            limiter.check_n("b", 21).expect_err("over the burst") >= Duration::from_secs(2),
            "more than a burst waits as long as the tokens take"
        );
        assert!(Limiter::new(&RateLimit::new(0, 0))
            .check_n("a", 1_000_000)
            .is_ok());
    }

    #[test]
    fn a_zero_rate_is_no_limit() {
        let limiter = Limiter::new(&RateLimit::new(0, 0));
        assert!((0..10_000).all(|_| limiter.check("a").is_ok()));
    }
}

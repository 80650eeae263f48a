//! Helpers shared by the integration tests (each test binary uses some of them).
#![allow(dead_code)]

pub mod stub;
pub mod synapse;

use std::time::{Duration, Instant};

/// Polls `done` until it holds and returns how long that took; panics naming `what` when it
/// does not hold within `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut done: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < within {
        if done().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within {within:?}");
}

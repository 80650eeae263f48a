//! The figures every benchmark prints: latency quantiles and rates of one case.

use std::time::Duration;

/// Latencies and throughput of one case.
pub(crate) struct Stats {
    /// One entry per completed request.
    pub(crate) latencies_ns: Vec<u64>,
    /// Wall time of the case.
    pub(crate) elapsed: Duration,
}

impl Stats {
    /// p50 and p99, in nanoseconds (0 when nothing completed).
    pub(crate) fn quantiles(&mut self) -> (u64, u64) {
        self.latencies_ns.sort_unstable();
        let n = self.latencies_ns.len();
        let pick = |q: f64| match n {
            0 => 0,
            _ => self.latencies_ns[((n as f64 * q) as usize).min(n - 1)],
        };
        (pick(0.50), pick(0.99))
    }

    /// Prints one row: name, threads (or clients), p50, p99, rate.
    pub(crate) fn print(self, name: &str, threads: usize) {
        self.print_with(name, threads, "");
    }

    /// [`Stats::print`], then `cpu_ns` (CPU time the working threads used) per request.
    pub(crate) fn print_with_cpu(self, name: &str, threads: usize, cpu_ns: u64) {
        let n = self.latencies_ns.len().max(1) as u64;
        self.print_with(name, threads, &format!(" {:>10}", micros(cpu_ns / n)));
    }

    fn print_with(mut self, name: &str, threads: usize, extra: &str) {
        let (p50, p99) = self.quantiles();
        let rate = self.latencies_ns.len() as f64 / self.elapsed.as_secs_f64();
        println!(
            "{:<26} {:>8} {:>10} {:>10} {:>14.0}{extra}",
            name,
            threads,
            micros(p50),
            micros(p99),
            rate
        );
    }
}

pub(crate) fn micros(ns: u64) -> String {
    if ns >= 10_000_000 {
        format!("{:.1} ms", ns as f64 / 1e6)
    } else {
        format!("{:.1} µs", ns as f64 / 1000.0)
    }
}

/// This thread's CPU time so far, in nanoseconds (0 where the kernel does not say).
pub(crate) fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// The 1-, 5- and 15-minute load averages, as `uptime` shows them.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

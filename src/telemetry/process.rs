//! Metrics about the process itself: `msgnode_build_info` and, read from `/proc` at each
//! scrape, CPU time, resident and virtual memory, open and maximum file descriptors,
//! threads and start time (`msgnode_process_*`, the standard process metrics under the
//! node's prefix). Elsewhere than Linux only the build info is reported.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use crate::version;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    commit: &'static str,
    regorus: &'static str,
    ruma: &'static str,
}

/// Registers `build_info` and the process collector in `registry`.
pub fn register(registry: &mut Registry) {
    let build = Family::<BuildLabels, Gauge>::default();
    build
        .get_or_create(&BuildLabels {
            version: version::VERSION,
            commit: version::GIT_COMMIT,
            regorus: version::REGORUS,
            ruma: version::RUMA,
        })
        .set(1);
    registry.register(
        "build_info",
        "What this binary is (value 1): msgnode version, git commit, regorus and ruma versions",
        build,
    );
    registry.register_collector(Box::new(ProcessCollector));
}

/// Reads `/proc/self` on every scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(sample) = Sample::read() else {
            return Ok(());
        };
        let counter = |encoder: &mut DescriptorEncoder, name, help, value: f64| {
            let metric = ConstCounter::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
        };
        let gauge = |encoder: &mut DescriptorEncoder, name, help, value: f64| {
            let metric = ConstGauge::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
        };
        counter(
            &mut encoder,
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds",
            sample.cpu_seconds,
        )?;
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size, in bytes",
            sample.rss_bytes,
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size, in bytes",
            sample.vsize_bytes,
        )?;
        gauge(
            &mut encoder,
            "process_open_fds",
            "Open file descriptors",
            sample.open_fds,
        )?;
        gauge(
            &mut encoder,
            "process_max_fds",
            "Most open file descriptors allowed",
            sample.max_fds,
        )?;
        gauge(
            &mut encoder,
            "process_threads",
            "Operating-system threads",
            sample.threads,
        )?;
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time since the Unix epoch, in seconds",
            sample.start_time,
        )?;
        Ok(())
    }
}

/// One reading of the process's figures.
struct Sample {
    cpu_seconds: f64,
    rss_bytes: f64,
    vsize_bytes: f64,
    open_fds: f64,
    max_fds: f64,
    threads: f64,
    start_time: f64,
}

impl Sample {
    fn read() -> Option<Sample> {
        let me = procfs::process::Process::myself().ok()?;
        let stat = me.stat().ok()?;
        let ticks = procfs::ticks_per_second() as f64;
        let page = procfs::page_size() as f64;
        let boot = procfs::boot_time_secs().ok()? as f64;
        let max_fds = me
            .limits()
            .ok()
            .and_then(|l| match l.max_open_files.soft_limit {
                procfs::process::LimitValue::Value(v) => Some(v as f64),
                procfs::process::LimitValue::Unlimited => None,
            })
            .unwrap_or(f64::INFINITY);
        Some(Sample {
            cpu_seconds: (stat.utime + stat.stime) as f64 / ticks,
            rss_bytes: stat.rss as f64 * page,
            vsize_bytes: stat.vsize as f64,
            open_fds: me.fd_count().ok()? as f64,
            max_fds,
            threads: stat.num_threads as f64,
            start_time: boot + stat.starttime as f64 / ticks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_and_process_figures_are_exported() {
        let mut registry = Registry::with_prefix("msgnode");
        register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains("msgnode_build_info{version=\""), "{text}");
        for series in [
            "msgnode_process_cpu_seconds_total ",
            "msgnode_process_resident_memory_bytes ",
            "msgnode_process_open_fds ",
            "msgnode_process_max_fds ",
            "msgnode_process_start_time_seconds ",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
        let rss: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("msgnode_process_resident_memory_bytes "))
            .and_then(|v| v.parse().ok())
            .expect("rss");
        assert!(rss > 0.0);
    }
}

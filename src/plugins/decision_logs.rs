//! Shipping decision records to an HTTP collector, as OPA's decision-log plugin does.
//!
//! [`UploadSink`] is a `DecisionSink`: the PDP hands it every record (masked and cut short
//! already) and it only appends it, serialised, to a buffer bounded in records
//! (`max_buffer`) and in bytes ([`BUFFER_BYTES`]) — past either the oldest records are dropped
//! and counted — so decisions never wait on the network. One task takes up to `max_batch`
//! records at a time — when the batch is full or `flush_interval` has passed — and POSTs them
//! as a gzip-compressed JSON array (`Content-Encoding: gzip`). A failed upload is retried with
//! backoff and the batch is kept; at shutdown (or when SIGHUP replaces the sink) what is
//! buffered is sent once more, then given up and counted.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flate2::write::GzEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::PluginError;
use crate::config::DecisionUploadConfig;
use crate::pdp::decision_log::{DecisionRecord, DecisionSink};

/// Bytes of serialised records the buffer holds at most.
pub const BUFFER_BYTES: usize = 64 * 1024 * 1024;

/// Serialised records waiting to be sent, and their size.
#[derive(Default)]
struct Buffer {
    records: VecDeque<Vec<u8>>,
    bytes: usize,
}
use crate::retry::Backoff;

/// Counters of the uploader, registered once and shared by every sink SIGHUP makes.
#[derive(Clone, Default)]
pub struct UploadMetrics {
    uploaded: Counter,
    dropped: Counter,
    failures: Counter,
}

impl UploadMetrics {
    /// Registers the counters (`msgnode_pdp_decision_log_upload_*`).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "pdp_decision_log_uploaded",
            "Decision records accepted by the upload endpoint",
            metrics.uploaded.clone(),
        );
        registry.register(
            "pdp_decision_log_upload_dropped",
            "Decision records dropped before upload: buffer full, or given up at shutdown",
            metrics.dropped.clone(),
        );
        registry.register(
            "pdp_decision_log_upload_failures",
            "Failed (retried) uploads of a batch",
            metrics.failures.clone(),
        );
        metrics
    }
}

struct Shared {
    buffer: Mutex<Buffer>,
    wake: Notify,
    closed: CancellationToken,
    max_buffer: usize,
    max_batch: usize,
    metrics: UploadMetrics,
}

/// The PDP's side of the uploader.
pub struct UploadSink {
    shared: Arc<Shared>,
}

impl Drop for UploadSink {
    fn drop(&mut self) {
        // Replaced (SIGHUP) or shut down: the task sends what is left and stops.
        self.shared.closed.cancel();
    }
}

impl DecisionSink for UploadSink {
    fn log(&self, record: DecisionRecord) {
        let Ok(json) = serde_json::to_vec(&record) else {
            self.shared.metrics.dropped.inc();
            return;
        };
        let full = {
            let mut buffer = self.shared.buffer.lock().unwrap_or_else(|p| p.into_inner());
            while !buffer.records.is_empty()
                && (buffer.records.len() >= self.shared.max_buffer
                    || buffer.bytes + json.len() > BUFFER_BYTES)
            {
                if let Some(oldest) = buffer.records.pop_front() {
                    buffer.bytes -= oldest.len();
                }
                self.shared.metrics.dropped.inc();
            }
            buffer.bytes += json.len();
            buffer.records.push_back(json);
            buffer.records.len() >= self.shared.max_batch
        };
        if full {
            self.shared.wake.notify_one();
        }
    }
}

/// Starts uploading to `config.url` (records come masked and cut short: `Redacted`).
///
/// # Errors
/// An unusable URL or HTTP client.
pub fn start(
    config: &DecisionUploadConfig,
    metrics: UploadMetrics,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Result<UploadSink, PluginError> {
    super::require_http_url("[pdp.decision_log.upload] url", &config.url)?;
    let client = reqwest::Client::builder()
        .connect_timeout(config.timeout)
        .timeout(config.timeout)
        .build()?;
    let shared = Arc::new(Shared {
        buffer: Mutex::new(Buffer::default()),
        wake: Notify::new(),
        closed: CancellationToken::new(),
        max_buffer: config.max_buffer.max(1),
        max_batch: config.max_batch.max(1),
        metrics,
    });
    let uploader = Uploader {
        shared: Arc::clone(&shared),
        client,
        url: config.url.clone(),
        token: config.token.clone(),
        flush_interval: config.flush_interval,
    };
    tracker.spawn(uploader.run(shutdown));
    Ok(UploadSink { shared })
}

struct Uploader {
    shared: Arc<Shared>,
    client: reqwest::Client,
    url: String,
    token: Option<String>,
    flush_interval: Duration,
}

impl Uploader {
    async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut batch: Vec<Vec<u8>> = Vec::new();
        loop {
            let stopping = shutdown.is_cancelled() || self.shared.closed.is_cancelled();
            if batch.is_empty() {
                batch = self.take();
            }
            if batch.is_empty() {
                if stopping {
                    return;
                }
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = self.shared.closed.cancelled() => {}
                    () = self.shared.wake.notified() => {}
                    () = tokio::time::sleep(self.flush_interval) => {}
                }
                continue;
            }
            match self.upload(&batch).await {
                Ok(()) => {
                    self.shared.metrics.uploaded.inc_by(batch.len() as u64);
                    batch.clear();
                    if backoff.success() {
                        tracing::info!(url = %self.url, "decision-log upload works again");
                    }
                }
                Err(error) => {
                    self.shared.metrics.failures.inc();
                    if stopping {
                        let lost = batch.len() + self.buffered();
                        self.shared.metrics.dropped.inc_by(lost as u64);
                        tracing::error!(url = %self.url, %error, lost, "decision-log upload failed at shutdown; records given up");
                        return;
                    }
                    let (delay, first) = backoff.failure();
                    match first {
                        true => {
                            tracing::warn!(url = %self.url, %error, retry_in = ?delay, "decision-log upload failed; retrying")
                        }
                        false => {
                            tracing::debug!(url = %self.url, %error, retry_in = ?delay, "decision-log upload failed again")
                        }
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = self.shared.closed.cancelled() => {}
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    fn buffered(&self) -> usize {
        self.shared
            .buffer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .records
            .len()
    }

    /// Up to a batch of records.
    fn take(&self) -> Vec<Vec<u8>> {
        let mut buffer = self.shared.buffer.lock().unwrap_or_else(|p| p.into_inner());
        let n = buffer.records.len().min(self.shared.max_batch);
        let batch: Vec<Vec<u8>> = buffer.records.drain(..n).collect();
        buffer.bytes -= batch.iter().map(Vec::len).sum::<usize>();
        batch
    }

    async fn upload(&self, batch: &[Vec<u8>]) -> Result<(), String> {
        let mut json = Vec::with_capacity(batch.iter().map(|r| r.len() + 1).sum::<usize>() + 2);
        json.push(b'[');
        for (i, record) in batch.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            json.extend_from_slice(record);
        }
        json.push(b']');
        let mut gzip = GzEncoder::new(Vec::new(), flate2::Compression::default());
        gzip.write_all(&json).map_err(|e| e.to_string())?;
        let body = gzip.finish().map_err(|e| e.to_string())?;
        let mut request = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| e.to_string())?;
        match response.status().is_success() {
            true => Ok(()),
            false => Err(format!("the endpoint answered {}", response.status())),
        }
    }
}

//! STUB (replaced by the bus-store branch): the node's history of routed messages.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// History writer.
#[derive(Clone, Default)]
pub struct Journal {
    seq: Arc<AtomicU64>,
}

/// Journal failure.
#[derive(Debug, thiserror::Error)]
#[error("journal unavailable")]
pub struct JournalError;

impl Journal {
    /// Memory only.
    pub fn memory() -> Journal {
        Journal::default()
    }
    /// Records one message.
    pub fn record(&self, _message_json: &str, _to: Vec<String>) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }
    /// Records and waits until stored.
    pub async fn record_persisted(
        &self,
        message_json: &str,
        to: Vec<String>,
    ) -> Result<u64, JournalError> {
        Ok(self.record(message_json, to))
    }
    /// Waits for everything recorded.
    pub async fn flush(&self) {}
}

/// Batching settings.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JournalConfig {}

impl Journal {
    /// Starts.
    pub async fn start(
        _actor: Arc<crate::pep::actor::Actor>,
        _config: JournalConfig,
        _shutdown: tokio_util::sync::CancellationToken,
        _tracker: &tokio_util::task::TaskTracker,
    ) -> Result<Journal, crate::pep::actor::ActorError> {
        Ok(Journal::memory())
    }
}

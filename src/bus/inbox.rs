//! STUB (replaced by the bus-store branch): messages for runtimes that are not connected.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::pep::actor::ActorError;

/// Offline store.
#[derive(Clone, Default)]
pub struct Inbox {
    queues: Arc<Mutex<HashMap<String, Vec<String>>>>,
}

/// Messages taken for delivery.
pub struct Taken {
    /// Raw JSON texts in order.
    pub messages: Vec<String>,
    /// Highest sequence number taken.
    pub upto: u64,
}

impl Inbox {
    /// Memory only.
    pub fn memory() -> Inbox {
        Inbox::default()
    }
    /// Queues one message.
    pub fn push(&self, runtime: &str, message_json: &str) {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(runtime.to_string())
            .or_default()
            .push(message_json.to_string());
    }
    /// Everything queued.
    pub async fn take(&self, runtime: &str) -> Result<Taken, ActorError> {
        let messages = self
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(runtime)
            .cloned()
            .unwrap_or_default();
        Ok(Taken {
            upto: messages.len() as u64,
            messages,
        })
    }
    /// Delivered.
    pub async fn ack(&self, runtime: &str, taken: &Taken) -> Result<(), ActorError> {
        if let Some(q) = self
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(runtime)
        {
            q.drain(..taken.messages.len().min(q.len()));
        }
        Ok(())
    }
}

impl Inbox {
    /// Starts.
    pub fn new(
        _actor: Arc<crate::pep::actor::Actor>,
        _shutdown: tokio_util::sync::CancellationToken,
        _tracker: &tokio_util::task::TaskTracker,
    ) -> Inbox {
        Inbox::memory()
    }
}

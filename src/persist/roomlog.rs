//! Rooms as logs: sending batch events in order until stored, paging through them, and
//! finding where a writer's sequence continues — what the journal and the inboxes share.
//!
//! Sends are retried with backoff (logged and counted in [`Counters`]) until stored; after
//! shutdown a writer keeps trying for its grace period, then gives up (logged with the number
//! of messages lost). Every send has a transaction id derived from the batch (see
//! `persist::batch::txn_id`), so a retry never stores an event twice.

use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::batch::{decode_batch, redo_compressed, txn_id, DecodedBatch, EncodedEvent};
use crate::matrix::{Actor, ActorError};
use crate::retry::Backoff;

/// Where a writer counts its sends (Prometheus counters, so they can be registered).
#[derive(Clone, Default)]
pub(crate) struct Counters {
    pub events_sent: Counter,
    pub bytes_sent: Counter,
    pub send_failures: Counter,
    pub lost: Counter,
}

impl Counters {
    /// Registers the counters as `<prefix>_events_sent` etc.
    pub fn register(&self, registry: &mut Registry, prefix: &str, what: &str) {
        registry.register(
            format!("{prefix}_events_sent"),
            format!("Batch events of {what} sent to the homeserver"),
            self.events_sent.clone(),
        );
        registry.register(
            format!("{prefix}_event_bytes_sent"),
            format!("Bytes of batch event content of {what} sent"),
            self.bytes_sent.clone(),
        );
        registry.register(
            format!("{prefix}_send_failures"),
            format!("Failed (retried) batch sends of {what}"),
            self.send_failures.clone(),
        );
        registry.register(
            format!("{prefix}_lost"),
            format!("Messages of {what} given up on at shutdown"),
            self.lost.clone(),
        );
    }
}

/// Sends `events` in order as `user`, each retried with backoff until stored; false when
/// given up (`shutdown_grace` after shutdown). A plain event refused as bad JSON (Synapse's
/// canonical JSON forbids floats) is sent compressed instead.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn send_batches(
    actor: &Actor,
    user: &str,
    room: &str,
    event_type: &str,
    txn_prefix: &str,
    events: Vec<EncodedEvent>,
    shutdown: &CancellationToken,
    shutdown_grace: Duration,
    counters: &Counters,
) -> bool {
    let mut queue: std::collections::VecDeque<EncodedEvent> = events.into();
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    let mut give_up_at: Option<Instant> = None;
    while let Some(event) = queue.pop_front() {
        let content: Value = match serde_json::from_str(&event.content) {
            Ok(content) => content,
            Err(error) => {
                // Cannot happen for what encode_batch makes; never loop on it.
                tracing::error!(%error, first_seq = event.first_seq, "batch content is not JSON");
                return false;
            }
        };
        let txn = txn_id(txn_prefix, &event);
        match actor
            .send_event(user, room, event_type, &txn, &content)
            .await
        {
            Ok(_) => {
                counters.events_sent.inc();
                counters.bytes_sent.inc_by(event.content.len() as u64);
                backoff.reset();
            }
            Err(error) if !event.compressed && error.errcode() == Some("M_BAD_JSON") => {
                tracing::debug!(
                    first_seq = event.first_seq,
                    "plain batch refused as non-canonical JSON; compressing"
                );
                match redo_compressed(&event) {
                    Ok(again) => {
                        for e in again.into_iter().rev() {
                            queue.push_front(e);
                        }
                    }
                    Err(why) => {
                        tracing::error!(%why, "cannot re-encode a refused batch");
                        return false;
                    }
                }
            }
            Err(error) => {
                counters.send_failures.inc();
                let delay = backoff.next_delay();
                tracing::warn!(%error, first_seq = event.first_seq, count = event.count, retry_in = ?delay, "batch send failed; retrying");
                if shutdown.is_cancelled() {
                    let at = *give_up_at.get_or_insert_with(|| Instant::now() + shutdown_grace);
                    if Instant::now() >= at {
                        let lost: u64 = event.count + queue.iter().map(|e| e.count).sum::<u64>();
                        tracing::error!(
                            lost,
                            first_seq = event.first_seq,
                            "giving up storing batches after shutdown"
                        );
                        return false;
                    }
                }
                queue.push_front(event);
                tokio::time::sleep(delay).await;
            }
        }
    }
    true
}

/// Pages through the room's batch events of `event_type`, oldest first (`from: None`) and
/// hands each decoded batch to `each` until it returns false.
pub(crate) async fn for_each_batch(
    actor: &Actor,
    room: &str,
    event_type: &str,
    from: Option<String>,
    mut each: impl FnMut(DecodedBatch) -> Result<bool, ActorError>,
) -> Result<(), ActorError> {
    let filter = json!({"types": [event_type]});
    let sender = actor.sender().to_string();
    let mut token = from;
    loop {
        let (events, next) = actor
            .messages_filtered(&sender, room, token.as_deref(), false, 100, Some(&filter))
            .await?;
        for event in &events {
            if event.get("type").and_then(Value::as_str) != Some(event_type) {
                continue;
            }
            let content = event.get("content").cloned().unwrap_or(Value::Null);
            if content.as_object().is_none_or(|c| c.is_empty()) {
                continue; // redacted
            }
            let batch = decode_batch(&content).map_err(ActorError::Malformed)?;
            if !each(batch)? {
                return Ok(());
            }
        }
        match next {
            Some(next) => token = Some(next),
            None => return Ok(()),
        }
    }
}

/// The sequence number after the highest of the batches of `event_type` whose header fields
/// have the given values, from the newest events back (`None` for a room without such
/// batches). Looks at the newest few such batches, as concurrent sends may have reordered the
/// last ones.
pub(crate) async fn recover_next_seq(
    actor: &Actor,
    room: &str,
    event_type: &str,
    header: &[(&str, &str)],
) -> Result<Option<u64>, ActorError> {
    let filter = json!({"types": [event_type]});
    let sender = actor.sender().to_string();
    let mut token: Option<String> = None;
    let mut best: Option<u64> = None;
    let mut seen = 0;
    loop {
        let (events, next) = actor
            .messages_filtered(&sender, room, token.as_deref(), true, 20, Some(&filter))
            .await?;
        for event in &events {
            let content = &event["content"];
            if event["type"] != event_type
                || header
                    .iter()
                    .any(|(field, value)| content[*field] != *value)
            {
                continue;
            }
            if let (Some(first), Some(count)) =
                (content["first_seq"].as_u64(), content["count"].as_u64())
            {
                best = best.max(Some(first + count));
                seen += 1;
            }
        }
        if seen >= 4 {
            return Ok(best);
        }
        match next {
            Some(next) => token = Some(next),
            None => return Ok(best),
        }
    }
}

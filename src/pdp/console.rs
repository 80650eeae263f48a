//! What the console shows of live decisions: [`ConsoleFeed`], a [`DecisionSink`] placed
//! *inside* the decision log's `Redacted` (so it only ever sees masked, cut records), keeps
//! the recent ones in a ring bounded in count and bytes, counts them per time bucket, kind
//! and result (both closed sets: [`kind_label`], so an HTTP client's odd `input.kind` is
//! `other`), and broadcasts each to the open tails (bounded in number, overall and per
//! client address). Nothing here blocks the deciding
//! thread: the ring and the counts are short critical sections, and the broadcast never
//! waits — a tail that falls behind loses the oldest entries it has not read (it is told how
//! many). The HTTP side is `pdp::api::console`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;

use super::decision_log::{DecisionRecord, DecisionSink};
use super::metrics::Outcome;
use super::shadow::kind_label;
use crate::config::ConsoleConfig;

/// Entries a tail may fall behind by before it loses the oldest.
pub const TAIL_LAG: usize = 256;
/// Width of one bucket of the counts, in seconds.
pub const BUCKET_SECONDS: u64 = 10;
/// Buckets kept (with [`BUCKET_SECONDS`]: the last hour).
pub const BUCKETS: usize = 360;

/// One decision as the console shows it (masked as the decision log is).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Shown {
    /// The decision id.
    pub decision_id: String,
    /// When (RFC 3339).
    pub timestamp: String,
    /// The data path.
    pub path: String,
    /// `input.kind`.
    pub kind: String,
    /// The user the input is about (`subject.user`, or the Matrix sender).
    pub user: String,
    /// Addresses in the input (from, to, resource, claimed address, room).
    pub addresses: Vec<String>,
    /// `allow`, `deny`, `undefined`, `value` or `error`.
    pub result: String,
    /// The decision's reasons, or the error.
    pub reasons: Vec<String>,
    /// Which part of the node asked.
    pub enforcement_point: String,
    /// The revision that decided.
    pub revision: String,
    /// The input, masked.
    pub input: Option<Value>,
    /// The masked fields, as JSON pointers.
    pub erased: Vec<String>,
}

impl Shown {
    fn of(record: &DecisionRecord) -> Self {
        let input = record.input.as_ref();
        let text = |pointer: &str| {
            input
                .and_then(|i| i.pointer(pointer))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let mut addresses = Vec::new();
        for pointer in [
            "/message/from",
            "/message/to",
            "/subscription/resource",
            "/claim/address",
            "/matrix/room_id",
        ] {
            match input.and_then(|i| i.pointer(pointer)) {
                Some(Value::String(a)) => addresses.push(a.clone()),
                Some(Value::Array(items)) => {
                    addresses.extend(items.iter().filter_map(Value::as_str).map(str::to_string))
                }
                _ => {}
            }
        }
        let result = match &record.error {
            Some(_) => "error",
            None => match Outcome::of(record.result.as_ref()) {
                Outcome::Allow => "allow",
                Outcome::Deny => "deny",
                Outcome::Undefined => "undefined",
                Outcome::Value => "value",
                Outcome::Error => "error",
            },
        };
        let reasons = match &record.error {
            Some(error) => vec![error.message.clone()],
            None => record
                .result
                .as_ref()
                .map(super::shadow::reasons_of)
                .unwrap_or_default(),
        };
        Self {
            decision_id: record.decision_id.clone(),
            timestamp: humantime::format_rfc3339_millis(record.timestamp).to_string(),
            path: record.path.clone(),
            kind: text("/kind").unwrap_or_default(),
            user: text("/subject/user")
                .or_else(|| text("/matrix/sender"))
                .unwrap_or_default(),
            addresses,
            result: result.to_string(),
            reasons,
            enforcement_point: serde_json::to_value(record.enforcement_point)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            revision: record
                .bundles
                .values()
                .next()
                .map(|b| b.revision.clone())
                .unwrap_or_default(),
            input: record.input.clone(),
            erased: record.erased.clone(),
        }
    }
}

/// A decision in the ring: what filters read, and its JSON for the page.
#[derive(Debug)]
pub struct Entry {
    /// What filters read (the input is dropped: it is in `json`).
    pub shown: Shown,
    /// The whole [`Shown`], serialised once.
    pub json: String,
}

/// What a tail asks for; every field set must match (text fields: case-insensitive
/// substrings, `decision_id`: exact).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Filter {
    /// `allow`, `deny` (or `error`, `undefined`).
    pub result: Option<String>,
    /// `input.kind`.
    pub kind: Option<String>,
    /// Part of the user.
    pub user: Option<String>,
    /// Part of any address.
    pub address: Option<String>,
    /// Part of any reason.
    pub reason: Option<String>,
    /// The decision id.
    pub decision_id: Option<String>,
}

/// A filter field that is set (not empty).
fn set(field: &Option<String>) -> Option<&str> {
    field.as_deref().map(str::trim).filter(|f| !f.is_empty())
}

impl Filter {
    /// Whether `shown` passes.
    pub fn matches(&self, shown: &Shown) -> bool {
        let has = |text: &str, part: &str| text.to_lowercase().contains(&part.to_lowercase());
        set(&self.result).is_none_or(|r| shown.result.eq_ignore_ascii_case(r))
            && set(&self.kind).is_none_or(|k| shown.kind.eq_ignore_ascii_case(k))
            && set(&self.user).is_none_or(|u| has(&shown.user, u))
            && set(&self.address).is_none_or(|a| shown.addresses.iter().any(|x| has(x, a)))
            && set(&self.reason).is_none_or(|r| shown.reasons.iter().any(|x| has(x, r)))
            && set(&self.decision_id).is_none_or(|d| shown.decision_id == d)
    }
}

#[derive(Default)]
struct Ring {
    entries: VecDeque<Arc<Entry>>,
    bytes: usize,
}

/// Decisions counted in one bucket, by `kind/result`.
#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    /// Start of the bucket, seconds since the Unix epoch.
    pub start: u64,
    /// Counts by `kind/result` (closed sets: at most 7 × 5 keys).
    pub counts: BTreeMap<String, u64>,
}

/// The console's view of live decisions. See the module docs.
pub struct ConsoleFeed {
    ring: Mutex<Ring>,
    counts: Mutex<VecDeque<Bucket>>,
    tail: broadcast::Sender<Arc<Entry>>,
    subscribers: Arc<AtomicUsize>,
    /// Open tails per client address.
    per_client: Arc<PerClient>,
    max_entries: usize,
    max_bytes: usize,
    max_subscribers: usize,
    max_per_client: usize,
}

/// Open tails by client address.
type PerClient = Mutex<HashMap<IpAddr, usize>>;

/// An open tail; dropping it frees its place.
pub struct Subscription {
    /// Entries as they come; `Lagged(n)` when the tail lost `n`.
    pub receiver: broadcast::Receiver<Arc<Entry>>,
    count: Arc<AtomicUsize>,
    client: Option<(IpAddr, Arc<PerClient>)>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        if let Some((ip, per_client)) = &self.client {
            let mut per_client = per_client.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = per_client.get_mut(ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per_client.remove(ip);
                }
            }
        }
    }
}

/// Why a tail was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TailRefused {
    /// `[console] max_subscribers` tails are open.
    #[error("too many open tails ([console] max_subscribers)")]
    Full,
    /// This client holds `[console] max_subscribers_per_client` already.
    #[error("too many open tails from this address ([console] max_subscribers_per_client)")]
    ClientFull,
}

impl ConsoleFeed {
    /// A feed with `[console]`'s bounds.
    pub fn new(config: &ConsoleConfig) -> Self {
        Self {
            ring: Mutex::new(Ring::default()),
            counts: Mutex::new(VecDeque::new()),
            tail: broadcast::channel(TAIL_LAG).0,
            subscribers: Arc::new(AtomicUsize::new(0)),
            per_client: Arc::default(),
            max_entries: config.recent_decisions,
            max_bytes: config.recent_bytes,
            max_subscribers: config.max_subscribers,
            max_per_client: config.max_subscribers_per_client,
        }
    }

    /// Opens a tail for `client`, unless `max_subscribers` are open, or that many from it.
    ///
    /// # Errors
    /// Which bound is reached.
    pub fn subscribe(&self, client: Option<IpAddr>) -> Result<Subscription, TailRefused> {
        self.subscribers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_subscribers).then_some(n + 1)
            })
            .map_err(|_| TailRefused::Full)?;
        // From here on, dropping it gives the places back.
        let mut subscription = Subscription {
            receiver: self.tail.subscribe(),
            count: Arc::clone(&self.subscribers),
            client: None,
        };
        if let Some(ip) = client {
            let mut per_client = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
            let n = per_client.entry(ip).or_default();
            if *n >= self.max_per_client {
                if *n == 0 {
                    per_client.remove(&ip);
                }
                return Err(TailRefused::ClientFull);
            }
            *n += 1;
            subscription.client = Some((ip, Arc::clone(&self.per_client)));
        }
        Ok(subscription)
    }

    /// The most recent entries that pass `filter`, newest first, at most `limit`.
    pub fn recent(&self, filter: &Filter, limit: usize) -> Vec<Arc<Entry>> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.entries
            .iter()
            .rev()
            .filter(|e| filter.matches(&e.shown))
            .take(limit)
            .cloned()
            .collect()
    }

    /// The entry of `decision_id`, if it is still in the ring.
    pub fn find(&self, decision_id: &str) -> Option<Arc<Entry>> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.entries
            .iter()
            .rev()
            .find(|e| e.shown.decision_id == decision_id)
            .cloned()
    }

    /// The counts, oldest bucket first.
    pub fn counts(&self) -> Vec<Bucket> {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.iter().cloned().collect()
    }

    fn count(&self, shown: &Shown, at: SystemTime) {
        let seconds = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let start = seconds - seconds % BUCKET_SECONDS;
        let key = format!("{}/{}", kind_label(&shown.kind), shown.result);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        match counts.back_mut() {
            Some(last) if last.start == start => {}
            Some(last) if last.start > start => {
                // A clock step back: count it in the newest bucket.
                *last.counts.entry(key).or_default() += 1;
                return;
            }
            _ => {
                counts.push_back(Bucket {
                    start,
                    counts: BTreeMap::new(),
                });
                while counts.len() > BUCKETS {
                    counts.pop_front();
                }
            }
        }
        if let Some(last) = counts.back_mut() {
            *last.counts.entry(key).or_default() += 1;
        }
    }
}

impl DecisionSink for ConsoleFeed {
    fn log(&self, record: DecisionRecord) {
        let mut shown = Shown::of(&record);
        self.count(&shown, record.timestamp);
        let Ok(json) = serde_json::to_string(&shown) else {
            return;
        };
        shown.input = None;
        let entry = Arc::new(Entry { shown, json });
        {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            ring.bytes += entry.json.len();
            ring.entries.push_back(Arc::clone(&entry));
            while ring.entries.len() > self.max_entries || ring.bytes > self.max_bytes {
                match ring.entries.pop_front() {
                    Some(old) => ring.bytes -= old.json.len(),
                    None => break,
                }
            }
        }
        // No tail open is not an error.
        let _ = self.tail.send(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdp::decision_log::{bundles, EnforcementPoint, Mask, RecordMetrics, Redacted, Tee};
    use serde_json::json;

    fn record(id: &str, input: Value, allow: bool) -> DecisionRecord {
        DecisionRecord {
            labels: Arc::default(),
            decision_id: id.into(),
            bundles: bundles("policies", "r1"),
            timestamp: SystemTime::now(),
            path: "msgnode/authz/decision".into(),
            input: Some(input),
            result: Some(
                json!({"allow": allow, "reasons": if allow { vec![] } else { vec!["blocked"] }}),
            ),
            error: None,
            requested_by: "bus".into(),
            enforcement_point: EnforcementPoint::Bus,
            metrics: RecordMetrics {
                timer_rego_query_eval_ns: 1,
                counter_decision_cache_hit: 0,
            },
            erased: vec![],
        }
    }

    #[test]
    fn the_feed_sees_masked_records_filters_and_stays_bounded() {
        let config = ConsoleConfig {
            recent_decisions: 3,
            ..ConsoleConfig::default()
        };
        let feed = Arc::new(ConsoleFeed::new(&config));
        let sink = Redacted::new(
            Mask::new(&[], &["*token*".into()]),
            Tee(vec![Arc::clone(&feed) as Arc<dyn DecisionSink>]),
        );
        let mut tail = feed.subscribe(None).expect("a tail");
        let input = |user: &str| json!({"kind": "message", "subject": {"user": user}, "message": {"from": "hyperty://a/1", "to": ["hyperty://b/2"], "body": {"idToken": "secret-1"}}});
        sink.log(record("d1", input("@alice:x"), true));
        sink.log(record("d2", input("@bob:x"), false));
        let first = tail.receiver.try_recv().expect("live");
        assert!(!first.json.contains("secret-1"), "{}", first.json);
        assert_eq!(first.shown.addresses, ["hyperty://a/1", "hyperty://b/2"]);
        let denied = Filter {
            result: Some("deny".into()),
            ..Filter::default()
        };
        let ids = |entries: Vec<Arc<Entry>>| -> Vec<String> {
            entries
                .iter()
                .map(|e| e.shown.decision_id.clone())
                .collect()
        };
        assert_eq!(ids(feed.recent(&denied, 10)), ["d2"]);
        let by_address = Filter {
            address: Some("B/2".into()),
            user: Some("alice".into()),
            ..Filter::default()
        };
        assert_eq!(ids(feed.recent(&by_address, 10)), ["d1"]);
        for i in 3..10 {
            sink.log(record(&format!("d{i}"), input("@carol:x"), true));
        }
        assert_eq!(ids(feed.recent(&Filter::default(), 10)), ["d9", "d8", "d7"]);
        assert!(feed.find("d1").is_none());
        let total: u64 = feed.counts().iter().flat_map(|b| b.counts.values()).sum();
        assert_eq!(total, 9);
    }

    /// Finding 9 of the console review: one client may not take every tail.
    #[test]
    fn one_client_holds_at_most_its_share_of_tails() {
        let config = ConsoleConfig {
            max_subscribers: 3,
            max_subscribers_per_client: 2,
            ..ConsoleConfig::default()
        };
        let feed = ConsoleFeed::new(&config);
        let (mallory, alice): (IpAddr, IpAddr) = (
            "10.0.0.66".parse().expect("ip"),
            "10.0.0.1".parse().expect("ip"),
        );
        let held: Vec<_> = (0..2)
            .map(|_| feed.subscribe(Some(mallory)).expect("two"))
            .collect();
        assert_eq!(
            feed.subscribe(Some(mallory)).err(),
            Some(TailRefused::ClientFull)
        );
        let alices = feed
            .subscribe(Some(alice))
            .expect("another client still gets one");
        assert_eq!(feed.subscribe(Some(alice)).err(), Some(TailRefused::Full));
        drop(alices);
        drop(held);
        assert!(feed.per_client.lock().expect("lock").is_empty());
        assert_eq!(feed.subscribers.load(Ordering::Acquire), 0);
    }

    /// Finding 5 of the console review: fresh kinds do not grow the counts.
    #[test]
    fn counts_are_keyed_by_a_closed_set() {
        let feed = ConsoleFeed::new(&ConsoleConfig::default());
        for i in 0..500 {
            let kind = format!("kind-{i}-{}", "k".repeat(1000));
            feed.log(record(&format!("d{i}"), json!({ "kind": kind }), true));
        }
        feed.log(record("m", json!({"kind": "message"}), false));
        let keys: Vec<String> = feed
            .counts()
            .iter()
            .flat_map(|b| b.counts.keys().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(keys, ["message/deny", "other/allow"]);
    }

    #[test]
    fn tails_are_bounded_and_a_slow_one_loses_the_oldest() {
        let config = ConsoleConfig {
            max_subscribers: 1,
            ..ConsoleConfig::default()
        };
        let feed = ConsoleFeed::new(&config);
        let mut tail = feed.subscribe(None).expect("one");
        assert_eq!(
            feed.subscribe(None).err(),
            Some(TailRefused::Full),
            "the second is refused"
        );
        for i in 0..TAIL_LAG + 10 {
            feed.log(record(&format!("d{i}"), json!({"kind": "claim"}), true));
        }
        assert!(matches!(
            tail.receiver.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(10))
        ));
        drop(tail);
        assert!(
            feed.subscribe(None).is_ok(),
            "a closed tail frees its place"
        );
    }
}

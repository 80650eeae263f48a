//! Decision log: one JSON line per decision, in OPA's decision-log shape, with configurable
//! masking of input fields (identity assertions and tokens are masked by default), and
//! strings longer than [`MAX_FIELD_BYTES`] or arrays longer than [`MAX_ITEMS`] cut short, so
//! one huge request cannot make a huge log line.
//!
//! The PDP gets a [`DecisionSink`] injected and calls it on every exit path (allow, deny,
//! undefined, error, timeout, cache hit, schema violation). [`JsonLinesSink`] hands records
//! to a writer thread through a bounded queue, so the hot path never waits on I/O (nor, but once
//! per burst, on waking the writer, which takes records in batches); when the
//! queue is full the record is dropped and counted (`msgnode_pdp_decision_log_dropped_total`),
//! as OPA's log plugin does, rather than slowing decisions down. [`Tee`] gives every record
//! to several sinks (the file and an uploader); [`SwappableSink`] lets SIGHUP replace the
//! sinks without restarting.
//!
//! A record has OPA's fields — `decision_id`, `path` (`msgnode/authz/decision`), `input`,
//! `result`, `error`, `bundles.{name}.revision`, `requested_by`, `labels`, `timestamp`,
//! `metrics`, `erased` — plus `enforcement_point`: which part of the node asked.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::batch::Batched;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use serde_json::Value;

/// Which part of the node asked for a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EnforcementPoint {
    /// An HTTP client of the PDP API (`POST /v1/data/…`): another node, OPA's clients, curl.
    HttpApi,
    /// The Matrix client-server proxy.
    Proxy,
    /// The application service (events the homeserver pushes).
    Appservice,
    /// The reTHINK message bus.
    Bus,
    /// The Matrix policy server (events checked for the homeserver).
    PolicyServer,
}

/// Who asked: the enforcement point and, over HTTP, the client's address.
#[derive(Debug, Clone, Copy)]
pub struct AskedBy {
    /// The enforcement point.
    pub point: EnforcementPoint,
    /// The HTTP client, when the request came over the API.
    pub peer: Option<SocketAddr>,
}

impl AskedBy {
    /// An in-process enforcement point.
    pub fn point(point: EnforcementPoint) -> Self {
        Self { point, peer: None }
    }

    /// An HTTP client of the PDP API at `peer`.
    pub fn http(peer: Option<SocketAddr>) -> Self {
        Self {
            point: EnforcementPoint::HttpApi,
            peer,
        }
    }

    /// OPA's `requested_by`: the client's address, or the enforcement point in-process.
    pub fn requested_by(&self) -> String {
        match self.peer {
            Some(peer) => peer.to_string(),
            None => match serde_json::to_value(self.point) {
                Ok(Value::String(name)) => name,
                _ => String::new(),
            },
        }
    }
}

/// An error in a record (OPA logs the error object).
#[derive(Debug, Clone, Serialize)]
pub struct RecordError {
    /// OPA's error code (`internal_error`, `invalid_parameter`).
    pub code: &'static str,
    /// What went wrong.
    pub message: String,
}

/// Timers and counters of one decision, named as OPA names them.
#[derive(Debug, Clone, Serialize)]
pub struct RecordMetrics {
    /// Evaluation time in nanoseconds (lookup time on a cache hit).
    pub timer_rego_query_eval_ns: u64,
    /// 1 when the result came from the decision cache (msgnode extension).
    pub counter_decision_cache_hit: u64,
}

/// One bundle's entry in `bundles`.
#[derive(Debug, Clone, Serialize)]
pub struct BundleRevision {
    /// The revision the decision was made with.
    pub revision: String,
}

/// `bundles` of a record made with `revision` of bundle `name`.
pub fn bundles(name: &str, revision: &str) -> BTreeMap<String, BundleRevision> {
    BTreeMap::from([(
        name.to_string(),
        BundleRevision {
            revision: revision.to_string(),
        },
    )])
}

/// What is logged about one decision.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord {
    /// Labels of this node (`id`, `version`, and `[pdp.decision_log] labels`).
    pub labels: Arc<BTreeMap<String, String>>,
    /// Unique id, also returned to the caller.
    pub decision_id: String,
    /// Bundle revisions the decision was made with, by bundle name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub bundles: BTreeMap<String, BundleRevision>,
    /// The data path, e.g. `msgnode/authz/decision`.
    pub path: String,
    /// The input document (masked before it is written).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// The result; absent when undefined or on error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error, when evaluation failed, timed out or the input was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<RecordError>,
    /// OPA's `requested_by`: the HTTP client's address, or the enforcement point.
    pub requested_by: String,
    /// Which part of the node asked.
    pub enforcement_point: EnforcementPoint,
    /// When the decision was made (RFC 3339).
    #[serde(serialize_with = "rfc3339")]
    pub timestamp: SystemTime,
    /// Timers and counters.
    pub metrics: RecordMetrics,
    /// Input fields replaced by the mask, as JSON pointers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub erased: Vec<String>,
}

/// Serialises a time as RFC 3339 with microseconds.
pub(crate) fn rfc3339<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*time))
}

/// Receives every decision. Implementations must not block.
pub trait DecisionSink: Send + Sync {
    /// Records one decision.
    fn log(&self, record: DecisionRecord);
    /// Whether records are wanted at all (lets the PDP skip building them).
    fn enabled(&self) -> bool {
        true
    }
}

/// Discards everything (decision logging switched off).
pub struct NullSink;

impl DecisionSink for NullSink {
    fn log(&self, _record: DecisionRecord) {}
    fn enabled(&self) -> bool {
        false
    }
}

/// Gives every record to each of its sinks.
pub struct Tee(pub Vec<Arc<dyn DecisionSink>>);

impl DecisionSink for Tee {
    fn log(&self, record: DecisionRecord) {
        let mut sinks = self.0.iter().filter(|s| s.enabled()).peekable();
        while let Some(sink) = sinks.next() {
            match sinks.peek() {
                Some(_) => sink.log(record.clone()),
                None => return sink.log(record),
            }
        }
    }
    fn enabled(&self) -> bool {
        self.0.iter().any(|s| s.enabled())
    }
}

/// A sink that can be replaced while the PDP runs (SIGHUP: new output, mask or uploader).
pub struct SwappableSink(ArcSwap<Box<dyn DecisionSink>>);

impl SwappableSink {
    /// Starts with `sink`.
    pub fn new(sink: Box<dyn DecisionSink>) -> Self {
        Self(ArcSwap::from_pointee(sink))
    }

    /// Replaces the sink; records already queued by the old one are still written.
    pub fn replace(&self, sink: Box<dyn DecisionSink>) {
        self.0.store(Arc::new(sink));
    }
}

impl DecisionSink for SwappableSink {
    fn log(&self, record: DecisionRecord) {
        self.0.load().log(record);
    }
    fn enabled(&self) -> bool {
        self.0.load().enabled()
    }
}

/// Input fields to mask, compiled once: exact paths, and key names anywhere in the input.
#[derive(Debug, Clone, Default)]
pub struct Mask {
    /// The masked paths below the input: each as its JSON pointer (what `erased` says) and
    /// its key names, walked without building a string per look-up.
    pointers: Vec<(String, Vec<String>)>,
    /// Lower-case key-name patterns, `*` matching any run of characters.
    keys: Vec<String>,
    /// Bytes of the shortest pattern without its stars.
    shortest_key: usize,
}

impl Mask {
    /// Dotted `paths` below `input` (`message.body.value`; a leading `input.` is allowed) and
    /// key-name patterns `keys` matched anywhere, case-insensitively (`*token*`).
    pub fn new(paths: &[String], keys: &[String]) -> Self {
        let keys: Vec<String> = keys.iter().map(|k| k.to_lowercase()).collect();
        Self {
            pointers: paths
                .iter()
                .map(|m| {
                    let names: Vec<String> = m
                        .trim_start_matches("input.")
                        .split('.')
                        .map(str::to_string)
                        .collect();
                    let pointer = names
                        .iter()
                        .map(|s| format!("/{}", s.replace('~', "~0").replace('/', "~1")))
                        .collect();
                    (pointer, names)
                })
                .collect(),
            shortest_key: keys
                .iter()
                .map(|k| k.len() - k.matches('*').count())
                .min()
                .unwrap_or(0),
            keys,
        }
    }

    /// The mask `[pdp.decision_log]` configures (`mask`, `mask_keys`): the one every output
    /// of decisions uses — the log, the uploader, the console and the shadow candidate.
    pub fn of(config: &crate::config::DecisionLogConfig) -> Self {
        Self::new(&config.mask, &config.mask_keys)
    }

    /// Replaces each masked path that is present in the record's input, then every value
    /// under a key whose name matches, wherever it is.
    pub fn apply(&self, record: &mut DecisionRecord) {
        if let Some(input) = record.input.as_mut() {
            self.apply_to(input, &mut record.erased);
        }
    }

    /// [`Mask::apply`] on a bare input; the masked fields are added to `erased` as JSON
    /// pointers (`/input/…`).
    pub fn apply_to(&self, input: &mut Value, erased: &mut Vec<String>) {
        for (pointer, names) in &self.pointers {
            if let Some(node) = member_mut(input, names) {
                if node.as_str() != Some(MASKED) {
                    *node = Value::String(MASKED.to_string());
                    erased.push(format!("/input{pointer}"));
                }
            }
        }
        if !self.keys.is_empty() {
            let mut at = String::from("/input");
            self.mask_keys(input, &mut at, erased);
        }
    }

    /// Masks `input` and cuts it short: what every output of decisions holds of an input
    /// (the decision log's records, and what a shadow candidate is given to decide).
    pub fn redact(&self, input: &mut Value, erased: &mut Vec<String>) {
        self.apply_to(input, erased);
        cut_short(input);
    }

    fn mask_keys(&self, value: &mut Value, at: &mut String, erased: &mut Vec<String>) {
        let len = at.len();
        match value {
            Value::Object(members) => {
                for (key, member) in members.iter_mut() {
                    if self.key_matches(key) {
                        if member.as_str() != Some(MASKED) {
                            *member = Value::String(MASKED.to_string());
                            push_pointer_segment(at, key);
                            erased.push(at.clone());
                            at.truncate(len);
                        }
                    } else if has_children(member) {
                        push_pointer_segment(at, key);
                        self.mask_keys(member, at, erased);
                        at.truncate(len);
                    }
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    if has_children(item) {
                        use std::fmt::Write as _;
                        let _ = write!(at, "/{i}");
                        self.mask_keys(item, at, erased);
                        at.truncate(len);
                    }
                }
            }
            _ => {}
        }
    }

    /// Whether a key name matches one of the patterns, case-insensitively. ASCII names (all
    /// but rare ones) are compared in place, without a lower-case copy.
    fn key_matches(&self, key: &str) -> bool {
        if key.is_ascii() {
            // No pattern matches a name shorter than its letters.
            key.len() >= self.shortest_key
                && self
                    .keys
                    .iter()
                    .any(|k| glob_bytes(k.as_bytes(), key.as_bytes()))
        } else {
            let lower = key.to_lowercase();
            self.keys.iter().any(|k| glob(k, &lower))
        }
    }
}

/// The value at `names` below `value`, as `Value::pointer_mut` finds it (an array's member
/// by its decimal index, without leading zeros), without unescaping a copy of each name.
fn member_mut<'v>(mut value: &'v mut Value, names: &[String]) -> Option<&'v mut Value> {
    for name in names {
        value = match value {
            Value::Object(members) => members.get_mut(name)?,
            Value::Array(items) => {
                if name.starts_with('+') || (name.starts_with('0') && name.len() > 1) {
                    return None;
                }
                items.get_mut(name.parse::<usize>().ok()?)?
            }
            _ => return None,
        };
    }
    Some(value)
}

/// Whether a value can hold keys to mask (an object or an array with members).
fn has_children(value: &Value) -> bool {
    match value {
        Value::Object(members) => !members.is_empty(),
        Value::Array(items) => !items.is_empty(),
        _ => false,
    }
}

/// Appends `/key` to a JSON pointer, escaped as RFC 6901 says (`~` → `~0`, `/` → `~1`).
fn push_pointer_segment(at: &mut String, key: &str) {
    at.push('/');
    if key.contains(['~', '/']) {
        at.push_str(&key.replace('~', "~0").replace('/', "~1"));
    } else {
        at.push_str(key);
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    glob_bytes(pattern.as_bytes(), text.as_bytes())
}

/// [`glob`] on bytes, `text` compared ASCII-case-insensitively with a lower-case `pattern`
/// (a lower-case UTF-8 text matches as it is: its non-ASCII bytes compare equal only to the
/// same bytes).
fn glob_bytes(pattern: &[u8], text: &[u8]) -> bool {
    let mut parts = pattern.split(|&b| b == b'*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = strip_prefix_folded(text, first) else {
        return false;
    };
    let mut parts = parts.peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            return rest.len() >= part.len() && folded_eq(&rest[rest.len() - part.len()..], part);
        }
        match find_folded(rest, part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

fn folded_eq(text: &[u8], pattern: &[u8]) -> bool {
    text.len() == pattern.len()
        && text
            .iter()
            .zip(pattern)
            .all(|(t, p)| t.to_ascii_lowercase() == *p)
}

fn strip_prefix_folded<'t>(text: &'t [u8], prefix: &[u8]) -> Option<&'t [u8]> {
    (text.len() >= prefix.len() && folded_eq(&text[..prefix.len()], prefix))
        .then(|| &text[prefix.len()..])
}

fn find_folded(text: &[u8], part: &[u8]) -> Option<usize> {
    if part.is_empty() {
        return Some(0);
    }
    text.windows(part.len()).position(|w| folded_eq(w, part))
}

/// Masks and cuts every record short once, before any sink (file, upload, console) sees it,
/// on the thread that made the decision: no sink queues more than the cut record.
pub struct Redacted<S> {
    mask: Mask,
    inner: S,
}

impl<S: DecisionSink> Redacted<S> {
    /// `inner`, given records masked with `mask` and cut short.
    pub fn new(mask: Mask, inner: S) -> Self {
        Self { mask, inner }
    }
}

impl<S: DecisionSink> DecisionSink for Redacted<S> {
    fn log(&self, mut record: DecisionRecord) {
        if let Some(input) = record.input.as_mut() {
            self.mask.redact(input, &mut record.erased);
        }
        if let Some(error) = record.error.as_mut() {
            cut_text(&mut error.message);
        }
        self.inner.log(record);
    }
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }
}

/// Writes JSON lines to a writer on a thread of its own. Records (masked and cut short
/// already: this sink sits inside [`Redacted`]) are queued as they are, bounded in count and
/// in bytes (their [`record_bytes`]), and serialised by the writer thread straight into its
/// buffer, so the deciding thread neither serialises nor allocates a line.
///
/// The writer takes records in batches ([`Batched`]): a deciding thread wakes it only once
/// per burst.
pub struct JsonLinesSink {
    queue: Batched<(DecisionRecord, usize)>,
    queued_bytes: Arc<AtomicUsize>,
    dropped: Counter,
}

/// Records that may wait for the writer before new ones are dropped.
const QUEUE_LEN: usize = 64 * 1024;
/// Bytes that may wait for the writer before new records are dropped.
pub const QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// The value masked fields are replaced with.
pub const MASKED: &str = "**REDACTED**";
/// Longest string of an input written whole; longer ones are cut, saying how long they were.
pub const MAX_FIELD_BYTES: usize = 4096;
/// Most items of an input array written; the rest are replaced by one note.
pub const MAX_ITEMS: usize = 100;

impl JsonLinesSink {
    /// Starts the writer thread over `out`; records that do not fit the queue are counted in
    /// `dropped`.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn spawn(out: Box<dyn Write + Send>, dropped: Counter) -> std::io::Result<Self> {
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let written = Arc::clone(&queued_bytes);
        let failed = dropped.clone();
        let mut out = BufWriter::new(out);
        // One line's bytes, reused from record to record.
        let mut line = Vec::with_capacity(4096);
        let queue = Batched::spawn("decision-log", QUEUE_LEN, move |next| match next {
            Some((record, len)) => {
                write_record(&mut out, &mut line, &record, &failed);
                drop(record);
                written.fetch_sub(len, Ordering::AcqRel);
            }
            // Flush whenever the queue runs dry: batches under load, prompt when idle.
            None => {
                if let Err(e) = out.flush() {
                    tracing::warn!(error = %e, "decision log: flush failed");
                }
            }
        })?;
        Ok(Self {
            queue,
            queued_bytes,
            dropped,
        })
    }

    /// Opens `output` (`stdout`, `stderr`, or a file path — with a `/` or an extension —
    /// appended to, created readable by its owner only, and made so if it was not) and starts
    /// the writer. (`off` is no sink at all: see [`is_off`].)
    ///
    /// # Errors
    /// An output that is none of these, or a file that cannot be opened.
    pub fn open(output: &str, dropped: Counter) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match output {
            "stdout" | "-" => Box::new(std::io::stdout()),
            "stderr" => Box::new(std::io::stderr()),
            path if path.contains('/') || path.contains('.') => {
                let mut options = std::fs::OpenOptions::new();
                options.create(true).append(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let file = options.open(path).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("decision log {path}: {e}"))
                })?;
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    file.set_permissions(std::fs::Permissions::from_mode(0o600))
                        .map_err(|e| {
                            std::io::Error::new(e.kind(), format!("decision log {path}: {e}"))
                        })?;
                }
                Box::new(file)
            }
            other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("[pdp.decision_log] output must be stdout, stderr, off or a file path (with a '/' or an extension), not {other:?}"),
                ))
            }
        };
        Self::spawn(out, dropped)
    }
}

impl DecisionSink for JsonLinesSink {
    fn log(&self, record: DecisionRecord) {
        let len = record_bytes(&record);
        if self.queued_bytes.fetch_add(len, Ordering::AcqRel) + len > QUEUE_BYTES {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.dropped.inc();
            return;
        }
        if self.queue.send((record, len)).is_err() {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.dropped.inc();
        }
    }
}

/// Whether `output` switches the decision log off.
pub fn is_off(output: &str) -> bool {
    output.eq_ignore_ascii_case("off")
}

/// Writes one record as a JSON line through `line`, a buffer reused from record to record.
fn write_record(
    out: &mut impl Write,
    line: &mut Vec<u8>,
    record: &DecisionRecord,
    failed: &Counter,
) {
    line.clear();
    match serde_json::to_writer(&mut *line, record) {
        Ok(()) => {
            line.push(b'\n');
            if out.write_all(line).is_err() {
                tracing::warn!("decision log: write failed");
            }
        }
        // Not JSON (it always is): counted and left out, never half a line.
        Err(_) => {
            failed.inc();
        }
    }
    if line.capacity() > 1 << 20 {
        *line = Vec::with_capacity(4096);
    }
}

/// About the bytes a queued record takes in memory: its input, result and error, plus the
/// fixed fields.
pub fn record_bytes(record: &DecisionRecord) -> usize {
    const FIXED: usize = 512;
    FIXED
        + record.input.as_ref().map_or(0, approx_bytes)
        + record.result.as_ref().map_or(0, approx_bytes)
        + record.error.as_ref().map_or(0, |e| e.message.len())
        + record.erased.iter().map(String::len).sum::<usize>()
}

/// About the bytes `value` takes in memory (its text, plus a word per value): what byte
/// budgets of queues holding inputs count.
pub fn approx_bytes(value: &Value) -> usize {
    const NODE: usize = 32;
    NODE + match value {
        Value::String(text) => text.len(),
        Value::Array(items) => items.iter().map(approx_bytes).sum(),
        Value::Object(members) => members
            .iter()
            .map(|(key, member)| key.len() + NODE + approx_bytes(member))
            .sum(),
        _ => 0,
    }
}

/// Cuts strings longer than [`MAX_FIELD_BYTES`] and arrays longer than [`MAX_ITEMS`],
/// saying what was left out.
pub fn cut_short(value: &mut Value) {
    match value {
        Value::String(text) => cut_text(text),
        Value::Array(items) => {
            if items.len() > MAX_ITEMS {
                let total = items.len();
                items.truncate(MAX_ITEMS);
                items.push(Value::String(format!("…(cut: {total} items)")));
            }
            items.iter_mut().for_each(cut_short);
        }
        Value::Object(members) => members.values_mut().for_each(cut_short),
        _ => {}
    }
}

/// Cuts `text` to [`MAX_FIELD_BYTES`] (on a character boundary), saying how long it was.
pub fn cut_text(text: &mut String) {
    cut_text_to(text, MAX_FIELD_BYTES);
}

/// Cuts `text` to `max` bytes (on a character boundary), saying how long it was.
pub fn cut_text_to(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let total = text.len();
    text.truncate(end);
    text.push_str(&format!("…(cut: {total} bytes)"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn record(input: Value) -> DecisionRecord {
        DecisionRecord {
            labels: Arc::new(BTreeMap::from([("id".to_string(), "n1".to_string())])),
            decision_id: "d1".into(),
            bundles: bundles("policies", "r1"),
            timestamp: SystemTime::UNIX_EPOCH,
            path: "p/allow".into(),
            input: Some(input),
            result: Some(json!(true)),
            error: None,
            requested_by: "127.0.0.1:5000".into(),
            enforcement_point: EnforcementPoint::HttpApi,
            metrics: RecordMetrics {
                timer_rego_query_eval_ns: 10,
                counter_decision_cache_hit: 0,
            },
            erased: vec![],
        }
    }

    /// Waits (boundedly) until `buf` holds `lines` lines; returns how many it holds.
    fn lines_within(buf: &Shared, lines: usize) -> usize {
        let count = || {
            buf.0
                .lock()
                .map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count())
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while count() < lines && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        count()
    }

    #[test]
    fn every_accepted_record_is_written_in_bursts_after_idle_and_at_drop() {
        let buf = Shared::default();
        let dropped = Counter::default();
        let sink = JsonLinesSink::spawn(Box::new(buf.clone()), dropped.clone()).expect("spawn");
        let burst = |n: usize| {
            for _ in 0..n {
                sink.log(record(json!({"n": 1})));
            }
        };
        burst(500);
        assert_eq!(lines_within(&buf, 500), 500);
        // Idle: the writer parks, and the next record wakes it.
        std::thread::sleep(crate::batch::LINGER * 5);
        burst(1);
        assert_eq!(lines_within(&buf, 501), 501);
        // From several threads at once, then dropped at once: nothing accepted is lost.
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| burst(1000));
            }
        });
        drop(sink);
        assert_eq!(lines_within(&buf, 4501), 4501);
        assert_eq!(dropped.get(), 0);
    }

    #[test]
    fn lines_are_json_with_masked_fields() {
        let buf = Shared::default();
        let sink = Redacted::new(
            Mask::new(&["message.body.value".into(), "input.absent".into()], &[]),
            JsonLinesSink::spawn(Box::new(buf.clone()), Counter::default()).expect("spawn"),
        );
        sink.log(record(
            json!({"message": {"body": {"value": "secret", "x": 1}}}),
        ));
        sink.log(record(json!({"other": 1})));
        let mut lines = Vec::new();
        for _ in 0..200 {
            let text = String::from_utf8(buf.0.lock().expect("lock").clone()).expect("utf8");
            lines = text.lines().map(str::to_string).collect();
            if lines.len() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(lines.len(), 2);
        let first: Value = serde_json::from_str(&lines[0]).expect("json");
        assert_eq!(first["input"]["message"]["body"]["value"], json!(MASKED));
        assert_eq!(first["input"]["message"]["body"]["x"], json!(1));
        assert_eq!(first["erased"], json!(["/input/message/body/value"]));
        assert_eq!(first["timestamp"], json!("1970-01-01T00:00:00.000000Z"));
        // OPA's decision-log fields, as its tooling reads them.
        assert_eq!(first["bundles"]["policies"]["revision"], json!("r1"));
        assert_eq!(first["labels"]["id"], json!("n1"));
        assert_eq!(first["path"], json!("p/allow"));
        assert_eq!(first["requested_by"], json!("127.0.0.1:5000"));
        assert_eq!(first["enforcement_point"], json!("http_api"));
        assert_eq!(first["metrics"]["timer_rego_query_eval_ns"], json!(10));
        assert_eq!(first["result"], json!(true));
        let second: Value = serde_json::from_str(&lines[1]).expect("json");
        assert!(second.get("erased").is_none());
    }

    #[test]
    fn identity_assertions_and_tokens_are_masked_by_default() {
        let defaults = crate::config::DecisionLogConfig::default();
        let mask = Mask::new(&defaults.mask, &defaults.mask_keys);
        let mut r = record(json!({"message": {"body": {
            "identity": {"userURL": "user://idp.example/alice", "assertion": "eyJhbGciOi…",
                         "infoToken": "i-1", "interworking": {"access_token": "w-1"}},
            "idToken": "token-1", "assertion": "a-1", "accessToken": "t-1", "token": "t-2",
            "auth": "t-3", "access_token": "t-4", "resource": "kept",
            "list": [{"Password": "p-1"}, {"secretKey": "s-1"}]}}}));
        mask.apply(&mut r);
        let body = &r.input.as_ref().expect("input")["message"]["body"];
        for field in [
            "idToken",
            "assertion",
            "accessToken",
            "token",
            "auth",
            "access_token",
        ] {
            assert_eq!(body[field], json!(MASKED), "{field}");
        }
        for pointer in [
            "/identity/assertion",
            "/identity/infoToken",
            "/identity/interworking",
            "/list/0/Password",
            "/list/1/secretKey",
        ] {
            assert_eq!(body.pointer(pointer), Some(&json!(MASKED)), "{pointer}");
        }
        assert_eq!(body["identity"]["userURL"], "user://idp.example/alice");
        assert_eq!(body["resource"], "kept");
        assert!(
            r.erased
                .contains(&"/input/message/body/list/0/Password".to_string()),
            "{:?}",
            r.erased
        );
        let once: std::collections::BTreeSet<_> = r.erased.iter().collect();
        assert_eq!(
            once.len(),
            r.erased.len(),
            "each field said once: {:?}",
            r.erased
        );
    }

    #[test]
    fn masked_paths_are_found_where_json_pointers_find_them() {
        let mut doc = json!({"a": {"b/c": [1, {"d~e": 2}], "": 3}, "x": [[4]]});
        for names in [
            &["a", "b/c", "1", "d~e"][..],
            &["a", ""],
            &["x", "0", "0"],
            &["x", "00"],
            &["x", "+0"],
            &["x", "1"],
            &["a", "nope"],
            &["a", "b/c", "0", "z"],
        ] {
            let pointer: String = names
                .iter()
                .map(|s| format!("/{}", s.replace('~', "~0").replace('/', "~1")))
                .collect();
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            let expected = doc.pointer(&pointer).cloned();
            assert_eq!(member_mut(&mut doc, &names).cloned(), expected, "{pointer}");
        }
    }

    #[test]
    fn key_names_match_in_any_case_and_erased_pointers_are_escaped() {
        let mask = Mask::new(&[], &["*Token*".into(), "auth".into()]);
        let mut input = json!({
            "IdTOKEN": "t-1",
            "a/b~c": {"AUTH": "t-2", "author": "kept"},
            "list": [{"x": {"my_token": "t-3"}}, "plain", []],
            "ÜBER_TOKEN": "t-4",
            "tok": "kept",
        });
        let mut erased = Vec::new();
        mask.apply_to(&mut input, &mut erased);
        erased.sort();
        assert_eq!(
            erased,
            [
                "/input/IdTOKEN",
                "/input/a~1b~0c/AUTH",
                "/input/list/0/x/my_token",
                "/input/ÜBER_TOKEN",
            ]
        );
        let text = input.to_string();
        for secret in ["t-1", "t-2", "t-3", "t-4"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(input["a/b~c"]["author"], "kept");
        assert_eq!(input["tok"], "kept");
        // Masking twice says nothing new.
        let mut again = Vec::new();
        mask.apply_to(&mut input, &mut again);
        assert!(again.is_empty(), "{again:?}");
    }

    #[test]
    fn key_patterns_match_with_stars() {
        for (pattern, text, matches) in [
            ("*token*", "idtoken", true),
            ("*token*", "token", true),
            ("*token*", "tokens_left", true),
            ("*token*", "tok", false),
            ("auth", "auth", true),
            ("auth", "author", false),
            ("*secret", "clientsecret", true),
            ("*secret", "secretkey", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "acb", false),
            ("*token*", "IDTOKEN", true),
            ("a*", "a", true),
            ("*", "", true),
        ] {
            assert_eq!(glob(pattern, text), matches, "{pattern} {text}");
        }
    }

    #[test]
    fn the_queue_is_bounded_in_bytes() {
        struct Stuck;
        impl Write for Stuck {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                Ok(0)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let dropped = Counter::default();
        let sink = JsonLinesSink::spawn(Box::new(Stuck), dropped.clone()).expect("spawn");
        let big = "x".repeat(1024 * 1024);
        for _ in 0..100 {
            sink.log(record(json!({ "big": big })));
        }
        assert!(sink.queued_bytes.load(Ordering::Acquire) <= QUEUE_BYTES);
        assert!(dropped.get() >= 100 - 64, "{}", dropped.get());
    }

    #[test]
    fn huge_fields_are_cut_short() {
        let mut input = json!({"to": (0..300).collect::<Vec<_>>(), "body": "é".repeat(5000)});
        cut_short(&mut input);
        assert_eq!(input["to"].as_array().map(Vec::len), Some(MAX_ITEMS + 1));
        assert_eq!(input["to"][MAX_ITEMS], json!("…(cut: 300 items)"));
        let body = input["body"].as_str().expect("body");
        assert!(
            body.len() < MAX_FIELD_BYTES + 40 && body.ends_with("(cut: 10000 bytes)"),
            "{body}"
        );
    }

    #[test]
    fn error_messages_are_cut_short_before_any_sink() {
        struct Capture(Arc<Mutex<Vec<DecisionRecord>>>);
        impl DecisionSink for Capture {
            fn log(&self, record: DecisionRecord) {
                self.0.lock().expect("lock").push(record);
            }
            fn enabled(&self) -> bool {
                true
            }
        }
        let captured = Arc::new(Mutex::new(Vec::new()));
        let sink = Redacted::new(Mask::new(&[], &[]), Capture(Arc::clone(&captured)));
        let mut r = record(json!({}));
        r.error = Some(RecordError {
            code: "invalid_parameter",
            message: "x".repeat(3 * MAX_FIELD_BYTES),
        });
        sink.log(r);
        let records = captured.lock().expect("lock");
        let message = &records[0].error.as_ref().expect("error").message;
        assert!(message.len() < MAX_FIELD_BYTES + 40, "{}", message.len());
        assert!(message.ends_with(&format!("(cut: {} bytes)", 3 * MAX_FIELD_BYTES)));
    }

    #[test]
    fn outputs_are_a_stream_a_file_or_off() {
        assert!(is_off("off") && is_off("OFF") && !is_off("stdout"));
        let err = JsonLinesSink::open("stdot", Counter::default())
            .err()
            .expect("refused");
        assert!(
            err.to_string().contains("must be stdout, stderr, off"),
            "{err}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("decisions.jsonl");
        std::fs::write(&path, "").expect("create");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        JsonLinesSink::open(path.to_str().expect("utf8"), Counter::default()).expect("file");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path)
                .expect("created")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        }
    }

    #[test]
    fn requested_by_is_the_client_or_the_enforcement_point() {
        assert_eq!(
            AskedBy::point(EnforcementPoint::PolicyServer).requested_by(),
            "policy_server"
        );
        let peer: SocketAddr = "10.1.2.3:4".parse().expect("addr");
        assert_eq!(AskedBy::http(Some(peer)).requested_by(), "10.1.2.3:4");
    }

    #[test]
    fn a_tee_feeds_every_enabled_sink_and_a_swap_takes_over() {
        #[derive(Default)]
        struct Count(std::sync::atomic::AtomicUsize);
        impl DecisionSink for Count {
            fn log(&self, _: DecisionRecord) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let (a, b) = (Arc::new(Count::default()), Arc::new(Count::default()));
        let tee = Tee(vec![a.clone(), Arc::new(NullSink), b.clone()]);
        tee.log(record(json!({})));
        let swappable = SwappableSink::new(Box::new(tee));
        swappable.log(record(json!({})));
        swappable.replace(Box::new(NullSink));
        assert!(!swappable.enabled());
        let count = |c: &Count| c.0.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!((count(&a), count(&b)), (2, 2));
    }
}

//! Decision log: one JSON line per decision, with configurable masking of input fields
//! (identity assertions and tokens are masked by default), and strings longer than
//! [`MAX_FIELD_BYTES`] or arrays longer than [`MAX_ITEMS`] cut short, so one huge request
//! cannot make a huge log line.
//!
//! The PDP gets a [`DecisionSink`] injected and calls it on every exit path (allow, deny,
//! undefined, error, timeout, cache hit). [`JsonLinesSink`] hands records to a writer thread
//! through a bounded queue, so the hot path never waits on I/O; when the queue is full the
//! record is dropped and counted (`msgnode_pdp_decision_log_dropped_total`), as OPA's log
//! plugin does, rather than slowing decisions down.

use std::io::{BufWriter, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use serde_json::Value;

/// What is logged about one decision.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord {
    /// Unique id, also returned to the caller.
    pub decision_id: String,
    /// When the decision was made (RFC 3339).
    #[serde(serialize_with = "rfc3339")]
    pub timestamp: SystemTime,
    /// The query, e.g. `data.msgnode.authz.decision`.
    pub path: String,
    /// The input document (masked before it is written).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// The result; absent when undefined or on error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error, when evaluation failed or timed out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bundle revision the decision was made with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Evaluation time in nanoseconds (lookup time on a cache hit).
    pub eval_ns: u64,
    /// Whether the result came from the decision cache.
    pub cache_hit: bool,
    /// Input fields replaced by the mask, as JSON pointers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub erased: Vec<String>,
}

fn rfc3339<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
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

/// Writes JSON lines to a writer on a thread of its own.
pub struct JsonLinesSink {
    queue: SyncSender<DecisionRecord>,
    dropped: Counter,
}

/// Records that may wait for the writer before new ones are dropped.
const QUEUE_LEN: usize = 64 * 1024;

/// The value masked fields are replaced with.
pub const MASKED: &str = "**REDACTED**";
/// Longest string of an input written whole; longer ones are cut, saying how long they were.
pub const MAX_FIELD_BYTES: usize = 4096;
/// Most items of an input array written; the rest are replaced by one note.
pub const MAX_ITEMS: usize = 100;

impl JsonLinesSink {
    /// Starts the writer thread over `out`, masking the dotted `mask` paths of each input.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn spawn(out: Box<dyn Write + Send>, mask: &[String]) -> std::io::Result<Self> {
        let (queue, rx) = sync_channel(QUEUE_LEN);
        let mask: Vec<Vec<String>> = mask
            .iter()
            .map(|m| {
                m.trim_start_matches("input.")
                    .split('.')
                    .map(str::to_string)
                    .collect()
            })
            .collect();
        std::thread::Builder::new()
            .name("decision-log".to_string())
            .spawn(move || write_loop(rx, out, &mask))?;
        Ok(Self {
            queue,
            dropped: Counter::default(),
        })
    }

    /// The counter of dropped records, for registering as a metric.
    pub fn dropped_counter(&self) -> Counter {
        self.dropped.clone()
    }

    /// Opens `output` (`stdout`, `stderr`, or a file path — with a `/` or an extension —
    /// appended to, created readable by its owner only) and starts the writer. (`off` is no
    /// sink at all: see [`is_off`].)
    ///
    /// # Errors
    /// An output that is none of these, or a file that cannot be opened.
    pub fn open(output: &str, mask: &[String]) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match output {
            "stdout" | "-" => Box::new(std::io::stdout()),
            "stderr" => Box::new(std::io::stderr()),
            path if path.contains('/') || path.contains('.') => {
                let mut options = std::fs::OpenOptions::new();
                options.create(true).append(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                Box::new(options.open(path).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("decision log {path}: {e}"))
                })?)
            }
            other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("[pdp.decision_log] output must be stdout, stderr, off or a file path (with a '/' or an extension), not {other:?}"),
                ))
            }
        };
        Self::spawn(out, mask)
    }
}

impl DecisionSink for JsonLinesSink {
    fn log(&self, record: DecisionRecord) {
        match self.queue.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

/// Whether `output` switches the decision log off.
pub fn is_off(output: &str) -> bool {
    output.eq_ignore_ascii_case("off")
}

fn write_loop(rx: Receiver<DecisionRecord>, out: Box<dyn Write + Send>, mask: &[Vec<String>]) {
    let mut out = BufWriter::new(out);
    while let Ok(mut record) = rx.recv() {
        loop {
            apply_mask(&mut record, mask);
            if let Some(input) = record.input.as_mut() {
                cut_short(input);
            }
            if serde_json::to_writer(&mut out, &record).is_err() || out.write_all(b"\n").is_err() {
                tracing::warn!("decision log: write failed");
            }
            match rx.try_recv() {
                Ok(next) => record = next,
                Err(_) => break,
            }
        }
        // Flush whenever the queue runs dry: batches under load, prompt when idle.
        if let Err(e) = out.flush() {
            tracing::warn!(error = %e, "decision log: flush failed");
        }
    }
}

/// Cuts strings longer than [`MAX_FIELD_BYTES`] and arrays longer than [`MAX_ITEMS`],
/// saying what was left out.
pub fn cut_short(value: &mut Value) {
    match value {
        Value::String(text) if text.len() > MAX_FIELD_BYTES => {
            let mut end = MAX_FIELD_BYTES;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let total = text.len();
            text.truncate(end);
            text.push_str(&format!("…(cut: {total} bytes)"));
        }
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

/// Replaces each masked path that is present in the input.
pub fn apply_mask(record: &mut DecisionRecord, mask: &[Vec<String>]) {
    let Some(input) = record.input.as_mut() else {
        return;
    };
    for path in mask {
        let pointer: String = path
            .iter()
            .map(|s| format!("/{}", s.replace('~', "~0").replace('/', "~1")))
            .collect();
        if let Some(node) = input.pointer_mut(&pointer) {
            *node = Value::String(MASKED.to_string());
            record.erased.push(format!("/input{pointer}"));
        }
    }
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
            decision_id: "d1".into(),
            timestamp: SystemTime::UNIX_EPOCH,
            path: "data.p.allow".into(),
            input: Some(input),
            result: Some(json!(true)),
            error: None,
            revision: Some("r1".into()),
            eval_ns: 10,
            cache_hit: false,
            erased: vec![],
        }
    }

    #[test]
    fn lines_are_json_with_masked_fields() {
        let buf = Shared::default();
        let sink = JsonLinesSink::spawn(
            Box::new(buf.clone()),
            &["message.body.value".into(), "input.absent".into()],
        )
        .expect("spawn");
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
        for key in [
            "decision_id",
            "path",
            "result",
            "revision",
            "eval_ns",
            "cache_hit",
        ] {
            assert!(first.get(key).is_some(), "{key} missing in {first}");
        }
        let second: Value = serde_json::from_str(&lines[1]).expect("json");
        assert!(second.get("erased").is_none());
    }

    #[test]
    fn identity_assertions_and_tokens_are_masked_by_default() {
        let mask: Vec<Vec<String>> = crate::config::DecisionLogConfig::default()
            .mask
            .iter()
            .map(|m| m.split('.').map(str::to_string).collect())
            .collect();
        let mut r = record(json!({"message": {"body": {
            "identity": {"userURL": "user://idp.example/alice", "assertion": "eyJhbGciOi…"},
            "idToken": "token-1", "assertion": "a-1", "accessToken": "t-1", "resource": "kept"}}}));
        apply_mask(&mut r, &mask);
        let body = &r.input.as_ref().expect("input")["message"]["body"];
        for field in ["idToken", "assertion", "accessToken"] {
            assert_eq!(body[field], json!(MASKED), "{field}");
        }
        assert_eq!(body["identity"]["assertion"], json!(MASKED));
        assert_eq!(body["identity"]["userURL"], "user://idp.example/alice");
        assert_eq!(body["resource"], "kept");
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
    fn outputs_are_a_stream_a_file_or_off() {
        assert!(is_off("off") && is_off("OFF") && !is_off("stdout"));
        let err = JsonLinesSink::open("stdot", &[]).err().expect("refused");
        assert!(
            err.to_string().contains("must be stdout, stderr, off"),
            "{err}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("decisions.jsonl");
        JsonLinesSink::open(path.to_str().expect("utf8"), &[]).expect("file");
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
}

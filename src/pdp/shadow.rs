//! Shadow policies: a candidate bundle decides every live decision too, off the critical
//! path, and never enforces.
//!
//! [`Shadow`] holds at most one candidate (`[pdp] shadow = "dir"`, or loaded through the
//! console in write mode). [`Shadow::offer`] is called on the deciding thread with the
//! decision-rule input and the live verdict: it only `try_send`s onto a bounded queue (a full
//! queue drops the job and counts it in `msgnode_pdp_shadow_dropped_total`), so the live
//! decision is never slowed down nor changed. One thread of its own evaluates the queue on
//! the candidate; each verdict whose `allow` differs from the live one is a *difference*:
//! logged (decision id, kind, both verdicts — never the input), counted in
//! `msgnode_pdp_shadow_differences_total{from,to}`, grouped by kind and reason, and kept in a
//! short ring for the console.
//!
//! A candidate may come from whoever holds the console's write credential, so it is not
//! trusted with more than the console shows: it decides the input *as the decision log has
//! it* — masked and cut by the same [`Mask::redact`] — never the live, unmasked one (a rule
//! that reads a masked field sees `"**REDACTED**"`, as in `policy replay`), and what it writes
//! (its reasons, or a malformed result quoted in one) is cut ([`Verdict::cut`]) before it is
//! kept, logged or shown. Kinds are counted as a closed set ([`kind_label`]). The queue is
//! bounded in jobs and in bytes.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde_json::Value;

use super::bundle::{Bundle, BundleError};
use super::decision_log::{approx_bytes, cut_text_to, Mask};
use super::engine::{CompiledBundle, DataPath, EvalError};

/// Live decisions that may wait for the shadow evaluator before new ones are dropped.
pub const QUEUE_LEN: usize = 1024;
/// Bytes (about: [`approx_bytes`]) those inputs may take before new ones are dropped.
pub const QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// Reasons of a verdict kept; the rest are said in one note.
pub const MAX_REASONS: usize = 8;
/// Longest reason kept whole; longer ones are cut, saying how long they were.
pub const MAX_REASON_BYTES: usize = 512;
/// Where a candidate loaded through the console comes from.
pub const CONSOLE_SOURCE: &str = "console upload";
/// The kinds of input the node decides (`schemas/input.schema.json`); any other is counted
/// as `other`, none as `none`.
pub const KINDS: [&str; 5] = [
    "message",
    "subscription",
    "matrix_event",
    "membership",
    "claim",
];

/// `kind` as counters and groups say it: one of [`KINDS`], `none` or `other` — a closed set,
/// whatever an HTTP client puts in `input.kind`.
pub fn kind_label(kind: &str) -> &'static str {
    match kind {
        "" => "none",
        known => KINDS
            .iter()
            .find(|k| **k == known)
            .copied()
            .unwrap_or("other"),
    }
}
/// Differences kept for the console (the oldest go first).
pub const RECENT: usize = 200;
/// Distinct (from, to, kind, reason) groups counted; past it they count as reason `(other)`.
pub const MAX_GROUPS: usize = 256;

/// A decision as the decision rule gave it: allow, and why (fail closed: anything but an
/// object with a boolean `allow` is a deny saying what it was).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Whether the request may proceed.
    pub allow: bool,
    /// The rule's reasons, or what went wrong.
    pub reasons: Vec<String>,
}

impl Verdict {
    /// The verdict of a decision-rule result (`query` names the rule in the reason when it is
    /// undefined).
    pub fn of(result: Option<&Value>, query: &str) -> Self {
        let deny = |reason: String| Self {
            allow: false,
            reasons: vec![reason],
        };
        let Some(value) = result else {
            return deny(format!(
                "policy returned no decision ({query} is undefined)"
            ));
        };
        match value.get("allow").and_then(Value::as_bool) {
            Some(allow) => Self {
                allow,
                reasons: reasons_of(value),
            },
            None => deny(format!("policy decision has no boolean \"allow\": {value}")),
        }
    }

    /// The verdict of an evaluation that failed.
    pub fn failed(error: &EvalError) -> Self {
        Self {
            allow: false,
            reasons: vec![format!("policy error: {error}")],
        }
    }

    /// The verdict with at most [`MAX_REASONS`] reasons of at most [`MAX_REASON_BYTES`] each:
    /// what is kept, logged or shown of a verdict a candidate (or a logged result) wrote.
    pub fn cut(mut self) -> Self {
        if self.reasons.len() > MAX_REASONS {
            let total = self.reasons.len();
            self.reasons.truncate(MAX_REASONS);
            self.reasons.push(format!("…(cut: {total} reasons)"));
        }
        for reason in &mut self.reasons {
            cut_text_to(reason, MAX_REASON_BYTES);
        }
        self
    }

    /// `allow` or `deny`, as the metric labels say it.
    pub fn label(&self) -> &'static str {
        match self.allow {
            true => "allow",
            false => "deny",
        }
    }
}

/// The `reasons` of a decision-rule result, as text (none when absent).
pub fn reasons_of(result: &Value) -> Vec<String> {
    result
        .get("reasons")
        .and_then(Value::as_array)
        .map(|r| {
            r.iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The candidate revision.
pub struct Candidate {
    /// The compiled candidate.
    pub bundle: CompiledBundle,
    /// Its revision.
    pub revision: Arc<str>,
    /// Where it came from (a directory, or [`CONSOLE_SOURCE`]).
    pub source: String,
    /// When it was loaded.
    pub loaded_at: SystemTime,
}

impl Candidate {
    /// Whether it was loaded through the console (not `[pdp] shadow`).
    pub fn from_console(&self) -> bool {
        self.source == CONSOLE_SOURCE
    }
}

/// One live decision whose candidate verdict differs.
#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    /// The live decision's id (its record in the decision log and the console's tail).
    pub decision_id: String,
    /// `input.kind` ([`kind_label`]).
    pub kind: &'static str,
    /// The live verdict.
    pub live: Verdict,
    /// The candidate's verdict.
    pub candidate: Verdict,
    /// The candidate revision.
    pub revision: Arc<str>,
    /// When the live decision was made.
    #[serde(serialize_with = "crate::pdp::decision_log::rfc3339")]
    pub timestamp: SystemTime,
}

/// Differences counted by (from, to, kind, reason): the reason is the denying side's first.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Group {
    /// The live verdict, `allow` or `deny`.
    pub from: &'static str,
    /// The candidate's verdict.
    pub to: &'static str,
    /// `input.kind`.
    pub kind: String,
    /// The first reason of the side that denies.
    pub reason: String,
}

impl Group {
    /// The group of a difference between `live` and `candidate` for an input of `kind`.
    pub fn of(kind: &str, live: &Verdict, candidate: &Verdict) -> Self {
        let denying = if live.allow { candidate } else { live };
        Self {
            from: live.label(),
            to: candidate.label(),
            kind: kind.to_string(),
            reason: denying.reasons.first().cloned().unwrap_or_default(),
        }
    }
}

/// What the console and `/v1/status` say about the shadow.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShadowStatus {
    /// The candidate revision, if one is loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Where it came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Live decisions also decided by the candidate.
    pub evaluated: u64,
    /// Live decisions not shadowed because the queue was full.
    pub dropped: u64,
    /// Differences by group, most frequent first.
    pub groups: Vec<(Group, u64)>,
    /// The most recent differences, newest first.
    pub recent: Vec<Difference>,
    /// Why the last candidate did not load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FromTo {
    from: &'static str,
    to: &'static str,
}

struct Job {
    decision_id: String,
    input: Value,
    /// What `input` counts against [`QUEUE_BYTES`].
    bytes: usize,
    live: Verdict,
    timestamp: SystemTime,
}

#[derive(Default)]
struct Seen {
    groups: BTreeMap<Group, u64>,
    recent: VecDeque<Difference>,
    last_error: Option<String>,
}

struct Inner {
    candidate: ArcSwapOption<Candidate>,
    /// Set once, when the thread starts: offering reads it without a lock.
    queue: OnceLock<SyncSender<Job>>,
    starting: Mutex<()>,
    /// Bytes of the inputs queued.
    queued_bytes: AtomicUsize,
    /// The decision log's mask: candidates decide inputs as the log has them.
    mask: ArcSwap<Mask>,
    rule: DataPath,
    eval_timeout: Duration,
    max_instructions: usize,
    seen: Mutex<Seen>,
    evaluated: AtomicU64,
    dropped: Counter,
    differences: Family<FromTo, Counter>,
}

/// The shadow evaluator of one PDP. Clones share everything.
#[derive(Clone)]
pub struct Shadow {
    inner: Arc<Inner>,
}

impl Shadow {
    /// A shadow for the decision rule `rule`, whose candidates decide inputs masked with
    /// `mask` and cut, its metrics registered in `registry`. Its thread starts with the first
    /// candidate.
    pub fn new(
        mask: Mask,
        rule: DataPath,
        eval_timeout: Duration,
        max_instructions: usize,
        registry: &mut Registry,
    ) -> Self {
        let dropped = Counter::default();
        registry.register(
            "pdp_shadow_dropped",
            "Live decisions not evaluated on the shadow candidate because its queue was full",
            dropped.clone(),
        );
        let differences = Family::<FromTo, Counter>::default();
        registry.register(
            "pdp_shadow_differences",
            "Live decisions the shadow candidate decides otherwise, by live and candidate verdict",
            differences.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                candidate: ArcSwapOption::empty(),
                queue: OnceLock::new(),
                starting: Mutex::new(()),
                queued_bytes: AtomicUsize::new(0),
                mask: ArcSwap::from_pointee(mask),
                rule,
                eval_timeout,
                max_instructions,
                seen: Mutex::new(Seen::default()),
                evaluated: AtomicU64::new(0),
                dropped,
                differences,
            }),
        }
    }

    /// Compiles `bundle` (no reload gate: a candidate is being tried) and makes it the
    /// candidate, starting the evaluator thread if needed; forgets the differences of the
    /// previous one. Blocking (compilation).
    ///
    /// # Errors
    /// The bundle does not compile (or the thread cannot start); the previous candidate stays.
    pub fn load(&self, bundle: Bundle) -> Result<Arc<str>, BundleError> {
        self.load_from(Ok(bundle))
    }

    /// Reads the candidate from the directory `dir` and loads it, as [`Shadow::load`].
    ///
    /// # Errors
    /// The directory is no bundle, or it does not compile; the previous candidate stays.
    pub fn load_dir(&self, dir: &std::path::Path) -> Result<Arc<str>, BundleError> {
        self.load_from(Bundle::read(dir))
    }

    fn load_from(&self, bundle: Result<Bundle, BundleError>) -> Result<Arc<str>, BundleError> {
        let source = bundle
            .as_ref()
            .map(|b| b.source.clone())
            .unwrap_or_default();
        let loaded = bundle
            .and_then(|bundle| CompiledBundle::compile(bundle, self.inner.eval_timeout))
            .map(|b| {
                b.with_fast_path(&self.inner.rule, self.inner.max_instructions)
                    .0
            })
            .and_then(|bundle| self.start_thread().map(|()| bundle));
        let bundle = match loaded {
            Ok(bundle) => bundle,
            Err(error) => {
                tracing::error!(%error, "shadow candidate rejected");
                self.seen().last_error = Some(error.to_string());
                return Err(error);
            }
        };
        let revision: Arc<str> = Arc::from(bundle.revision());
        tracing::info!(%revision, %source, "shadow candidate loaded: live decisions are also decided by it, never enforced");
        self.inner.candidate.store(Some(Arc::new(Candidate {
            bundle,
            revision: Arc::clone(&revision),
            source,
            loaded_at: SystemTime::now(),
        })));
        *self.seen() = Seen::default();
        self.inner.evaluated.store(0, Ordering::Relaxed);
        Ok(revision)
    }

    /// Masks inputs with `mask` from now on (SIGHUP changed `[pdp.decision_log]`).
    pub fn set_mask(&self, mask: Mask) {
        self.inner.mask.store(Arc::new(mask));
    }

    /// Drops the candidate: live decisions are no longer shadowed.
    pub fn unload(&self) {
        if self.inner.candidate.swap(None).is_some() {
            tracing::info!("shadow candidate unloaded");
        }
    }

    /// The candidate, if one is loaded.
    pub fn candidate(&self) -> Option<Arc<Candidate>> {
        self.inner.candidate.load_full()
    }

    /// Whether a candidate wants live decisions (so the caller may keep the input).
    pub fn is_active(&self) -> bool {
        self.inner.candidate.load().is_some()
    }

    /// Hands a live decision to the candidate; never blocks (a queue full in jobs or bytes
    /// drops it, counted). The input is masked and cut on the shadow's thread.
    pub fn offer(&self, decision_id: &str, input: Value, live: Verdict) {
        let Some(queue) = self.inner.queue.get() else {
            return;
        };
        let bytes = approx_bytes(&input);
        let queued = &self.inner.queued_bytes;
        if queued.fetch_add(bytes, Ordering::AcqRel) + bytes > QUEUE_BYTES {
            queued.fetch_sub(bytes, Ordering::AcqRel);
            self.inner.dropped.inc();
            return;
        }
        let job = Job {
            decision_id: decision_id.to_string(),
            input,
            bytes,
            live,
            timestamp: SystemTime::now(),
        };
        if queue.try_send(job).is_err() {
            queued.fetch_sub(bytes, Ordering::AcqRel);
            self.inner.dropped.inc();
        }
    }

    /// The candidate's verdict on `input` (for the console's playground; not a difference).
    pub fn decide(&self, input: &Value) -> Option<(Arc<str>, Verdict)> {
        let candidate = self.candidate()?;
        Some((
            Arc::clone(&candidate.revision),
            evaluate(&candidate.bundle, &self.inner.rule, input).cut(),
        ))
    }

    /// What is known: the candidate, counts, groups and recent differences.
    pub fn status(&self) -> ShadowStatus {
        let candidate = self.candidate();
        let seen = self.seen();
        let mut groups: Vec<(Group, u64)> =
            seen.groups.iter().map(|(g, n)| (g.clone(), *n)).collect();
        groups.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        ShadowStatus {
            revision: candidate.as_ref().map(|c| c.revision.to_string()),
            source: candidate.as_ref().map(|c| c.source.clone()),
            evaluated: self.inner.evaluated.load(Ordering::Relaxed),
            dropped: self.inner.dropped.get(),
            groups,
            recent: seen.recent.iter().rev().cloned().collect(),
            last_error: seen.last_error.clone(),
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.inner.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start_thread(&self) -> Result<(), BundleError> {
        let _starting = self
            .inner
            .starting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.inner.queue.get().is_some() {
            return Ok(());
        }
        let (tx, rx) = sync_channel(QUEUE_LEN);
        // The thread holds a weak handle: it ends when the PDP is dropped.
        let weak = Arc::downgrade(&self.inner);
        std::thread::Builder::new()
            .name("pdp-shadow".to_string())
            .spawn(move || shadow_loop(&rx, &weak))
            .map_err(|source| BundleError::Io {
                file: "pdp-shadow thread".into(),
                source,
            })?;
        // Only this (locked) path sets it, once.
        let _ = self.inner.queue.set(tx);
        Ok(())
    }
}

fn shadow_loop(rx: &Receiver<Job>, weak: &std::sync::Weak<Inner>) {
    while let Ok(mut job) = rx.recv() {
        let Some(inner) = weak.upgrade() else {
            return;
        };
        inner.queued_bytes.fetch_sub(job.bytes, Ordering::AcqRel);
        let shadow = Shadow { inner };
        let Some(candidate) = shadow.candidate() else {
            continue;
        };
        // The candidate decides what the log would show, never more.
        shadow
            .inner
            .mask
            .load()
            .redact(&mut job.input, &mut Vec::new());
        let verdict = evaluate(&candidate.bundle, &shadow.inner.rule, &job.input).cut();
        shadow.inner.evaluated.fetch_add(1, Ordering::Relaxed);
        if verdict.allow == job.live.allow {
            continue;
        }
        let live = job.live.cut();
        let kind = kind_label(job.input.get("kind").and_then(Value::as_str).unwrap_or(""));
        let (from, to) = (live.label(), verdict.label());
        shadow
            .inner
            .differences
            .get_or_create(&FromTo { from, to })
            .inc();
        tracing::info!(decision_id = %job.decision_id, kind, from, to, live_reasons = ?live.reasons, candidate_reasons = ?verdict.reasons, candidate = %candidate.revision, "shadow difference");
        let mut group = Group::of(kind, &live, &verdict);
        let mut seen = shadow.seen();
        if !seen.groups.contains_key(&group) && seen.groups.len() >= MAX_GROUPS {
            group.reason = "(other)".to_string();
        }
        *seen.groups.entry(group).or_default() += 1;
        if seen.recent.len() == RECENT {
            seen.recent.pop_front();
        }
        seen.recent.push_back(Difference {
            decision_id: job.decision_id,
            kind,
            live,
            candidate: verdict,
            revision: Arc::clone(&candidate.revision),
            timestamp: job.timestamp,
        });
    }
}

/// The verdict of `bundle`'s decision rule `rule` on `input`.
pub fn evaluate(bundle: &CompiledBundle, rule: &DataPath, input: &Value) -> Verdict {
    let rego = match <regorus::Value as serde::Deserialize>::deserialize(input) {
        Ok(rego) => rego,
        Err(e) => return Verdict::failed(&EvalError::Failed(format!("input: {e}"))),
    };
    match bundle.evaluate(rule, Some(rego)) {
        Ok(result) => Verdict::of(result.as_ref(), rule.as_query()),
        Err(error) => Verdict::failed(&error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdp::test_tree;
    use serde_json::json;

    const LIVE: &str = r#"package t
default allow := false
allow if input.user == "alice"
reasons contains "not alice" if not allow
decision := {"allow": allow, "reasons": reasons}
"#;

    fn shadow() -> Shadow {
        Shadow::new(
            Mask::new(&[], &["*token*".into()]),
            DataPath::from_ref("data.t.decision").expect("ref"),
            Duration::from_secs(1),
            1_000_000,
            &mut Registry::default(),
        )
    }

    fn wait_for(shadow: &Shadow, evaluated: u64) -> ShadowStatus {
        for _ in 0..1000 {
            let status = shadow.status();
            if status.evaluated >= evaluated {
                return status;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("the shadow evaluated {} jobs", shadow.status().evaluated);
    }

    #[test]
    fn differences_are_counted_grouped_and_kept() {
        let candidate = LIVE.replace(
            r#"allow if input.user == "alice""#,
            r#"allow if input.user == "bob""#,
        );
        let dir = test_tree(&[("t.rego", &candidate)]);
        let shadow = shadow();
        shadow
            .load(Bundle::read(dir.path()).expect("read"))
            .expect("load");
        let allow = Verdict {
            allow: true,
            reasons: vec![],
        };
        let deny = Verdict {
            allow: false,
            reasons: vec!["not alice".into()],
        };
        shadow.offer("d1", json!({"kind": "message", "user": "alice"}), allow);
        shadow.offer(
            "d2",
            json!({"kind": "message", "user": "bob"}),
            deny.clone(),
        );
        shadow.offer("d3", json!({"kind": "claim", "user": "carol"}), deny);
        let status = wait_for(&shadow, 3);
        let ids: Vec<&str> = status
            .recent
            .iter()
            .map(|d| d.decision_id.as_str())
            .collect();
        assert_eq!(ids, ["d2", "d1"], "carol is denied by both: no difference");
        assert_eq!(status.recent[1].candidate.reasons, ["not alice"]);
        let groups: Vec<(&str, &str, &str, &str, u64)> = status
            .groups
            .iter()
            .map(|(g, n)| (g.from, g.to, g.kind.as_str(), g.reason.as_str(), *n))
            .collect();
        assert_eq!(
            groups,
            [
                ("allow", "deny", "message", "not alice", 1),
                ("deny", "allow", "message", "not alice", 1)
            ]
        );
        shadow.unload();
        assert!(shadow.decide(&json!({})).is_none());
    }

    /// Finding 1 of the console review: a candidate that quotes its whole input in a malformed
    /// result (`decision := {"x": input}`) must see only the masked, cut input, and what it
    /// writes is cut before it is kept.
    #[test]
    fn a_candidate_sees_the_input_as_logged_and_its_words_are_cut() {
        let dir = test_tree(&[("t.rego", "package t\ndecision := {\"x\": input}\n")]);
        let shadow = shadow();
        shadow
            .load(Bundle::read(dir.path()).expect("read"))
            .expect("load");
        let allow = Verdict {
            allow: true,
            reasons: vec![],
        };
        let input = json!({
            "kind": "odd-kind",
            "message": {"body": {"idToken": "secret-token-1", "value": "v".repeat(100_000)}},
        });
        shadow.offer("d1", input, allow);
        let status = wait_for(&shadow, 1);
        let shown = serde_json::to_string(&status).expect("json");
        assert!(!shown.contains("secret-token-1"), "{shown}");
        assert!(
            shown.contains("**REDACTED**"),
            "the candidate saw the mask: {shown}"
        );
        let difference = &status.recent[0];
        assert_eq!(difference.kind, "other", "kinds are a closed set");
        assert!(
            difference.candidate.reasons[0].len() < MAX_REASON_BYTES + 40,
            "{}",
            difference.candidate.reasons[0].len()
        );
        assert!(shown.len() < 8 * MAX_REASON_BYTES, "{}", shown.len());
        assert_eq!(status.groups[0].0.kind, "other");
    }

    #[test]
    fn verdicts_are_cut_in_count_and_length() {
        let verdict = Verdict {
            allow: false,
            reasons: (0..100)
                .map(|i| format!("{i}{}", "r".repeat(10_000)))
                .collect(),
        }
        .cut();
        assert_eq!(verdict.reasons.len(), MAX_REASONS + 1);
        assert_eq!(verdict.reasons[MAX_REASONS], "…(cut: 100 reasons)");
        assert!(
            verdict.reasons[0].ends_with("(cut: 10001 bytes)"),
            "{}",
            verdict.reasons[0]
        );
        assert_eq!(kind_label("membership"), "membership");
        assert_eq!((kind_label(""), kind_label("Message")), ("none", "other"));
    }

    #[test]
    fn the_queue_is_bounded_in_bytes() {
        let slow = "package t\ndecision := {\"allow\": n > 0} if n := count([x | some a in numbers.range(1, 300); some b in numbers.range(1, 300); x := a + b])\n";
        let dir = test_tree(&[("t.rego", slow)]);
        let shadow = shadow();
        shadow
            .load(Bundle::read(dir.path()).expect("read"))
            .expect("load");
        let live = Verdict {
            allow: true,
            reasons: vec![],
        };
        let big = json!({"kind": "message", "body": "b".repeat(4 * 1024 * 1024)});
        for i in 0..64 {
            shadow.offer(&format!("d{i}"), big.clone(), live.clone());
        }
        assert!(shadow.inner.queued_bytes.load(Ordering::Acquire) <= QUEUE_BYTES);
        // 256 MiB offered to a slow candidate: most of it cannot have fitted.
        assert!(shadow.status().dropped > 0);
    }

    #[test]
    fn a_broken_candidate_is_refused_and_said() {
        let dir = test_tree(&[("t.rego", "package t\nallow if {\n")]);
        let shadow = shadow();
        assert!(shadow.load_dir(dir.path()).is_err());
        let status = shadow.status();
        assert!(status.revision.is_none());
        assert!(
            status
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("t.rego:")),
            "{status:?}"
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_never_blocks() {
        // A candidate slow enough that the evaluator falls behind.
        let slow = "package t\ndecision := {\"allow\": n > 0} if n := count([x | some a in numbers.range(1, 100); some b in numbers.range(1, 100); some c in numbers.range(1, 20); x := a + b + c])\n";
        let dir = test_tree(&[("t.rego", slow)]);
        let shadow = shadow();
        shadow
            .load(Bundle::read(dir.path()).expect("read"))
            .expect("load");
        let live = Verdict {
            allow: true,
            reasons: vec![],
        };
        let offered = QUEUE_LEN as u64 + 200;
        for i in 0..offered {
            shadow.offer(&format!("d{i}"), json!({"kind": "message"}), live.clone());
        }
        let status = shadow.status();
        assert!(status.dropped >= 100, "{}", status.dropped);
        assert!(status.evaluated + status.dropped <= offered);
    }
}

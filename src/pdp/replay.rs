//! Replaying a recorded decision log against a candidate bundle (`msgnode policy replay`).
//!
//! Each JSON line of an OPA-shaped decision log (what `[pdp.decision_log]` writes, or OPA's
//! own) is re-decided at its `path` with its `input` *as logged*: a field the log masked is
//! `"**REDACTED**"` for the candidate too, so each record says which of its fields were masked
//! (`erased`) and the report counts them. Records without input, and records whose live
//! decision failed (`error`), are skipped and counted. Differences are grouped as the shadow
//! groups them ([`Group`]: from, to, kind, the denying side's first reason), with examples.
//!
//! A log may be large or hostile: lines are read at most [`MAX_LINE_BYTES`] at a time (a
//! longer one is skipped and counted unreadable), bytes that are not UTF-8 are read as U+FFFD
//! (counted), groups and masked fields are capped ([`MAX_GROUPS`], [`MAX_FIELDS`]; the rest
//! count as `(other)`), verdicts are cut ([`Verdict::cut`]), and the text report escapes
//! control characters, so a logged string cannot drive the terminal.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{BufRead, Read};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::decision_log::cut_text_to;
use super::engine::{CompiledBundle, DataPath};
use super::shadow::{Group, Verdict, MAX_GROUPS};

/// Examples kept per group.
pub const EXAMPLES: usize = 3;
/// Longest line read; a longer one is skipped (counted unreadable).
pub const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;
/// Distinct masked fields counted; past it they count as `(other)`.
pub const MAX_FIELDS: usize = 256;
/// Longest kind kept in a group.
const MAX_KIND_BYTES: usize = 64;
/// Masked fields an example names.
const EXAMPLE_FIELDS: usize = 16;
/// What groups and fields past their cap count as.
const OTHER: &str = "(other)";

/// One record, as far as replay reads it.
#[derive(Debug, Deserialize)]
struct Logged {
    #[serde(default)]
    decision_id: String,
    #[serde(default)]
    path: String,
    input: Option<Value>,
    result: Option<Value>,
    error: Option<Value>,
    #[serde(default)]
    erased: Vec<String>,
}

/// One changed decision.
#[derive(Debug, Clone, Serialize)]
pub struct Example {
    /// The logged decision's id.
    pub decision_id: String,
    /// Its line in the log (1-based).
    pub line: usize,
    /// The logged verdict.
    pub live: Verdict,
    /// The candidate's verdict.
    pub candidate: Verdict,
    /// Input fields that were masked in the log (the candidate saw the mask).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub masked: Vec<String>,
}

/// Decisions of one group that changed.
#[derive(Debug, Clone, Serialize)]
pub struct Changed {
    /// From, to, kind and reason.
    #[serde(flatten)]
    pub group: Group,
    /// How many.
    pub count: usize,
    /// How many of them had masked fields.
    pub masked: usize,
    /// The first few.
    pub examples: Vec<Example>,
}

/// What a replay found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The candidate's revision.
    pub revision: String,
    /// Lines read (records and unreadable lines; blank lines are not counted).
    pub lines: usize,
    /// Records re-decided.
    pub replayed: usize,
    /// Re-decided the same way (allow as allow, deny as deny).
    pub unchanged: usize,
    /// Logged allows the candidate denies.
    pub allow_to_deny: usize,
    /// Logged denies the candidate allows.
    pub deny_to_allow: usize,
    /// Records without an input (nothing to re-decide).
    pub skipped_no_input: usize,
    /// Records whose live decision failed (no verdict to compare with).
    pub skipped_error: usize,
    /// Lines that are not a decision record: (line, why), the first few.
    pub unreadable: Vec<(usize, String)>,
    /// How many lines were unreadable.
    pub unreadable_count: usize,
    /// Lines with bytes that are not UTF-8 (read with U+FFFD in their place).
    pub not_utf8: usize,
    /// Records whose input had masked fields.
    pub masked_records: usize,
    /// Masked fields, by JSON pointer, and in how many records.
    pub masked_fields: BTreeMap<String, usize>,
    /// The differences, most frequent group first.
    pub changed: Vec<Changed>,
}

/// The verdict of `result` at a data path: a boolean is itself (`…/allow` paths), anything
/// else is read as a decision rule's result.
fn verdict(result: Option<&Value>, query: &str) -> Verdict {
    match result {
        Some(Value::Bool(allow)) => Verdict {
            allow: *allow,
            reasons: Vec::new(),
        },
        other => Verdict::of(other, query),
    }
}

/// Re-decides every record of `log` with `candidate`.
///
/// # Errors
/// Reading `log` failed.
pub fn replay(log: impl BufRead, candidate: &CompiledBundle) -> std::io::Result<Report> {
    let mut report = Report {
        revision: candidate.revision().to_string(),
        ..Report::default()
    };
    let mut groups: BTreeMap<Group, Changed> = BTreeMap::new();
    let mut log = log;
    let mut bytes = Vec::new();
    for index in 0.. {
        bytes.clear();
        let limit = MAX_LINE_BYTES as u64 + 1;
        if (&mut log).take(limit).read_until(b'\n', &mut bytes)? == 0 {
            break;
        }
        let number = index + 1;
        if bytes.len() > MAX_LINE_BYTES && bytes.last() != Some(&b'\n') {
            log.skip_until(b'\n')?;
            report.lines += 1;
            report.unreadable_count += 1;
            if report.unreadable.len() < EXAMPLES {
                let why = format!("longer than {MAX_LINE_BYTES} bytes: skipped");
                report.unreadable.push((number, why));
            }
            continue;
        }
        let line = String::from_utf8_lossy(&bytes);
        if matches!(line, Cow::Owned(_)) {
            report.not_utf8 += 1;
        }
        if line.trim().is_empty() {
            continue;
        }
        report.lines += 1;
        let parsed = serde_json::from_str::<Logged>(&line)
            .map_err(|e| e.to_string())
            .and_then(|r| {
                DataPath::from_url_path(&r.path)
                    .map(|p| (r, p))
                    .map_err(|e| e.to_string())
            });
        let (record, path) = match parsed {
            Ok(parsed) => parsed,
            Err(why) => {
                report.unreadable_count += 1;
                if report.unreadable.len() < EXAMPLES {
                    report.unreadable.push((number, why));
                }
                continue;
            }
        };
        let Some(input) = record.input else {
            report.skipped_no_input += 1;
            continue;
        };
        if record.error.is_some() {
            report.skipped_error += 1;
            continue;
        }
        if !record.erased.is_empty() {
            report.masked_records += 1;
            for field in &record.erased {
                let known = report.masked_fields.contains_key(field);
                let field = match known || report.masked_fields.len() < MAX_FIELDS {
                    true => field.clone(),
                    false => OTHER.to_string(),
                };
                *report.masked_fields.entry(field).or_default() += 1;
            }
        }
        let live = verdict(record.result.as_ref(), path.as_query()).cut();
        let rego = <regorus::Value as Deserialize>::deserialize(&input);
        let candidate_verdict = match rego {
            Ok(rego) => match candidate.evaluate(&path, Some(rego)) {
                Ok(result) => verdict(result.as_ref(), path.as_query()),
                Err(error) => Verdict::failed(&error),
            },
            Err(e) => Verdict {
                allow: false,
                reasons: vec![format!("policy error: input cannot be evaluated: {e}")],
            },
        };
        let candidate_verdict = candidate_verdict.cut();
        report.replayed += 1;
        match (live.allow, candidate_verdict.allow) {
            (true, false) => report.allow_to_deny += 1,
            (false, true) => report.deny_to_allow += 1,
            _ => {
                report.unchanged += 1;
                continue;
            }
        }
        let mut kind = input
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        cut_text_to(&mut kind, MAX_KIND_BYTES);
        let mut group = Group::of(&kind, &live, &candidate_verdict);
        if !groups.contains_key(&group) && groups.len() >= MAX_GROUPS {
            group.kind = OTHER.to_string();
            group.reason = OTHER.to_string();
        }
        let entry = groups.entry(group.clone()).or_insert_with(|| Changed {
            group,
            count: 0,
            masked: 0,
            examples: Vec::new(),
        });
        entry.count += 1;
        entry.masked += usize::from(!record.erased.is_empty());
        if entry.examples.len() < EXAMPLES {
            let (mut decision_id, mut masked) = (record.decision_id, record.erased);
            cut_text_to(&mut decision_id, MAX_KIND_BYTES);
            masked.truncate(EXAMPLE_FIELDS);
            entry.examples.push(Example {
                decision_id,
                line: number,
                live,
                candidate: candidate_verdict,
                masked,
            });
        }
    }
    report.changed = groups.into_values().collect();
    report
        .changed
        .sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.group.cmp(&b.group)));
    Ok(report)
}

/// `text` with its control characters escaped (`\u{1b}`), as it may be printed to a
/// terminal.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(
        text.chars()
            .map(|c| match c.is_control() {
                true => c.escape_default().to_string(),
                false => c.to_string(),
            })
            .collect(),
    )
}

impl Report {
    /// The report for people: totals, masked fields, then each group with its examples.
    pub fn to_text(&self, log: &str) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "replayed {} of {} records of {} against revision {}",
            self.replayed,
            self.lines,
            printable(log),
            printable(&self.revision)
        );
        let _ = writeln!(
            out,
            "  unchanged: {}   allow → deny: {}   deny → allow: {}",
            self.unchanged, self.allow_to_deny, self.deny_to_allow
        );
        if self.skipped_no_input + self.skipped_error + self.unreadable_count > 0 {
            let _ = writeln!(
                out,
                "  skipped: {} without input, {} whose live decision failed, {} unreadable lines",
                self.skipped_no_input, self.skipped_error, self.unreadable_count
            );
            for (line, why) in &self.unreadable {
                let _ = writeln!(out, "    line {line}: {}", printable(why));
            }
        }
        if self.not_utf8 > 0 {
            let _ = writeln!(
                out,
                "  {} lines had bytes that are not UTF-8 (read as U+FFFD)",
                self.not_utf8
            );
        }
        if self.masked_records > 0 {
            let _ = writeln!(
                out,
                "  masked: {} records had fields masked in the log; they were re-decided as logged (\"{}\"):",
                self.masked_records,
                super::decision_log::MASKED
            );
            for (field, n) in &self.masked_fields {
                let _ = writeln!(out, "    {} ({n})", printable(field));
            }
        }
        for changed in &self.changed {
            let g = &changed.group;
            let reason = match g.reason.is_empty() {
                true => "(no reason)".to_string(),
                false => format!("{:?}", g.reason),
            };
            let _ = writeln!(
                out,
                "\n{} → {}  kind {}  reason {reason}: {}",
                g.from,
                g.to,
                if g.kind.is_empty() {
                    Cow::Borrowed("(none)")
                } else {
                    printable(&g.kind)
                },
                changed.count
            );
            if changed.masked > 0 {
                let _ = writeln!(
                    out,
                    "  {} of them had masked fields: the mask may be why",
                    changed.masked
                );
            }
            for e in &changed.examples {
                let why = |v: &Verdict| match v.reasons.is_empty() {
                    true => v.label().to_string(),
                    false => format!("{}: {}", v.label(), printable(&v.reasons.join("; "))),
                };
                let _ = writeln!(
                    out,
                    "  e.g. {} (line {}): logged {}; candidate {}",
                    printable(&e.decision_id),
                    e.line,
                    why(&e.live),
                    why(&e.candidate)
                );
                if !e.masked.is_empty() {
                    let _ = writeln!(out, "       masked: {}", printable(&e.masked.join(", ")));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdp::bundle::Bundle;
    use crate::pdp::test_tree;
    use std::time::Duration;

    const CANDIDATE: &str = r#"package t
default allow := false
allow if input.user == "bob"
reasons contains "only bob" if not allow
decision := {"allow": allow, "reasons": reasons}
"#;

    fn line(id: &str, input: &str, result: &str, extra: &str) -> String {
        format!(
            r#"{{"decision_id":"{id}","path":"t/decision","input":{input},"result":{result}{extra}}}"#
        )
    }

    fn candidate() -> CompiledBundle {
        let dir = test_tree(&[("t.rego", CANDIDATE)]);
        CompiledBundle::compile(
            Bundle::read(dir.path()).expect("read"),
            Duration::from_secs(1),
        )
        .expect("compile")
    }

    /// Findings 7 and 8 of the console review: a hostile log — a line with no end, bytes
    /// that are not UTF-8, a kind per line, escape sequences — is read within bounds, to the
    /// end, and printed harmless.
    #[test]
    fn a_hostile_log_is_read_within_bounds_and_printed_harmless() {
        let allowed = r#"{"allow":true,"reasons":[]}"#;
        let mut log = Vec::new();
        log.extend_from_slice(b"{\"decision_id\":\"");
        log.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES + 10));
        log.push(b'\n');
        log.extend_from_slice(b"{\"decision_id\":\"bad-\xff\xfe\",\"path\":\"t/decision\",\"input\":{\"user\":\"alice\"},\"result\":{\"allow\":true}}\n");
        for i in 0..(MAX_GROUPS + 50) {
            let input = format!(r#"{{"kind":"k{i}","user":"alice"}}"#);
            log.extend_from_slice(line(&format!("g{i}"), &input, allowed, "").as_bytes());
            log.push(b'\n');
        }
        let evil = line(
            r"\u001b]0;owned\u0007",
            r#"{"kind":"\u001b[2J","user":"alice"}"#,
            allowed,
            r#","erased":["/input/\u001b[31m"]"#,
        );
        log.extend_from_slice(evil.as_bytes());
        let report = replay(log.as_slice(), &candidate()).expect("replay");
        assert_eq!(report.unreadable_count, 1, "{:?}", report.unreadable);
        assert!(
            report.unreadable[0].1.contains("longer than"),
            "{:?}",
            report.unreadable
        );
        assert_eq!(report.not_utf8, 1);
        assert_eq!(
            report.replayed,
            MAX_GROUPS + 52,
            "every other line was replayed"
        );
        assert!(
            report.changed.len() <= MAX_GROUPS + 2,
            "{}",
            report.changed.len()
        );
        assert!(report.changed.iter().any(|c| c.group.reason == "(other)"));
        let text = report.to_text("log\u{1b}[2J");
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text:?}"
        );
        assert!(text.contains("\\u{1b}"), "escaped, not dropped");
    }

    #[test]
    fn changes_are_counted_grouped_and_masked_fields_said() {
        let dir = test_tree(&[("t.rego", CANDIDATE)]);
        let bundle = CompiledBundle::compile(
            Bundle::read(dir.path()).expect("read"),
            Duration::from_secs(1),
        )
        .expect("compile");
        let allowed = r#"{"allow":true,"reasons":[]}"#;
        let denied = r#"{"allow":false,"reasons":["not alice"]}"#;
        let log = [
            line("a1", r#"{"kind":"message","user":"alice"}"#, allowed, ""),
            line("a2", r#"{"kind":"message","user":"alice","token":"**REDACTED**"}"#, allowed, r#","erased":["/input/token"]"#),
            line("b1", r#"{"kind":"message","user":"bob"}"#, denied, ""),
            line("b2", r#"{"kind":"claim","user":"bob"}"#, allowed, ""),
            r#"{"decision_id":"e1","path":"t/decision","input":{},"error":{"code":"internal_error","message":"x"}}"#.to_string(),
            r#"{"decision_id":"n1","path":"t/decision"}"#.to_string(),
            "not json".to_string(),
            String::new(),
        ]
        .join("\n");
        let report = replay(log.as_bytes(), &bundle).expect("replay");
        assert_eq!(report.lines, 7);
        assert_eq!(report.replayed, 4);
        assert_eq!(
            (report.allow_to_deny, report.deny_to_allow, report.unchanged),
            (2, 1, 1)
        );
        assert_eq!(
            (
                report.skipped_error,
                report.skipped_no_input,
                report.unreadable_count
            ),
            (1, 1, 1)
        );
        assert_eq!(report.masked_records, 1);
        assert_eq!(report.masked_fields.get("/input/token"), Some(&1));
        let first = &report.changed[0];
        assert_eq!(
            (first.group.from, first.group.to, first.group.kind.as_str()),
            ("allow", "deny", "message")
        );
        assert_eq!((first.count, first.masked), (2, 1));
        assert_eq!(first.group.reason, "only bob");
        let text = report.to_text("decisions.jsonl");
        assert!(text.contains("allow → deny: 2   deny → allow: 1"), "{text}");
        assert!(text.contains("/input/token (1)"), "{text}");
        assert!(
            text.contains("e.g. b1 (line 3): logged deny: not alice; candidate allow"),
            "{text}"
        );
    }
}

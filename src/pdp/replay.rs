//! Replaying a recorded decision log against a candidate bundle (`msgnode policy replay`).
//!
//! Each JSON line of an OPA-shaped decision log (what `[pdp.decision_log]` writes, or OPA's
//! own) is re-decided at its `path` with its `input` *as logged*: a field the log masked is
//! `"**REDACTED**"` for the candidate too, so each record says which of its fields were masked
//! (`erased`) and the report counts them. Records without input, and records whose live
//! decision failed (`error`), are skipped and counted. Differences are grouped as the shadow
//! groups them ([`Group`]: from, to, kind, the denying side's first reason), with examples.

use std::collections::BTreeMap;
use std::io::BufRead;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::engine::{CompiledBundle, DataPath};
use super::shadow::{Group, Verdict};

/// Examples kept per group.
pub const EXAMPLES: usize = 3;

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
    for (index, line) in log.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        report.lines += 1;
        let number = index + 1;
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
                *report.masked_fields.entry(field.clone()).or_default() += 1;
            }
        }
        let live = verdict(record.result.as_ref(), path.as_query());
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
        report.replayed += 1;
        match (live.allow, candidate_verdict.allow) {
            (true, false) => report.allow_to_deny += 1,
            (false, true) => report.deny_to_allow += 1,
            _ => {
                report.unchanged += 1;
                continue;
            }
        }
        let kind = input.get("kind").and_then(Value::as_str).unwrap_or("");
        let group = Group::of(kind, &live, &candidate_verdict);
        let entry = groups.entry(group.clone()).or_insert_with(|| Changed {
            group,
            count: 0,
            masked: 0,
            examples: Vec::new(),
        });
        entry.count += 1;
        entry.masked += usize::from(!record.erased.is_empty());
        if entry.examples.len() < EXAMPLES {
            entry.examples.push(Example {
                decision_id: record.decision_id,
                line: number,
                live,
                candidate: candidate_verdict,
                masked: record.erased,
            });
        }
    }
    report.changed = groups.into_values().collect();
    report
        .changed
        .sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.group.cmp(&b.group)));
    Ok(report)
}

impl Report {
    /// The report for people: totals, masked fields, then each group with its examples.
    pub fn to_text(&self, log: &str) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "replayed {} of {} records of {log} against revision {}",
            self.replayed, self.lines, self.revision
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
                let _ = writeln!(out, "    line {line}: {why}");
            }
        }
        if self.masked_records > 0 {
            let _ = writeln!(
                out,
                "  masked: {} records had fields masked in the log; they were re-decided as logged (\"{}\"):",
                self.masked_records,
                super::decision_log::MASKED
            );
            for (field, n) in &self.masked_fields {
                let _ = writeln!(out, "    {field} ({n})");
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
                if g.kind.is_empty() { "(none)" } else { &g.kind },
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
                    false => format!("{}: {}", v.label(), v.reasons.join("; ")),
                };
                let _ = writeln!(
                    out,
                    "  e.g. {} (line {}): logged {}; candidate {}",
                    e.decision_id,
                    e.line,
                    why(&e.live),
                    why(&e.candidate)
                );
                if !e.masked.is_empty() {
                    let _ = writeln!(out, "       masked: {}", e.masked.join(", "));
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

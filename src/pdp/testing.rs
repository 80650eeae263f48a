//! Policy tests, as `opa test` runs them, plus fixture files.
//!
//! Two kinds of test: every rule named `test_*` in the bundle's `*_test.rego` modules must
//! evaluate to `true`; and every fixture of the bundle — `{"description", "query"?, "input",
//! "expect": {"allow", "reasons"?}}` — is validated against the input schema, evaluated, and
//! must give the expected `allow` and contain each expected reason (as a substring of some
//! actual reason). Coverage, when asked for, is gathered by one engine over all tests and
//! reported per non-test module. `msgnode policy test` and the reload gate
//! (`[pdp] reload_requires_tests`) both run [`run`].

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::bundle::{Bundle, BundleError, FixtureFile};
use super::elapsed_ns;
use super::engine::{one_line, CompiledBundle, DataPath};
use super::schema::Schemas;

/// What to run.
#[derive(Debug, Clone)]
pub struct TestOptions {
    /// Query of fixtures that name none (and the rule checked on the bytecode VM).
    pub decision: DataPath,
    /// Only tests whose name matches (`-r`, a regular expression as in `opa test -r`).
    pub filter: Option<regex::Regex>,
    /// Gather line coverage.
    pub coverage: bool,
    /// Time limit of one test's evaluation.
    pub timeout: Duration,
}

/// Which schema fixture inputs must match.
#[derive(Clone, Copy)]
pub enum FixtureSchema<'a> {
    /// The named schema file (`policy test --input-schema`).
    Named(&'a Schemas, &'a str),
    /// The schema bound to the fixture's query path (`[pdp] schemas`, as the API checks).
    Bound(&'a Schemas),
}

/// Why the tests could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// The bundle does not compile.
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

/// The outcome of one test.
#[derive(Debug, Clone, Serialize)]
pub struct TestResult {
    /// `data.pkg.test_x` or the fixture's path.
    pub name: String,
    /// `rego` or `fixture`.
    pub kind: &'static str,
    /// Whether it passed.
    pub passed: bool,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Fixture description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Wall time.
    pub duration_ns: u64,
}

/// Line coverage of one module.
#[derive(Debug, Clone, Serialize)]
pub struct FileCoverage {
    /// Module path.
    pub file: String,
    /// Lines evaluated.
    pub covered: Vec<u32>,
    /// Lines with code that were not evaluated.
    pub not_covered: Vec<u32>,
}

impl FileCoverage {
    /// Covered share of lines with code, in percent.
    pub fn percent(&self) -> f64 {
        let total = self.covered.len() + self.not_covered.len();
        if total == 0 {
            100.0
        } else {
            self.covered.len() as f64 * 100.0 / total as f64
        }
    }
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct TestReport {
    /// One entry per test, rego tests first, each group sorted by name.
    pub results: Vec<TestResult>,
    /// Tests that passed.
    pub passed: usize,
    /// Tests that failed.
    pub failed: usize,
    /// With `coverage`: per module.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coverage: Option<Vec<FileCoverage>>,
    /// With `coverage`: covered share of all lines with code, in percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coverage_percent: Option<f64>,
}

impl TestReport {
    /// Names of the tests that failed.
    pub fn failures(&self) -> Vec<String> {
        self.results
            .iter()
            .filter(|r| !r.passed)
            .map(|r| r.name.clone())
            .collect()
    }
}

/// A fixture: an input and the decision expected for it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fixture {
    /// What it shows, for people.
    #[serde(default)]
    pub description: Option<String>,
    /// The rule to evaluate; default: the decision rule.
    #[serde(default)]
    pub query: Option<String>,
    /// The input document.
    pub input: Value,
    /// The decision expected.
    pub expect: Expectation,
}

/// What a fixture expects.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expectation {
    /// The expected `allow`.
    pub allow: bool,
    /// Texts each of which some actual reason must contain.
    #[serde(default)]
    pub reasons: Vec<String>,
}

impl Fixture {
    /// Parses a fixture file's text.
    ///
    /// # Errors
    /// Not JSON, or not a fixture (unknown keys, no `input` or `expect`).
    pub fn parse(text: &str) -> Result<Fixture, String> {
        serde_json::from_str(text).map_err(|e| format!("not a fixture: {e}"))
    }

    /// Whether `value` (a decision `{"allow", "reasons"}`) is what the fixture expects.
    ///
    /// # Errors
    /// Another `allow`, no boolean `allow`, or an expected reason missing — saying which.
    pub fn compare(&self, value: &Value) -> Result<(), String> {
        let allow = value.get("allow").and_then(Value::as_bool);
        let reasons: Vec<&str> = value
            .get("reasons")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if allow != Some(self.expect.allow) {
            return Err(format!(
                "expected allow={}, got {} (reasons: {reasons:?})",
                self.expect.allow,
                allow.map_or("no boolean allow".to_string(), |a| format!("allow={a}"))
            ));
        }
        let missing: Vec<&String> = self
            .expect
            .reasons
            .iter()
            .filter(|want| !reasons.iter().any(|r| r.contains(want.as_str())))
            .collect();
        if !missing.is_empty() {
            return Err(format!("missing reasons {missing:?}; got {reasons:?}"));
        }
        Ok(())
    }
}

/// Runs every test of `bundle` (its `*_test.rego` modules and fixtures).
///
/// # Errors
/// The bundle does not compile with its tests. Failing tests are not errors: they are in the
/// report.
pub fn run(
    bundle: &Bundle,
    options: &TestOptions,
    schema: FixtureSchema<'_>,
) -> Result<TestReport, TestError> {
    let compiled = CompiledBundle::compile(bundle.with_tests(), options.timeout)?;
    let default_query = &options.decision;
    let mut engine = compiled.engine();
    engine.set_enable_coverage(options.coverage);
    // The server runs the decision rule on the bytecode VM: check it agrees with the
    // interpreter on every fixture.
    let (fast, rvm_error) = compiled.clone().with_fast_path(default_query, usize::MAX);
    let vm = Crosscheck {
        bundle: rvm_error.is_none().then_some(&fast),
        query: default_query,
    };
    let wanted = |name: &str| options.filter.as_ref().is_none_or(|f| f.is_match(name));

    let mut results = Vec::new();
    let mut tests: Vec<&str> = compiled
        .rules()
        .filter(|r| r.rsplit('.').next().is_some_and(|n| n.starts_with("test_")))
        .filter(|r| wanted(r))
        .collect();
    tests.sort_unstable();
    for test in tests {
        let start = Instant::now();
        engine.set_input(regorus::Value::Undefined);
        let outcome = engine.eval_rule(test.to_string());
        let (passed, message) = match outcome {
            Ok(regorus::Value::Bool(true)) => (true, None),
            Ok(regorus::Value::Undefined) => (
                false,
                Some("undefined (a condition in the test body was false)".to_string()),
            ),
            Ok(other) => (false, Some(format!("evaluated to {other}, expected true"))),
            Err(e) => (false, Some(one_line(&e.to_string()))),
        };
        results.push(TestResult {
            name: test.to_string(),
            kind: "rego",
            passed,
            message,
            description: None,
            duration_ns: elapsed_ns(start),
        });
    }

    for fixture in &bundle.fixtures {
        if !wanted(&fixture.path) {
            continue;
        }
        let start = Instant::now();
        let (description, outcome) = run_fixture(fixture, &mut engine, schema, &vm);
        results.push(TestResult {
            name: fixture.path.clone(),
            kind: "fixture",
            passed: outcome.is_ok(),
            message: outcome.err(),
            description,
            duration_ns: elapsed_ns(start),
        });
    }

    let coverage = options.coverage.then(|| coverage(&engine));
    let coverage_percent = coverage.as_deref().map(total_percent);
    let passed = results.iter().filter(|r| r.passed).count();
    Ok(TestReport {
        failed: results.len() - passed,
        passed,
        results,
        coverage,
        coverage_percent,
    })
}

/// Covered share of all lines with code of `files`, in percent (100 with none).
fn total_percent(files: &[FileCoverage]) -> f64 {
    let covered: usize = files.iter().map(|f| f.covered.len()).sum();
    let total: usize = files
        .iter()
        .map(|f| f.covered.len() + f.not_covered.len())
        .sum();
    if total == 0 {
        100.0
    } else {
        covered as f64 * 100.0 / total as f64
    }
}

/// The bytecode-VM build of the decision rule, to compare with the interpreter.
struct Crosscheck<'a> {
    bundle: Option<&'a CompiledBundle>,
    query: &'a DataPath,
}

fn run_fixture(
    file: &FixtureFile,
    engine: &mut regorus::Engine,
    schema: FixtureSchema<'_>,
    vm: &Crosscheck<'_>,
) -> (Option<String>, Result<(), String>) {
    let default_query = vm.query;
    let fixture = match Fixture::parse(&file.text) {
        Ok(f) => f,
        Err(e) => return (None, Err(e)),
    };
    let description = fixture.description.clone();
    let outcome = (|| {
        let query = match &fixture.query {
            Some(q) => DataPath::from_ref(q).map_err(|e| e.to_string())?,
            None => default_query.clone(),
        };
        match schema {
            FixtureSchema::Named(schemas, name) => schemas.validate(name, &fixture.input),
            FixtureSchema::Bound(schemas) => {
                schemas.validate_for_path(query.segments(), &fixture.input)
            }
        }
        .map_err(|v| v.to_string())?;
        engine.set_input(regorus::Value::from(fixture.input.clone()));
        let value = engine
            .eval_rule(query.as_query().to_string())
            .map_err(|e| format!("evaluation failed: {}", one_line(&e.to_string())))?;
        if value == regorus::Value::Undefined {
            return Err(format!("{query} is undefined"));
        }
        let value = serde_json::to_value(&value).map_err(|e| e.to_string())?;
        if let Some(fast) = vm.bundle.filter(|b| b.is_fast_path(&query)) {
            let on_vm = fast
                .evaluate(&query, Some(regorus::Value::from(fixture.input.clone())))
                .map_err(|e| format!("bytecode VM failed where the interpreter did not: {e}"))?;
            if on_vm.as_ref() != Some(&value) {
                return Err(format!(
                    "bytecode VM and interpreter disagree: vm={}, interpreter={value}",
                    on_vm.map_or("undefined".to_string(), |v| v.to_string())
                ));
            }
        }
        fixture.compare(&value)
    })();
    (description, outcome)
}

fn coverage(engine: &regorus::Engine) -> Vec<FileCoverage> {
    let Ok(report) = engine.get_coverage_report() else {
        return Vec::new();
    };
    let mut files: Vec<FileCoverage> = report
        .files
        .into_iter()
        .filter(|f| !f.path.ends_with("_test.rego"))
        .map(|f| FileCoverage {
            file: f.path,
            covered: f.covered.into_iter().collect(),
            not_covered: f.not_covered.into_iter().collect(),
        })
        .collect();
    files.sort_by(|a, b| a.file.cmp(&b.file));
    files
}

/// `1, 2, 3, 7, 9, 10` → `1-3, 7, 9-10`.
pub fn line_ranges(lines: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut iter = lines.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_in(files: &[(&str, &str)]) -> TestReport {
        let mut files = files.to_vec();
        files.push((
            "schemas/in.json",
            r#"{"type": "object", "required": ["user"]}"#,
        ));
        let dir = crate::pdp::test_tree(&files);
        let schemas =
            Schemas::load(&dir.path().join("schemas"), std::iter::empty()).expect("schemas");
        let bundle = Bundle::read(&dir.path().join("p")).expect("bundle");
        run(
            &bundle,
            &TestOptions {
                decision: DataPath::from_ref("data.t.decision").expect("ref"),
                filter: None,
                coverage: true,
                timeout: Duration::from_secs(5),
            },
            FixtureSchema::Named(&schemas, "in.json"),
        )
        .expect("run")
    }

    const POLICY: &str = "package t\ndefault allow := false\nallow if input.user == \"alice\"\nreasons contains \"not alice\" if not allow\ndecision := {\"allow\": allow, \"reasons\": reasons}\n";

    #[test]
    fn rego_tests_and_fixtures_pass_and_fail() {
        let report = run_in(&[
            ("p/t.rego", POLICY),
            (
                "p/t_test.rego",
                "package t_test\ntest_alice if data.t.allow with input as {\"user\": \"alice\"}\ntest_bob_fails if data.t.allow with input as {\"user\": \"bob\"}\n",
            ),
            ("p/fixtures/a_ok.json", r#"{"input": {"user": "alice"}, "expect": {"allow": true}}"#),
            ("p/fixtures/b_reason.json", r#"{"input": {"user": "bob"}, "expect": {"allow": false, "reasons": ["not alice"]}}"#),
            ("p/fixtures/c_wrong.json", r#"{"input": {"user": "bob"}, "expect": {"allow": true}}"#),
            ("p/fixtures/d_schema.json", r#"{"input": {"usr": "bob"}, "expect": {"allow": false}}"#),
            ("p/fixtures/e_missing_reason.json", r#"{"input": {"user": "bob"}, "expect": {"allow": false, "reasons": ["nope"]}}"#),
        ]);
        let by_name = |suffix: &str| {
            report
                .results
                .iter()
                .find(|r| r.name.ends_with(suffix))
                .expect(suffix)
        };
        assert!(by_name("test_alice").passed);
        assert!(!by_name("test_bob_fails").passed);
        assert!(by_name("a_ok.json").passed);
        assert!(by_name("b_reason.json").passed);
        assert!(by_name("c_wrong.json")
            .message
            .as_deref()
            .unwrap_or("")
            .contains("expected allow=true"));
        assert!(by_name("d_schema.json")
            .message
            .as_deref()
            .unwrap_or("")
            .contains("does not match schema"));
        assert!(by_name("e_missing_reason.json")
            .message
            .as_deref()
            .unwrap_or("")
            .contains("missing reasons"));
        assert_eq!((report.passed, report.failed), (3, 4));
        let coverage = report.coverage.expect("coverage");
        assert_eq!(coverage.len(), 1, "test modules are not reported");
        assert!(!coverage[0].covered.is_empty());
        let total = report.coverage_percent.expect("total");
        assert!((total - coverage[0].percent()).abs() < 1e-9, "{total}");
    }

    #[test]
    fn line_ranges_compress() {
        assert_eq!(line_ranges(&[1, 2, 3, 7, 9, 10]), "1-3, 7, 9-10");
        assert_eq!(line_ranges(&[]), "");
    }
}

//! Policy tests, as `opa test` runs them, plus fixture files.
//!
//! Two kinds of test: every rule named `test_*` in the bundle's `*_test.rego` modules must
//! evaluate to `true`; and every fixture of the bundle — `{"description", "query"?, "input",
//! "expect": {"allow", "reasons"?}}` — is validated against the input schema, evaluated, and
//! must give the expected `allow` and contain each expected reason (as a substring of some
//! actual reason). Coverage, when asked for, is gathered by one engine over all tests and
//! reported per non-test module. `msgnode policy test` and the reload gate
//! (`[pdp] reload_requires_tests`) both run [`run`].
//!
//! Every fixture also runs on the bytecode VM, which serves the decision rule; with
//! `variants` (`policy test`, not the reload gate), so does every generated variant of each
//! fixture (`variants`): a variant the VM decides otherwise than the interpreter fails its
//! fixture's `variants` test. With `opa` (the real OPA engine's library), every test rule,
//! fixture and variant runs on OPA too and must come out the same (`agreement`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::agreement::{self, Outcome, SecondEngine};
use super::bundle::{Bundle, BundleError, FixtureFile};
use super::elapsed_ns;
use super::engine::{CompiledBundle, DataPath};
use super::schema::Schemas;
use super::variants::variants;

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
    /// Also decide every generated variant of each fixture on every engine.
    pub variants: bool,
    /// The real OPA engine's library: decide every test, fixture and variant on it too.
    pub opa: Option<PathBuf>,
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
    /// The OPA engine could not be loaded, or rejects the bundle.
    #[error("OPA: {0}")]
    Opa(String),
}

/// The outcome of one test.
#[derive(Debug, Clone, Serialize)]
pub struct TestResult {
    /// `data.pkg.test_x` or the fixture's path.
    pub name: String,
    /// `rego`, `fixture` or `variants` (the generated variants of a fixture).
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
    // interpreter on every fixture (and variant); and so must OPA, when given.
    let (fast, rvm_error) = compiled.clone().with_fast_path(default_query, usize::MAX);
    let vm = agreement::Vm(&fast);
    let opa = load_opa(options, &compiled, default_query)?;
    let mut others: Vec<&dyn SecondEngine> = Vec::new();
    if rvm_error.is_none() {
        others.push(&vm);
    }
    if let Some(opa) = &opa {
        others.push(opa.as_ref());
    }
    let engines = Engines {
        others: &others,
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
        let (passed, message) = run_rego_test(test, &mut engine, &engines);
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
        let (parsed, outcome) = run_fixture(fixture, &mut engine, schema, &engines);
        let description = parsed.as_ref().and_then(|f| f.description.clone());
        results.push(TestResult {
            name: fixture.path.clone(),
            kind: "fixture",
            passed: outcome.is_ok(),
            message: outcome.err(),
            description: description.clone(),
            duration_ns: elapsed_ns(start),
        });
        if let Some(parsed) = parsed.filter(|_| options.variants) {
            let start = Instant::now();
            let outcome = run_variants(&parsed, &mut engine, &engines);
            results.push(TestResult {
                name: format!("{} variants", fixture.path),
                kind: "variants",
                passed: outcome.is_ok(),
                message: outcome.err(),
                description,
                duration_ns: elapsed_ns(start),
            });
        }
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

/// The engines every test, fixture and variant runs on besides the interpreter.
struct Engines<'a> {
    others: &'a [&'a dyn SecondEngine],
    /// The default query (of fixtures that name none).
    query: &'a DataPath,
}

/// The OPA build of the bundle, when `options.opa` names the library.
#[cfg(feature = "opa")]
fn load_opa(
    options: &TestOptions,
    bundle: &CompiledBundle,
    query: &DataPath,
) -> Result<Option<Box<super::opa::OpaBundle>>, TestError> {
    let Some(path) = &options.opa else {
        return Ok(None);
    };
    let opa = super::opa::Opa::load(path).map_err(|e| TestError::Opa(e.to_string()))?;
    super::opa::OpaBundle::load(opa, bundle.bundle(), query)
        .map(|b| Some(Box::new(b)))
        .map_err(|e| TestError::Opa(e.to_string()))
}

#[cfg(not(feature = "opa"))]
fn load_opa(
    options: &TestOptions,
    _: &CompiledBundle,
    _: &DataPath,
) -> Result<Option<Box<dyn SecondEngine>>, TestError> {
    match options.opa {
        None => Ok(None),
        Some(_) => Err(TestError::Opa(
            "this msgnode was built without the `opa` feature".into(),
        )),
    }
}

/// A `test_*` rule: true on the interpreter, and on OPA when given.
fn run_rego_test(
    test: &str,
    engine: &mut regorus::Engine,
    engines: &Engines<'_>,
) -> (bool, Option<String>) {
    let Ok(rule) = DataPath::from_ref(test) else {
        return (false, Some(format!("{test} is not a rule reference")));
    };
    let expect = |outcome: Outcome| match outcome {
        Outcome::Document(Value::Bool(true)) => None,
        Outcome::Undefined => Some("undefined (a condition in the test body was false)".into()),
        Outcome::Document(other) => Some(format!("evaluated to {other}, expected true")),
        Outcome::Error(e) => Some(e),
    };
    if let Some(why) = expect(agreement::interpret(engine, &rule, None)) {
        return (false, Some(why));
    }
    for other in engines.others.iter().filter(|e| e.evaluates(&rule)) {
        if let Some(why) = expect(other.outcome(&rule, None)) {
            return (
                false,
                Some(format!("passes here, fails on {}: {why}", other.name())),
            );
        }
    }
    (true, None)
}

/// Every variant of a fixture's input decided alike by every engine.
fn run_variants(
    fixture: &Fixture,
    engine: &mut regorus::Engine,
    engines: &Engines<'_>,
) -> Result<(), String> {
    let query = fixture_query(fixture, engines)?;
    let all = variants(&fixture.input);
    let mut differ = Vec::new();
    for variant in &all {
        let reference = agreement::interpret(engine, &query, Some(&variant.input));
        let found =
            agreement::disagreements(&reference, engines.others, &query, Some(&variant.input));
        if !found.is_empty() {
            differ.push(format!("{}: {}", variant.change, found.join("; ")));
        }
    }
    if differ.is_empty() {
        return Ok(());
    }
    const SHOWN: usize = 3;
    let more = differ.len().saturating_sub(SHOWN);
    differ.truncate(SHOWN);
    Err(format!(
        "{} of {} variants decided differently: {}{}",
        differ.len() + more,
        all.len(),
        differ.join(" | "),
        if more > 0 {
            format!(" | … {more} more")
        } else {
            String::new()
        }
    ))
}

fn fixture_query(fixture: &Fixture, engines: &Engines<'_>) -> Result<DataPath, String> {
    match &fixture.query {
        Some(q) => DataPath::from_ref(q).map_err(|e| e.to_string()),
        None => Ok(engines.query.clone()),
    }
}

fn run_fixture(
    file: &FixtureFile,
    engine: &mut regorus::Engine,
    schema: FixtureSchema<'_>,
    engines: &Engines<'_>,
) -> (Option<Fixture>, Result<(), String>) {
    let fixture = match Fixture::parse(&file.text) {
        Ok(f) => f,
        Err(e) => return (None, Err(e)),
    };
    let outcome = (|| {
        let query = fixture_query(&fixture, engines)?;
        match schema {
            FixtureSchema::Named(schemas, name) => schemas.validate(name, &fixture.input),
            FixtureSchema::Bound(schemas) => {
                schemas.validate_for_path(query.segments(), &fixture.input)
            }
        }
        .map_err(|v| v.to_string())?;
        let reference = agreement::interpret(engine, &query, Some(&fixture.input));
        let value = match &reference {
            Outcome::Document(value) => value,
            Outcome::Undefined => return Err(format!("{query} is undefined")),
            Outcome::Error(e) => return Err(format!("evaluation failed: {e}")),
        };
        let differ =
            agreement::disagreements(&reference, engines.others, &query, Some(&fixture.input));
        if !differ.is_empty() {
            return Err(format!("the engines disagree: {}", differ.join("; ")));
        }
        fixture.compare(value)
    })();
    (Some(fixture), outcome)
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
                variants: true,
                opa: None,
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
        assert!(by_name("a_ok.json variants").passed);
        // Each fixture's variants agree on both engines, failing fixtures' too.
        assert_eq!((report.passed, report.failed), (8, 4));
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

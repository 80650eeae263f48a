//! The compiled form of one bundle revision, and evaluation against it.
//! (One concern: the file is past 600 lines only with its tests.)
//!
//! A [`CompiledBundle`] holds a regorus `Engine` that has parsed every module, merged the data
//! and been prepared (analysed) once. Each thread evaluates on its own copy, cloned from the
//! compiled engine the first time the thread evaluates that revision and reused after that
//! (a clone copies the interpreter's rule tables, which costs tens of microseconds on a real
//! bundle — more than an evaluation). So evaluations never wait on one another and no lock
//! is held while one runs. The regorus execution timer bounds each evaluation.
//!
//! The rule the node decides every request with can also be compiled for regorus's bytecode
//! VM (RVM) with [`CompiledBundle::with_fast_path`]: several times faster than the
//! interpreter on the shipped bundle. Each thread's VM gets its own copy of the program's
//! literals and of the data, sharing no reference count with another thread's: the VM
//! clones an `Rc` for every literal it loads and every data value it reads, and on shared
//! ones two cores would fight over the cache line of each count (two threads decided only
//! ~1.5 times as fast as one). Everything else (arbitrary `/v1/data` paths, policy
//! tests with `with`) runs on the interpreter, and so does the decision rule when the RVM
//! cannot compile it. `msgnode policy test` runs every fixture on both and fails when they
//! disagree.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::sync::Arc;

use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::vm::VmError;
use regorus::rvm::{Program, RegoVM};
use regorus::utils::limits::{ExecutionTimerConfig, LimitError};

use super::bundle::{Bundle, BundleError, Location};

/// A path into the data document, e.g. `data.msgnode.authz.decision`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DataPath {
    segments: Vec<String>,
    query: String,
}

/// Why a string is not a usable data path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid data path {path:?}: {why}")]
pub struct DataPathError {
    path: String,
    why: &'static str,
}

impl DataPath {
    /// The root document (`data`).
    pub fn root() -> Self {
        Self::from_segments(Vec::new())
    }

    /// From URL path segments (`msgnode/authz`); empty segments (double or trailing slashes)
    /// are ignored, as OPA does.
    ///
    /// # Errors
    /// A segment with a control character.
    pub fn from_url_path(path: &str) -> Result<Self, DataPathError> {
        let segments: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if segments.iter().any(|s| s.chars().any(char::is_control)) {
            return Err(DataPathError {
                path: path.to_string(),
                why: "control characters are not allowed",
            });
        }
        Ok(Self::from_segments(segments))
    }

    /// From a dotted reference (`data.msgnode.authz.decision`); the `data.` prefix is optional.
    ///
    /// # Errors
    /// An empty segment or a segment that is not a Rego identifier.
    pub fn from_ref(reference: &str) -> Result<Self, DataPathError> {
        let rest = reference
            .strip_prefix("data")
            .filter(|r| r.is_empty() || r.starts_with('.'))
            .map(|r| r.trim_start_matches('.'))
            .unwrap_or(reference);
        if rest.is_empty() {
            return Ok(Self::root());
        }
        let segments: Vec<String> = rest.split('.').map(str::to_string).collect();
        if segments.iter().any(|s| !is_identifier(s)) {
            return Err(DataPathError {
                path: reference.to_string(),
                why: "each segment must be a Rego identifier",
            });
        }
        Ok(Self::from_segments(segments))
    }

    fn from_segments(segments: Vec<String>) -> Self {
        let mut query = String::from("data");
        for segment in &segments {
            if is_identifier(segment) {
                query.push('.');
                query.push_str(segment);
            } else {
                query.push('[');
                query.push_str(&serde_json::Value::String(segment.clone()).to_string());
                query.push(']');
            }
        }
        Self { segments, query }
    }

    /// The Rego reference text, e.g. `data.msgnode.authz` or `data.a["b-c"]`.
    pub fn as_query(&self) -> &str {
        &self.query
    }

    /// The path segments below `data`.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }
}

impl fmt::Display for DataPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.query)
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Why one evaluation failed.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The evaluation ran longer than the configured limit.
    #[error("evaluation exceeded the time limit of {0:?}")]
    Timeout(Duration),
    /// The bytecode VM executed more instructions than `[pdp] max_instructions` allows.
    #[error("evaluation exceeded the instruction limit of {0} ([pdp] max_instructions)")]
    InstructionLimit(usize),
    /// The policy raised an error (a conflict, a strict builtin error, …).
    #[error("{0}")]
    Failed(String),
}

/// Work units between two reads of the clock by regorus's execution timer. Reading it before
/// every instruction cost 20–30 % of VM time on the shipped bundle; every 256 units still
/// notices an overrun within well under a millisecond.
const TIMER_CHECK_INTERVAL: NonZeroU32 = match NonZeroU32::new(256) {
    Some(n) => n,
    None => NonZeroU32::MIN,
};

/// Identifies a compiled bundle for the per-thread engine slot.
static NEXT_BUNDLE_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's engine for the bundle it evaluated last: (bundle id, engine).
    static THREAD_ENGINE: RefCell<Option<(u64, regorus::Engine)>> = const { RefCell::new(None) };
    /// This thread's VM for the fast path of the bundle it evaluated last.
    static THREAD_VM: RefCell<Option<(u64, RegoVM)>> = const { RefCell::new(None) };
}

/// The decision rule compiled for the RVM.
#[derive(Clone)]
struct FastPath {
    query: String,
    program: Arc<Program>,
    data: regorus::Value,
    max_instructions: usize,
}

/// One bundle revision, parsed, merged and prepared for evaluation.
#[derive(Clone)]
pub struct CompiledBundle {
    id: u64,
    bundle: Bundle,
    engine: regorus::Engine,
    rules: HashSet<String>,
    timeout: Duration,
    fast: Option<FastPath>,
}

impl fmt::Debug for CompiledBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledBundle")
            .field("revision", &self.bundle.revision)
            .field("modules", &self.bundle.modules.len())
            .finish_non_exhaustive()
    }
}

impl CompiledBundle {
    /// Parses every module, merges the data and runs the engine's analysis once, so that
    /// compile errors (unsafe variables, unknown functions, …) surface here, not at request
    /// time.
    ///
    /// # Errors
    /// The first module that fails to parse, or the analysis error, with its location.
    pub fn compile(bundle: Bundle, timeout: Duration) -> Result<Self, BundleError> {
        let compiled = Self::compile_unchecked(bundle, timeout)?;
        compiled.check_rules()?;
        Ok(compiled)
    }

    fn compile_unchecked(bundle: Bundle, timeout: Duration) -> Result<Self, BundleError> {
        let mut engine = regorus::Engine::new();
        engine.set_rego_v0(false);
        engine.set_execution_timer_config(ExecutionTimerConfig {
            limit: timeout,
            check_interval: TIMER_CHECK_INTERVAL,
        });
        for module in &bundle.modules {
            engine
                .add_policy(module.path.clone(), module.raw.to_string())
                .map_err(|e| rego_error(&module.path, &e.to_string()))?;
        }
        let data = regorus::Value::from(bundle.data.clone());
        engine.add_data(data).map_err(|e| BundleError::Data {
            file: bundle.source.clone(),
            message: e.to_string(),
        })?;
        let first = bundle
            .modules
            .first()
            .map(|m| m.path.as_str())
            .unwrap_or("");
        // Any query prepares the engine (analysis + scheduling); clones then share the result.
        engine
            .eval_query("true".to_string(), false)
            .map_err(|e| rego_error(first, &e.to_string()))?;
        let ast = engine
            .get_ast_as_json()
            .map_err(|e| rego_error(first, &e.to_string()))?;
        let rules = rule_paths(&ast);
        Ok(Self {
            id: NEXT_BUNDLE_ID.fetch_add(1, Ordering::Relaxed),
            bundle,
            engine,
            rules,
            timeout,
            fast: None,
        })
    }

    /// Evaluates every rule once without input, in a stable order, and turns the errors that
    /// OPA would report at compile time into a load failure.
    fn check_rules(&self) -> Result<(), BundleError> {
        match self.rule_errors().into_iter().next() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// The compile-time errors of every rule (see [`CompiledBundle::check_rules`]), each once.
    fn rule_errors(&self) -> Vec<BundleError> {
        let mut rules: Vec<&String> = self.rules.iter().collect();
        rules.sort();
        let mut errors: Vec<BundleError> = Vec::new();
        for rule in rules {
            let mut engine = self.engine.clone();
            if let Err(e) = engine.eval_rule(rule.clone()) {
                let text = e.to_string();
                if COMPILE_ERROR_MARKERS.iter().any(|m| text.contains(m)) {
                    let (location, message) = split_location(&text);
                    let file = location
                        .as_ref()
                        .map(|l| l.file.clone())
                        .unwrap_or_default();
                    let error = BundleError::Rego {
                        file,
                        location,
                        message,
                    };
                    if !errors.iter().any(|e| e.to_string() == error.to_string()) {
                        errors.push(error);
                    }
                }
            }
        }
        errors
    }

    /// Every error of `bundle` that can be found, for `policy check`: each module's parse
    /// errors (parsed with recovery, `pdp::recovery`: every failing statement is reported and
    /// blanked), then the compile errors of what parses — of every rule when the modules
    /// compile together, else the first of each module (regorus stops a module's analysis at
    /// its first error). A call to a function whose statement was blanked is not reported
    /// again. Empty when the bundle compiles.
    pub fn diagnose(mut bundle: Bundle, timeout: Duration) -> Vec<BundleError> {
        let mut errors = Vec::new();
        let mut blanked = Vec::new();
        bundle.modules.retain_mut(|module| {
            let recovered = super::recovery::recover(&module.path, &module.raw);
            if recovered.errors.is_empty() {
                return true;
            }
            errors.extend(recovered.errors);
            blanked.extend(recovered.blanked_names);
            module.raw = recovered.text.into();
            recovered.parses
        });
        if bundle.modules.is_empty() {
            return errors;
        }
        let cascade = |e: &BundleError| match e {
            BundleError::Rego { message, .. } => super::recovery::is_cascade(message, &blanked),
            _ => false,
        };
        match Self::compile_unchecked(bundle.clone(), timeout) {
            Ok(compiled) => {
                errors.extend(compiled.rule_errors().into_iter().filter(|e| !cascade(e)))
            }
            Err(error) => {
                if !cascade(&error) {
                    errors.push(error);
                }
                // Each module alone, for the errors the first one hid (a function another
                // module defines is not one of them).
                for module in &bundle.modules {
                    let alone = Bundle {
                        modules: vec![module.clone()],
                        ..bundle.clone()
                    };
                    if let Err(error) = Self::compile_unchecked(alone, timeout) {
                        let text = error.to_string();
                        let known = errors.iter().any(|e| e.to_string() == text);
                        if !known && !text.contains("could not find function") {
                            errors.push(error);
                        }
                    }
                }
            }
        }
        errors
    }

    /// Compiles `rule` for the bytecode VM, which then evaluates it. When the RVM cannot
    /// compile the bundle (it lacks some features, e.g. `with`), the interpreter keeps
    /// evaluating it; the reason is returned so that it can be reported.
    pub fn with_fast_path(
        mut self,
        rule: &DataPath,
        max_instructions: usize,
    ) -> (Self, Option<String>) {
        if !self.rules.contains(rule.as_query()) {
            return (self, Some(format!("{rule} is not a rule of the bundle")));
        }
        let query = rule.as_query().to_string();
        let mut engine = self.engine.clone();
        let program = engine
            .compile_with_entrypoint(&query.as_str().into())
            .and_then(|compiled| {
                Compiler::compile_from_policy(&compiled, &[query.as_str()])
                    .map_err(|e| anyhow::anyhow!("{e}"))
            });
        match program {
            Ok(program) => {
                self.fast = Some(FastPath {
                    query,
                    program,
                    data: regorus::Value::from(self.bundle.data.clone()),
                    max_instructions,
                });
                (self, None)
            }
            Err(e) => (self, Some(one_line(&e.to_string()))),
        }
    }

    /// Whether `path` is evaluated by the bytecode VM.
    pub fn is_fast_path(&self, path: &DataPath) -> bool {
        self.fast
            .as_ref()
            .is_some_and(|f| f.query == path.as_query())
    }

    /// The bundle this was compiled from.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// The bundle's revision.
    pub fn revision(&self) -> &str {
        &self.bundle.revision
    }

    /// Every rule defined by the bundle, as `data.pkg.rule`.
    pub fn rules(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(String::as_str)
    }

    /// A fresh engine for this revision (for test runners and coverage).
    pub fn engine(&self) -> regorus::Engine {
        self.engine.clone()
    }

    /// Evaluates `path` against `input` (or without input). `Ok(None)` is an undefined
    /// document, which is not an error.
    ///
    /// # Errors
    /// Timeout, or an error raised by the policy.
    pub fn evaluate(
        &self,
        path: &DataPath,
        input: Option<regorus::Value>,
    ) -> Result<Option<serde_json::Value>, EvalError> {
        let cpu = thread_cpu();
        match self.evaluate_once(path, input.clone()) {
            // Out of wall time while the thread ran for less than half of it: the machine
            // was busy, not the policy (whose cost the limit bounds). Once more, bounded alike.
            Err(EvalError::Timeout(limit)) if starved(limit, thread_cpu().saturating_sub(cpu)) => {
                tracing::debug!(
                    ?limit,
                    "a policy evaluation ran out of time waiting for a core; evaluated once more"
                );
                self.evaluate_once(path, input)
            }
            other => other,
        }
    }

    fn evaluate_once(
        &self,
        path: &DataPath,
        input: Option<regorus::Value>,
    ) -> Result<Option<serde_json::Value>, EvalError> {
        let value = match &self.fast {
            Some(fast) if fast.query == path.as_query() => self.execute(fast, input),
            _ => self.interpret(path, input),
        }
        .map_err(|e| self.eval_error(e))?;
        to_json(value)
    }

    fn interpret(
        &self,
        path: &DataPath,
        input: Option<regorus::Value>,
    ) -> anyhow::Result<regorus::Value> {
        // Take this thread's engine out of its slot while evaluating: if evaluation panics,
        // the engine is dropped rather than reused in an unknown state.
        let mut engine = THREAD_ENGINE
            .with(|slot| slot.borrow_mut().take())
            .filter(|(id, _)| *id == self.id)
            .map(|(_, engine)| engine)
            .unwrap_or_else(|| self.engine.clone());
        engine.set_input(input.unwrap_or(regorus::Value::Undefined));
        let value = if self.rules.contains(path.as_query()) {
            engine.eval_rule(path.as_query().to_string())
        } else {
            engine
                .eval_query(path.as_query().to_string(), false)
                .map(|results| {
                    results
                        .result
                        .into_iter()
                        .next()
                        .and_then(|r| r.expressions.into_iter().next())
                        .map(|e| e.value)
                        .unwrap_or(regorus::Value::Undefined)
                })
        };
        THREAD_ENGINE.with(|slot| *slot.borrow_mut() = Some((self.id, engine)));
        value
    }

    fn execute(
        &self,
        fast: &FastPath,
        input: Option<regorus::Value>,
    ) -> anyhow::Result<regorus::Value> {
        let vm = THREAD_VM
            .with(|slot| slot.borrow_mut().take())
            .filter(|(id, _)| *id == self.id)
            .map(|(_, vm)| vm);
        let mut vm = match vm {
            Some(vm) => vm,
            None => {
                let mut vm = RegoVM::new();
                let mut program = Program::clone(&fast.program);
                program.literals = program.literals.iter().map(unshared).collect();
                program.rule_tree = unshared(&program.rule_tree);
                vm.load_program(Arc::new(program));
                vm.set_data(unshared(&fast.data))?;
                vm.set_max_instructions(fast.max_instructions);
                // Raise builtin errors as the interpreter (which runs the policy tests) does.
                vm.set_strict_builtin_errors(true);
                vm.set_execution_timer_config(Some(ExecutionTimerConfig {
                    limit: self.timeout,
                    check_interval: TIMER_CHECK_INTERVAL,
                }));
                vm
            }
        };
        vm.set_input(input.unwrap_or(regorus::Value::Undefined));
        let value = vm.execute_entry_point_by_name(&fast.query);
        THREAD_VM.with(|slot| *slot.borrow_mut() = Some((self.id, vm)));
        value.map_err(anyhow::Error::from)
    }

    fn eval_error(&self, error: anyhow::Error) -> EvalError {
        match error.downcast_ref::<VmError>() {
            Some(VmError::InstructionLimitExceeded { limit, .. }) => {
                return EvalError::InstructionLimit(*limit)
            }
            Some(VmError::TimeLimitExceeded { .. }) => return EvalError::Timeout(self.timeout),
            _ => {}
        }
        let timed_out = error.chain().any(|e| {
            matches!(
                e.downcast_ref::<LimitError>(),
                Some(LimitError::TimeLimitExceeded { .. })
            )
        }) || error.to_string().contains("time limit");
        if timed_out {
            EvalError::Timeout(self.timeout)
        } else {
            EvalError::Failed(one_line(&error.to_string()))
        }
    }
}

/// A deep copy of `value` that shares no reference-counted part with it (see the module doc).
fn unshared(value: &regorus::Value) -> regorus::Value {
    use regorus::Value;
    match value {
        Value::String(s) => Value::from(&**s),
        Value::Array(items) => Value::from(items.iter().map(unshared).collect::<Vec<_>>()),
        Value::Set(items) => Value::from(items.iter().map(unshared).collect::<BTreeSet<_>>()),
        Value::Object(map) => Value::from(
            map.iter_sorted()
                .map(|(k, v)| (unshared(k), unshared(v)))
                .collect::<BTreeMap<_, _>>(),
        ),
        // Numbers are plain but for big integers, which are rare enough to share.
        other => other.clone(),
    }
}

fn to_json(value: regorus::Value) -> Result<Option<serde_json::Value>, EvalError> {
    if value == regorus::Value::Undefined {
        return Ok(None);
    }
    serde_json::to_value(&value)
        .map(Some)
        .map_err(|e| EvalError::Failed(format!("result is not JSON: {e}")))
}

/// Joins a multi-line engine message into one line.
pub(crate) fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

impl CompiledBundle {}

/// Splits a regorus error into location and message. regorus reports
/// `--> file:row:col`, the offending source line with a caret, then `error: message`.
pub(crate) fn rego_error(file: &str, text: &str) -> BundleError {
    let (location, message) = split_location(text);
    BundleError::Rego {
        file: file.to_string(),
        location,
        message,
    }
}

fn split_location(text: &str) -> (Option<Location>, String) {
    let location = text.lines().find_map(|line| {
        let head = line.trim().strip_prefix("--> ")?;
        let mut pos = head.rsplitn(3, ':');
        let col = pos.next()?.trim().parse().ok()?;
        let row = pos.next()?.trim().parse().ok()?;
        let file = pos.next()?.trim().to_string();
        Some(Location { file, row, col })
    });
    let message = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("error: "))
        .map(str::to_string)
        .unwrap_or_else(|| text.trim().to_string());
    (location, without_internals(&message))
}

/// The message without regorus's internal state (`var x is unsafe (path [..], scopes [..])`
/// → `var x is unsafe`).
fn without_internals(message: &str) -> String {
    match message.find(" (path ") {
        Some(at) if message[at..].contains("scopes ") => message[..at].to_string(),
        _ => message.to_string(),
    }
}

/// Errors that regorus only finds when a rule is first evaluated but that OPA reports at
/// compile time: they reject the bundle at load instead of failing requests later.
const COMPILE_ERROR_MARKERS: &[&str] = &[
    "is unsafe",
    "could not find function",
    "rule conflicts with rule",
    "could not schedule",
];

/// Rule paths (`data.pkg.rule`) from the engine's AST JSON; functions are left out.
fn rule_paths(ast_json: &str) -> HashSet<String> {
    let mut rules = HashSet::new();
    let Ok(serde_json::Value::Array(modules)) = serde_json::from_str::<serde_json::Value>(ast_json)
    else {
        return rules;
    };
    for module in &modules {
        let ast = &module["ast"];
        let Some(package) = ref_path(&ast["package"]["refr"]) else {
            continue;
        };
        for rule in ast["rules"].as_array().into_iter().flatten() {
            if let Some(name) = rule_head_path(rule) {
                rules.insert(format!("data.{package}.{name}"));
            }
        }
    }
    rules
}

/// `a.b.c` from a reference in the AST (`Var`, `RefDot`; a `RefBrack` ends the static part).
fn ref_path(expr: &serde_json::Value) -> Option<String> {
    if let Some(var) = expr.get("Var") {
        return var
            .get("value")
            .and_then(|v| v.as_str())
            .map(str::to_string);
    }
    if let Some(dot) = expr.get("RefDot") {
        let refr = ref_path(dot.get("refr")?)?;
        let field = dot.get("field")?.get(1)?.as_str()?;
        return Some(format!("{refr}.{field}"));
    }
    if let Some(brack) = expr.get("RefBrack") {
        return ref_path(brack.get("refr")?);
    }
    None
}

/// The static path of a rule head (`allow`, `deny`, `n.o`); `None` for functions.
fn rule_head_path(rule: &serde_json::Value) -> Option<String> {
    if let Some(default) = rule.get("Default") {
        return ref_path(default.get("refr")?);
    }
    let head = rule.get("Spec")?.get("head")?;
    let kind = ["Compr", "Set"].into_iter().find_map(|k| head.get(k))?;
    ref_path(kind.get("refr")?)
}

/// The calling thread's CPU time (zero where the clock cannot be read).
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// An evaluation that timed out after `limit` of wall time having used `cpu` of its
/// thread's time was starved of a core (a loaded machine), not too costly.
fn starved(limit: Duration, cpu: Duration) -> bool {
    cpu > Duration::ZERO && cpu < limit / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_evaluation_starved_of_a_core_is_evaluated_once_more() {
        let limit = Duration::from_millis(50);
        assert!(starved(limit, Duration::from_millis(3)));
        assert!(
            !starved(limit, Duration::from_millis(40)),
            "the policy's own cost"
        );
        assert!(!starved(limit, Duration::ZERO), "no clock: as before");
        assert!(thread_cpu() > Duration::ZERO, "the thread's clock is read");
    }

    fn compile(files: &[(&str, &str)]) -> Result<CompiledBundle, BundleError> {
        let dir = crate::pdp::test_tree(files);
        CompiledBundle::compile(Bundle::read(dir.path())?, Duration::from_millis(50))
    }

    fn eval(
        bundle: &CompiledBundle,
        path: &str,
        input: serde_json::Value,
    ) -> Option<serde_json::Value> {
        let path = DataPath::from_url_path(path).expect("path");
        bundle
            .evaluate(&path, Some(regorus::Value::from(input)))
            .expect("eval")
    }

    #[test]
    fn data_paths_render_as_rego_references() {
        let check = |url: &str, expected: &str| {
            assert_eq!(
                DataPath::from_url_path(url).expect("path").as_query(),
                expected
            );
        };
        check("", "data");
        check("msgnode/authz", "data.msgnode.authz");
        check("//msgnode//authz/", "data.msgnode.authz");
        check("a/b-c/1", "data.a[\"b-c\"][\"1\"]");
        assert_eq!(
            DataPath::from_ref("data.x.y").expect("ref").as_query(),
            "data.x.y"
        );
        assert_eq!(
            DataPath::from_ref("x.y").expect("ref").as_query(),
            "data.x.y"
        );
        assert!(DataPath::from_ref("data.x-y").is_err());
        assert!(DataPath::from_url_path("a/\u{7}").is_err());
    }

    /// Issue 13's closing note: with `subject_principals` rewritten as
    /// `user := lib.str(…); user != ""`, a live node kept a subscription after a consent
    /// edit. Each engine decides a run of inputs on one thread (the VM keeps its state from
    /// run to run, and its rule cache is reset in place between runs), before and after the
    /// edit, with the revalidation's input shape (no message): the VM agrees with the
    /// interpreter, and the subscription is revoked.
    #[test]
    fn a_consent_edit_revokes_on_both_engines_run_after_run() {
        let policy = r#"package s
import rego.v1
str(x) := x if {
	is_string(x)
} else := ""
sub := object.get(input, "subscription", {})
consent_list := object.get(data.consent, sub.resource, null)
consented if sub.subscriber in consent_list
consented if input.subject.user in consent_list
consented if {
	holder := object.get(sub, "holder", "")
	holder != ""
	holder in subject_principals
}
subject_principals contains user if {
	user := str(input.subject.user)
	user != ""
}
default decision := {"allow": false}
decision := {"allow": true} if consented
"#;
        let bundle = |consent: &str| {
            let compiled =
                compile(&[("s.rego", policy), ("consent/data.json", consent)]).expect("compile");
            let rule = DataPath::from_ref("data.s.decision").expect("rule");
            let (vm, why) = compiled.clone().with_fast_path(&rule, 100_000);
            assert_eq!(why, None, "the VM compiles the rule");
            (compiled, vm)
        };
        let input = |user: &str, holder: &str| {
            serde_json::json!({
                "subscription": {"resource": "comm://x/board", "subscriber": "hyperty://x/bob-1",
                                 "holder": holder},
                "subject": {"user": user},
            })
        };
        let decide = |(interpreter, vm): &(CompiledBundle, CompiledBundle), input| {
            let (a, b) = (
                eval(interpreter, "s/decision", serde_json::Value::clone(&input)),
                eval(vm, "s/decision", input),
            );
            assert_eq!(a, b, "VM and interpreter agree");
            a.and_then(|d| d["allow"].as_bool())
        };
        let before = bundle(r#"{"comm://x/board": ["@bob:x"]}"#);
        let after = bundle(r#"{"comm://x/board": []}"#);
        for _ in 0..3 {
            // The holder's own principal, then someone else's, on the same thread's VM.
            assert_eq!(decide(&before, input("@alice:x", "@alice:x")), Some(true));
            assert_eq!(decide(&before, input("@bob:x", "@alice:x")), Some(true));
            assert_eq!(decide(&after, input("@bob:x", "@alice:x")), Some(false));
            assert_eq!(decide(&after, input("", "@alice:x")), Some(false));
            assert_eq!(decide(&after, input("@alice:x", "@alice:x")), Some(true));
            assert_eq!(decide(&after, input("@bob:x", "")), Some(false));
        }
    }

    #[test]
    fn rules_packages_and_data_evaluate() {
        let bundle = compile(&[
            (
                "p.rego",
                "package p\nimport rego.v1\ndefault allow := false\nallow if input.user == \"alice\"\nreasons contains \"x\" if not allow\nf(x) := x + 1\n",
            ),
            ("cfg/data.json", r#"{"limit": 3}"#),
        ])
        .expect("compile");
        let rules: HashSet<&str> = bundle.rules().collect();
        assert!(
            rules.contains("data.p.allow") && rules.contains("data.p.reasons"),
            "{rules:?}"
        );
        let alice = serde_json::json!({"user": "alice"});
        assert_eq!(
            eval(&bundle, "p/allow", alice.clone()),
            Some(serde_json::json!(true))
        );
        assert_eq!(
            eval(&bundle, "p", serde_json::json!({"user": "bob"})),
            Some(serde_json::json!({"allow": false, "reasons": ["x"]}))
        );
        assert_eq!(
            eval(&bundle, "cfg/limit", alice.clone()),
            Some(serde_json::json!(3))
        );
        assert_eq!(eval(&bundle, "p/nothing", alice), None);
    }

    #[test]
    fn parse_errors_carry_file_line_col() {
        let err =
            compile(&[("bad.rego", "package p\nallow if {\n  input.a ==\n}\n")]).expect_err("bad");
        let location = err.location().expect("location").clone();
        assert!(location.file.ends_with("bad.rego"), "{err}");
        assert!(location.row >= 3, "{err}");
        let text = err.to_string();
        assert!(text.contains("bad.rego:"), "{text}");
    }

    #[test]
    fn compile_errors_are_caught_at_load() {
        let err =
            compile(&[("p.rego", "package p\nallow if {\n  z := q\n}\n")]).expect_err("unsafe var");
        assert!(err.to_string().contains("p.rego"), "{err}");
    }

    #[test]
    fn conflicts_are_evaluation_errors() {
        let bundle =
            compile(&[("p.rego", "package p\nx := input.a\nx := input.b\n")]).expect("compile");
        let path = DataPath::from_ref("data.p.x").expect("ref");
        let err = bundle
            .evaluate(
                &path,
                Some(regorus::Value::from(serde_json::json!({"a": 1, "b": 2}))),
            )
            .expect_err("conflict");
        assert!(matches!(err, EvalError::Failed(_)), "{err}");
    }

    #[test]
    fn runaway_evaluation_times_out() {
        let bundle = compile(&[(
            "p.rego",
            "package p\nslow := count([x | some a in numbers.range(1, 300); some b in numbers.range(1, 300); some c in numbers.range(1, 300); x := a + b + c])\n",
        )])
        .expect("compile");
        let path = DataPath::from_ref("data.p.slow").expect("ref");
        let err = bundle.evaluate(&path, None).expect_err("timeout");
        assert!(matches!(err, EvalError::Timeout(_)), "{err}");
    }
}

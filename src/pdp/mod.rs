//! Policy decision point: Rego bundle in, decisions out.
//! (One concern: the file is past 600 lines only with its tests.)
//!
//! [`Pdp`] is a cheap, cloneable handle shared by the HTTP API and the node's own enforcement
//! points. It owns the current bundle revision (swapped atomically, so no request ever sees a
//! half-loaded bundle), the decision cache, the decision log and the metrics. `pdp/` does no
//! network I/O: `api` exposes it over HTTP, `watcher` reloads it when files change.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use msgnode::config::PdpConfig;
//! use msgnode::pdp::{EnforcementPoint, Pdp};
//!
//! let pdp = Pdp::builder(&PdpConfig::default()).build()?;
//! pdp.reload()?; // reads ./policies
//! let decision = pdp.decide(serde_json::json!({"kind": "message"}), EnforcementPoint::Bus);
//! assert!(!decision.allow); // default deny
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod agreement;
pub mod api;
pub mod bundle;
pub mod cache;
pub mod console;
pub mod decision_log;
pub mod engine;
pub mod metrics;
#[cfg(feature = "opa")]
pub mod opa;
pub mod pool;
mod recovery;
pub mod replay;
pub mod schema;
pub mod shadow;
pub mod testing;
pub mod variants;
pub mod watcher;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use serde_json::Value;

use crate::config::PdpConfig;
use bundle::{Bundle, BundleError};
use cache::{CacheKey, DecisionCache, Keyed};
use decision_log::{AskedBy, DecisionRecord, DecisionSink, NullSink, RecordError};
use engine::{CompiledBundle, DataPath, EvalError};
use metrics::{Outcome, PdpMetrics};
use schema::{SchemaError, SchemaViolation, Schemas};
use shadow::{Shadow, Verdict};
use testing::{FixtureSchema, TestOptions};

pub use decision_log::EnforcementPoint;

/// Time limit of one test evaluation when the reload gate runs a bundle's tests (the
/// interpreter runs them, slower than the serving VM; as `policy test --timeout`).
pub const GATE_TEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a revision was not activated.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// It could not be read or compiled.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// Its own tests fail (`[pdp] reload_requires_tests`).
    #[error("revision {revision} rejected: {} of its tests fail: {}", .failing.len(), .failing.join(", "))]
    TestsFailed {
        /// The rejected revision.
        revision: String,
        /// The failing tests' names.
        failing: Vec<String>,
    },
}

/// Why a query produced no decision.
#[derive(Debug, thiserror::Error)]
pub enum PdpError {
    /// No bundle has loaded yet (the last load error says why).
    #[error("no policy bundle loaded: {0}")]
    NoBundle(String),
    /// Evaluation failed or timed out.
    #[error(transparent)]
    Eval(#[from] EvalError),
    /// The input does not match the schema bound to the path.
    #[error(transparent)]
    Schema(#[from] SchemaViolation),
    /// The evaluation pool is busy (its queue full, with no place to wait or for too long):
    /// retry.
    #[error("the PDP is busy: {0}")]
    Busy(pool::PoolError),
}

/// The result of one query, as the HTTP API returns it.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Unique id of this decision (also in the decision log).
    pub decision_id: String,
    /// The document; `None` when undefined.
    pub result: Arc<Option<Value>>,
    /// The revision it was evaluated against.
    pub revision: Arc<str>,
    /// Time spent evaluating (or looking up the cache), in nanoseconds.
    pub eval_ns: u64,
    /// Whether the result came from the cache.
    pub cache_hit: bool,
}

/// A yes/no decision for the node's own enforcement points. Always fails closed: an error,
/// a timeout, an undefined or malformed result, or no bundle at all is `allow: false`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allow: bool,
    /// Human-readable reasons (why not, mostly).
    pub reasons: Vec<String>,
    /// Decision log id.
    pub decision_id: String,
    /// True when no policy decided: the PDP failed (no bundle, error, timeout, limit).
    /// Enforcement points may answer these differently (e.g. 503 instead of 403).
    pub failed: bool,
}

/// State of the last bundle load, for `/health` and logs.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadStatus {
    /// Revision being served, if any.
    pub revision: Option<String>,
    /// When the served revision was activated.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_time")]
    pub activated_at: Option<SystemTime>,
    /// Whether the last load attempt succeeded.
    pub last_load_ok: bool,
    /// The last load error (kept until a load succeeds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Where in the bundle the last load error is (`file`, `row`, `col`), when it is in a
    /// file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error_location: Option<bundle::Location>,
    /// When the last load was attempted.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_time")]
    pub last_attempt_at: Option<SystemTime>,
    /// `rvm` when the decision rule runs on the bytecode VM, `interpreter` otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision_engine: Option<&'static str>,
    /// Why the decision rule could not be compiled for the bytecode VM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rvm_error: Option<String>,
    /// The tests that failed on the last rejected revision (reload gate).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failing_tests: Vec<String>,
    /// Bundles pulled from a bundle server, by name (`[pdp.bundle]`).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub bundles: std::collections::BTreeMap<String, BundleStatus>,
}

/// What is known about a pulled bundle, as OPA's status API reports it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BundleStatus {
    /// The bundle's name.
    pub name: String,
    /// Where it is pulled from.
    pub url: String,
    /// The revision serving from this bundle, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_revision: Option<String>,
    /// When a download last succeeded (a new bundle, or `304 Not Modified`).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_time")]
    pub last_successful_download: Option<SystemTime>,
    /// When a downloaded bundle was last activated.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_time")]
    pub last_successful_activation: Option<SystemTime>,
    /// When the server was last asked.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_time")]
    pub last_request: Option<SystemTime>,
    /// Where the active revision came from: `server` or `disk` (the persisted copy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<&'static str>,
    /// OPA's error code of the last failure (`bundle_error`), absent when the last poll
    /// succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    /// What went wrong last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

fn opt_time<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.collect_str(&humantime::format_rfc3339_millis(*t)),
        None => s.serialize_none(),
    }
}

/// One activated revision.
pub struct Active {
    /// The compiled bundle.
    pub bundle: CompiledBundle,
    /// Increases with every activation; part of every cache key.
    pub generation: u64,
    /// Revision, shared cheaply with answers.
    pub revision: Arc<str>,
}

struct Inner {
    active: ArcSwapOption<Active>,
    generation: AtomicU64,
    cache: DecisionCache,
    sink: Arc<dyn DecisionSink>,
    labels: Arc<std::collections::BTreeMap<String, String>>,
    metrics: PdpMetrics,
    status: Mutex<LoadStatus>,
    policies: PathBuf,
    bundle_name: String,
    requires_tests: Option<bool>,
    eval_timeout: Duration,
    max_instructions: usize,
    decision_path: DataPath,
    decision_query: Arc<str>,
    schemas: Schemas,
    /// Where evaluations that miss the cache run.
    pool: pool::EvalPool,
    /// The candidate bundle live decisions are also decided by, if any.
    shadow: Shadow,
}

/// Handle to the policy decision point. Clones share everything.
#[derive(Clone)]
pub struct Pdp {
    inner: Arc<Inner>,
}

/// Builds a [`Pdp`] from configuration plus the injected sink and metrics registry.
pub struct PdpBuilder<'a> {
    config: &'a PdpConfig,
    sink: Arc<dyn DecisionSink>,
    id: Option<String>,
    registry: Option<&'a mut prometheus_client::registry::Registry>,
}

impl<'a> PdpBuilder<'a> {
    /// Where decisions are logged (default: nowhere).
    pub fn sink(mut self, sink: Arc<dyn DecisionSink>) -> Self {
        self.sink = sink;
        self
    }

    /// This node's id in decision-log labels (default: `[pdp.decision_log] labels.id`, else
    /// a random one).
    pub fn id(mut self, id: Option<String>) -> Self {
        self.id = id;
        self
    }

    /// Registers the PDP's metrics in `registry` (default: a private registry).
    pub fn registry(mut self, registry: &'a mut prometheus_client::registry::Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Builds the handle. No bundle is loaded yet: call [`Pdp::reload`].
    ///
    /// # Errors
    /// The configured decision rule is not a valid reference, a schema is broken, or the
    /// evaluation threads cannot start.
    pub fn build(self) -> Result<Pdp, BuildError> {
        let config = self.config;
        let decision_path = DataPath::from_ref(&config.decision)
            .map_err(|e| BuildError::Decision(e.to_string()))?;
        let schemas = Schemas::load(&config.schema_dir, &config.schemas)?;
        let mut private = prometheus_client::registry::Registry::default();
        let registry = self.registry.unwrap_or(&mut private);
        let metrics = PdpMetrics::register(registry);
        let shadow = Shadow::new(
            decision_log::Mask::of(&config.decision_log),
            decision_path.clone(),
            config.eval_timeout,
            config.max_instructions,
            registry,
        );
        let cache = DecisionCache::new(
            config.cache.enabled,
            config.cache.max_entries,
            config.cache.ttl,
            &config.cache.ignore_fields,
        );
        let mut labels = config.decision_log.labels.clone();
        if !labels.contains_key("id") {
            let id = self.id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            labels.insert("id".to_string(), id);
        }
        labels
            .entry("version".to_string())
            .or_insert_with(|| env!("CARGO_PKG_VERSION").to_string());
        Ok(Pdp {
            inner: Arc::new(Inner {
                active: ArcSwapOption::empty(),
                generation: AtomicU64::new(0),
                cache,
                sink: self.sink,
                labels: Arc::new(labels),
                metrics,
                status: Mutex::new(LoadStatus::default()),
                policies: config.policies.clone(),
                bundle_name: config
                    .bundle
                    .as_ref()
                    .map_or_else(|| "policies".to_string(), |b| b.name.clone()),
                requires_tests: config.reload_requires_tests,
                eval_timeout: config.eval_timeout,
                max_instructions: config.max_instructions,
                decision_query: Arc::from(decision_path.as_query()),
                decision_path,
                schemas,
                pool: pool::EvalPool::new(
                    config.eval_threads.unwrap_or_else(|| {
                        std::thread::available_parallelism().map_or(2, |n| n.get())
                    }),
                    config.eval_queue,
                    config.eval_waiters,
                    config.eval_queue_wait,
                )
                .map_err(BuildError::Pool)?,
                shadow,
            }),
        })
    }
}

/// Why a [`Pdp`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `[pdp] decision` is not a data reference.
    #[error("[pdp] decision: {0}")]
    Decision(String),
    /// A schema could not be loaded.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The evaluation threads could not start.
    #[error("cannot start the policy evaluation threads: {0}")]
    Pool(std::io::Error),
}

impl Pdp {
    /// Starts building a PDP for `config`.
    pub fn builder(config: &PdpConfig) -> PdpBuilder<'_> {
        PdpBuilder {
            config,
            sink: Arc::new(NullSink),
            id: None,
            registry: None,
        }
    }

    /// Reads the policy directory and, if it compiles (and its tests pass, with the reload
    /// gate), activates it; see [`Pdp::load`]. Blocking: call from a blocking context.
    ///
    /// # Errors
    /// As [`Pdp::load`]; nothing changed.
    pub fn reload(&self) -> Result<Arc<str>, LoadError> {
        match Bundle::read(&self.inner.policies) {
            Ok(bundle) => self.load(bundle),
            Err(error) => Err(self.rejected(LoadError::Bundle(error))),
        }
    }

    /// Compiles `bundle` and, if that succeeds and — with `[pdp] reload_requires_tests` (on by
    /// default when the bundle has tests) — its own tests pass, activates it. On failure the
    /// previous revision keeps serving; the error (and the failing tests) are kept for
    /// `/health` and the metrics. Blocking (compilation, tests).
    ///
    /// # Errors
    /// The bundle does not compile, or its tests fail; nothing changed.
    pub fn load(&self, bundle: Bundle) -> Result<Arc<str>, LoadError> {
        // The revision serving already (a reload that found nothing new, or an edit undone):
        // neither tested nor compiled again, only the failure of any newer attempt cleared.
        let serving = self.inner.active.load();
        if let Some(active) = serving.as_ref().filter(|a| *a.revision == *bundle.revision) {
            let revision = Arc::clone(&active.revision);
            let mut status = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
            status.last_attempt_at = Some(SystemTime::now());
            self.loaded(&mut status, &revision);
            return Ok(revision);
        }
        drop(serving);
        let gate = self.inner.requires_tests.unwrap_or(bundle.has_tests());
        let started = Instant::now();
        let tested = match gate {
            true => self.run_gate(&bundle),
            false => Ok(()),
        };
        let tests_ms = started.elapsed().as_millis();
        let loaded = tested.and_then(|()| {
            CompiledBundle::compile(bundle, self.inner.eval_timeout)
                .map(|b| b.with_fast_path(&self.inner.decision_path, self.inner.max_instructions))
                .map_err(LoadError::Bundle)
        });
        let (bundle, rvm_error) = match loaded {
            Ok(loaded) => loaded,
            Err(error) => return Err(self.rejected(error)),
        };
        let mut status = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
        status.last_attempt_at = Some(SystemTime::now());
        if let Some(error) = &rvm_error {
            tracing::warn!(%error, rule = %self.inner.decision_path, "decision rule runs on the interpreter: the bytecode VM cannot compile it");
        }
        status.decision_engine = Some(if rvm_error.is_none() {
            "rvm"
        } else {
            "interpreter"
        });
        status.rvm_error = rvm_error;
        let revision: Arc<str> = Arc::from(bundle.revision());
        let unchanged = self
            .inner
            .active
            .load()
            .as_ref()
            .is_some_and(|a| a.revision == revision);
        if !unchanged {
            let source = bundle.bundle().source.clone();
            self.activate(bundle, Arc::clone(&revision));
            status.activated_at = status.last_attempt_at;
            tracing::info!(%revision, %source, tests_gate = gate, tests_ms, "policy bundle activated");
        }
        self.loaded(&mut status, &revision);
        Ok(revision)
    }

    /// Records in `status` (and the metrics) that a load of `revision` succeeded.
    fn loaded(&self, status: &mut LoadStatus, revision: &str) {
        status.revision = Some(revision.to_string());
        status.last_load_ok = true;
        status.last_error = None;
        status.last_error_location = None;
        status.failing_tests.clear();
        self.inner.metrics.reload_ok(revision);
    }

    /// Runs the tests of `bundle` (a compiled revision, e.g. the active one) as `policy test`
    /// does, with line coverage when `coverage`. Blocking.
    ///
    /// # Errors
    /// The bundle does not compile with its tests.
    pub fn test(
        &self,
        bundle: &CompiledBundle,
        coverage: bool,
    ) -> Result<testing::TestReport, testing::TestError> {
        let options = TestOptions {
            decision: self.inner.decision_path.clone(),
            filter: None,
            coverage,
            timeout: GATE_TEST_TIMEOUT,
            variants: false,
            opa: None,
        };
        testing::run(
            bundle.bundle(),
            &options,
            FixtureSchema::Bound(&self.inner.schemas),
        )
    }

    /// Runs the bundle's own tests, as `policy test` does (fixtures checked against the
    /// schema bound to their query path).
    fn run_gate(&self, bundle: &Bundle) -> Result<(), LoadError> {
        let options = TestOptions {
            decision: self.inner.decision_path.clone(),
            filter: None,
            coverage: false,
            timeout: GATE_TEST_TIMEOUT,
            // The variants are a development check (thousands of evaluations), not a gate.
            variants: false,
            opa: None,
        };
        let report = testing::run(bundle, &options, FixtureSchema::Bound(&self.inner.schemas))
            .map_err(|e| match e {
                testing::TestError::Bundle(e) => LoadError::Bundle(e),
                testing::TestError::Opa(message) => LoadError::TestsFailed {
                    revision: bundle.revision.clone(),
                    failing: vec![message],
                },
            })?;
        let failing = report.failures();
        match failing.is_empty() {
            true => Ok(()),
            false => Err(LoadError::TestsFailed {
                revision: bundle.revision.clone(),
                failing,
            }),
        }
    }

    /// Records a rejected load (logged once per distinct error) and hands the error back.
    fn rejected(&self, error: LoadError) -> LoadError {
        let mut status = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
        status.last_attempt_at = Some(SystemTime::now());
        let text = error.to_string();
        let serving = status.revision.clone();
        if status.last_error.as_deref() == Some(text.as_str()) {
            tracing::debug!(error = %text, "policy bundle still rejected");
        } else {
            match &serving {
                Some(revision) => {
                    tracing::error!(error = %text, %revision, "policy bundle rejected; the previous revision keeps serving")
                }
                None => {
                    tracing::error!(error = %text, "policy bundle rejected; no revision is serving, so every decision is a deny")
                }
            }
        }
        status.last_load_ok = false;
        status.last_error = Some(text);
        status.last_error_location = match &error {
            LoadError::Bundle(e) => e.location().cloned(),
            LoadError::TestsFailed { .. } => None,
        };
        let failing = match &error {
            LoadError::TestsFailed { failing, .. } => failing.clone(),
            LoadError::Bundle(_) => Vec::new(),
        };
        self.inner.metrics.reload_failed(&failing);
        status.failing_tests = failing;
        error
    }

    /// Updates what `/health?bundles` and `/v1/status` say about the pulled bundle `name`.
    pub fn update_bundle_status(&self, name: &str, update: impl FnOnce(&mut BundleStatus)) {
        let mut status = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
        let entry = status
            .bundles
            .entry(name.to_string())
            .or_insert_with(|| BundleStatus {
                name: name.to_string(),
                ..BundleStatus::default()
            });
        update(entry);
    }

    fn activate(&self, bundle: CompiledBundle, revision: Arc<str>) {
        let generation = self.inner.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.inner.active.store(Some(Arc::new(Active {
            bundle,
            generation,
            revision,
        })));
        // Entries of older generations can never hit again; drop them now to free memory.
        self.inner.cache.clear();
    }

    /// The shadow evaluator (the candidate bundle, its differences).
    pub fn shadow(&self) -> &Shadow {
        &self.inner.shadow
    }

    /// The verdict of the decision rule on `input` under the active revision, neither cached
    /// nor logged nor shadowed (the console's playground asks "what if"). Blocking.
    pub fn try_decision(&self, input: &Value) -> Option<(Arc<str>, Verdict)> {
        let active = self.active()?;
        Some((
            Arc::clone(&active.revision),
            shadow::evaluate(&active.bundle, &self.inner.decision_path, input),
        ))
    }

    /// The active revision, if any.
    pub fn active(&self) -> Option<Arc<Active>> {
        self.inner.active.load_full()
    }

    /// The name decision logs and provenance give the bundle (`policies`, or `[pdp.bundle]
    /// name`).
    pub fn bundle_name(&self) -> &str {
        &self.inner.bundle_name
    }

    /// The labels of this node's decision-log records (`id`, `version`, …).
    pub fn labels(&self) -> Arc<std::collections::BTreeMap<String, String>> {
        Arc::clone(&self.inner.labels)
    }

    /// State of the last load.
    pub fn status(&self) -> LoadStatus {
        self.inner
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Evaluates `path` with `input` (validated against the schema bound to the path first),
    /// through the cache, and logs the decision on every exit path.
    ///
    /// # Errors
    /// No bundle, a schema violation, or an evaluation error or timeout.
    pub fn query(
        &self,
        path: &DataPath,
        input: Option<Value>,
        asked_by: &AskedBy,
    ) -> Result<Answer, PdpError> {
        self.check_schema(path, input.as_ref(), asked_by)?;
        let query: Arc<str> = Arc::from(path.as_query());
        self.query_unchecked(&query, path, input.map(Asked::Json), None, asked_by)
    }

    /// Validates `input` against the schema bound to `path`; a violation is logged as a
    /// decision (with its error) and returned.
    fn check_schema(
        &self,
        path: &DataPath,
        input: Option<&Value>,
        asked_by: &AskedBy,
    ) -> Result<(), PdpError> {
        let Some(input) = input else {
            return Ok(());
        };
        let Err(violation) = self.inner.schemas.validate_for_path(path.segments(), input) else {
            return Ok(());
        };
        let error = PdpError::Schema(violation);
        let id = uuid::Uuid::new_v4().to_string();
        let input = Some(Asked::Json(input.clone()));
        self.record(&id, path, input, Err(&error), None, 0, false, asked_by);
        Err(error)
    }

    /// [`Pdp::query`] on the evaluation pool, unless the cache holds the answer (answered
    /// here, at once).
    ///
    /// # Errors
    /// As [`Pdp::query`]; an evaluation that cannot be run is an evaluation error.
    pub async fn query_async(
        &self,
        path: &DataPath,
        input: Option<Value>,
        asked_by: AskedBy,
    ) -> Result<Answer, PdpError> {
        self.check_schema(path, input.as_ref(), &asked_by)?;
        let query: Arc<str> = Arc::from(path.as_query());
        let input = input.map(Asked::Json);
        let lookup = self.look_up(&query, input.as_ref());
        if lookup.as_ref().is_some_and(|l| l.hit.is_some()) {
            return self.query_unchecked(&query, path, input, lookup, &asked_by);
        }
        let (pdp, path) = (self.clone(), path.clone());
        self.inner
            .pool
            .run(move || pdp.query_unchecked(&query, &path, input, lookup, &asked_by))
            .await
            .unwrap_or_else(|e| match e {
                pool::PoolError::Busy => Err(PdpError::Busy(e)),
                pool::PoolError::Gone => Err(PdpError::Eval(EvalError::Failed(e.to_string()))),
            })
    }

    /// The cache key of `query` with `input` under the active revision, and what the cache
    /// holds for it (`None`: cache off, or no revision).
    fn look_up(&self, query: &Arc<str>, input: Option<&Asked>) -> Option<Lookup> {
        if !self.inner.cache.is_enabled() {
            return None;
        }
        let active = self.inner.active.load();
        let active = active.as_ref()?;
        let key = self.key(active.generation, query, input);
        let hit = self.inner.cache.get(&key);
        Some(Lookup { key, hit })
    }

    fn key(&self, generation: u64, query: &Arc<str>, input: Option<&Asked>) -> CacheKey {
        let cache = &self.inner.cache;
        match input {
            Some(Asked::Json(json)) => cache.key(generation, query, Some(json)),
            Some(Asked::Rego(rego)) => cache.key(generation, query, Some(rego)),
            Some(Asked::Typed(typed)) => cache.key(generation, query, Some(*typed)),
            None => cache.key::<Value>(generation, query, None),
        }
    }

    fn query_unchecked(
        &self,
        query: &Arc<str>,
        path: &DataPath,
        input: Option<Asked>,
        lookup: Option<Lookup>,
        asked_by: &AskedBy,
    ) -> Result<Answer, PdpError> {
        let start = Instant::now();
        let decision_id = uuid::Uuid::new_v4().to_string();
        // A guard, not a clone of the Arc: no reference count shared by every thread.
        let active = self.inner.active.load();
        let Some(active) = active.as_ref() else {
            let why = self
                .status()
                .last_error
                .unwrap_or_else(|| "not loaded yet".to_string());
            let error = PdpError::NoBundle(why);
            self.record(
                &decision_id,
                path,
                input,
                Err(&error),
                None,
                0,
                false,
                asked_by,
            );
            return Err(error);
        };
        // A lookup made before (on another thread) stands: the cache is cleared on every
        // swap, and a key names its generation.
        let (key, cached) = match lookup {
            Some(Lookup { key, hit }) => (Some(key), hit),
            None if self.inner.cache.is_enabled() => {
                let key = self.key(active.generation, query, input.as_ref());
                let hit = self.inner.cache.get(&key);
                (Some(key), hit)
            }
            None => (None, None),
        };
        let cache_hit = cached.is_some();
        let result = match cached {
            Some(result) => Ok(result),
            None => {
                if key.is_some() {
                    self.inner.metrics.cache_miss();
                }
                let evaluated = input
                    .as_ref()
                    .map(Asked::to_rego)
                    .transpose()
                    .and_then(|rego_input| active.bundle.evaluate(path, rego_input))
                    .map(Arc::new);
                if let (Some(key), Ok(result)) = (key, &evaluated) {
                    self.inner.cache.insert(key, Arc::clone(result));
                }
                evaluated.map_err(PdpError::Eval)
            }
        };
        let eval_ns = elapsed_ns(start);
        self.record(
            &decision_id,
            path,
            input,
            result.as_ref(),
            Some(&active.revision),
            eval_ns,
            cache_hit,
            asked_by,
        );
        result.map(|result| Answer {
            decision_id,
            result,
            revision: Arc::clone(&active.revision),
            eval_ns,
            cache_hit,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        decision_id: &str,
        path: &DataPath,
        input: Option<Asked>,
        result: Result<&Arc<Option<Value>>, &PdpError>,
        revision: Option<&Arc<str>>,
        eval_ns: u64,
        cache_hit: bool,
        asked_by: &AskedBy,
    ) {
        let outcome = match result {
            Ok(r) => Outcome::of(r.as_ref().as_ref()),
            Err(_) => Outcome::Error,
        };
        self.inner.metrics.decision(outcome, eval_ns, cache_hit);
        if let (Ok(result), Some(input)) = (result, &input) {
            if self.inner.shadow.is_active() && path.as_query() == &*self.inner.decision_query {
                let live = Verdict::of(result.as_ref().as_ref(), &self.inner.decision_query);
                // JSON only when a candidate listens (the candidate decides what is logged).
                self.inner.shadow.offer(decision_id, input.to_json(), live);
            }
        }
        if !self.inner.sink.enabled() {
            return;
        }
        self.inner.sink.log(DecisionRecord {
            labels: Arc::clone(&self.inner.labels),
            decision_id: decision_id.to_string(),
            timestamp: SystemTime::now(),
            path: path.segments().join("/"),
            input: input.map(Asked::into_json),
            result: result.ok().and_then(|r| r.as_ref().clone()),
            error: result.err().map(|e| RecordError {
                code: match e {
                    PdpError::NoBundle(_) | PdpError::Eval(_) | PdpError::Busy(_) => {
                        "internal_error"
                    }
                    PdpError::Schema(_) => "invalid_parameter",
                },
                message: e.to_string(),
            }),
            bundles: revision
                .map(|r| decision_log::bundles(&self.inner.bundle_name, r))
                .unwrap_or_default(),
            requested_by: asked_by.requested_by(),
            enforcement_point: asked_by.point,
            metrics: decision_log::RecordMetrics {
                timer_rego_query_eval_ns: eval_ns,
                counter_decision_cache_hit: u64::from(cache_hit),
            },
            erased: Vec::new(),
        });
    }

    /// Decides `input` with the configured decision rule (`[pdp] decision`). Fails closed:
    /// every failure is a deny whose reason says what went wrong. The input is not validated
    /// against a schema: the node's enforcement points build it from already-validated types
    /// (HTTP callers go through [`Pdp::query`], which validates).
    pub fn decide(&self, input: Value, asked_by: EnforcementPoint) -> Decision {
        self.decide_keyed(Asked::Json(input), None, asked_by)
    }

    /// [`Pdp::decide`] of a document the node built as regorus's value (`Input::to_rego`),
    /// which is evaluated as it is: no JSON in between.
    pub fn decide_value(&self, input: regorus::Value, asked_by: EnforcementPoint) -> Decision {
        self.decide_keyed(Asked::Rego(input), None, asked_by)
    }

    /// [`Pdp::decide`] of a typed input of the node's enforcement points: the cache key is
    /// written from its fields, and regorus's value is built only when the cache misses.
    pub fn decide_input(&self, input: &dyn TypedInput, asked_by: EnforcementPoint) -> Decision {
        self.decide_keyed(Asked::Typed(input), None, asked_by)
    }

    /// [`Pdp::decide_input`] on the evaluation pool, unless the cache holds the decision
    /// (answered here, at once, without building regorus's value): what the node's
    /// enforcement points call from async code.
    pub async fn decide_async(
        &self,
        input: &dyn TypedInput,
        asked_by: EnforcementPoint,
    ) -> Decision {
        let typed = Asked::Typed(input);
        let lookup = self.look_up(&self.inner.decision_query, Some(&typed));
        if lookup.as_ref().is_some_and(|l| l.hit.is_some()) {
            return self.decide_keyed(typed, lookup, asked_by);
        }
        let input = Asked::Rego(input.to_rego());
        let pdp = self.clone();
        self.inner
            .pool
            .run(move || pdp.decide_keyed(input, lookup, asked_by))
            .await
            .unwrap_or_else(|e| Decision {
                allow: false,
                reasons: vec![format!("policy error: {e}")],
                decision_id: String::new(),
                failed: true,
            })
    }

    fn decide_keyed(
        &self,
        input: Asked,
        lookup: Option<Lookup>,
        asked_by: EnforcementPoint,
    ) -> Decision {
        let fail = |reason: String| Decision {
            allow: false,
            reasons: vec![reason],
            decision_id: String::new(),
            failed: true,
        };
        let answer = match self.query_unchecked(
            &self.inner.decision_query,
            &self.inner.decision_path,
            Some(input),
            lookup,
            &AskedBy::point(asked_by),
        ) {
            Ok(answer) => answer,
            Err(PdpError::Eval(EvalError::Timeout(limit))) => {
                return fail(format!("policy evaluation timed out after {limit:?}"))
            }
            Err(PdpError::Eval(error @ EvalError::InstructionLimit(_))) => {
                return fail(format!("policy evaluation stopped: {error}"))
            }
            Err(error) => return fail(format!("policy error: {error}")),
        };
        let verdict = Verdict::of(answer.result.as_ref().as_ref(), &self.inner.decision_query);
        Decision {
            allow: verdict.allow,
            reasons: verdict.reasons,
            decision_id: answer.decision_id,
            failed: false,
        }
    }
}

/// A typed input of the node's enforcement points (`policy::input::Input`, a floor above):
/// the cache key is written from its fields ([`Keyed`]), and it is built as regorus's value
/// or as JSON only when evaluated or logged.
pub trait TypedInput: Keyed + Sync {
    /// The document as regorus evaluates it.
    fn to_rego(&self) -> regorus::Value;
    /// The document as JSON.
    fn to_value(&self) -> Value;
}

/// A cache look-up: the key, and what the cache held for it.
struct Lookup {
    key: CacheKey,
    hit: Option<Arc<Option<Value>>>,
}

/// An input as its caller handed it over.
enum Asked<'i> {
    /// JSON, as an HTTP client (or a test) sent it; logged as it came.
    Json(Value),
    /// Regorus's value, evaluated as it is (built from a typed input on a cache miss).
    Rego(regorus::Value),
    /// A typed input of the node's enforcement points: keyed as it is, built as regorus's
    /// value only when evaluated, as JSON only when logged.
    Typed(&'i dyn TypedInput),
}

impl Asked<'_> {
    /// What regorus evaluates.
    fn to_rego(&self) -> Result<regorus::Value, EvalError> {
        match self {
            // Deserialising from a reference saves cloning the input (~2 µs on a message).
            Asked::Json(json) => <regorus::Value as serde::Deserialize>::deserialize(json)
                .map_err(|e| EvalError::Failed(format!("input cannot be evaluated: {e}"))),
            // Values share their parts: a clone is a reference count.
            Asked::Rego(rego) => Ok(rego.clone()),
            Asked::Typed(input) => Ok(input.to_rego()),
        }
    }

    /// A JSON copy (for the shadow's candidate, only when one listens).
    fn to_json(&self) -> Value {
        match self {
            Asked::Json(json) => json.clone(),
            Asked::Rego(rego) => serde_json::to_value(rego).unwrap_or(Value::Null),
            Asked::Typed(input) => input.to_value(),
        }
    }

    /// What the decision log writes (only built when the log is on).
    fn into_json(self) -> Value {
        match self {
            Asked::Json(json) => json,
            Asked::Rego(rego) => serde_json::to_value(&rego).unwrap_or(Value::Null),
            Asked::Typed(input) => input.to_value(),
        }
    }
}

/// Nanoseconds since `start`, saturating.
pub(crate) fn elapsed_ns(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Writes `(path, text)` files into a fresh temporary directory (unit-test helper).
#[cfg(test)]
pub(crate) fn test_tree(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (path, text) in files {
        let full = dir.path().join(path);
        std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
        std::fs::write(full, text).expect("write");
    }
    dir
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const HTTP: AskedBy = AskedBy {
        point: EnforcementPoint::HttpApi,
        peer: None,
    };

    pub(crate) fn pdp_with(files: &[(&str, &str)]) -> (tempfile::TempDir, Pdp) {
        let dir = test_tree(files);
        let config = PdpConfig {
            policies: dir.path().to_path_buf(),
            schema_dir: dir.path().join("no-schemas"),
            schemas: Default::default(),
            decision: "data.t.decision".into(),
            ..PdpConfig::default()
        };
        let pdp = Pdp::builder(&config).build().expect("build");
        (dir, pdp)
    }

    const POLICY: &str = r#"package t
default allow := false
allow if input.user == "alice"
reasons contains "not alice" if not allow
decision := {"allow": allow, "reasons": reasons}
"#;

    fn check(pdp: &Pdp, input: Value, allow: bool, reason: &str) {
        let decision = pdp.decide(input.clone(), EnforcementPoint::Bus);
        assert_eq!(decision.allow, allow, "{input} → {decision:?}");
        assert!(
            reason.is_empty() && decision.reasons.is_empty()
                || decision.reasons.iter().any(|r| r.contains(reason)),
            "{input} → {decision:?}, expected reason {reason:?}"
        );
    }

    #[test]
    fn decide_allows_and_denies_with_reasons() {
        let (_dir, pdp) = pdp_with(&[("t.rego", POLICY)]);
        pdp.reload().expect("load");
        check(&pdp, json!({"user": "alice"}), true, "");
        check(&pdp, json!({"user": "bob"}), false, "not alice");
    }

    #[test]
    fn deny_when_no_bundle_is_loaded() {
        let (_dir, pdp) = pdp_with(&[]);
        assert!(pdp.reload().is_err());
        check(
            &pdp,
            json!({"user": "alice"}),
            false,
            "no policy bundle loaded",
        );
    }

    #[test]
    fn deny_when_decision_is_undefined() {
        let (_dir, pdp) = pdp_with(&[("t.rego", "package t\nx := 1\n")]);
        pdp.reload().expect("load");
        check(&pdp, json!({}), false, "undefined");
    }

    #[test]
    fn deny_when_decision_is_malformed() {
        let (_dir, pdp) = pdp_with(&[("t.rego", "package t\ndecision := {\"ok\": true}\n")]);
        pdp.reload().expect("load");
        check(&pdp, json!({}), false, "no boolean \"allow\"");
    }

    #[test]
    fn deny_when_evaluation_errors() {
        // `with` keeps this rule off the bytecode VM, so the interpreter serves it and raises
        // the conflict (the VM would make the conflicting rule undefined: also a deny).
        let policy = "package t\nx := input.a\nx := input.b\ndecision := {\"allow\": x} if {\n  true with input.z as 1\n}\n";
        let (_dir, pdp) = pdp_with(&[("t.rego", policy)]);
        pdp.reload().expect("load");
        let status = pdp.status();
        assert_eq!(status.decision_engine, Some("interpreter"));
        assert!(status.rvm_error.is_some());
        check(&pdp, json!({"a": true, "b": false}), false, "policy error");
        check(&pdp, json!({"a": true}), true, "");
    }

    #[test]
    fn deny_when_evaluation_times_out() {
        let slow = "package t\ndecision := {\"allow\": n > 0} if n := count([x | some a in numbers.range(1, 300); some b in numbers.range(1, 300); some c in numbers.range(1, 300); x := a + b + c])\n";
        let (_dir, pdp) = pdp_with(&[("t.rego", slow)]);
        pdp.reload().expect("load");
        check(&pdp, json!({}), false, "timed out");
    }

    #[test]
    fn deny_when_instruction_limit_is_exceeded() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("t.rego"), "package t\ndecision := {\"allow\": count([x | some x in numbers.range(1, 1000)]) > 0}\n").expect("write");
        let config = PdpConfig {
            policies: dir.path().to_path_buf(),
            schemas: Default::default(),
            decision: "data.t.decision".into(),
            max_instructions: 100,
            ..PdpConfig::default()
        };
        let pdp = Pdp::builder(&config).build().expect("build");
        pdp.reload().expect("load");
        assert_eq!(pdp.status().decision_engine, Some("rvm"));
        check(&pdp, json!({}), false, "instruction limit of 100");
    }

    #[test]
    fn broken_reload_keeps_serving_the_previous_revision() {
        let (dir, pdp) = pdp_with(&[("t.rego", POLICY)]);
        let first = pdp.reload().expect("load");
        std::fs::write(dir.path().join("t.rego"), "package t\nallow if {\n").expect("write");
        let err = pdp.reload().expect_err("broken");
        assert!(err.to_string().contains("t.rego:"), "{err}");
        let status = pdp.status();
        assert!(!status.last_load_ok);
        assert_eq!(status.revision.as_deref(), Some(&*first));
        check(&pdp, json!({"user": "alice"}), true, "");
    }

    const TESTS: &str =
        "package t_test\ntest_alice if data.t.allow with input as {\"user\": \"alice\"}\n";

    #[test]
    fn a_revision_whose_tests_fail_is_refused_and_the_previous_keeps_serving() {
        let (dir, pdp) = pdp_with(&[("t.rego", POLICY), ("t_test.rego", TESTS)]);
        let first = pdp.reload().expect("tests pass");
        // An edit that breaks the bundle's own test: refused, named, the old one serves.
        std::fs::write(
            dir.path().join("t.rego"),
            POLICY.replace("\"alice\"", "\"carol\""),
        )
        .expect("write");
        let err = pdp.reload().expect_err("gated");
        assert!(
            matches!(&err, LoadError::TestsFailed { failing, .. } if failing == &["data.t_test.test_alice"]),
            "{err}"
        );
        let status = pdp.status();
        assert_eq!(status.revision.as_deref(), Some(&*first));
        assert_eq!(status.failing_tests, vec!["data.t_test.test_alice"]);
        assert!(!status.last_load_ok);
        check(&pdp, json!({"user": "alice"}), true, "");
        // Fixing the test lets the revision in, and the failures are forgotten.
        std::fs::write(
            dir.path().join("t_test.rego"),
            TESTS.replace("\"alice\"", "\"carol\""),
        )
        .expect("write");
        let second = pdp.reload().expect("tests pass again");
        assert_ne!(second, first);
        assert!(pdp.status().failing_tests.is_empty());
        check(&pdp, json!({"user": "carol"}), true, "");
    }

    #[test]
    fn the_gate_can_be_switched_off_and_a_failing_fixture_counts_too() {
        let failing_fixture = r#"{"input": {"user": "bob"}, "expect": {"allow": true}}"#;
        let (dir, pdp) = pdp_with(&[("t.rego", POLICY), ("fixtures/bob.json", failing_fixture)]);
        let err = pdp.reload().expect_err("a fixture fails");
        assert!(err.to_string().contains("bob.json"), "{err}");
        assert!(
            pdp.active().is_none(),
            "nothing was serving, nothing serves"
        );
        let config = PdpConfig {
            policies: dir.path().to_path_buf(),
            schemas: Default::default(),
            decision: "data.t.decision".into(),
            reload_requires_tests: Some(false),
            ..PdpConfig::default()
        };
        let ungated = Pdp::builder(&config).build().expect("build");
        ungated.reload().expect("not gated");
    }

    #[test]
    fn each_record_names_the_enforcement_point_that_asked() {
        #[derive(Default)]
        struct Capture(Mutex<Vec<DecisionRecord>>);
        impl DecisionSink for Capture {
            fn log(&self, record: DecisionRecord) {
                self.0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(record);
            }
        }
        let dir = test_tree(&[("t.rego", POLICY)]);
        let config = PdpConfig {
            policies: dir.path().to_path_buf(),
            schemas: Default::default(),
            decision: "data.t.decision".into(),
            ..PdpConfig::default()
        };
        let capture = Arc::new(Capture::default());
        let pdp = Pdp::builder(&config)
            .sink(capture.clone())
            .id(Some("replica-a".into()))
            .build()
            .expect("build");
        pdp.reload().expect("load");
        for point in [
            EnforcementPoint::Proxy,
            EnforcementPoint::Appservice,
            EnforcementPoint::Bus,
            EnforcementPoint::PolicyServer,
        ] {
            pdp.decide(json!({"user": "alice"}), point);
        }
        let records = capture.0.lock().expect("lock");
        let asked: Vec<String> = records.iter().map(|r| r.requested_by.clone()).collect();
        assert_eq!(asked, ["proxy", "appservice", "bus", "policy_server"]);
        let first = serde_json::to_value(&records[0]).expect("json");
        assert_eq!(first["enforcement_point"], "proxy");
        assert_eq!(first["path"], "t/decision");
        assert_eq!(first["labels"]["id"], "replica-a");
        assert_eq!(
            first["bundles"]["policies"]["revision"].as_str(),
            pdp.status().revision.as_deref()
        );
    }

    #[test]
    fn a_shadow_candidate_decides_beside_and_never_changes_the_live_decision() {
        let (_dir, pdp) = pdp_with(&[("t.rego", POLICY)]);
        pdp.reload().expect("load");
        let candidate = test_tree(&[("t.rego", &POLICY.replace("\"alice\"", "\"bob\""))]);
        pdp.shadow()
            .load(Bundle::read(candidate.path()).expect("read"))
            .expect("candidate");
        check(&pdp, json!({"user": "alice"}), true, "");
        check(&pdp, json!({"user": "bob"}), false, "not alice");
        let mut status = pdp.shadow().status();
        for _ in 0..1000 {
            if status.evaluated == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
            status = pdp.shadow().status();
        }
        let flips: Vec<(&str, &str)> = status
            .recent
            .iter()
            .map(|d| (d.live.label(), d.candidate.label()))
            .collect();
        assert_eq!(flips, [("deny", "allow"), ("allow", "deny")]);
        // The playground's what-if: both sides, nothing logged or counted.
        let (_, live) = pdp.try_decision(&json!({"user": "bob"})).expect("active");
        let (_, shadowed) = pdp
            .shadow()
            .decide(&json!({"user": "bob"}))
            .expect("candidate");
        assert!(!live.allow && shadowed.allow);
        assert_eq!(pdp.shadow().status().evaluated, 2);
    }

    #[test]
    fn cache_hits_until_the_revision_changes() {
        let (dir, pdp) = pdp_with(&[("t.rego", POLICY)]);
        pdp.reload().expect("load");
        let path = DataPath::from_ref("data.t.allow").expect("ref");
        let input = json!({"user": "alice", "message": {"id": 1}});
        assert!(
            !pdp.query(&path, Some(input.clone()), &HTTP)
                .expect("q")
                .cache_hit
        );
        let mut other_id = input.clone();
        other_id["message"]["id"] = json!(2);
        let hit = pdp.query(&path, Some(other_id), &HTTP).expect("q");
        assert!(hit.cache_hit, "message.id is ignored by default");
        assert_eq!(*hit.result, Some(json!(true)));
        std::fs::write(
            dir.path().join("t.rego"),
            POLICY.replace("\"alice\"", "\"carol\""),
        )
        .expect("write");
        pdp.reload().expect("reload");
        let after = pdp.query(&path, Some(input), &HTTP).expect("q");
        assert!(!after.cache_hit);
        assert_eq!(*after.result, Some(json!(false)));
    }
}

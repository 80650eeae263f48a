//! The PDP's Prometheus metrics. Labels are closed sets (result kinds, reload outcomes,
//! route names) — never paths, users or addresses — except the bundle revision of the info
//! gauge, which has one series at a time.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// How a decision came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `allow: true` (or a `true` result).
    Allow,
    /// `allow: false` (or a `false` result).
    Deny,
    /// No value: the rule was undefined.
    Undefined,
    /// Some other value (a whole package, data, …).
    Value,
    /// Evaluation failed or timed out.
    Error,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::Undefined => "undefined",
            Outcome::Value => "value",
            Outcome::Error => "error",
        }
    }

    /// Classifies a result: a boolean, or an object with a boolean `allow`, is allow/deny.
    pub fn of(result: Option<&serde_json::Value>) -> Self {
        let allow = match result {
            None => return Outcome::Undefined,
            Some(serde_json::Value::Bool(b)) => Some(*b),
            Some(v) => v.get("allow").and_then(serde_json::Value::as_bool),
        };
        match allow {
            Some(true) => Outcome::Allow,
            Some(false) => Outcome::Deny,
            None => Outcome::Value,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TestLabel {
    test: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RevisionLabel {
    revision: String,
}

/// Counters, gauges and histograms of one PDP.
pub struct PdpMetrics {
    decisions: [Counter; 5],
    eval_seconds: Histogram,
    cache_hits: Counter,
    cache_misses: Counter,
    reloads_ok: Counter,
    reloads_failed: Counter,
    last_reload_ok: Gauge,
    bundle: Family<RevisionLabel, Gauge>,
    failing_tests: Family<TestLabel, Gauge>,
}

const OUTCOMES: [Outcome; 5] = [
    Outcome::Allow,
    Outcome::Deny,
    Outcome::Undefined,
    Outcome::Value,
    Outcome::Error,
];

impl PdpMetrics {
    /// Creates the metrics and registers them (prefix `msgnode_pdp_`).
    pub fn register(registry: &mut Registry) -> Self {
        let registry = registry.sub_registry_with_prefix("pdp");
        let decisions_family = Family::<ResultLabel, Counter>::default();
        registry.register(
            "decisions",
            "Decisions made, by result",
            decisions_family.clone(),
        );
        let decisions = OUTCOMES.map(|o| {
            decisions_family
                .get_or_create(&ResultLabel { result: o.label() })
                .clone()
        });
        // 1 µs .. ~65 ms
        let eval_seconds = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(1e-6, 2.0, 17),
        );
        registry.register(
            "eval_duration_seconds",
            "Time to evaluate one decision (cache lookups excluded)",
            eval_seconds.clone(),
        );
        let cache_hits = Counter::default();
        registry.register(
            "cache_hits",
            "Decisions served from the cache",
            cache_hits.clone(),
        );
        let cache_misses = Counter::default();
        registry.register(
            "cache_misses",
            "Decisions not found in the cache",
            cache_misses.clone(),
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register("bundle_reloads", "Bundle loads, by result", reloads.clone());
        let reloads_ok = reloads.get_or_create(&ResultLabel { result: "ok" }).clone();
        let reloads_failed = reloads
            .get_or_create(&ResultLabel { result: "failed" })
            .clone();
        let last_reload_ok = Gauge::default();
        registry.register(
            "bundle_last_reload_ok",
            "1 when the last bundle load succeeded, 0 when it failed (the previous revision keeps serving)",
            last_reload_ok.clone(),
        );
        let bundle = Family::<RevisionLabel, Gauge>::default();
        registry.register(
            "bundle_info",
            "The revision being served (value 1)",
            bundle.clone(),
        );
        let failing_tests = Family::<TestLabel, Gauge>::default();
        registry.register(
            "bundle_failing_test",
            "Tests of the last rejected revision that failed (value 1; the reload gate, [pdp] reload_requires_tests); none once a revision activates",
            failing_tests.clone(),
        );
        Self {
            failing_tests,
            decisions,
            eval_seconds,
            cache_hits,
            cache_misses,
            reloads_ok,
            reloads_failed,
            last_reload_ok,
            bundle,
        }
    }

    /// Counts one decision and, unless it came from the cache, its evaluation time.
    pub fn decision(&self, outcome: Outcome, eval_ns: u64, cache_hit: bool) {
        let index = OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(4);
        self.decisions[index].inc();
        if cache_hit {
            self.cache_hits.inc();
        } else {
            self.eval_seconds.observe(eval_ns as f64 / 1e9);
        }
    }

    /// Counts a cache miss.
    pub fn cache_miss(&self) {
        self.cache_misses.inc();
    }

    /// Records a successful load of `revision`.
    pub fn reload_ok(&self, revision: &str) {
        self.reloads_ok.inc();
        self.last_reload_ok.set(1);
        self.failing_tests.clear();
        self.bundle.clear();
        self.bundle
            .get_or_create(&RevisionLabel {
                revision: revision.to_string(),
            })
            .set(1);
    }

    /// Records a failed load, naming the tests that failed when the reload gate refused it.
    pub fn reload_failed(&self, failing_tests: &[String]) {
        self.reloads_failed.inc();
        self.last_reload_ok.set(0);
        self.failing_tests.clear();
        for test in failing_tests {
            self.failing_tests
                .get_or_create(&TestLabel { test: test.clone() })
                .set(1);
        }
    }
}

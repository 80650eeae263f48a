//! OPA v1 wire types and error codes, used only at the HTTP edge.

use serde::Serialize;
use serde_json::Value;

/// Error codes, as OPA spells them.
pub mod codes {
    /// Bad request: malformed body, bad parameter, schema violation.
    pub const INVALID_PARAMETER: &str = "invalid_parameter";
    /// Unknown policy id.
    pub const RESOURCE_NOT_FOUND: &str = "resource_not_found";
    /// Missing or wrong bearer token.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// Evaluation error, timeout, or no bundle.
    pub const INTERNAL_ERROR: &str = "internal_error";
    /// 429: the client is over its rate limit (msgnode's own; OPA has no rate limits).
    pub const TOO_MANY_REQUESTS: &str = "too_many_requests";
    /// 403: refused whoever asks (msgnode's console: cross-origin, read-only).
    pub const FORBIDDEN: &str = "forbidden";
    /// 503: a bound is reached (msgnode's console: too many tails).
    pub const UNAVAILABLE: &str = "unavailable";
    /// Warning code when a data request has no `input`.
    pub const API_USAGE_WARNING: &str = "api_usage_warning";
}

/// `ErrorV1`: every error response body.
#[derive(Debug, Serialize)]
pub struct ErrorV1 {
    /// One of [`codes`].
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// Details (evaluation errors, schema violations).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ErrorDetailV1>,
}

/// One entry of `ErrorV1.errors`.
#[derive(Debug, Serialize)]
pub struct ErrorDetailV1 {
    /// Error kind (`eval_error`, `eval_timeout`, `schema_violation`).
    pub code: &'static str,
    /// What went wrong.
    pub message: String,
    /// JSON pointer into the input, for schema violations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pointer: Option<String>,
}

/// `DataResponseV1` (the result borrowed from the decision, which the cache may share).
#[derive(Debug, Serialize)]
pub struct DataResponseV1<'r> {
    /// Decision id, as in the decision log.
    pub decision_id: String,
    /// The document; absent when undefined.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<&'r Value>,
    /// With `?metrics=true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsV1>,
    /// With `?provenance=true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provenance: Option<ProvenanceV1>,
    /// When `input` was missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<WarningV1>,
}

/// Timers of one request, in nanoseconds, named as OPA names them.
#[derive(Debug, Serialize)]
pub struct MetricsV1 {
    /// Parsing the request body.
    pub timer_rego_input_parse_ns: u64,
    /// Evaluation (or cache lookup).
    pub timer_rego_query_eval_ns: u64,
    /// The whole handler.
    pub timer_server_handler_ns: u64,
    /// 1 when the result came from the decision cache (msgnode extension).
    pub counter_decision_cache_hit: u64,
}

/// Where a decision came from.
#[derive(Debug, Serialize)]
pub struct ProvenanceV1 {
    /// msgnode version.
    pub version: &'static str,
    /// The commit msgnode was built from (OPA: `revision`).
    pub revision: &'static str,
    /// Bundles by name (one: `policies`, or `[pdp.bundle] name`).
    pub bundles: std::collections::BTreeMap<String, BundleProvenanceV1>,
}

/// One bundle's provenance.
#[derive(Debug, Serialize)]
pub struct BundleProvenanceV1 {
    /// The revision.
    pub revision: String,
}

/// A non-fatal remark about the request.
#[derive(Debug, Serialize)]
pub struct WarningV1 {
    /// [`codes::API_USAGE_WARNING`].
    pub code: &'static str,
    /// What to change.
    pub message: &'static str,
}

/// One module in `GET /v1/policies`.
#[derive(Debug, Serialize)]
pub struct PolicyV1 {
    /// Path relative to the bundle root.
    pub id: String,
    /// Source text.
    pub raw: String,
}

/// `{"result": …}` wrapper of the policy endpoints.
#[derive(Debug, Serialize)]
pub struct ResultV1<T> {
    /// The payload.
    pub result: T,
}

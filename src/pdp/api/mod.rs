//! The PDP's HTTP API, compatible with OPA's v1 REST API so existing OPA clients work.
//!
//! The whole route table is [`router`]. Handlers live one per file (`v1_data`, `v1_policies`,
//! `health`, `metrics`); wire types in `types`; errors become HTTP responses only in
//! [`ApiError`]'s `IntoResponse`. Every route has a fixed metric label ([`RouteLabel`]).

pub mod console;
pub mod health;
pub mod metrics;
pub mod types;
pub mod v1_data;
pub mod v1_policies;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::engine::EvalError;
use super::{Pdp, PdpError};
use types::{codes, ErrorDetailV1, ErrorV1};

/// Everything the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The decision point.
    pub pdp: Pdp,
    /// Metrics of the whole process, rendered by `GET /metrics`.
    pub registry: Arc<Registry>,
    /// Bearer token required on every route but `/health*`, if set.
    pub token: Option<Arc<str>>,
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// The console (`[console] enabled`).
    pub console: Option<console::Console>,
    /// Requests per client address.
    limiter: Arc<crate::ratelimit::Limiter>,
    http: HttpMetrics,
}

impl ApiState {
    /// State for `pdp`; registers the HTTP metrics in `registry` before it is frozen.
    pub fn new(
        pdp: Pdp,
        registry: &mut Registry,
        token: Option<String>,
        max_body_bytes: usize,
    ) -> Self {
        let http = HttpMetrics::register(registry);
        Self {
            pdp,
            registry: Arc::new(std::mem::take(registry)),
            token: token.filter(|t| !t.is_empty()).map(Arc::from),
            max_body_bytes,
            console: None,
            limiter: Arc::new(crate::ratelimit::Limiter::new(
                &crate::config::RateLimit::default(),
            )),
            http,
        }
    }

    /// Limits the requests of each client address to `limit`.
    pub fn with_rate_limit(mut self, limit: &crate::config::RateLimit) -> Self {
        self.limiter = Arc::new(crate::ratelimit::Limiter::new(limit));
        self
    }

    /// Serves the console at `/console`.
    pub fn with_console(mut self, console: console::Console) -> Self {
        self.console = Some(console);
        self
    }

    /// Forgets the rate-limit state of idle clients (call now and then).
    pub fn forget_idle_clients(&self) {
        self.limiter.forget_idle();
    }
}

/// Fixed metric label of each route; never a raw path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteLabel {
    /// `/v1/data[/…]`
    V1Data,
    /// `/v1/policies[/…]`
    V1Policies,
    /// `/health[/…]`
    Health,
    /// `/metrics`
    Metrics,
    /// `/v1/status`
    Status,
    /// `/console[/…]`
    Console,
    /// Anything else (404s).
    Other,
}

impl RouteLabel {
    fn of(matched: Option<&str>) -> Self {
        match matched {
            Some(p) if p.starts_with("/v1/data") => RouteLabel::V1Data,
            Some(p) if p.starts_with("/v1/policies") => RouteLabel::V1Policies,
            Some(p) if p.starts_with("/health") => RouteLabel::Health,
            Some("/v1/status") => RouteLabel::Status,
            Some("/metrics") => RouteLabel::Metrics,
            Some(p) if p.starts_with("/console") => RouteLabel::Console,
            _ => RouteLabel::Other,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            RouteLabel::V1Data => "v1/data",
            RouteLabel::V1Policies => "v1/policies",
            RouteLabel::Health => "health",
            RouteLabel::Metrics => "metrics",
            RouteLabel::Status => "v1/status",
            RouteLabel::Console => "console",
            RouteLabel::Other => "other",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteOnly {
    route: &'static str,
}

#[derive(Clone)]
struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteOnly, Histogram>,
}

impl HttpMetrics {
    fn register(registry: &mut Registry) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "pdp_http_requests",
            "PDP API requests, by route and status code",
            requests.clone(),
        );
        let duration = Family::<RouteOnly, Histogram>::new_with_constructor(|| {
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                1e-5, 2.0, 16,
            ))
        });
        registry.register(
            "pdp_http_request_duration_seconds",
            "PDP API handler time, by route",
            duration.clone(),
        );
        Self { requests, duration }
    }
}

/// The PDP API's route table.
pub fn router(state: ApiState) -> Router {
    let authenticated = Router::new()
        .route(
            "/v1/data",
            get(v1_data::v1_data_get).post(v1_data::v1_data_post),
        )
        .route(
            "/v1/data/",
            get(v1_data::v1_data_get).post(v1_data::v1_data_post),
        )
        .route(
            "/v1/data/{*path}",
            get(v1_data::v1_data_get_path).post(v1_data::v1_data_post_path),
        )
        .route("/v1/policies", get(v1_policies::v1_policies_list))
        .route("/v1/policies/{*id}", get(v1_policies::v1_policies_get))
        .route("/metrics", get(metrics::metrics_get))
        .route("/v1/status", get(health::v1_status_get))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let mut routes = Router::new();
    if state.console.is_some() {
        routes = routes.merge(console::router(&state));
    }
    routes
        .route("/health", get(health::health_get))
        .route("/health/live", get(health::health_live_get))
        .route("/health/ready", get(health::health_get))
        .merge(authenticated)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), limit_rate))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .with_state(state)
}

/// The access log's target: `tower_http`'s, whose trace layer wrote these lines before, so
/// filters that name it (`[log] level = "info,tower_http=warn"`) still apply.
const ACCESS_LOG: &str = "tower_http::trace::on_response";

/// Metrics of every request, and the access log: one INFO event per request (method, URI,
/// version, status, latency) and no span, so a request costs the log nothing when the level
/// is off, and one event, not a span entered at every poll, when it is on.
async fn observe(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let route = RouteLabel::of(
        request
            .extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str),
    )
    .as_str();
    let access = tracing::enabled!(target: ACCESS_LOG, tracing::Level::INFO).then(|| {
        (
            request.method().clone(),
            request.uri().clone(),
            request.version(),
        )
    });
    let start = Instant::now();
    let response = next.run(request).await;
    let elapsed = start.elapsed();
    let code = response.status().as_u16();
    state
        .http
        .duration
        .get_or_create(&RouteOnly { route })
        .observe(elapsed.as_secs_f64());
    state
        .http
        .requests
        .get_or_create(&RequestLabels { route, code })
        .inc();
    if let Some((method, uri, version)) = access {
        tracing::info!(
            target: ACCESS_LOG,
            %method,
            %uri,
            ?version,
            latency = format_args!("{} μs", elapsed.as_micros()),
            status = code,
            "finished processing request"
        );
    }
    response
}

/// 429 with `Retry-After` for a client address over its rate limit.
async fn limit_rate(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let client = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "unknown".to_string(), |c| c.0.ip().to_string());
    match state.limiter.check(&client) {
        Ok(()) => next.run(request).await,
        Err(wait) => ApiError::TooManyRequests(wait).into_response(),
    }
}

async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let Some(expected) = state.token.as_deref() else {
        return next.run(request).await;
    };
    let presented = crate::http_auth::bearer(request.headers()).unwrap_or("");
    if crate::http_auth::token_matches(presented, expected) {
        next.run(request).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound("unknown API path".to_string())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

fn panicked(_: Box<dyn std::any::Any + Send>) -> Response {
    tracing::error!("PDP API handler panicked");
    ApiError::Internal("internal error".to_string()).into_response()
}

/// Everything an API request can fail with; mapped to status + `ErrorV1` in one place.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No or wrong bearer token.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// Not allowed, whoever asks (a cross-origin request, a write to a read-only console).
    #[error("{0}")]
    Forbidden(String),
    /// Not now (a bound is reached).
    #[error("{0}")]
    Unavailable(String),
    /// A malformed body or parameter.
    #[error("{0}")]
    BadRequest(String),
    /// Body over the limit.
    #[error("request body exceeds the limit of {0} bytes")]
    TooLarge(usize),
    /// Unknown resource.
    #[error("{0}")]
    NotFound(String),
    /// Known path, wrong method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Unexpected failure.
    #[error("{0}")]
    Internal(String),
    /// The client is over its rate limit; it may retry after the duration.
    #[error("too many requests: retry in {} ms", crate::ratelimit::millis(*.0))]
    TooManyRequests(std::time::Duration),
    /// The PDP could not decide.
    #[error(transparent)]
    Pdp(#[from] PdpError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let retry_after = match &self {
            ApiError::TooManyRequests(wait) => Some(wait.as_secs() + 1),
            ApiError::Pdp(PdpError::Busy(_)) => Some(1),
            _ => None,
        };
        let (status, code, errors) = match self {
            ApiError::TooManyRequests(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                codes::TOO_MANY_REQUESTS,
                vec![],
            ),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, codes::UNAUTHORIZED, vec![]),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, codes::FORBIDDEN, vec![]),
            ApiError::Unavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE, vec![])
            }
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, codes::INVALID_PARAMETER, vec![]),
            ApiError::TooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                codes::INVALID_PARAMETER,
                vec![],
            ),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, codes::RESOURCE_NOT_FOUND, vec![]),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                codes::INVALID_PARAMETER,
                vec![],
            ),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                codes::INTERNAL_ERROR,
                vec![],
            ),
            ApiError::Pdp(PdpError::NoBundle(_)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                codes::INTERNAL_ERROR,
                vec![],
            ),
            ApiError::Pdp(PdpError::Busy(_)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                codes::INTERNAL_ERROR,
                vec![ErrorDetailV1 {
                    code: "busy",
                    message: message.clone(),
                    pointer: None,
                }],
            ),
            ApiError::Pdp(PdpError::Schema(v)) => (
                StatusCode::BAD_REQUEST,
                codes::INVALID_PARAMETER,
                vec![ErrorDetailV1 {
                    code: "schema_violation",
                    message: v.message,
                    pointer: Some(v.pointer),
                }],
            ),
            ApiError::Pdp(PdpError::Eval(e)) => {
                let detail = match e {
                    EvalError::Timeout(_) | EvalError::InstructionLimit(_) => "eval_timeout",
                    EvalError::Failed(_) => "eval_error",
                };
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    codes::INTERNAL_ERROR,
                    vec![ErrorDetailV1 {
                        code: detail,
                        message: message.clone(),
                        pointer: None,
                    }],
                )
            }
        };
        let mut response = json_response(
            status,
            &ErrorV1 {
                code,
                message,
                errors,
            },
            false,
        );
        if let Some(seconds) = retry_after.and_then(|s| HeaderValue::from_str(&s.to_string()).ok())
        {
            response.headers_mut().insert(header::RETRY_AFTER, seconds);
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Serialises `body` as JSON (indented when `pretty`), with the right content type.
pub fn json_response<T: serde::Serialize>(status: StatusCode, body: &T, pretty: bool) -> Response {
    let bytes = if pretty {
        serde_json::to_vec_pretty(body)
    } else {
        serde_json::to_vec(body)
    };
    match bytes {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "application/json")],
            format!(r#"{{"code":"internal_error","message":"response is not serialisable: {e}"}}"#),
        )
            .into_response(),
    }
}

/// Whether a boolean query parameter is on (`?x`, `?x=true`), as OPA reads them.
pub(crate) fn flag(params: &[(String, String)], name: &str) -> bool {
    params
        .iter()
        .any(|(k, v)| k == name && (v.is_empty() || v.eq_ignore_ascii_case("true")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_busy_pdp_is_a_503_in_opas_error_shape_with_retry_after() {
        let response =
            ApiError::Pdp(PdpError::Busy(super::super::pool::PoolError::Busy)).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(body["code"], codes::INTERNAL_ERROR);
        assert_eq!(body["errors"][0]["code"], "busy");
        assert!(body["message"].as_str().is_some_and(|m| m.contains("busy")));
    }
}

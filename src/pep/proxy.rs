//! The client-server proxy: decide, then forward.
//!
//! Every request is classified by `route::classify`, an allow-list of the client-server API's
//! writes. Writes that create room events, change who is in a room or carry traffic between
//! users (send, state, redact, memberships, createRoom, profile changes, alias deletion,
//! deactivation, sendToDevice) are decided by the PDP first — one input per event or
//! membership change, the sender resolved from the access token — and forwarded with their
//! canonical path only when every decision allows. Before that, the identifiers in the path
//! (`route`) and the typed bodies (`body`) are checked with ruma's types: a malformed one is
//! 400 `M_INVALID_PARAM`, decided by no one. Writes known to create no room event are
//! forwarded as they are; every other write is refused. Reads stream through untouched.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde_json::{json, Value};

use super::canonical::forwarded;
use super::error::{from_homeserver, ErrorCode, MatrixError, RequestError};
use super::forward::forward;
use super::inputs::inputs_for;
use super::route::{classify, Intercepted, Route};
use crate::config::{PdpFailure, PepConfig};
use crate::matrix::{encode, Homeserver};
use crate::policy::{Decider, EnforcementPoint};
use crate::ratelimit::Limiter;

/// What the proxy's handler shares.
#[derive(Clone)]
pub struct PepState {
    decider: Decider,
    homeserver: Arc<Homeserver>,
    config: Arc<PepConfig>,
    metrics: ProxyMetrics,
    /// Decided requests per client address (before the token is looked up).
    limiter: Arc<Limiter>,
    /// Decisions per user (once the token names one).
    user_limiter: Arc<Limiter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// `intercepted` (decided), `allowlisted`, `refused` (by the route table) or
    /// `passthrough`.
    path: &'static str,
    /// `forwarded`, `denied`, `rejected` (bad request or token), `rate_limited` or
    /// `policy_unavailable`.
    outcome: &'static str,
}

/// The proxy's own metrics (labels are closed sets).
#[derive(Clone)]
struct ProxyMetrics {
    requests: Family<RequestLabels, Counter>,
    /// From arrival to hand-over to the homeserver (or to the refusal): the proxy's own time.
    enforce_seconds: Histogram,
}

impl ProxyMetrics {
    fn register(registry: &mut Registry) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "pep_requests",
            "Client-server requests through the proxy, by path kind and outcome",
            requests.clone(),
        );
        // 10 µs .. ~0.3 s
        let enforce_seconds = Histogram::new(exponential_buckets(1e-5, 2.0, 16));
        registry.register(
            "pep_enforce_duration_seconds",
            "Proxy time per intercepted request before forwarding: token look-up, body, decisions",
            enforce_seconds.clone(),
        );
        Self {
            requests,
            enforce_seconds,
        }
    }

    fn count(&self, path: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { path, outcome })
            .inc();
    }
}

impl PepState {
    /// State for a proxy in front of `config.homeserver`, deciding with `decider`; registers
    /// the proxy's metrics in `registry`.
    ///
    /// # Errors
    /// The homeserver URL is unusable.
    pub fn new(
        decider: Decider,
        config: PepConfig,
        registry: &mut Registry,
    ) -> anyhow::Result<Self> {
        let homeserver = Homeserver::new(&config.homeserver, config.whoami_ttl)?;
        Ok(Self {
            decider,
            homeserver: Arc::new(homeserver),
            limiter: Arc::new(Limiter::new(&config.rate_limit)),
            user_limiter: Arc::new(Limiter::new(&config.user_rate_limit)),
            config: Arc::new(config),
            metrics: ProxyMetrics::register(registry),
        })
    }

    /// Forgets the rate-limit state of idle clients (call now and then).
    pub fn forget_idle_clients(&self) {
        self.limiter.forget_idle();
        self.user_limiter.forget_idle();
    }

    /// The homeserver client, shared with the appservice.
    pub fn homeserver(&self) -> Arc<Homeserver> {
        Arc::clone(&self.homeserver)
    }
}

/// The proxy's route table: one fallback, since every path is either decided or forwarded.
pub fn router(state: PepState) -> Router {
    Router::new().fallback(proxy).with_state(state)
}

async fn proxy(
    State(state): State<PepState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    match classify(request.method(), request.uri().path()) {
        Route::PassThrough => {
            state.metrics.count("passthrough", "forwarded");
            forward(&state.homeserver, request, &path_and_query, Some(client)).await
        }
        Route::Allowed(_) => {
            state.metrics.count("allowlisted", "forwarded");
            forward(&state.homeserver, request, &path_and_query, Some(client)).await
        }
        Route::Refused(refusal) => {
            state.metrics.count("refused", "rejected");
            let errcode = match refusal.status {
                StatusCode::FORBIDDEN => ErrorCode::Forbidden,
                _ => ErrorCode::Unrecognized,
            };
            MatrixError::new(refusal.status, errcode, refusal.reason).into_response()
        }
        Route::Decide(endpoint) => match state.limiter.check(&client.ip().to_string()) {
            Ok(()) => enforce(&state, request, &endpoint, client).await,
            Err(wait) => {
                state.metrics.count("intercepted", "rate_limited");
                MatrixError::limit_exceeded(wait).into_response()
            }
        },
    }
}

/// The caller's access token and, for appservices, the user it masquerades as.
struct Caller {
    token: String,
    user_id: Option<String>,
}

fn caller(request: &Request) -> Option<Caller> {
    let query: Vec<(String, String)> = request.uri().query().map(url_pairs).unwrap_or_default();
    let token = crate::http_auth::presented(request.headers(), &query)?.to_string();
    let user_id = query
        .iter()
        .find(|(k, _)| k == "user_id")
        .map(|(_, v)| v.clone());
    Some(Caller { token, user_id })
}

fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (!k.is_empty()).then(|| (decode(k), decode(v)))
        })
        .collect()
}

async fn enforce(
    state: &PepState,
    request: Request,
    endpoint: &Intercepted,
    client: SocketAddr,
) -> Response {
    let started = Instant::now();
    let decided = decide(state, request, endpoint).await;
    state
        .metrics
        .enforce_seconds
        .observe(started.elapsed().as_secs_f64());
    match decided {
        Ok((request, path_and_query)) => {
            state.metrics.count("intercepted", "forwarded");
            forward(&state.homeserver, request, &path_and_query, Some(client)).await
        }
        Err((outcome, response)) => {
            state.metrics.count("intercepted", outcome);
            response
        }
    }
}

/// Decides an intercepted request: the request to forward with its canonical path, or the
/// outcome label and the refusal.
async fn decide(
    state: &PepState,
    request: Request,
    endpoint: &Intercepted,
) -> Result<(Request, String), (&'static str, Response)> {
    let rejected = |error: MatrixError| ("rejected", error.into_response());
    // Malformed identifiers never reach the PDP or the homeserver.
    let invalid = |why: String| {
        rejected(MatrixError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidParam,
            why,
        ))
    };
    endpoint.validate().map_err(|e| invalid(e.to_string()))?;
    let Some(caller) = caller(&request) else {
        return Err(rejected(MatrixError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::MissingToken,
            "missing access token",
        )));
    };
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, state.config.max_body_bytes)
        .await
        .map_err(|_| {
            rejected(MatrixError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::TooLarge,
                format!("request body exceeds {} bytes", state.config.max_body_bytes),
            ))
        })?;
    let content: Value = if bytes.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&bytes).map_err(|e| {
            rejected(MatrixError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::NotJson,
                format!("body is not JSON: {e}"),
            ))
        })?
    };
    if !content.is_object() {
        return Err(rejected(MatrixError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::NotJson,
            "body must be a JSON object",
        )));
    }
    super::body::validate(endpoint, &bytes).map_err(|e| invalid(e.to_string()))?;
    let sender = state
        .homeserver
        .whoami(&caller.token, caller.user_id.as_deref())
        .await
        .map_err(|error| ("rejected", from_homeserver(error)))?;
    let query: Vec<(String, String)> = parts
        .uri
        .query()
        .map(url_pairs)
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k != "access_token")
        .collect();
    let refused = |error: RequestError| (error.outcome(), error.into_response());
    let forwarded = forwarded(&state.homeserver, endpoint, &content, &query, &caller.token)
        .await
        .map_err(refused)?;
    let asking = super::inputs::Caller {
        sender: &sender,
        token: &caller.token,
        user_id: caller.user_id.as_deref(),
    };
    let inputs = inputs_for(
        &state.homeserver,
        &state.config.server_name,
        &forwarded.endpoint,
        &forwarded.body,
        &asking,
    )
    .await
    .map_err(refused)?;
    if inputs.is_empty() {
        // Every intercepted request yields at least one input; none means a gap: refuse.
        return Err((
            "denied",
            MatrixError::forbidden("nothing in this request could be decided").into_response(),
        ));
    }
    // No more than one burst of the user's bucket either: more would never be granted.
    let user_limit = state.config.user_rate_limit;
    let most = match user_limit.per_second {
        0 => state.config.max_decisions_per_request,
        _ => state
            .config
            .max_decisions_per_request
            .min(usize::try_from(user_limit.burst.max(1)).unwrap_or(usize::MAX)),
    };
    if inputs.len() > most {
        return Err(refused(RequestError::TooLarge(format!(
            "this request makes {} events or membership changes; msgnode decides at most {most} per request",
            inputs.len()
        ))));
    }
    // Each decision costs the user one token: one request cannot buy thousands.
    if let Err(wait) = state.user_limiter.check_n(&sender, inputs.len()) {
        return Err((
            "rate_limited",
            MatrixError::limit_exceeded(wait).into_response(),
        ));
    }
    for input in &inputs {
        let decision = state.decider.decide(input, EnforcementPoint::Proxy).await;
        if decision.allow {
            continue;
        }
        let reasons = decision.reasons.join("; ");
        tracing::info!(%sender, endpoint = ?endpoint, %reasons, decision_id = %decision.decision_id, "request denied");
        let unavailable = crate::policy::refusal(&decision);
        let refusal = match (decision.failed, state.config.on_pdp_failure) {
            (false, _) => ("denied", MatrixError::forbidden(reasons)),
            (true, PdpFailure::Forbidden) => {
                ("policy_unavailable", MatrixError::forbidden(unavailable))
            }
            (true, PdpFailure::Unavailable) => (
                "policy_unavailable",
                MatrixError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Unknown,
                    unavailable,
                ),
            ),
        };
        return Err((refusal.0, refusal.1.into_response()));
    }
    // Forward exactly what was decided: the canonical path and body, the decided token (no
    // second token in the query or behind a `Connection` header), and the kept query
    // re-encoded from what was parsed (the homeserver also splits on `;`).
    let mut parts = parts;
    let mut path_and_query = forwarded.endpoint.canonical_path();
    let query: Vec<String> = forwarded
        .query
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect();
    if !query.is_empty() {
        path_and_query.push('?');
        path_and_query.push_str(&query.join("&"));
    }
    let headers = &mut parts.headers;
    headers.remove(header::CONNECTION);
    headers.remove(header::AUTHORIZATION);
    // The body is rebuilt: its length is the new one's.
    headers.remove(header::CONTENT_LENGTH);
    let bearer =
        axum::http::HeaderValue::from_str(&format!("Bearer {}", caller.token)).map_err(|_| {
            rejected(MatrixError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::UnknownToken,
                "unusable access token",
            ))
        })?;
    headers.insert(header::AUTHORIZATION, bearer);
    headers.insert(
        header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    let body = match forwarded.body.as_object() {
        Some(fields) if fields.is_empty() && bytes.is_empty() => Body::empty(),
        _ => Body::from(forwarded.body.to_string()),
    };
    Ok((Request::from_parts(parts, body), path_and_query))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_pairs_are_decoded() {
        assert_eq!(
            url_pairs("access_token=a%2Bb&user_id=%40x%3Al&flag"),
            vec![
                ("access_token".into(), "a+b".into()),
                ("user_id".into(), "@x:l".into()),
                ("flag".into(), String::new())
            ]
        );
    }
}

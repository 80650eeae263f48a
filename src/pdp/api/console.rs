//! `/console`: the security team's page on the PDP listener (`[console] enabled`).
//!
//! Every route is behind `[pdp] token` — as a bearer token, or as the password of HTTP Basic
//! (any user name) so that a browser can log in and its `EventSource` carries it — and
//! refuses cross-origin requests: a `Sec-Fetch-Site` other than `same-origin`/`none`, or an
//! `Origin` that is not this host, is 403, and no CORS header is ever sent. Pages are
//! served with a strict CSP (no inline script, nothing from elsewhere) and may not be framed.
//! Reads never change anything; the playground evaluates without logging, caching or
//! shadowing. The only writes — loading and unloading the shadow candidate — need
//! `[console] write = true`. The live tail is [`ConsoleFeed`]: it sits inside the decision
//! log's masking, so a masked field never reaches this module.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use base64::Engine as _;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::{json_response, v1_data::read_body, ApiError, ApiState};
use crate::pdp::bundle::tarball;
use crate::pdp::console::{ConsoleFeed, Filter};
use crate::pdp::shadow::Verdict;
use crate::pdp::testing::Fixture;

/// Decisions a new tail is sent first (the most recent that pass its filter).
pub const BACKFILL: usize = 100;
/// Decisions `GET /console/api/recent` returns at most.
pub const RECENT_LIMIT: usize = 500;
/// Largest candidate tarball the console accepts.
pub const MAX_CANDIDATE_BYTES: usize = 64 * 1024 * 1024;

const INDEX_HTML: &str = include_str!("console/index.html");
const APP_JS: &str = include_str!("console/app.js");
const APP_CSS: &str = include_str!("console/app.css");

/// What the console routes share.
#[derive(Clone)]
pub struct Console {
    feed: Arc<ConsoleFeed>,
    write: bool,
    shutdown: CancellationToken,
    /// Coverage of the active revision's tests, computed once per revision.
    coverage: Arc<Mutex<Option<CoverageOf>>>,
}

/// A revision and the coverage report of its tests.
type CoverageOf = (Arc<str>, Arc<Value>);

impl Console {
    /// The console over `feed`; `write` allows loading a shadow candidate; open tails end
    /// when `shutdown` is cancelled.
    pub fn new(feed: Arc<ConsoleFeed>, write: bool, shutdown: CancellationToken) -> Self {
        Self {
            feed,
            write,
            shutdown,
            coverage: Arc::default(),
        }
    }
}

/// The console's routes (merged into the PDP's route table when enabled).
pub fn router(state: &ApiState) -> Router<ApiState> {
    Router::new()
        .route("/console", get(page))
        .route("/console/", get(page))
        .route("/console/app.js", get(script))
        .route("/console/app.css", get(style))
        .route("/console/api/events", get(events))
        .route("/console/api/recent", get(recent))
        .route("/console/api/status", get(status))
        .route("/console/api/counts", get(counts))
        .route("/console/api/coverage", get(coverage))
        .route("/console/api/fixtures", get(fixtures))
        .route("/console/api/playground", post(playground))
        .route(
            "/console/api/shadow",
            put(shadow_load).delete(shadow_unload),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .route_layer(middleware::from_fn(same_origin))
        .route_layer(middleware::from_fn(headers))
}

fn console(state: &ApiState) -> Result<&Console, ApiError> {
    state
        .console
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("the console is off ([console] enabled)".into()))
}

/// Whether the request comes from a page of another origin.
fn cross_origin(headers: &HeaderMap) -> Option<String> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site") {
        if site != "same-origin" && site != "none" {
            return Some(format!("Sec-Fetch-Site: {site}"));
        }
    }
    let origin = text("origin")?;
    let host = text("host").unwrap_or("");
    let same = ["http://", "https://"]
        .iter()
        .any(|scheme| origin.strip_prefix(scheme) == Some(host));
    (!same).then(|| format!("Origin: {origin}"))
}

async fn same_origin(request: Request, next: Next) -> Response {
    match cross_origin(request.headers()) {
        Some(what) => {
            tracing::warn!(%what, "console: cross-origin request refused");
            ApiError::Forbidden("cross-origin requests are refused".into()).into_response()
        }
        None => next.run(request).await,
    }
}

/// The bearer token, or the password of HTTP Basic.
fn presented(headers: &HeaderMap) -> Option<String> {
    if let Some(token) = crate::http_auth::bearer(headers) {
        return Some(token.to_string());
    }
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())?
        .strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':')
        .map(|(_, password)| password.to_string())
}

async fn authenticate(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if let Some(expected) = state.token.as_deref() {
        let presented = presented(request.headers()).unwrap_or_default();
        if !crate::http_auth::token_matches(&presented, expected) {
            let mut response = ApiError::Unauthorized.into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"msgnode console\", charset=\"UTF-8\""),
            );
            return response;
        }
    }
    next.run(request).await
}

async fn headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn asset(state: &ApiState, content_type: &'static str, body: &'static str) -> Response {
    match console(state) {
        Ok(_) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn page(State(state): State<ApiState>) -> Response {
    asset(&state, "text/html; charset=utf-8", INDEX_HTML)
}

async fn script(State(state): State<ApiState>) -> Response {
    asset(&state, "text/javascript; charset=utf-8", APP_JS)
}

async fn style(State(state): State<ApiState>) -> Response {
    asset(&state, "text/css; charset=utf-8", APP_CSS)
}

/// `GET /console/api/events?filters`: server-sent events, `decision` (a masked decision as
/// JSON) and `lagged` (how many this tail lost); the most recent matching decisions first.
async fn events(
    State(state): State<ApiState>,
    Query(filter): Query<Filter>,
) -> Result<Response, ApiError> {
    let console = console(&state)?;
    let subscription = console.feed.subscribe().ok_or_else(|| {
        ApiError::Unavailable("too many open tails ([console] max_subscribers)".into())
    })?;
    let mut backfill = console.feed.recent(&filter, BACKFILL);
    backfill.reverse();
    let first = futures_util::stream::iter(
        backfill
            .into_iter()
            .map(|e| Ok::<_, std::convert::Infallible>(decision_event(&e.json))),
    );
    let live = futures_util::stream::unfold(
        (subscription, filter),
        |(mut subscription, filter)| async move {
            loop {
                match subscription.receiver.recv().await {
                    Ok(entry) if filter.matches(&entry.shown) => {
                        let event = decision_event(&entry.json);
                        return Some((Ok(event), (subscription, filter)));
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(n)) => {
                        let event = Event::default().event("lagged").data(n.to_string());
                        return Some((Ok(event), (subscription, filter)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        },
    );
    let stream = first
        .chain(live)
        .take_until(console.shutdown.clone().cancelled_owned());
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

fn decision_event(json: &str) -> Event {
    Event::default().event("decision").data(json)
}

/// `GET /console/api/recent?filters`: the matching decisions still held, newest first.
async fn recent(
    State(state): State<ApiState>,
    Query(filter): Query<Filter>,
) -> Result<Response, ApiError> {
    let console = console(&state)?;
    let entries = console.feed.recent(&filter, RECENT_LIMIT);
    let mut body = String::from("[");
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&entry.json);
    }
    body.push(']');
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// `GET /console/api/status`: the active revision, the last reload (with `file:line:col`),
/// the shadow and whether the console may write.
async fn status(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let console = console(&state)?;
    let load = state.pdp.status();
    let body = json!({
        "load": load,
        "last_error_at": load.last_error_location.as_ref().map(ToString::to_string),
        "shadow": state.pdp.shadow().status(),
        "write": console.write,
        "bundle": state.pdp.bundle_name(),
    });
    Ok(json_response(StatusCode::OK, &body, false))
}

/// `GET /console/api/counts`: decisions per bucket, by `kind/result`.
async fn counts(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let console = console(&state)?;
    let body = json!({
        "bucket_seconds": crate::pdp::console::BUCKET_SECONDS,
        "buckets": console.feed.counts(),
    });
    Ok(json_response(StatusCode::OK, &body, false))
}

/// `GET /console/api/coverage`: `policy test --coverage` of the active revision: per module,
/// the covered and uncovered lines, and its source.
async fn coverage(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let console = console(&state)?.clone();
    let active = state
        .pdp
        .active()
        .ok_or_else(|| ApiError::NotFound("no revision is active".into()))?;
    {
        let cached = console.coverage.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((revision, body)) = cached.as_ref() {
            if *revision == active.revision {
                return Ok(json_response(StatusCode::OK, body.as_ref(), false));
            }
        }
    }
    let pdp = state.pdp.clone();
    let report = tokio::task::spawn_blocking(move || pdp.test(&active.bundle, true))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let active = state
        .pdp
        .active()
        .ok_or_else(|| ApiError::NotFound("no revision is active".into()))?;
    let modules = &active.bundle.bundle().modules;
    let files: Vec<Value> = report
        .coverage
        .iter()
        .flatten()
        .map(|file| {
            let source = modules
                .iter()
                .find(|m| m.path == file.file)
                .map(|m| m.raw.to_string());
            json!({
                "file": file.file,
                "percent": file.percent(),
                "covered": file.covered,
                "not_covered": file.not_covered,
                "source": source,
            })
        })
        .collect();
    let body = Arc::new(json!({
        "revision": active.revision,
        "passed": report.passed,
        "failed": report.failed,
        "percent": report.coverage_percent,
        "files": files,
    }));
    *console.coverage.lock().unwrap_or_else(|p| p.into_inner()) =
        Some((Arc::clone(&active.revision), Arc::clone(&body)));
    Ok(json_response(StatusCode::OK, body.as_ref(), false))
}

/// `GET /console/api/fixtures`: the active bundle's fixtures, for the playground.
async fn fixtures(State(state): State<ApiState>) -> Result<Response, ApiError> {
    console(&state)?;
    let names: Vec<Value> = state
        .pdp
        .active()
        .map(|a| {
            a.bundle
                .bundle()
                .fixtures
                .iter()
                .map(|f| {
                    let description = Fixture::parse(&f.text).ok().and_then(|f| f.description);
                    json!({"path": f.path, "description": description})
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(json_response(StatusCode::OK, &names, false))
}

/// What the playground decides: one of an input, a fixture of the active bundle, or a
/// decision still in the tail.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Try {
    input: Option<Value>,
    fixture: Option<String>,
    decision_id: Option<String>,
}

#[derive(Serialize)]
struct Side {
    revision: Arc<str>,
    #[serde(flatten)]
    verdict: Verdict,
}

/// `POST /console/api/playground`: the active and the candidate revision's verdicts on the
/// same input, side by side. Changes nothing: not logged, cached or shadowed.
async fn playground(State(state): State<ApiState>, body: Body) -> Result<Response, ApiError> {
    let console = console(&state)?;
    let bytes = read_body(body, state.max_body_bytes).await?;
    let asked: Try = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("playground: {e}")))?;
    let (input, source, masked) = match asked {
        Try {
            input: Some(input),
            fixture: None,
            decision_id: None,
        } => (input, "input".to_string(), Vec::new()),
        Try {
            input: None,
            fixture: Some(name),
            decision_id: None,
        } => {
            let active = state
                .pdp
                .active()
                .ok_or_else(|| ApiError::NotFound("no revision is active".into()))?;
            let fixture = active
                .bundle
                .bundle()
                .fixtures
                .iter()
                .find(|f| f.path == name)
                .ok_or_else(|| ApiError::NotFound(format!("no fixture {name}")))?;
            let parsed = Fixture::parse(&fixture.text).map_err(ApiError::BadRequest)?;
            (parsed.input, format!("fixture {name}"), Vec::new())
        }
        Try {
            input: None,
            fixture: None,
            decision_id: Some(id),
        } => {
            let entry = console.feed.find(&id).ok_or_else(|| {
                ApiError::NotFound(format!("decision {id} is no longer held by the console"))
            })?;
            let shown: crate::pdp::console::Shown =
                serde_json::from_str(&entry.json).map_err(|e| ApiError::Internal(e.to_string()))?;
            let input = shown
                .input
                .ok_or_else(|| ApiError::BadRequest(format!("decision {id} has no input")))?;
            (input, format!("decision {id} (as logged)"), shown.erased)
        }
        _ => {
            return Err(ApiError::BadRequest(
                "playground: send exactly one of input, fixture, decision_id".into(),
            ))
        }
    };
    let pdp = state.pdp.clone();
    let decided = tokio::task::spawn_blocking(move || {
        let active = pdp.try_decision(&input);
        let candidate = pdp.shadow().decide(&input);
        (active, candidate)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    let side =
        |d: Option<(Arc<str>, Verdict)>| d.map(|(revision, verdict)| Side { revision, verdict });
    let body = json!({
        "source": source,
        "masked": masked,
        "active": side(decided.0),
        "candidate": side(decided.1),
    });
    Ok(json_response(StatusCode::OK, &body, false))
}

fn writable(console: &Console) -> Result<(), ApiError> {
    match console.write {
        true => Ok(()),
        false => Err(ApiError::Forbidden(
            "the console is read-only ([console] write = false)".into(),
        )),
    }
}

/// `PUT /console/api/shadow` (write mode): the body, a bundle tarball, becomes the shadow
/// candidate.
async fn shadow_load(State(state): State<ApiState>, body: Body) -> Result<Response, ApiError> {
    writable(console(&state)?)?;
    let bytes = read_body(body, MAX_CANDIDATE_BYTES).await?;
    let pdp = state.pdp.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        let source = "console upload";
        let bundle = tarball::read(&bytes, source, MAX_CANDIDATE_BYTES as u64)
            .and_then(|files| files.into_bundle(source))?;
        pdp.shadow().load(bundle)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    tracing::info!(revision = %loaded, "console: shadow candidate loaded");
    Ok(json_response(
        StatusCode::OK,
        &json!({"revision": loaded}),
        false,
    ))
}

/// `DELETE /console/api/shadow` (write mode): no candidate any more.
async fn shadow_unload(State(state): State<ApiState>) -> Result<Response, ApiError> {
    writable(console(&state)?)?;
    state.pdp.shadow().unload();
    Ok(json_response(StatusCode::OK, &json!({}), false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().expect("value"));
        }
        map
    }

    #[test]
    fn only_same_origin_requests_pass() {
        let host = ("host", "127.0.0.1:8181");
        assert!(cross_origin(&headers(&[host])).is_none(), "curl");
        assert!(cross_origin(&headers(&[host, ("sec-fetch-site", "same-origin")])).is_none());
        assert!(cross_origin(&headers(&[host, ("sec-fetch-site", "none")])).is_none());
        assert!(cross_origin(&headers(&[host, ("origin", "http://127.0.0.1:8181")])).is_none());
        for refused in [
            vec![host, ("sec-fetch-site", "cross-site")],
            vec![host, ("sec-fetch-site", "same-site")],
            vec![host, ("origin", "http://evil.example")],
            vec![host, ("origin", "null")],
            vec![host, ("origin", "http://127.0.0.1:8181.evil.example")],
        ] {
            assert!(cross_origin(&headers(&refused)).is_some(), "{refused:?}");
        }
    }

    #[test]
    fn the_token_is_a_bearer_or_a_basic_password() {
        assert_eq!(
            presented(&headers(&[("authorization", "Bearer t1")])).as_deref(),
            Some("t1")
        );
        let basic = base64::engine::general_purpose::STANDARD.encode("anyone:t:2");
        assert_eq!(
            presented(&headers(&[("authorization", &format!("Basic {basic}"))])).as_deref(),
            Some("t:2")
        );
        assert!(presented(&headers(&[("authorization", "Basic !!")])).is_none());
    }
}

//! `/console`: the security team's page on the PDP listener (`[console] enabled`).
//!
//! Every route is behind `[pdp] token` (or `[console] write_token`) — as a bearer token, or
//! as the password of HTTP Basic (any user name) so that a browser can log in and its
//! `EventSource` carries it — answers only to its own host names (a `Host` that is not the
//! listener's address, a loopback name with its port or one of `[console] hosts` is 403: DNS
//! rebinding) and refuses cross-origin requests: a `Sec-Fetch-Site` other than
//! `same-origin`/`none`, or an `Origin` that is not this host, is 403, and no CORS header is
//! ever sent. Pages are served with a strict CSP (no inline script, nothing from elsewhere)
//! and may not be framed. Reads never change anything; the playground evaluates without
//! logging, caching or shadowing, at most [`PLAYGROUND_AT_ONCE`] at a time (429 past it), and
//! coverage is computed once per revision, by one request. The only writes — loading and
//! unloading the shadow candidate — need `[console] write = true` and `[console]
//! write_token`. The live tail is [`ConsoleFeed`]: it sits inside the decision log's
//! masking, so a masked field never reaches this module; each tail lives at most
//! `[console] tail_lifetime`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Router};
use base64::Engine as _;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{json_response, v1_data::read_body, ApiError, ApiState};
use crate::config::ConsoleConfig;
use crate::pdp::bundle::tarball;
use crate::pdp::console::{ConsoleFeed, Filter};
use crate::pdp::shadow::{Verdict, CONSOLE_SOURCE};
use crate::pdp::testing::Fixture;

/// Decisions a new tail is sent first (the most recent that pass its filter).
pub const BACKFILL: usize = 100;
/// Decisions `GET /console/api/recent` returns at most.
pub const RECENT_LIMIT: usize = 500;
/// Largest candidate tarball the console accepts.
pub const MAX_CANDIDATE_BYTES: usize = 64 * 1024 * 1024;
/// Playground questions evaluated at once; more are answered 429 with `Retry-After`.
pub const PLAYGROUND_AT_ONCE: usize = 2;

const INDEX_HTML: &str = include_str!("console/index.html");
const APP_JS: &str = include_str!("console/app.js");
const APP_CSS: &str = include_str!("console/app.css");

/// What the console routes share.
#[derive(Clone)]
pub struct Console {
    feed: Arc<ConsoleFeed>,
    write: bool,
    /// `[console] write_token`: what writes need.
    write_token: Option<Arc<str>>,
    /// The `Host` values answered (lower case; an entry without a port allows any).
    hosts: Arc<[String]>,
    tail_lifetime: Duration,
    shutdown: CancellationToken,
    /// Places for playground evaluations.
    playground: Arc<Semaphore>,
    /// Coverage of the active revision's tests, computed once per revision: the lock makes
    /// concurrent misses wait for the one computing it.
    coverage: Arc<tokio::sync::Mutex<Option<CoverageOf>>>,
}

/// A revision and the coverage report of its tests.
type CoverageOf = (Arc<str>, Arc<Value>);

impl Console {
    /// The console over `feed` as `config` says, served on `listener`; open tails end when
    /// `shutdown` is cancelled.
    pub fn new(
        feed: Arc<ConsoleFeed>,
        config: &ConsoleConfig,
        listener: SocketAddr,
        shutdown: CancellationToken,
    ) -> Self {
        let port = listener.port();
        let mut hosts = vec![
            listener.to_string(),
            format!("localhost:{port}"),
            format!("127.0.0.1:{port}"),
            format!("[::1]:{port}"),
        ];
        hosts.extend(config.hosts.iter().map(|h| h.trim().to_ascii_lowercase()));
        Self {
            feed,
            write: config.write,
            write_token: config
                .write_token
                .as_deref()
                .filter(|t| !t.is_empty())
                .map(Arc::from),
            hosts: hosts.into(),
            tail_lifetime: config.tail_lifetime,
            shutdown,
            playground: Arc::new(Semaphore::new(PLAYGROUND_AT_ONCE)),
            coverage: Arc::default(),
        }
    }

    /// Whether `host` (a `Host` header or URI authority) names this console.
    fn answers_to(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let name = match host.rsplit_once(':') {
            Some((name, port)) if !port.contains(']') => name,
            _ => host.as_str(),
        };
        self.hosts
            .iter()
            .any(|allowed| *allowed == host || (!allowed.contains(':') && *allowed == name))
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
        .route_layer(middleware::from_fn_with_state(state.clone(), own_host))
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

/// Refuses a `Host` the console does not answer to: after DNS rebinding, an attacker's page
/// is same-origin with itself, but its requests name the attacker's host.
async fn own_host(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let Some(console) = state.console.as_ref() else {
        return next.run(request).await;
    };
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| request.uri().authority().map(ToString::to_string));
    match host {
        Some(host) if console.answers_to(&host) => next.run(request).await,
        other => {
            tracing::warn!(host = ?other.as_deref().map(|h| h.chars().take(100).collect::<String>()), "console: request for another host refused ([console] hosts)");
            ApiError::Forbidden("this host is not the console's ([console] hosts)".into())
                .into_response()
        }
    }
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
        let writer = state
            .console
            .as_ref()
            .and_then(|c| c.write_token.as_deref())
            .is_some_and(|w| crate::http_auth::token_matches(&presented, w));
        if !writer && !crate::http_auth::token_matches(&presented, expected) {
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
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    Query(filter): Query<Filter>,
) -> Result<Response, ApiError> {
    let console = console(&state)?;
    let client = peer.map(|Extension(ConnectInfo(addr))| addr.ip());
    let subscription = console
        .feed
        .subscribe(client)
        .map_err(|refused| ApiError::Unavailable(refused.to_string()))?;
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
    // The page's EventSource reconnects when a tail ends: a held tail frees its place.
    let stream = first
        .chain(live)
        .take_until(console.shutdown.clone().cancelled_owned())
        .take_until(tokio::time::sleep(console.tail_lifetime));
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
    // One computation per revision: concurrent misses wait here, then find it cached.
    let mut cached = console.coverage.lock().await;
    if let Some((revision, body)) = cached.as_ref() {
        if *revision == active.revision {
            return Ok(json_response(StatusCode::OK, body.as_ref(), false));
        }
    }
    let pdp = state.pdp.clone();
    let tested = Arc::clone(&active);
    let report = tokio::task::spawn_blocking(move || pdp.test(&tested.bundle, true))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
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
    *cached = Some((Arc::clone(&active.revision), Arc::clone(&body)));
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
    // Bounded: the permit lives as long as the evaluation, also when the client has gone.
    let permit = Arc::clone(&console.playground)
        .try_acquire_owned()
        .map_err(|_| ApiError::TooManyRequests(Duration::from_secs(1)))?;
    let pdp = state.pdp.clone();
    let decided = tokio::task::spawn_blocking(move || {
        let active = pdp.try_decision(&input).map(|(r, v)| (r, v.cut()));
        let candidate = pdp.shadow().decide(&input);
        drop(permit);
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

/// Whether this request may write: write mode, and the write token (not `[pdp] token`).
fn writable(console: &Console, headers: &HeaderMap) -> Result<(), ApiError> {
    if !console.write {
        return Err(ApiError::Forbidden(
            "the console is read-only ([console] write = false)".into(),
        ));
    }
    match console.write_token.as_deref() {
        Some(expected) => {
            let presented = presented(headers).unwrap_or_default();
            match crate::http_auth::token_matches(&presented, expected) {
                true => Ok(()),
                false => Err(ApiError::Forbidden(
                    "writing needs [console] write_token, not [pdp] token".into(),
                )),
            }
        }
        None => Ok(()),
    }
}

/// `PUT /console/api/shadow` (write mode): the body, a bundle tarball, becomes the shadow
/// candidate.
async fn shadow_load(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    writable(console(&state)?, &headers)?;
    let bytes = read_body(body, MAX_CANDIDATE_BYTES).await?;
    let pdp = state.pdp.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        let source = CONSOLE_SOURCE;
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
async fn shadow_unload(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    writable(console(&state)?, &headers)?;
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

    /// Finding 3 of the console review: after DNS rebinding the attacker's page sends its own
    /// host name; only the listener's names (and `[console] hosts`) are answered.
    #[test]
    fn only_its_own_host_names_are_answered() {
        let config = ConsoleConfig {
            hosts: vec!["console.example.org".into(), "Ops.Example.org:9443".into()],
            ..ConsoleConfig::default()
        };
        let console = Console::new(
            Arc::new(ConsoleFeed::new(&config)),
            &config,
            "127.0.0.1:8181".parse().expect("addr"),
            CancellationToken::new(),
        );
        for host in [
            "127.0.0.1:8181",
            "localhost:8181",
            "LOCALHOST:8181",
            "[::1]:8181",
            "console.example.org",
            "console.example.org:8181",
            "ops.example.org:9443",
        ] {
            assert!(console.answers_to(host), "{host}");
        }
        for host in [
            "evil.example:8181",
            "localhost:9999",
            "127.0.0.1",
            "ops.example.org:8181",
            "console.example.org.evil.example",
            "",
        ] {
            assert!(!console.answers_to(host), "{host}");
        }
    }

    /// Finding 4 of the console review: a flood of playground questions is answered 429
    /// (with `Retry-After`) past [`PLAYGROUND_AT_ONCE`], never queued without bound.
    #[tokio::test]
    async fn the_playground_is_bounded() {
        let config = ConsoleConfig::default();
        let pdp = crate::pdp::Pdp::builder(&crate::config::PdpConfig::default())
            .build()
            .expect("pdp");
        let console = Console::new(
            Arc::new(ConsoleFeed::new(&config)),
            &config,
            "127.0.0.1:8181".parse().expect("addr"),
            CancellationToken::new(),
        );
        let held = Arc::clone(&console.playground)
            .try_acquire_many_owned(PLAYGROUND_AT_ONCE as u32)
            .expect("permits");
        let state = ApiState::new(
            pdp,
            &mut prometheus_client::registry::Registry::default(),
            None,
            1 << 20,
        )
        .with_console(console);
        let ask = || playground(State(state.clone()), Body::from(r#"{"input": {}}"#));
        let refused = ask().await.expect_err("refused");
        assert!(matches!(refused, ApiError::TooManyRequests(_)), "{refused}");
        let response = refused.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(response.headers().contains_key(header::RETRY_AFTER));
        drop(held);
        assert!(ask().await.is_ok(), "a place is free again");
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

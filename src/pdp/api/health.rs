//! `GET /health`, `/health/ready`, `/health/live`, and `GET /v1/status`.
//!
//! `/health` (and `/health/ready`) is `200` once a bundle is active and `503` before; with
//! `?bundles` (as OPA's `/health?bundles`) it is `200` only when every pulled bundle
//! (`[pdp.bundle]`) has a revision serving. The body reports the served revision and the
//! last load: a rejected edit shows up here (`last_load_ok: false`, `last_error`, and the
//! `failing_tests` when the reload gate refused it) while the old revision keeps serving.
//! `/health/live` is `200` whenever the process answers. `/v1/status` is OPA's status
//! report (`labels`, `bundles.{name}.active_revision`, …) for people and tools that poll.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

use super::{flag, json_response, ApiState};

/// `GET /health[?bundles]`.
pub async fn health_get(
    State(state): State<ApiState>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let status = state.pdp.status();
    let bundles = params.is_ok_and(|Query(p)| flag(&p, "bundles"));
    let ready = state.pdp.active().is_some()
        && (!bundles || status.bundles.values().all(|b| b.active_revision.is_some()));
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(code, &status, false)
}

/// `GET /health/live`.
pub async fn health_live_get() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({}), false)
}

/// `GET /v1/status`: OPA's status report.
pub async fn v1_status_get(State(state): State<ApiState>) -> Response {
    let status = state.pdp.status();
    let mut bundles = serde_json::Map::new();
    match status.bundles.is_empty() {
        // The policy directory, as one bundle.
        true => {
            bundles.insert(
                state.pdp.bundle_name().to_string(),
                json!({
                    "name": state.pdp.bundle_name(),
                    "active_revision": status.revision,
                    "last_successful_activation": status.activated_at.map(|t| humantime::format_rfc3339_millis(t).to_string()),
                    "code": (!status.last_load_ok && status.last_attempt_at.is_some()).then_some("bundle_error"),
                    "message": status.last_error,
                }),
            );
        }
        false => {
            for (name, bundle) in &status.bundles {
                bundles.insert(name.clone(), json!(bundle));
            }
        }
    }
    let ready = state.pdp.active().is_some();
    let body = json!({"result": {
        "labels": state.pdp.labels().as_ref(),
        "bundles": bundles,
        "plugins": {"bundle": {"state": if ready { "OK" } else { "NOT_READY" }}},
        "last_load_ok": status.last_load_ok,
        "failing_tests": status.failing_tests,
    }});
    json_response(StatusCode::OK, &body, false)
}

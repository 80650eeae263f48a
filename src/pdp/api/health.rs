//! `GET /health`, `/health/ready`, `/health/live`.
//!
//! `/health` (and `/health/ready`) is `200` once a bundle is active and `503` before, as OPA's
//! `/health?bundles`. The body reports the served revision and the last load: a rejected edit
//! shows up here (`last_load_ok: false`, `last_error`) while the old revision keeps serving.
//! `/health/live` is `200` whenever the process answers.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

use super::{json_response, ApiState};

/// `GET /health`.
pub async fn health_get(State(state): State<ApiState>) -> Response {
    let status = state.pdp.status();
    let code = if state.pdp.active().is_some() {
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

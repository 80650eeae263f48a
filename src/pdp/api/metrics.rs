//! `GET /metrics`: every registered metric in Prometheus/OpenMetrics text format.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{ApiError, ApiState};

/// `GET /metrics`.
pub async fn metrics_get(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &state.registry)
        .map_err(|e| ApiError::Internal(format!("cannot encode metrics: {e}")))?;
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

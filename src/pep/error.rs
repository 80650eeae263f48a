//! Matrix errors the proxy answers with: `{"errcode": …, "error": …}` and a status, made
//! into HTTP responses here only. Error codes are ruma's [`ErrorCode`]s, so only standard
//! (or deliberately custom) codes can be written.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
pub use ruma::api::error::ErrorCode;

use crate::matrix::HomeserverError;

/// A Matrix client-server error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{errcode}: {error}")]
pub struct MatrixError {
    /// HTTP status.
    pub status: StatusCode,
    /// Matrix error code (`M_FORBIDDEN`, …).
    pub errcode: ErrorCode,
    /// What happened, for people.
    pub error: String,
    /// For 429: when to retry (`retry_after_ms`, and the `Retry-After` header).
    pub retry_after: Option<std::time::Duration>,
}

impl MatrixError {
    /// 403 `M_FORBIDDEN`.
    pub fn forbidden(error: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, error)
    }

    /// 502 `M_UNKNOWN`: the homeserver cannot be reached.
    pub fn unavailable() -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            ErrorCode::Unknown,
            "homeserver unavailable",
        )
    }

    /// Any status and code.
    pub fn new(status: StatusCode, errcode: ErrorCode, error: impl Into<String>) -> Self {
        Self {
            status,
            errcode,
            error: error.into(),
            retry_after: None,
        }
    }

    /// 429 `M_LIMIT_EXCEEDED`, to retry after `wait`.
    pub fn limit_exceeded(wait: std::time::Duration) -> Self {
        Self {
            retry_after: Some(wait),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::LimitExceeded,
                "too many requests",
            )
        }
    }
}

/// What a client hears when the homeserver gave the proxy no usable answer: the homeserver's
/// own refusal as it was (e.g. 401 `M_UNKNOWN_TOKEN` for a bad access token), else 502.
pub fn from_homeserver(error: HomeserverError) -> Response {
    match error {
        HomeserverError::Refused { status, body } => match StatusCode::from_u16(status) {
            Ok(status) => (status, axum::Json(body)).into_response(),
            Err(_) => MatrixError::unavailable().into_response(),
        },
        HomeserverError::Unavailable => MatrixError::unavailable().into_response(),
        HomeserverError::Malformed(what) => {
            MatrixError::new(StatusCode::BAD_GATEWAY, ErrorCode::Unknown, what).into_response()
        }
    }
}

impl IntoResponse for MatrixError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({"errcode": self.errcode.as_str(), "error": self.error});
        match self.retry_after {
            Some(wait) => {
                body["retry_after_ms"] = serde_json::json!(crate::ratelimit::millis(wait));
                let seconds = (wait.as_secs() + 1).to_string();
                (
                    self.status,
                    [(axum::http::header::RETRY_AFTER, seconds)],
                    axum::Json(body),
                )
                    .into_response()
            }
            None => (self.status, axum::Json(body)).into_response(),
        }
    }
}

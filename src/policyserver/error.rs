//! What the policy server answers when it does not sign: a Matrix error
//! (`{"errcode", "error"}` with its status), made into HTTP here only.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ruma::api::error::ErrorCode;

/// Why a federation request to the policy server was not served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PolicyServerError {
    /// No, or no valid, `X-Matrix` signature: 401 `M_UNAUTHORIZED`.
    #[error("{0}")]
    Unauthorized(String),
    /// The event is refused (by the policy, or because it is not intact): 400 `M_FORBIDDEN`,
    /// what MSC4284 asks of a refusal.
    #[error("{0}")]
    Refused(String),
    /// The caller may not ask this (e.g. an invitation from another server): 403 `M_FORBIDDEN`.
    #[error("{0}")]
    Forbidden(String),
    /// The body is not JSON: 400 `M_NOT_JSON`.
    #[error("{0}")]
    NotJson(String),
    /// JSON, but not what the endpoint takes (or not canonical): 400 `M_BAD_JSON`.
    #[error("{0}")]
    BadJson(String),
    /// The room is unknown to the policy server: 404 `M_NOT_FOUND`.
    #[error("{0}")]
    NotFound(String),
    /// The body is over `[policy_server] max_body_bytes`: 413 `M_TOO_LARGE`.
    #[error("request body too large")]
    TooLarge,
    /// No such endpoint here: 404 `M_UNRECOGNIZED` (Synapse then tries the unstable path).
    #[error("unrecognized request")]
    Unrecognized,
    /// Something on our side failed: 500 `M_UNKNOWN`.
    #[error("{0}")]
    Internal(String),
}

impl PolicyServerError {
    /// A closed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "unauthorized",
            Self::Refused(_) => "refused",
            Self::Forbidden(_) => "forbidden",
            Self::NotJson(_) | Self::BadJson(_) | Self::TooLarge => "bad_request",
            Self::NotFound(_) => "unknown_room",
            Self::Unrecognized => "unrecognized",
            Self::Internal(_) => "internal",
        }
    }

    fn status_and_code(&self) -> (StatusCode, ErrorCode) {
        match self {
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
            Self::Refused(_) => (StatusCode::BAD_REQUEST, ErrorCode::Forbidden),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
            Self::NotJson(_) => (StatusCode::BAD_REQUEST, ErrorCode::NotJson),
            Self::BadJson(_) => (StatusCode::BAD_REQUEST, ErrorCode::BadJson),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            Self::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge),
            Self::Unrecognized => (StatusCode::NOT_FOUND, ErrorCode::Unrecognized),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Unknown),
        }
    }
}

impl IntoResponse for PolicyServerError {
    fn into_response(self) -> Response {
        let (status, errcode) = self.status_and_code();
        let body = serde_json::json!({"errcode": errcode.as_str(), "error": self.to_string()});
        (status, axum::Json(body)).into_response()
    }
}

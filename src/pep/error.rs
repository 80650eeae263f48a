//! Matrix errors the proxy answers with: `{"errcode": …, "error": …}` and a status, made
//! into HTTP responses here only. Error codes are ruma's [`ErrorCode`]s, so only standard
//! (or deliberately custom) codes can be written.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
pub use ruma::api::error::ErrorCode;

use super::create_room::CreateRoomError;
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

/// Why an intercepted request is refused before, or instead of, its decisions.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// It would do something no input can describe beforehand (403 `M_FORBIDDEN`).
    #[error("{0}")]
    Undecidable(String),
    /// A field or parameter the homeserver would refuse, or that msgnode does not forward
    /// (400 `M_INVALID_PARAM`).
    #[error("{0}")]
    Invalid(String),
    /// What it names does not exist (404 `M_NOT_FOUND`), e.g. an unknown room alias.
    #[error("{0}")]
    NotFound(String),
    /// It would need more decisions than one request may (413 `M_TOO_LARGE`).
    #[error("{0}")]
    TooLarge(String),
    /// The homeserver cannot tell what the request needs (its room version, an alias, the
    /// caller's rooms).
    #[error(transparent)]
    Homeserver(#[from] HomeserverError),
}

impl From<CreateRoomError> for RequestError {
    fn from(error: CreateRoomError) -> Self {
        match error {
            CreateRoomError::Undecidable(why) => Self::Undecidable(why),
            CreateRoomError::Invalid(why) => Self::Invalid(why),
        }
    }
}

impl RequestError {
    /// The proxy's outcome label (`pep_requests{outcome}`).
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Undecidable(_) => "denied",
            _ => "rejected",
        }
    }

    /// The answer the client gets.
    pub fn into_response(self) -> Response {
        let (status, errcode, why) = match self {
            Self::Undecidable(why) => (StatusCode::FORBIDDEN, ErrorCode::Forbidden, why),
            Self::Invalid(why) => (StatusCode::BAD_REQUEST, ErrorCode::InvalidParam, why),
            Self::NotFound(why) => (StatusCode::NOT_FOUND, ErrorCode::NotFound, why),
            Self::TooLarge(why) => (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge, why),
            Self::Homeserver(error) => return from_homeserver(error),
        };
        MatrixError::new(status, errcode, why).into_response()
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

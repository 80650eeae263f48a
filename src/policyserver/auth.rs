//! `X-Matrix` request authentication: every federation request but the key server's names
//! its origin server and carries that server's signature over method, request-target as
//! received, origin, destination and body (ruma's `XMatrix`). Verified with the origin's
//! keys from the keyring; the destination, when named, must be this server. Anything else
//! is 401 `M_UNAUTHORIZED` (after 400 `M_NOT_JSON`/`M_BAD_JSON` for a body that is not
//! canonical JSON, and 413 for one over the limit).

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::header::AUTHORIZATION;
use ruma::api::federation::authentication::XMatrix;
use ruma::OwnedServerName;

use super::error::PolicyServerError;
use super::PolicyServer;

/// Most `Authorization` headers looked at (a server sends one per signing key).
const MAX_SIGNATURES: usize = 4;

/// A request whose origin signed it.
pub struct Authenticated {
    /// The server that signed it.
    pub origin: OwnedServerName,
    /// Its body.
    pub body: Bytes,
}

impl PolicyServer {
    /// Reads `request`'s body (bounded) and verifies its `X-Matrix` signature.
    ///
    /// # Errors
    /// 413 for a body over the limit, 401 without a valid signature by the origin.
    pub(super) async fn authenticate(
        &self,
        request: Request,
    ) -> Result<Authenticated, PolicyServerError> {
        let (parts, body) = request.into_parts();
        let body = read_body(body, self.inner.config.max_body_bytes).await?;
        if !body.is_empty() {
            // What is signed is the canonical JSON of the body: say what is wrong with it
            // before saying the signature does not verify.
            let value: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| PolicyServerError::NotJson(format!("body is not JSON: {e}")))?;
            ruma::canonical_json::to_canonical_value(&value).map_err(|e| {
                PolicyServerError::BadJson(format!("body is not canonical JSON: {e}"))
            })?;
        }
        let unauthorized = |why: String| PolicyServerError::Unauthorized(why);
        let headers: Vec<XMatrix> = parts
            .headers
            .get_all(AUTHORIZATION)
            .iter()
            .take(MAX_SIGNATURES)
            .filter_map(|value| value.to_str().ok())
            .filter(|value| value.starts_with(XMatrix::AUTH_SCHEME))
            .map(XMatrix::parse)
            .collect::<Result<_, _>>()
            .map_err(|e| unauthorized(format!("malformed X-Matrix header: {e}")))?;
        let Some(first) = headers.first() else {
            return Err(unauthorized("missing X-Matrix authorization".to_string()));
        };
        let origin = first.origin.clone();
        if headers.iter().any(|h| h.origin != origin) {
            return Err(unauthorized(
                "X-Matrix headers name different origins".to_string(),
            ));
        }
        let wanted: Vec<(&str, Option<&str>)> = headers
            .iter()
            .map(|h| (origin.as_str(), Some(h.key.as_str())))
            .collect();
        let keys = self
            .inner
            .keyring
            .key_map(&wanted)
            .await
            .map_err(|e| unauthorized(e.to_string()))?;
        let signed = axum::http::Request::builder()
            .method(parts.method)
            .uri(parts.uri)
            .body(body.as_ref())
            .map_err(|e| unauthorized(e.to_string()))?;
        let mut last = None;
        for header in &headers {
            match header.verify_http_request(&signed, &self.inner.name, &keys) {
                Ok(()) => return Ok(Authenticated { origin, body }),
                Err(e) => last = Some(e.to_string()),
            }
        }
        Err(unauthorized(format!(
            "X-Matrix signature of {origin} does not verify: {}",
            last.unwrap_or_default()
        )))
    }
}

/// The whole body, at most `limit` bytes.
///
/// # Errors
/// 413 over the limit; a body that cannot be read is 400 `M_NOT_JSON`.
pub async fn read_body(body: axum::body::Body, limit: usize) -> Result<Bytes, PolicyServerError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit");
        match too_large {
            true => PolicyServerError::TooLarge,
            false => PolicyServerError::NotJson(format!("cannot read the body: {e}")),
        }
    })
}

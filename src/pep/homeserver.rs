//! The homeserver as the proxy sees it: forwarding (streamed), `/whoami` with a short cache,
//! and room membership look-ups for invite decisions.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::error::{ErrorCode, MatrixError};

/// Headers that belong to one hop and are never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Client of one homeserver.
pub struct Homeserver {
    scheme: String,
    authority: String,
    client: Client<HttpConnector, Body>,
    whoami: moka::sync::Cache<(String, Option<String>), String>,
}

impl Homeserver {
    /// A client for `base` (e.g. `http://127.0.0.1:8008`), remembering token owners for `ttl`.
    ///
    /// # Errors
    /// `base` is not an absolute `http` URL.
    pub fn new(base: &str, whoami_ttl: Duration) -> anyhow::Result<Self> {
        let uri: Uri = base.parse()?;
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            anyhow::bail!("[pep] homeserver must be an absolute URL such as http://127.0.0.1:8008, not {base:?}");
        };
        if scheme != "http" {
            anyhow::bail!("[pep] homeserver: only http:// is supported (the homeserver is local)");
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Ok(Self {
            scheme: scheme.to_string(),
            authority: authority.to_string(),
            client: Client::builder(TokioExecutor::new()).build(connector),
            whoami: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(whoami_ttl)
                .build(),
        })
    }

    /// Sends `request` to the homeserver at `path_and_query`, streaming both bodies, and
    /// returns its answer unchanged but for hop-by-hop headers.
    pub async fn forward(
        &self,
        request: Request<Body>,
        path_and_query: &str,
        client: Option<SocketAddr>,
    ) -> Response {
        let (mut parts, body) = request.into_parts();
        let uri = match Uri::builder()
            .scheme(self.scheme.as_str())
            .authority(self.authority.as_str())
            .path_and_query(path_and_query)
            .build()
        {
            Ok(uri) => uri,
            Err(e) => {
                return MatrixError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::Unrecognized,
                    format!("bad path: {e}"),
                )
                .into_response()
            }
        };
        parts.uri = uri;
        strip_hop_by_hop(&mut parts.headers);
        if let Ok(host) = HeaderValue::from_str(&self.authority) {
            parts.headers.insert(header::HOST, host);
        }
        // The homeserver trusts X-Forwarded-For from us: it must name the real peer, never
        // what the client claimed.
        parts.headers.remove("x-forwarded-for");
        parts.headers.remove("x-forwarded-proto");
        if let Some(addr) = client {
            if let Ok(value) = HeaderValue::from_str(&addr.ip().to_string()) {
                parts
                    .headers
                    .insert(HeaderName::from_static("x-forwarded-for"), value);
            }
        }
        parts.headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("http"),
        );
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Body::new(body))
            }
            Err(error) => {
                tracing::warn!(%error, "homeserver unreachable");
                MatrixError::new(
                    StatusCode::BAD_GATEWAY,
                    ErrorCode::Unknown,
                    "homeserver unavailable",
                )
                .into_response()
            }
        }
    }

    /// The user an access token (and, for appservices, `user_id` masquerading) acts as.
    ///
    /// # Errors
    /// The homeserver's own answer when it rejects the token, or 502 when it is unreachable.
    pub async fn whoami(&self, token: &str, user_id: Option<&str>) -> Result<String, Response> {
        let key = (token.to_string(), user_id.map(str::to_string));
        if let Some(user) = self.whoami.get(&key) {
            return Ok(user);
        }
        let path = with_user_id("/_matrix/client/v3/account/whoami".to_string(), user_id);
        let (status, body) = self.get_json(&path, token).await?;
        if !status.is_success() {
            return Err((status, axum::Json(body)).into_response());
        }
        let user = body
            .get("user_id")
            .and_then(|u| u.as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                MatrixError::new(
                    StatusCode::BAD_GATEWAY,
                    ErrorCode::Unknown,
                    "homeserver /whoami gave no user_id",
                )
                .into_response()
            })?;
        self.whoami.insert(key, user.clone());
        Ok(user)
    }

    /// Users joined to `room_id`, as the requesting user may see them (empty when it may not).
    pub async fn joined_members(
        &self,
        room_id: &str,
        token: &str,
        user_id: Option<&str>,
    ) -> Vec<String> {
        let path = with_user_id(
            format!(
                "/_matrix/client/v3/rooms/{}/joined_members",
                encode(room_id)
            ),
            user_id,
        );
        match self.get_json(&path, token).await {
            Ok((status, body)) if status.is_success() => body
                .get("joined")
                .and_then(|j| j.as_object())
                .map(|members| members.keys().cloned().collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    async fn get_json(
        &self,
        path_and_query: &str,
        token: &str,
    ) -> Result<(StatusCode, serde_json::Value), Response> {
        self.request_json(Method::GET, path_and_query, token, None)
            .await
    }

    /// One JSON request to the homeserver as `token`; the answer's status and JSON body.
    ///
    /// # Errors
    /// 502 `M_UNKNOWN` when the homeserver cannot be reached.
    pub async fn request_json(
        &self,
        method: Method,
        path_and_query: &str,
        token: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, serde_json::Value), Response> {
        let unavailable = || {
            MatrixError::new(
                StatusCode::BAD_GATEWAY,
                ErrorCode::Unknown,
                "homeserver unavailable",
            )
            .into_response()
        };
        let uri = format!("{}://{}{}", self.scheme, self.authority, path_and_query);
        let body = match body {
            Some(json) => Body::from(json.to_string()),
            None => Body::empty(),
        };
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .map_err(|_| unavailable())?;
        let response = self.client.request(request).await.map_err(|error| {
            tracing::warn!(%error, "homeserver unreachable");
            unavailable()
        })?;
        let status = response.status();
        let bytes = http_body_util::BodyExt::collect(response.into_body())
            .await
            .map_err(|_| unavailable())?
            .to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Ok((status, body))
    }
}

/// One path segment or query value, percent-encoded.
pub fn encode(component: &str) -> String {
    percent_encoding::utf8_percent_encode(component, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// `path` acting as `user_id` (appservice masquerading), when there is one.
pub fn with_user_id(path: String, user_id: Option<&str>) -> String {
    match user_id {
        Some(user) => format!("{path}?user_id={}", encode(user)),
        None => path,
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        headers.remove(name);
    }
}

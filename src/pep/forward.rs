//! Forwarding a client's request to the homeserver, streamed both ways: the hop-by-hop
//! headers of each side dropped (RFC 9110 §7.6.1), `Host` the homeserver's, and
//! `X-Forwarded-For` the real peer — never what the client claimed.

use std::net::SocketAddr;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::{ErrorCode, MatrixError};
use crate::matrix::Homeserver;

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

/// Sends `request` to the homeserver at `path_and_query`, streaming both bodies, and
/// returns its answer unchanged but for hop-by-hop headers.
pub async fn forward(
    homeserver: &Homeserver,
    request: Request<Body>,
    path_and_query: &str,
    client: Option<SocketAddr>,
) -> Response {
    let (mut parts, body) = request.into_parts();
    parts.uri = match homeserver.uri(path_and_query) {
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
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(host) = HeaderValue::from_str(homeserver.authority()) {
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
    match homeserver.send(Request::from_parts(parts, body)).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Body::new(body))
        }
        Err(_) => MatrixError::unavailable().into_response(),
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

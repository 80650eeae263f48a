//! The bus's listener: its one route table — `GET /ws` and `GET /stub/connect` (protocol
//! stubs, `bus::socket`), `/socket.io/` (socket.io stubs, `bus::socketio`, with CORS for
//! browsers' polling requests) and `POST /bus/v1/messages` (other domains' nodes,
//! `bus::peers`).

use axum::extract::ws::WebSocketUpgrade;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;

use super::socket::upgrade;
use super::Bus;

/// The bus's HTTP routes.
pub fn router(bus: Bus) -> Router {
    Router::new()
        .route("/ws", get(ws_current))
        .route("/stub/connect", get(ws_legacy))
        .route("/bus/v1/messages", post(peer_message))
        .with_state(bus.clone())
        .layer(super::socketio::layer(bus))
        // Engine.IO's polling transport from a page of another origin sends credentials.
        .layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(tower_http::cors::AllowOrigin::mirror_request())
                .allow_credentials(true),
        )
}

type Params = Query<Vec<(String, String)>>;

async fn ws_current(
    ws: WebSocketUpgrade,
    State(bus): State<Bus>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Query(query): Params,
    headers: HeaderMap,
) -> Response {
    ws_session(ws, bus, client, &query, &headers, false)
}

async fn ws_legacy(
    ws: WebSocketUpgrade,
    State(bus): State<Bus>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Query(query): Params,
    headers: HeaderMap,
) -> Response {
    ws_session(ws, bus, client, &query, &headers, true)
}

/// A socket takes a place among the handshakes under way (`bus::handshakes`), or is
/// refused before the upgrade.
fn ws_session(
    ws: WebSocketUpgrade,
    bus: Bus,
    client: SocketAddr,
    query: &[(String, String)],
    headers: &HeaderMap,
    legacy: bool,
) -> Response {
    match bus.inner.handshakes.begin(client.ip()) {
        Ok(pending) => upgrade(ws, bus, query, headers, legacy, pending),
        Err((status, reason, text)) => {
            bus.inner.metrics.refuse(reason);
            (status, text).into_response()
        }
    }
}

/// `POST /bus/v1/messages`: a message from another domain's node (`[[bus.peers]]` token).
/// Answered 202 when routed, or with the reTHINK response (JSON) when the node answers.
async fn peer_message(
    State(bus): State<Bus>,
    Query(query): Params,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let token = crate::http_auth::presented(&headers, &query);
    let Some(domain) = token.and_then(|t| bus.peer_domain(t)) else {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"code": 401, "description": "unknown peer token"})),
        )
            .into_response();
    };
    let text = match std::str::from_utf8(&body) {
        Ok(t) => t,
        Err(_) => return (StatusCode::BAD_REQUEST, "body must be UTF-8 JSON").into_response(),
    };
    match bus.handle_from_peer(&domain, text).await {
        Some(text) => ([("content-type", "application/json")], text).into_response(),
        None => StatusCode::ACCEPTED.into_response(),
    }
}

//! The bus's listener: its one route table — `GET /ws` and `GET /stub/connect` (protocol
//! stubs, `bus::socket`), `/socket.io/` (socket.io stubs, `bus::socketio`, with CORS for
//! browsers' polling requests) and `POST /bus/v1/messages` (other domains' nodes,
//! `bus::peers`) — and how it is served ([`serve`]): at most `[bus] max_connections`
//! connections at once (upgraded sockets included, until they close), each given
//! `handshake_timeout` for its request's headers, which are at most [`MAX_HEADER_BYTES`].
//! A peer's post is authenticated from its headers before its body is read (at most
//! `max_frame_bytes`, within `handshake_timeout`), and one peer has at most
//! [`PEER_POSTS_AT_ONCE`] posts under way (more: 503).

use axum::extract::ws::WebSocketUpgrade;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::socket::upgrade;
use super::Bus;

/// Most bytes of a request's head (request line and headers) the bus reads.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most posts of one peer node under way at once (more: 503).
pub const PEER_POSTS_AT_ONCE: usize = 64;

/// The bus's HTTP routes.
pub fn router(bus: Bus) -> Router {
    Router::new()
        .route("/ws", get(ws_current))
        .route("/stub/connect", get(ws_legacy))
        .route(
            "/bus/v1/messages",
            post(peer_message).layer(Extension(PeerPosts::default())),
        )
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

/// The posts under way, per peer domain.
#[derive(Clone, Default)]
struct PeerPosts(Arc<Mutex<HashMap<String, Arc<Semaphore>>>>);

impl PeerPosts {
    /// A place for one more post of `domain`, unless it has [`PEER_POSTS_AT_ONCE`].
    fn begin(&self, domain: &str) -> Option<OwnedSemaphorePermit> {
        let places = {
            let mut peers = self.0.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(
                peers
                    .entry(domain.to_string())
                    .or_insert_with(|| Arc::new(Semaphore::new(PEER_POSTS_AT_ONCE))),
            )
        };
        places.try_acquire_owned().ok()
    }
}

fn peer_error(status: StatusCode, text: &str) -> Response {
    let body = json!({"code": status.as_u16(), "description": text});
    (status, axum::Json(body)).into_response()
}

/// `POST /bus/v1/messages`: a message from another domain's node (`[[bus.peers]]` token).
/// Answered 202 when routed, or with the reTHINK response (JSON) when the node answers. The
/// token is checked from the headers before anything of the body is read.
async fn peer_message(
    State(bus): State<Bus>,
    Extension(posts): Extension<PeerPosts>,
    Query(query): Params,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let token = crate::http_auth::presented(&headers, &query);
    let Some(domain) = token.and_then(|t| bus.peer_domain(t)) else {
        return peer_error(StatusCode::UNAUTHORIZED, "unknown peer token");
    };
    let Some(_place) = posts.begin(&domain) else {
        return peer_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many posts of this peer under way; retry",
        );
    };
    let config = bus.config();
    let read = axum::body::to_bytes(body, config.max_frame_bytes);
    let body = match tokio::time::timeout(config.handshake_timeout, read).await {
        Ok(Ok(body)) => body,
        Ok(Err(_)) => {
            return peer_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "a message is at most [bus] max_frame_bytes",
            )
        }
        Err(_) => return peer_error(StatusCode::REQUEST_TIMEOUT, "body not sent in time"),
    };
    let text = match std::str::from_utf8(&body) {
        Ok(t) => t,
        Err(_) => return (StatusCode::BAD_REQUEST, "body must be UTF-8 JSON").into_response(),
    };
    let started = tokio::time::Instant::now();
    match bus.handle_from_peer(&domain, text, started).await {
        Some(text) => ([("content-type", "application/json")], text).into_response(),
        None => StatusCode::ACCEPTED.into_response(),
    }
}

/// Serves the bus's routes on `listener` until `stop`: at most `[bus] max_connections`
/// connections at once (more wait in the kernel's backlog), each holding its place until it
/// closes — upgraded to a socket or not — and given `handshake_timeout` for each request's
/// head (at most [`MAX_HEADER_BYTES`]).
pub fn serve(
    listener: tokio::net::TcpListener,
    bus: Bus,
    stop: CancellationToken,
    tracker: &TaskTracker,
) {
    let config = bus.config();
    let header_timeout = config.handshake_timeout;
    let places = crate::listen::Places {
        max_connections: config.max_connections,
        per_address: config.max_connections_per_address,
    };
    let app = router(bus);
    let connections = stop.clone();
    crate::listen::accept(
        listener,
        places,
        connections,
        tracker,
        "bus",
        move |tcp, peer, place| {
            let app = app.clone().layer(Extension(ConnectInfo(peer)));
            let io = Placed {
                io: tcp,
                _place: place,
            };
            let stop = stop.clone();
            async move {
                crate::listen::http1(io, peer, app, header_timeout, MAX_HEADER_BYTES, stop, "bus")
                    .await;
            }
        },
    );
}

/// A connection with its place among `max_connections`, given back when it is dropped (an
/// upgraded socket keeps it: the socket owns this IO).
struct Placed {
    io: tokio::net::TcpStream,
    _place: crate::listen::Place,
}

impl AsyncRead for Placed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Placed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

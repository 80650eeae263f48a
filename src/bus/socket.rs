//! The End-User Device and Network Server connectors: protocol stubs over WebSocket
//! (`/ws` and `/stub/connect`, routed by `bus::listener`).
//!
//! A socket says which runtime it speaks for in one of the three ways reTHINK stubs do:
//! `?runtimeURL=` in the query; a first frame `{"cmd":"connect","data":{"runtimeURL":U}}`
//! (answered `{"cmd":"connect","response":200}`); or a first message
//! `{type:"open", from:U, to:"mn:/session"}` (answered with a response carrying
//! `runtimeToken`). The token is the `Authorization: Bearer` header, `?access_token=`, or
//! `accessToken`/`token` in the connect frame or open message body: a Matrix access token
//! (checked with the homeserver) or a Network Server's configured token. A failed handshake
//! is answered (401/403/400) and the socket closed with 1008.
//!
//! After the handshake one task reads (messages are handled in order; each request gets its
//! response through the same outbound queue as deliveries) and one writes. Frames that are
//! not JSON messages get a 400 response and the socket stays open; a text frame that is not
//! UTF-8 closes it with 1007, a frame over `[bus] max_frame_bytes` with 1009.
//! `{"cmd":"disconnect"}` (or a `close` to `mn:/session`) releases the runtime's addresses;
//! a socket that just closes keeps them, and messages wait in the inbox.

use std::sync::{Arc, Mutex};

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::connection::{Principal, SocketSlot};
use super::handshakes::Pending;
use super::metrics::refused;
use super::outbound::{self, OutboundRx};
use super::runtimes::Runtime;
use super::{Bus, Connection};
use crate::rethink::message::response;
use crate::rethink::{BusError, Message};
/// WebSocket close codes (RFC 6455 §7.4.1).
mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const TRY_AGAIN: u16 = 1013;
}

/// How much one read of a socket takes at most. The WebSocket reader zero-fills this much
/// of its buffer before every read, including each read that finds nothing waiting (the
/// library's default, 128 KiB, cost a routed message more than its cache key and look-up);
/// a larger frame is read in several reads.
const READ_BUFFER_BYTES: usize = 8 * 1024;

/// Upgrades to a WebSocket session of a protocol stub (`legacy`: the 2016 Matrix stub's
/// `/stub/connect`, which answers a bad first frame with its own `connect` command).
pub(super) fn upgrade(
    ws: WebSocketUpgrade,
    bus: Bus,
    query: &[(String, String)],
    headers: &HeaderMap,
    legacy: bool,
    pending: Pending,
) -> Response {
    // The later Matrix stub appends `?runtimeURL=…` to the configured URL even when that
    // already has a query (`…?access_token=T`): read such a value as two parameters.
    let query: Vec<(String, String)> = query
        .iter()
        .flat_map(|(k, v)| match v.split_once("?runtimeURL=") {
            Some((value, runtime)) => vec![
                (k.clone(), value.to_string()),
                ("runtimeURL".to_string(), runtime.to_string()),
            ],
            None => vec![(k.clone(), v.clone())],
        })
        .collect();
    let token = crate::http_auth::presented(headers, &query).map(str::to_string);
    let runtime = query
        .iter()
        .find(|(k, _)| k == "runtimeURL")
        .map(|(_, v)| v.clone());
    let max = bus.config().max_frame_bytes;
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(READ_BUFFER_BYTES)
        .on_upgrade(move |socket| session(bus, socket, token, runtime, legacy, pending))
}

/// How the socket introduced itself.
pub(super) enum Hello {
    Query(String),
    /// The runtime URL, and a token in `data.accessToken`.
    Connect(String, Option<String>),
    Open(Message),
}

impl Hello {
    fn runtime(&self) -> &str {
        match self {
            Hello::Query(url) | Hello::Connect(url, _) => url,
            Hello::Open(m) => &m.from,
        }
    }

    /// The answer to the handshake.
    pub(super) fn answer(&self, code: u16, text: &str) -> String {
        match self {
            Hello::Connect(..) => {
                json!({"cmd": "connect", "response": code, "data": {"msg": text}}).to_string()
            }
            Hello::Open(m) => {
                if code != 200 {
                    return m.response(code, text, None);
                }
                // The Vert.x stub reads `body.runtimeToken`; newer clients `body.value`.
                let token = uuid::Uuid::new_v4().to_string();
                let answer = m.response(code, text, Some(json!({"runtimeToken": token})));
                match serde_json::from_str::<Value>(&answer) {
                    Ok(mut answer) => {
                        answer["body"]["runtimeToken"] = json!(token);
                        answer.to_string()
                    }
                    Err(_) => answer,
                }
            }
            Hello::Query(url) => response(&Value::Null, "mn:/session", url, code, text, None),
        }
    }
}

type Sink = SplitSink<WebSocket, WsMessage>;

async fn close_with(sink: &mut Sink, code: u16, reason: &str) {
    let _ = sink
        .send(WsMessage::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason.to_string()),
        })))
        .await;
}

/// Answers a refused handshake (`answer`, if any) and closes with 1008 — within
/// `[bus] write_timeout`: a client that does not read is just dropped.
async fn refuse(bus: &Bus, sink: &mut Sink, answer: Option<String>, reason: &str) {
    let deadline = bus.config().write_timeout;
    let _ = tokio::time::timeout(deadline, async {
        if let Some(answer) = answer {
            let _ = sink.send(WsMessage::Text(Utf8Bytes::from(answer))).await;
        }
        close_with(sink, close_code::POLICY, reason).await;
    })
    .await;
}

async fn session(
    bus: Bus,
    socket: WebSocket,
    token: Option<String>,
    runtime: Option<String>,
    legacy: bool,
    pending: Pending,
) {
    let (mut sink, mut stream) = socket.split();
    let hello = match runtime {
        Some(url) => Hello::Query(url),
        None => {
            match tokio::time::timeout(bus.config().handshake_timeout, first_frame(&mut stream))
                .await
            {
                Ok(Ok(hello)) => hello,
                Ok(Err(answer)) => {
                    let answer = if legacy {
                        json!({"cmd": "connect", "response": 403, "data": {"msg": answer}})
                            .to_string()
                    } else {
                        response(&Value::Null, "mn:/session", "", 400, &answer, None)
                    };
                    refuse(&bus, &mut sink, Some(answer), "handshake expected").await;
                    return;
                }
                Err(_) => {
                    refuse(&bus, &mut sink, None, "no handshake in time").await;
                    return;
                }
            }
        }
    };
    let bound = bind_hello(&bus, &hello, token, pending).await;
    // `_slot`: this socket's place among its principal's, kept until it ends.
    let (runtime, principal, _slot) = match bound {
        Ok(bound) => bound,
        Err(refused) => {
            refuse(&bus, &mut sink, Some(refused.answer), refused.reason).await;
            return;
        }
    };
    if !matches!(hello, Hello::Query(_)) {
        let answer = WsMessage::Text(Utf8Bytes::from(hello.answer(200, "connected")));
        let deadline = bus.config().write_timeout;
        if !matches!(
            tokio::time::timeout(deadline, sink.send(answer)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
    let (tx, rx) = outbound::channel(
        bus.config().outbound_queue,
        bus.config().outbound_queue_bytes,
    );
    let closing: Arc<Mutex<Option<(u16, String)>>> = Arc::default();
    let writer_close = CancellationToken::new();
    let writer_dropped = CancellationToken::new();
    let writer = tokio::spawn(write_loop(
        sink,
        rx,
        Arc::clone(&closing),
        writer_close.clone(),
        writer_dropped.clone(),
        bus.clone(),
    ));
    let conn = match bus.attach(runtime, principal, tx).await {
        Ok(conn) => conn,
        Err(e) => {
            *closing.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((close_code::TRY_AGAIN, e.to_string()));
            writer_close.cancel();
            let _ = writer.await;
            return;
        }
    };
    read_loop(&bus, &conn, &mut stream, &closing).await;
    bus.detach(&conn);
    if closing.lock().unwrap_or_else(|p| p.into_inner()).is_none() && conn.close.is_cancelled() {
        *closing.lock().unwrap_or_else(|p| p.into_inner()) = Some((
            close_code::TRY_AGAIN,
            "taken over by another socket, or too slow: reconnect to resume".into(),
        ));
    }
    // At most one closing socket per runtime: an older one still closing is dropped now.
    conn.runtime.closing(writer_dropped);
    drop(conn);
    writer_close.cancel();
    bus.inner.metrics.closing.inc();
    let _ = writer.await;
    bus.inner.metrics.closing.dec();
}

/// A refused handshake: what the socket is answered, and the reason it is closed with.
pub(super) struct RefusedHello {
    pub answer: String,
    pub reason: &'static str,
}

/// Authenticates the socket (`token`, else one its handshake carries), gives it a place
/// among its principal's sockets (`[bus.limits] sockets_per_principal`) and binds the
/// runtime it names; `Err` with the answer for a refused handshake (then closed). The
/// socket's place among the handshakes (`pending`) is given back once the token is checked:
/// binding is the principal's business, bounded by its own limits.
pub(super) async fn bind_hello(
    bus: &Bus,
    hello: &Hello,
    token: Option<String>,
    pending: Pending,
) -> Result<(Arc<Runtime>, Principal, SocketSlot), RefusedHello> {
    let token = token.or_else(|| hello_token(hello));
    let refused = |e: BusError, reason| RefusedHello {
        answer: hello.answer(e.code(), &e.to_string()),
        reason,
    };
    let authenticated = bus.authenticate(token.as_deref()).await;
    drop(pending);
    let principal = authenticated.map_err(|e| refused(e, "not allowed"))?;
    let limit = bus.config().limits.sockets_per_principal;
    let slot = bus
        .inner
        .sockets
        .take(&principal.owner(), limit)
        .map_err(|held| {
            bus.inner.metrics.limited("sockets");
            refused(
                BusError::Forbidden(format!(
                    "this user has {held} sockets connected (the limit is {limit}, [bus.limits] sockets_per_principal)"
                )),
                "too many sockets for this principal",
            )
        })?;
    let runtime = bus
        .bind(hello.runtime(), &principal)
        .await
        .map_err(|e| refused(e, "not allowed"))?;
    Ok((runtime, principal, slot))
}

/// Reads the first frame: a connect command or an `open` message.
async fn first_frame(stream: &mut SplitStream<WebSocket>) -> Result<Hello, String> {
    loop {
        let text = match stream.next().await {
            Some(Ok(WsMessage::Text(t))) => t.to_string(),
            Some(Ok(WsMessage::Binary(b))) => String::from_utf8(b.to_vec())
                .map_err(|_| "frames must be UTF-8 JSON".to_string())?,
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
            _ => return Err("socket closed before the handshake".into()),
        };
        return hello_of(text);
    }
}

/// What a first frame says: a connect command or an `open` message.
pub(super) fn hello_of(text: String) -> Result<Hello, String> {
    let value: Value =
        serde_json::from_str(&text).map_err(|e| format!("first frame is not JSON: {e}"))?;
    if value["cmd"] == "connect" {
        let url = value["data"]["runtimeURL"]
            .as_str()
            .ok_or("connect needs data.runtimeURL")?;
        let token = ["accessToken", "token"]
            .iter()
            .find_map(|k| value["data"][*k].as_str())
            .map(str::to_string);
        return Ok(Hello::Connect(url.to_string(), token));
    }
    let is_open = value["type"]
        .as_str()
        .is_some_and(|t| t.eq_ignore_ascii_case("open") || t.eq_ignore_ascii_case("re-open"));
    if is_open && value["to"] == "mn:/session" {
        let message = Message::from_value(value, Some(Utf8Bytes::from(text)))
            .map_err(|(e, _)| e.to_string())?;
        return Ok(Hello::Open(message));
    }
    Err("the first frame must be {\"cmd\":\"connect\",\"data\":{\"runtimeURL\":…}} or an 'open' message to mn:/session (or give ?runtimeURL=)".into())
}

/// A token carried in the handshake itself.
fn hello_token(hello: &Hello) -> Option<String> {
    match hello {
        Hello::Query(_) => None,
        Hello::Connect(_, token) => token.clone(),
        Hello::Open(m) => {
            let body = m.body();
            ["accessToken", "token", "auth"]
                .iter()
                .find_map(|k| body.get(*k).and_then(Value::as_str))
                .map(str::to_string)
        }
    }
}

async fn read_loop(
    bus: &Bus,
    conn: &Arc<Connection>,
    stream: &mut SplitStream<WebSocket>,
    closing: &Mutex<Option<(u16, String)>>,
) {
    let set_close = |code: u16, reason: &str| {
        *closing.lock().unwrap_or_else(|p| p.into_inner()) = Some((code, reason.to_string()));
    };
    loop {
        let frame = tokio::select! {
            () = conn.close.cancelled() => return,
            // The writer gave up (write failed, or slower than its deadline).
            () = conn.tx.closed() => return,
            () = bus.inner.shutdown.cancelled() => {
                set_close(close_code::GOING_AWAY, "node shutting down");
                return;
            }
            frame = stream.next() => frame,
        };
        let text = match frame {
            None | Some(Ok(WsMessage::Close(_))) => return,
            Some(Ok(WsMessage::Text(t))) => t,
            Some(Ok(WsMessage::Binary(b))) => match Utf8Bytes::try_from(b) {
                Ok(t) => t,
                Err(_) => {
                    set_close(close_code::INVALID_DATA, "frames must be UTF-8 JSON");
                    return;
                }
            },
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                let text = e.to_string();
                if text.contains("too long") || text.contains("Space limit") {
                    set_close(close_code::TOO_BIG, "message too big");
                } else if text.contains("UTF-8") || text.contains("utf-8") {
                    set_close(close_code::INVALID_DATA, "text frames must be UTF-8");
                }
                tracing::debug!(error = %text, runtime = %conn.runtime.url, "socket read failed");
                return;
            }
        };
        if let Some(answer) = on_frame(bus, conn, text.as_str()).await {
            if !bus.respond(conn, Utf8Bytes::from(answer)).await {
                return;
            }
        }
        if conn.close.is_cancelled() {
            set_close(close_code::NORMAL, "closed");
            return;
        }
    }
}

/// One frame after the handshake; the answer for the sender, if any.
pub(super) async fn on_frame(bus: &Bus, conn: &Arc<Connection>, text: &str) -> Option<String> {
    // The stubs' disconnect command (not a reTHINK message).
    if text.contains("\"cmd\"") {
        if let Ok(value) = serde_json::from_str::<Value>(text) {
            if value["cmd"] == "disconnect" {
                // Like the reference node: release, then close (no answer frame, which the
                // 2016 stub would hand to its runtime as if it were a message).
                if let Err(e) = bus.release(conn).await {
                    tracing::warn!(%e, runtime = %conn.runtime.url, "disconnect: cannot release the runtime's addresses now");
                }
                conn.close.cancel();
                return None;
            }
        }
    }
    match Message::parse(text) {
        Ok(message) => bus.handle(conn, message).await,
        Err((error, id)) => {
            // Frames that are no message count against the principal's rate as messages do.
            let error = match bus.inner.rate.check(&conn.principal.owner()) {
                Ok(()) => error,
                Err(wait) => crate::rethink::BusError::RateLimited(format!(
                    "too many messages: retry in {} ms",
                    crate::ratelimit::millis(wait)
                )),
            };
            Some(response(
                &id,
                &bus.nodes().node,
                &conn.runtime.url,
                error.code(),
                &error.to_string(),
                None,
            ))
        }
    }
}

/// Writes `first` and whatever else is queued, then flushes: one syscall for a burst. Each
/// write may wait for the peer as long as it takes while the socket is open (what waits
/// meanwhile is within the queue's budget, and a queue that stays full closes the socket:
/// `bus::flow`); once it is closing, `over` ends it: false.
async fn write_burst<F: std::future::Future<Output = ()>>(
    sink: &mut Sink,
    first: Utf8Bytes,
    rx: &mut OutboundRx,
    over: &mut std::pin::Pin<&mut F>,
) -> bool {
    if !before(sink.feed(WsMessage::Text(first)), over).await {
        return false;
    }
    while let Some(text) = rx.try_recv() {
        if !before(sink.feed(WsMessage::Text(text)), over).await {
            return false;
        }
    }
    before(sink.flush(), over).await
}

/// Whether `write` succeeds before `over` (the closing socket's one deadline) ends.
async fn before<F: std::future::Future<Output = ()>>(
    write: impl std::future::Future<Output = Result<(), axum::Error>>,
    over: &mut std::pin::Pin<&mut F>,
) -> bool {
    tokio::select! {
        written = write => written.is_ok(),
        () = over.as_mut() => false,
    }
}

/// The socket's writer. Once it is closing (`stop`), it has one deadline in all — `[bus]
/// write_timeout` from the close, not per write — to hand over what is still queued and the
/// close frame (like a WebSocket close handshake's timeout); `dropped` (another socket of
/// its runtime began to close) ends it at once. Then the socket is dropped with the rest,
/// so a closed socket that reads slowly holds its queue for `write_timeout` at most.
async fn write_loop(
    mut sink: Sink,
    mut rx: OutboundRx,
    closing: Arc<Mutex<Option<(u16, String)>>>,
    stop: CancellationToken,
    dropped: CancellationToken,
    bus: Bus,
) {
    let deadline = bus.config().write_timeout;
    let over = async {
        tokio::select! {
            () = async {
                stop.cancelled().await;
                tokio::time::sleep(deadline).await;
            } => {}
            () = dropped.cancelled() => {}
        }
    };
    tokio::pin!(over);
    let handed_over = async {
        loop {
            let first = tokio::select! {
                biased;
                text = rx.recv() => text,
                () = stop.cancelled() => None,
            };
            let Some(first) = first else {
                break;
            };
            if !write_burst(&mut sink, first, &mut rx, &mut over).await {
                return false;
            }
        }
        // Hand over what is still queued (responses written before the close), then close.
        let (code, reason) = closing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or((close_code::NORMAL, String::new()));
        while let Some(text) = rx.try_recv() {
            if !before(sink.feed(WsMessage::Text(text)), &mut over).await {
                return false;
            }
        }
        let close = async {
            close_with(&mut sink, code, &reason).await;
            Ok(())
        };
        before(close, &mut over).await
    }
    .await;
    if !handed_over && (stop.is_cancelled() || dropped.is_cancelled()) {
        bus.inner.metrics.refuse(refused::CLOSING_TIMEOUT);
        tracing::debug!("closing socket did not take what was queued in time: dropped");
    } else if !handed_over {
        tracing::debug!("socket write failed: dropped");
    }
}

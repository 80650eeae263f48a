//! The socket.io protocol stubs (the reference Node.js stub: socket.io-client 1.x, Engine.IO
//! protocol 3) on the bus's listener, at `/socket.io/`: Engine.IO (polling and WebSocket
//! transports, both protocol revisions) is engineioxide's; the few Socket.IO packets above it
//! are read here, in the order they arrive.
//!
//! A socket sends reTHINK messages as `message` events (`42["message", <JSON text or
//! object>]`) and receives them the same way (as objects). Its first message must be an
//! `open` to `mn:/session`, answered like the Vert.x stub's; the token is `?access_token=`
//! or `Authorization: Bearer` on the Engine.IO request, or `accessToken` in the open body.
//! After a `close` (or a refused open) the node sends a Socket.IO DISCONNECT (`41`), which
//! the client does not reconnect after. Messages wait in a queue while the bus handles
//! earlier ones, bounded in messages and in bytes as a WebSocket stub's reading is: one
//! message being handled, and at most `[bus] max_frame_bytes` more waiting — before the
//! handshake is answered only the first message and [`HANDSHAKE_INBOUND_BYTES`] more. A
//! client past it is disconnected (it cannot be slowed down: Engine.IO delivers what it
//! reads). What is sent to it waits in its outbound queue, as a WebSocket stub's, and then in
//! Engine.IO's send buffer — bounded by Engine.IO in packets only, so also here in bytes: at
//! most `max_frame_bytes` of packets (any one when it is empty), as a WebSocket writer holds
//! the frame it writes; while it is full the queue fills and the senders are slowed.
//! Socket.IO protocol 5 clients (socket.io ≥ 3) connect
//! too: their `0` is answered with the session id.

use crate::sync::lock;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use engineioxide::config::EngineIoConfig;
use engineioxide::handler::EngineIoHandler;
use engineioxide::layer::EngineIoLayer;
use engineioxide::{DisconnectReason, ProtocolVersion, Socket, Str};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::metrics::refused;
use super::outbound;
use super::socket::{bind_hello, hello_of, on_frame, Hello};
use super::Bus;

/// Where the stubs find it (socket.io's default path).
pub const PATH: &str = "/socket.io";
/// Messages read but not yet handled, per socket; past it the socket is disconnected.
const INBOUND_QUEUE: usize = 1024;
/// Bytes a socket may send after its first message before its handshake is answered.
pub const HANDSHAKE_INBOUND_BYTES: usize = 16 * 1024;

/// The Engine.IO layer serving socket.io stubs in front of the bus's other routes.
pub fn layer(bus: Bus) -> EngineIoLayer<Handler> {
    let max = bus.config().max_frame_bytes;
    let config = EngineIoConfig::builder()
        .req_path(PATH)
        .max_payload(max as u64)
        .ws_max_message_size(max)
        .ws_max_frame_size(max)
        .max_buffer_size(bus.config().outbound_queue.max(16))
        .build();
    EngineIoLayer::from_config(Arc::new(Handler { bus }), config)
}

/// Hands each socket's packets to its own task.
#[derive(Clone)]
pub struct Handler {
    bus: Bus,
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("socket.io handler")
    }
}

/// A socket's state: the queue to its task (dropped when it disconnects).
#[derive(Default)]
pub struct Session {
    inbound: Mutex<Option<Inbound>>,
}

/// The sending side of a socket's inbound queue.
struct Inbound {
    tx: mpsc::Sender<String>,
    budget: Arc<Mutex<Budget>>,
}

/// What a socket's inbound queue may hold, in bytes: the first message (the handshake's,
/// which the task takes at once) whatever its size within `max_frame_bytes`, then what
/// fits in `limit` — [`HANDSHAKE_INBOUND_BYTES`] until the handshake is answered,
/// `max_frame_bytes` after.
#[derive(Debug)]
struct Budget {
    queued: usize,
    limit: usize,
    first_seen: bool,
}

impl Budget {
    fn new() -> Self {
        Self {
            queued: 0,
            limit: HANDSHAKE_INBOUND_BYTES,
            first_seen: false,
        }
    }

    /// Whether a message of `len` bytes may wait (then it is counted).
    fn admit(&mut self, len: usize) -> bool {
        if !self.first_seen {
            self.first_seen = true;
            return true;
        }
        if self.queued + len > self.limit {
            return false;
        }
        self.queued += len;
        true
    }

    /// A counted message of `len` bytes was taken out.
    fn taken(&mut self, len: usize) {
        self.queued = self.queued.saturating_sub(len);
    }
}

/// The receiving side, read by the socket's task.
struct InboundRx {
    rx: mpsc::Receiver<String>,
    budget: Arc<Mutex<Budget>>,
}

impl InboundRx {
    /// The first message (not counted: the handshake's).
    async fn first(&mut self) -> Option<String> {
        self.rx.recv().await
    }

    /// The next message.
    async fn recv(&mut self) -> Option<String> {
        let text = self.rx.recv().await?;
        lock(&self.budget).taken(text.len());
        Some(text)
    }

    /// The handshake is answered: up to `limit` bytes may wait from now on.
    fn bound(&self, limit: usize) {
        lock(&self.budget).limit = limit.max(HANDSHAKE_INBOUND_BYTES);
    }
}

fn inbound() -> (Inbound, InboundRx) {
    let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
    let budget = Arc::new(Mutex::new(Budget::new()));
    (
        Inbound {
            tx,
            budget: Arc::clone(&budget),
        },
        InboundRx { rx, budget },
    )
}

/// One Socket.IO packet, as far as the bus cares.
#[derive(Debug, PartialEq)]
enum Packet {
    /// CONNECT to the default namespace.
    Connect,
    /// DISCONNECT.
    Disconnect,
    /// A `message` event's payload (a JSON text).
    Message(String),
    /// Another event, or a packet the bus has no use for.
    Ignored,
}

/// Reads a Socket.IO (protocol 4 or 5) packet: `<type>[/<nsp>,][<ack id>][<JSON>]`.
fn parse(packet: &str) -> Result<Packet, String> {
    let mut chars = packet.chars();
    let kind = chars.next().ok_or("empty packet")?;
    let mut rest = chars.as_str();
    if let Some(namespaced) = rest.strip_prefix('/') {
        let (nsp, after) = namespaced.split_once(',').unwrap_or((namespaced, ""));
        if !nsp.is_empty() {
            return Err(format!("only the default namespace is served, not /{nsp}"));
        }
        rest = after;
    }
    let rest = rest.trim_start_matches(|c: char| c.is_ascii_digit());
    match kind {
        '0' => Ok(Packet::Connect),
        '1' => Ok(Packet::Disconnect),
        '2' => {
            let event: Vec<Value> = serde_json::from_str(rest)
                .map_err(|e| format!("event is not a JSON array: {e}"))?;
            match event.as_slice() {
                [Value::String(name), payload, ..] if name == "message" => match payload {
                    Value::String(text) => Ok(Packet::Message(text.clone())),
                    Value::Object(_) => Ok(Packet::Message(payload.to_string())),
                    _ => Err("a message event carries a JSON text or object".into()),
                },
                [Value::String(_), ..] => Ok(Packet::Ignored),
                _ => Err("an event is [name, payload]".into()),
            }
        }
        '5' | '6' => Err("binary events are not supported".into()),
        _ => Ok(Packet::Ignored),
    }
}

/// A `message` event carrying `text` (a JSON object).
fn event(text: &str) -> String {
    format!("2[\"message\",{text}]")
}

impl EngineIoHandler for Handler {
    type Data = Session;

    fn on_connect(self: Arc<Self>, socket: Arc<Socket<Session>>) {
        let (tx, rx) = inbound();
        *lock(&socket.data.inbound) = Some(tx);
        if socket.protocol == ProtocolVersion::V3 {
            // Socket.IO 1.x/2.x: the server connects the default namespace itself.
            let _ = socket.emit("0");
        }
        tokio::spawn(run(self.bus.clone(), socket, rx));
    }

    fn on_disconnect(&self, socket: Arc<Socket<Session>>, _reason: DisconnectReason) {
        lock(&socket.data.inbound).take();
    }

    fn on_message(self: &Arc<Self>, msg: Str, socket: Arc<Socket<Session>>) {
        match parse(msg.as_str()) {
            Ok(Packet::Message(text)) => {
                let queued = lock(&socket.data.inbound).as_ref().map(|inbound| {
                    let len = text.len();
                    if !lock(&inbound.budget).admit(len) {
                        return false;
                    }
                    let sent = inbound.tx.try_send(text).is_ok();
                    if !sent {
                        lock(&inbound.budget).taken(len);
                    }
                    sent
                });
                if queued == Some(false) {
                    self.bus.inner.metrics.refuse(refused::INBOUND_FULL);
                    tracing::warn!(sid = %socket.id, "socket.io stub sends faster than the bus handles its messages: disconnected");
                    disconnect(&socket);
                }
            }
            Ok(Packet::Connect) if socket.protocol != ProtocolVersion::V3 => {
                // Socket.IO 3+: the client connects the namespace, answered with its id.
                let _ = socket.emit(format!("0{}", json!({"sid": socket.id.to_string()})));
            }
            Ok(Packet::Connect) => {}
            Ok(Packet::Disconnect) => {
                lock(&socket.data.inbound).take();
                socket.close(DisconnectReason::TransportClose);
            }
            Ok(Packet::Ignored) => {}
            Err(problem) => {
                tracing::debug!(sid = %socket.id, %problem, "socket.io packet refused");
                let _ = socket.emit(format!("4{}", json!(problem)));
            }
        }
    }

    fn on_binary(self: &Arc<Self>, _data: bytes::Bytes, socket: Arc<Socket<Session>>) {
        let _ = socket.emit(format!("4{}", json!("binary data is not supported")));
    }
}

/// Sends a Socket.IO DISCONNECT and closes the transport.
fn disconnect(socket: &Socket<Session>) {
    lock(&socket.data.inbound).take();
    let _ = socket.emit("1");
    socket.close(DisconnectReason::ClosingServer);
}

/// What a socket's Engine.IO send buffer holds, in bytes: Engine.IO bounds it in packets only
/// (`max_buffer_size`), so each packet emitted is kept here too (sharing its bytes, not a
/// copy) until Engine.IO has dropped its own — written, or given up with the socket.
struct Sent {
    packets: std::collections::VecDeque<bytes::Bytes>,
    bytes: usize,
    /// What it may hold (`max_frame_bytes`, as a WebSocket writer holds the frame it writes);
    /// an empty buffer takes any one packet.
    max: usize,
}

impl Sent {
    fn new(max: usize) -> Self {
        Self {
            packets: std::collections::VecDeque::new(),
            bytes: 0,
            max,
        }
    }

    /// Forgets the packets Engine.IO no longer holds.
    fn prune(&mut self) {
        let before = std::mem::take(&mut self.packets);
        for packet in before {
            if packet.is_unique() {
                self.bytes -= packet.len();
            } else {
                self.packets.push_back(packet);
            }
        }
    }

    /// Emits `packet` once the buffer has room for it in bytes (and Engine.IO in packets);
    /// false once the socket is gone.
    async fn emit(&mut self, socket: &Socket<Session>, packet: String) -> bool {
        let mut wait = Duration::from_millis(1);
        loop {
            self.prune();
            if self.bytes == 0 || self.bytes + packet.len() <= self.max {
                break;
            }
            if socket.is_closed() {
                return false;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(50));
        }
        let packet = Str::from(packet);
        let kept = bytes::Bytes::from(packet.clone());
        if !emit(socket, packet, None).await {
            return false;
        }
        self.bytes += kept.len();
        self.packets.push_back(kept);
        true
    }
}

/// Emits `packet`, waiting while the socket's Engine.IO buffer is full (for `patience` at
/// most, when given); false once closed or out of patience (a client that does not read).
async fn emit(
    socket: &Socket<Session>,
    packet: impl Into<Str>,
    patience: Option<Duration>,
) -> bool {
    let mut packet = packet.into();
    let mut wait = Duration::from_millis(1);
    let give_up = patience.map(|p| tokio::time::Instant::now() + p);
    loop {
        if give_up.is_some_and(|at| tokio::time::Instant::now() >= at) {
            return false;
        }
        match socket.emit(packet) {
            Ok(()) => return true,
            Err(tokio::sync::mpsc::error::TrySendError::Full(back)) => {
                packet = back;
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(50));
            }
            Err(_) => return false,
        }
    }
}

/// One socket: the `open` handshake, then every message in order, until either side ends.
async fn run(bus: Bus, socket: Arc<Socket<Session>>, mut rx: InboundRx) {
    // Answers during the handshake wait for a client that does not read this long at most;
    // once attached, the writer is ended at most 5 s after the socket closes.
    let patience = Some(bus.config().write_timeout);
    // The same limits on sockets not authenticated yet as for WebSocket stubs.
    let ip = socket
        .req_parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
    let pending = match bus.inner.handshakes.begin(ip) {
        Ok(pending) => pending,
        Err((_, reason, text)) => {
            bus.inner.metrics.refuse(reason);
            tracing::debug!(%ip, text, "socket.io stub refused before its handshake");
            disconnect(&socket);
            return;
        }
    };
    let first = tokio::select! {
        first = rx.first() => first,
        () = tokio::time::sleep(bus.config().handshake_timeout) => None,
    };
    let Some(first) = first else {
        disconnect(&socket);
        return;
    };
    let hello = match hello_of(first) {
        Ok(hello @ Hello::Open(_)) => hello,
        Ok(_) | Err(_) => {
            let refused = json!({"id": null, "type": "response", "from": "mn:/session",
                "body": {"code": 400, "description": "the first message must be an 'open' to mn:/session"}});
            emit(&socket, event(&refused.to_string()), patience).await;
            disconnect(&socket);
            return;
        }
    };
    let token =
        crate::http_auth::presented(&socket.req_parts.headers, &query(&socket)).map(str::to_string);
    let bound = bind_hello(&bus, &hello, token, pending).await;
    // `_slot`: this socket's place among its principal's, kept until it ends.
    let (runtime, principal, _slot) = match bound {
        Ok(bound) => bound,
        Err(refused) => {
            emit(&socket, event(&refused.answer), patience).await;
            disconnect(&socket);
            return;
        }
    };
    if !emit(&socket, event(&hello.answer(200, "connected")), patience).await {
        return;
    }
    rx.bound(bus.config().max_frame_bytes);
    let (tx, mut out) = outbound::channel(
        bus.config().outbound_queue,
        bus.config().outbound_queue_bytes,
    );
    let writer = {
        let socket = Arc::clone(&socket);
        let mut sent = Sent::new(bus.config().max_frame_bytes);
        tokio::spawn(async move {
            while let Some(text) = out.recv().await {
                if !sent.emit(&socket, event(text.as_str())).await {
                    return;
                }
            }
        })
    };
    let conn = match bus.attach(runtime, principal, tx).await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::info!(%e, "socket.io stub not attached");
            writer.abort();
            disconnect(&socket);
            return;
        }
    };
    loop {
        let text = tokio::select! {
            text = rx.recv() => text,
            () = conn.close.cancelled() => None,
            () = conn.tx.closed() => None,
            () = bus.inner.shutdown.cancelled() => None,
        };
        let Some(text) = text else { break };
        if let Some(answer) = on_frame(&bus, &conn, &text).await {
            if !bus.respond(&conn, Utf8Bytes::from(answer)).await {
                break;
            }
        }
        if conn.close.is_cancelled() {
            break;
        }
    }
    bus.detach(&conn);
    drop(conn);
    // What was queued before the close goes out first, then the DISCONNECT.
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    disconnect(&socket);
}

/// The Engine.IO request's query, as pairs.
fn query(socket: &Socket<Session>) -> Vec<(String, String)> {
    let query = socket.req_parts.uri.query().unwrap_or("");
    url_pairs(query)
}

fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (decode(k), decode(v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_read_as_socket_io_writes_them() {
        let open = r#"{"id":1,"type":"open","from":"runtime://localhost/1","to":"mn:/session"}"#;
        for (packet, expected) in [
            (
                format!("2{}", json!(["message", open])),
                Packet::Message(open.into()),
            ),
            (
                format!("212{}", json!(["message", open])),
                Packet::Message(open.into()),
            ),
            (
                format!("2/,{}", json!(["message", {"a": 1}])),
                Packet::Message(r#"{"a":1}"#.into()),
            ),
            (format!("2{}", json!(["other", 1])), Packet::Ignored),
            ("0".into(), Packet::Connect),
            ("1".into(), Packet::Disconnect),
            ("3".into(), Packet::Ignored),
        ] {
            assert_eq!(parse(&packet), Ok(expected), "{packet}");
        }
        for bad in [
            "",
            "2/chat,[\"message\",\"x\"]",
            "2[\"message\",1]",
            "2not json",
            "51-[]",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(event(r#"{"a":1}"#), r#"2["message",{"a":1}]"#);
    }

    #[test]
    fn the_inbound_queue_is_bounded_in_bytes_tiny_before_the_handshake() {
        let mut budget = Budget::new();
        assert!(
            budget.admit(1024 * 1024),
            "the first message, whatever its size"
        );
        assert!(budget.admit(HANDSHAKE_INBOUND_BYTES - 10));
        assert!(!budget.admit(11), "past the handshake's budget");
        budget.taken(HANDSHAKE_INBOUND_BYTES - 10);
        budget.limit = 1000;
        assert!(budget.admit(600));
        assert!(!budget.admit(600), "1,200 > 1,000 waiting");
        budget.taken(600);
        assert!(budget.admit(600), "handled: room again");
    }
}

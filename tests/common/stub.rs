//! A reTHINK protocol stub for tests: a real WebSocket client of the bus that sends
//! messages, waits for the response with the same id, and collects everything else.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as Ws;

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long a test waits for one frame.
pub const WAIT: Duration = Duration::from_secs(10);

/// One connected runtime.
pub struct Stub {
    pub runtime: String,
    socket: Socket,
    /// Frames received that were not the awaited response.
    pub inbox: VecDeque<Value>,
    next_id: u64,
}

/// The upgrade request for `ws://addr/<path>` with `token` in the Authorization header.
pub fn request(
    addr: SocketAddr,
    path_and_query: &str,
    token: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut request = format!("ws://{addr}{path_and_query}")
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    request
}

/// Opens a socket to `ws://addr/<path>` with `token` in the Authorization header.
pub async fn open(addr: SocketAddr, path_and_query: &str, token: &str) -> Socket {
    let (socket, _) = tokio_tungstenite::connect_async(request(addr, path_and_query, token))
        .await
        .expect("websocket connect");
    socket
}

/// As [`open`], over a TCP connection with a small receive buffer: what the node writes to
/// a socket that does not read stays in the node's queue rather than in the kernel's.
pub async fn open_small_window(addr: SocketAddr, path_and_query: &str, token: &str) -> Socket {
    let tcp = tokio::net::TcpSocket::new_v4().expect("socket");
    tcp.set_recv_buffer_size(4096).expect("receive buffer");
    let tcp = tcp.connect(addr).await.expect("connect");
    let (socket, _) = tokio_tungstenite::client_async(
        request(addr, path_and_query, token),
        tokio_tungstenite::MaybeTlsStream::Plain(tcp),
    )
    .await
    .expect("websocket connect");
    socket
}

impl Stub {
    /// Connects with the `?runtimeURL=` handshake.
    pub async fn connect(addr: SocketAddr, runtime: &str, token: &str) -> Stub {
        let path = format!("/ws?runtimeURL={}", urlencode(runtime));
        Stub {
            runtime: runtime.to_string(),
            socket: open(addr, &path, token).await,
            inbox: VecDeque::new(),
            next_id: 1,
        }
    }

    /// Wraps an already handshaken socket.
    pub fn from_socket(socket: Socket, runtime: &str) -> Stub {
        Stub {
            runtime: runtime.to_string(),
            socket,
            inbox: VecDeque::new(),
            next_id: 1000,
        }
    }

    /// Sends a raw text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.socket
            .send(Ws::Text(text.to_string().into()))
            .await
            .expect("send");
    }

    /// Sends a raw binary frame.
    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.socket
            .send(Ws::Binary(bytes.into()))
            .await
            .expect("send");
    }

    /// Sends `message` (an `id` is added when missing); returns the id.
    pub async fn send(&mut self, message: Value) -> Value {
        self.try_send(message).await.expect("send")
    }

    /// As [`Stub::send`]; `None` when the socket is closed.
    async fn try_send(&mut self, mut message: Value) -> Option<Value> {
        if message.get("id").is_none() {
            message["id"] = json!(self.next_id);
            self.next_id += 1;
        }
        let id = message["id"].clone();
        self.socket
            .send(Ws::Text(message.to_string().into()))
            .await
            .ok()?;
        Some(id)
    }

    /// Sends `message` and returns the response with its id (other frames are kept).
    pub async fn request(&mut self, message: Value) -> Value {
        let id = self.send(message).await;
        self.response_to(&id).await
    }

    /// As [`Stub::request`], but `None` instead of a panic when the node closes the socket
    /// first (a connection it refuses).
    pub async fn try_request(&mut self, message: Value) -> Option<Value> {
        let id = self.try_send(message).await?;
        self.try_response_to(&id).await
    }

    /// Waits for the response to `id`.
    pub async fn response_to(&mut self, id: &Value) -> Value {
        self.try_response_to(id)
            .await
            .expect("a response before the socket closed")
    }

    /// As [`Stub::response_to`]; `None` when the socket closes first.
    async fn try_response_to(&mut self, id: &Value) -> Option<Value> {
        if let Some(pos) = self
            .inbox
            .iter()
            .position(|m| m["type"] == "response" && &m["id"] == id)
        {
            return self.inbox.remove(pos);
        }
        loop {
            let frame = self.next_frame().await?;
            if frame["type"] == "response" && &frame["id"] == id {
                return Some(frame);
            }
            self.inbox.push_back(frame);
        }
    }

    /// The next frame that is not a response to this stub's own requests.
    pub async fn recv(&mut self) -> Value {
        if let Some(m) = self.inbox.pop_front() {
            return m;
        }
        self.next_frame()
            .await
            .expect("a frame before the socket closed")
    }

    /// Whether a frame arrives within `within`.
    pub async fn quiet_for(&mut self, within: Duration) -> Option<Value> {
        if let Some(m) = self.inbox.pop_front() {
            return Some(m);
        }
        tokio::time::timeout(within, self.next_frame())
            .await
            .ok()
            .flatten()
    }

    /// The next JSON frame; `None` when the socket closed (the close frame is recorded).
    async fn next_frame(&mut self) -> Option<Value> {
        loop {
            let frame = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("a frame within the wait");
            match frame {
                Some(Ok(Ws::Text(t))) => {
                    return Some(serde_json::from_str(&t).expect("JSON frame"))
                }
                Some(Ok(Ws::Close(frame))) => {
                    self.inbox
                        .push_back(json!({"closed": frame.map(|f| u16::from(f.code))}));
                    return None;
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Waits for the socket's close frame; its code.
    pub async fn closed(&mut self) -> Option<u16> {
        while self.next_frame().await.is_some() {}
        self.inbox
            .iter()
            .find_map(|m| m.get("closed").and_then(Value::as_u64))
            .map(|c| c as u16)
    }

    /// Allocates `n` addresses of `scheme`; returns them.
    pub async fn allocate(&mut self, domain: &str, scheme: &str, n: u64) -> Vec<String> {
        let answer = self
            .request(json!({
                "type": "create", "from": format!("{}/registry/allocation", self.runtime),
                "to": format!("domain://msg-node.{domain}/address-allocation"),
                "body": {"scheme": scheme, "value": {"number": n}},
            }))
            .await;
        assert_eq!(answer["body"]["code"], 200, "allocation: {answer}");
        answer["body"]["value"]["allocated"]
            .as_array()
            .expect("allocated")
            .iter()
            .map(|v| v.as_str().expect("address").to_string())
            .collect()
    }

    /// Registers `hyperty` (held by this stub) in the built-in registry as a chat hyperty of
    /// `user` (`comm` objects, resource `chat`); the registry's response.
    pub async fn register_chat_hyperty(&mut self, hyperty: &str, user: &str) -> Value {
        self.request(
            json!({"type": "create", "from": hyperty, "to": "domain://registry.localhost",
            "body": {"value": {"url": hyperty, "descriptor": "hyperty-catalogue://localhost/Chat",
                "user": user, "dataSchemes": ["comm"], "resources": ["chat"]}}}),
        )
        .await
    }

    /// Closes the socket without a disconnect.
    pub async fn drop_socket(mut self) {
        let _ = self.socket.close(None).await;
    }
}

/// Percent-encodes a query value.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Sends 64 KiB messages from `filler` (runtime address `from`) to `to`, whose runtime does
/// not read, until they stop going anywhere: its queue and the sockets' buffers stay full
/// (nothing sent for two looks a second apart). The task that keeps trying (abort it).
pub async fn fill_until_stuck(
    mut filler: Stub,
    from: String,
    to: String,
) -> tokio::task::JoinHandle<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const MOST: usize = 4000;
    let sent = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&sent);
    let task = tokio::spawn(async move {
        let pad = "x".repeat(64 * 1024);
        for n in 0..MOST {
            filler
                .send(json!({"type": "create", "from": from, "to": to, "body": {"value": {"n": n, "pad": pad}}}))
                .await;
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let (mut last, mut still) = (usize::MAX, 0);
    while still < 2 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = sent.load(Ordering::Relaxed);
        assert!(now < MOST, "the receiver's queue never filled");
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    task
}

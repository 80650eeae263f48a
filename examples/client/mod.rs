//! A minimal reTHINK protocol stub: the client side of msgnode's message bus, shared by the
//! `stub` and `demo` examples.
//!
//! A stub speaks for one runtime (`runtime://<domain>/<name>`). It logs in to Matrix through
//! the node's proxy (or is given an access token), opens `ws://…/ws?runtimeURL=<runtime>`
//! with `Authorization: Bearer <token>`, and then exchanges reTHINK messages — JSON objects
//! with `id`, `type`, `from`, `to` and `body` — one per WebSocket text frame. Requests to the
//! node's components (address allocation, subscription manager, `mn:/session`) are answered
//! with a `response` carrying the request's `id`; so is any message the node refuses (403
//! with the policy's reasons in `body.description`). Everything else is routed to the
//! runtimes holding the destination address.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message as Ws;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long a request waits for its response from a node component.
pub const COMPONENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Logs `user` in with `password` through the node's Matrix proxy; the access token.
pub async fn login(homeserver: &str, user: &str, password: &str) -> Result<String> {
    let url = format!(
        "{}/_matrix/client/v3/login",
        homeserver.trim_end_matches('/')
    );
    let body = json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user},
        "password": password,
    });
    let response = reqwest::Client::new()
        .post(&url)
        .json(&body)
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .with_context(|| {
            format!("cannot reach the Matrix proxy at {homeserver} (is ./scripts/run running?)")
        })?;
    let status = response.status();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let error = answer["error"].as_str().unwrap_or("no error message");
        bail!("login as '{user}' refused ({status}): {error} (wrong password, or no such user: `scripts/synapse register {user} PASSWORD` creates one)");
    }
    answer["access_token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("login answer has no access_token: {answer}"))
}

/// One connected runtime.
pub struct Stub {
    /// The runtime URL this socket speaks for.
    pub runtime: String,
    /// The node's domain (`localhost` for a local Synapse).
    pub domain: String,
    socket: Socket,
    /// Frames read while waiting for a particular response.
    backlog: VecDeque<Value>,
    next_id: u64,
}

impl Stub {
    /// Connects to the bus at `bus_url` (`ws://127.0.0.1:9090/ws`) as `runtime`, and checks
    /// the token with a `ping` to `mn:/session` (the `?runtimeURL=` handshake has no answer
    /// of its own when it succeeds; a refused one is answered 401/403 and closed).
    pub async fn connect(bus_url: &str, runtime: &str, domain: &str, token: &str) -> Result<Stub> {
        let url = format!(
            "{bus_url}?runtimeURL={}",
            utf8_percent_encode(runtime, NON_ALPHANUMERIC)
        );
        let mut request = url
            .as_str()
            .into_client_request()
            .with_context(|| format!("invalid bus URL {bus_url:?}"))?;
        let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
            .context("the access token contains characters not allowed in a header")?;
        request.headers_mut().insert("authorization", bearer);
        // (tungstenite's errors repeat their source in their message: no context chain.)
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .map_err(|e| {
                anyhow!("cannot connect to the bus at {bus_url} (is ./scripts/run running?): {e}")
            })?;
        let mut stub = Stub {
            runtime: runtime.to_string(),
            domain: domain.to_string(),
            socket,
            backlog: VecDeque::new(),
            next_id: 1,
        };
        let ping = json!({"type": "ping", "from": runtime, "to": "mn:/session"});
        let answer = stub
            .request(ping, COMPONENT_TIMEOUT)
            .await
            .context("the bus did not accept the connection")?;
        if code(&answer) != 200 {
            bail!("the bus refused the connection: {}", describe(&answer));
        }
        Ok(stub)
    }

    /// `domain://msg-node.<D>/<component>`.
    pub fn node_address(&self, component: &str) -> String {
        format!("domain://msg-node.{}/{component}", self.domain)
    }

    /// Sends `message`, adding an `id` when it has none; returns the id.
    pub async fn send(&mut self, mut message: Value) -> Result<Value> {
        if message.get("id").is_none() {
            message["id"] = json!(self.next_id);
            self.next_id += 1;
        }
        let id = message["id"].clone();
        self.socket
            .send(Ws::Text(message.to_string().into()))
            .await
            .context("cannot send on the bus socket")?;
        Ok(id)
    }

    /// Sends `message` and waits up to `timeout` for the response with its id. Other frames
    /// that arrive meanwhile are kept for [`Stub::next`].
    pub async fn request(&mut self, message: Value, timeout: Duration) -> Result<Value> {
        let id = self.send(message).await?;
        self.response_to(&id, timeout)
            .await?
            .ok_or_else(|| anyhow!("no response within {}", humantime::format_duration(timeout)))
    }

    /// Waits up to `timeout` for the response to `id`; `None` when none came.
    pub async fn response_to(&mut self, id: &Value, timeout: Duration) -> Result<Option<Value>> {
        if let Some(pos) = self.backlog.iter().position(|m| is_response_to(m, id)) {
            return Ok(self.backlog.remove(pos));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let Some(frame) = self.read_until(deadline).await? else {
                return Ok(None);
            };
            if is_response_to(&frame, id) {
                return Ok(Some(frame));
            }
            // A refused handshake is answered with id null before the socket closes.
            if frame["type"] == "response" && frame["id"].is_null() && code(&frame) >= 400 {
                bail!("{}", describe(&frame));
            }
            self.backlog.push_back(frame);
        }
    }

    /// The next message (kept or newly read) within `timeout`; `None` when none came.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<Value>> {
        if let Some(m) = self.backlog.pop_front() {
            return Ok(Some(m));
        }
        self.read_until(Instant::now() + timeout).await
    }

    /// Reads one JSON frame; `Ok(None)` at the deadline; an error when the socket closed.
    async fn read_until(&mut self, deadline: Instant) -> Result<Option<Value>> {
        loop {
            let frame = match tokio::time::timeout_at(deadline, self.socket.next()).await {
                Err(_) => return Ok(None),
                Ok(frame) => frame,
            };
            match frame {
                Some(Ok(Ws::Text(text))) => match serde_json::from_str(text.as_str()) {
                    Ok(value) => return Ok(Some(value)),
                    Err(e) => eprintln!("! ignored a frame that is not JSON ({e}): {text}"),
                },
                Some(Ok(Ws::Close(Some(frame)))) => bail!(
                    "the node closed the connection (code {}{})",
                    u16::from(frame.code),
                    if frame.reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", frame.reason)
                    }
                ),
                Some(Ok(Ws::Close(None))) | None => bail!("the node closed the connection"),
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("the bus connection failed: {e}"),
            }
        }
    }

    /// Allocates `number` addresses of `scheme` (`hyperty`, `comm`, …) from the node's
    /// address allocation; they are bound to this runtime at once.
    pub async fn allocate(&mut self, scheme: &str, number: u64) -> Result<Vec<String>> {
        let request = json!({
            "type": "create",
            "from": format!("{}/registry/allocation", self.runtime),
            "to": self.node_address("address-allocation"),
            "body": {"scheme": scheme, "value": {"number": number}},
        });
        let answer = self.request(request, COMPONENT_TIMEOUT).await?;
        if code(&answer) != 200 {
            bail!("allocation refused: {}", describe(&answer));
        }
        let allocated: Vec<String> = answer["body"]["value"]["allocated"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        if allocated.len() as u64 != number {
            bail!("allocation answered without the addresses: {answer}");
        }
        Ok(allocated)
    }

    /// Subscribes `subscriber` (an address of this runtime) to `resources`; the node's
    /// response (200, or 403 with the policy's reasons).
    pub async fn subscribe(&mut self, resources: &[String], subscriber: &str) -> Result<Value> {
        let request = json!({
            "type": "subscribe",
            "from": format!("{}/sm", self.runtime),
            "to": self.node_address("sm"),
            "body": {"resources": resources, "source": subscriber},
        });
        self.request(request, COMPONENT_TIMEOUT).await
    }

    /// Answers `request` from `from` with `code` (the reTHINK response rule: same id, `from`
    /// and `to` swapped).
    pub async fn respond(
        &mut self,
        request: &Value,
        from: &str,
        code: u16,
        text: &str,
    ) -> Result<()> {
        let response = json!({
            "id": request["id"],
            "type": "response",
            "from": from,
            "to": request["from"],
            "body": {"code": code, "description": text},
        });
        self.send(response).await.map(|_| ())
    }

    /// Releases everything bound to this runtime (`{"cmd":"disconnect"}`) and closes.
    pub async fn disconnect(mut self) {
        let command = json!({"cmd": "disconnect", "data": {"runtimeURL": self.runtime}});
        if self
            .socket
            .send(Ws::Text(command.to_string().into()))
            .await
            .is_ok()
        {
            // The node releases the runtime's addresses and closes the socket.
            let deadline = Instant::now() + Duration::from_secs(3);
            while let Ok(Some(_)) = self.read_until(deadline).await {}
        }
        let _ = self.socket.close(None).await;
    }
}

fn is_response_to(message: &Value, id: &Value) -> bool {
    message["type"]
        .as_str()
        .is_some_and(|t| t.eq_ignore_ascii_case("response"))
        && &message["id"] == id
}

/// `body.code` of a response (0 when absent).
pub fn code(message: &Value) -> u64 {
    message["body"]["code"].as_u64().unwrap_or(0)
}

/// `to` as a list (it may be one URL or an array).
pub fn destinations(message: &Value) -> Vec<&str> {
    match &message["to"] {
        Value::String(s) => vec![s.as_str()],
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

/// One line for a received message: `response 403: <reason>`, or
/// `create from <from> to <to> {body}`.
pub fn describe(message: &Value) -> String {
    let kind = message["type"].as_str().unwrap_or("?");
    let body = &message["body"];
    let mut line = String::new();
    if kind.eq_ignore_ascii_case("response") {
        let code = code(message);
        let _ = write!(line, "response {code}");
        // A refusal by the node carries the request's `to` as `from` (the response rule):
        // naming it would suggest the destination refused.
        if let Some(from) = message["from"].as_str().filter(|_| code < 300) {
            let _ = write!(line, " from {from}");
        }
        if let Some(text) = body["description"].as_str().filter(|t| !t.is_empty()) {
            let _ = write!(line, ": {text}");
        }
        if !body["value"].is_null() {
            let _ = write!(line, " {}", body["value"]);
        }
        return line;
    }
    let _ = write!(
        line,
        "{kind} from {} to {}",
        message["from"].as_str().unwrap_or("?"),
        destinations(message).join(", ")
    );
    if !body.is_null() {
        let _ = write!(line, " {body}");
    }
    line
}

/// A runtime name unique enough for a demo: `<prefix>-<8 hex digits>`.
pub fn runtime_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &id[..8])
}

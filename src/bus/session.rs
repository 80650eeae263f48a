//! The session component, `mn:/session` (Session Management): `open`/`re-open`/`ping`/`read`
//! after the handshake are acknowledged with the runtime URL; `close`/`disconnect` releases
//! everything bound to the runtime and closes the socket, without an answer (as the
//! reference nodes: the Node.js stub reads any 200 from `mn:/session` as "connected" again).
//! Decided by no one: these messages reach nobody else.

use serde_json::json;

use super::{Bus, Connection};
use crate::rethink::{BusError, Message};

/// What a message to the session asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SessionOp {
    /// `open`, `re-open`, `ping`, `read`: acknowledged.
    Open,
    /// `close`, `disconnect`: release and close.
    Close,
}

impl SessionOp {
    /// The operation `message` asks for.
    ///
    /// # Errors
    /// 400 for any other type.
    pub(super) fn parse(message: &Message) -> Result<SessionOp, BusError> {
        match message.kind.to_ascii_lowercase().as_str() {
            "close" | "disconnect" => Ok(SessionOp::Close),
            "open" | "re-open" | "ping" | "read" => Ok(SessionOp::Open),
            other => Err(BusError::BadRequest(format!(
                "the session answers open, re-open, ping, read, close and disconnect, not '{other}'"
            ))),
        }
    }
}

impl Bus {
    /// Carries out a session operation; the response (none to a close: the socket closes).
    pub(super) async fn session(
        &self,
        conn: &Connection,
        message: &Message,
        op: SessionOp,
    ) -> Result<Option<String>, BusError> {
        match op {
            SessionOp::Close => {
                self.release(conn).await?;
                conn.close.cancel();
                Ok(None)
            }
            SessionOp::Open => Ok(Some(message.response(
                200,
                "",
                Some(json!({"runtimeURL": conn.runtime.url})),
            ))),
        }
    }
}

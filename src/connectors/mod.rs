//! Connectors: what the bus hands a message to when no local runtime holds its address.
//!
//! One small trait, [`Connector`], for the node components that answer messages, chosen by
//! address:
//! - `domain://registry.<D>` → [`registry`] (built-in, in Matrix state, or a domain registry
//!   over HTTP);
//! - `domain://idm.<D>` → [`idm`] (it also verifies `body.identity` for every message).
//!
//! Addresses of another domain go to [`foreign`] (that domain's node, over HTTP), which the
//! bus's router calls directly: it delivers one message to several destinations at once.
//!
//! The End-User Device and Network Server connectors are the bus's WebSocket sessions
//! (`bus::socket`): the same protocol, authenticated with a Matrix access token or a
//! configured service token.

pub mod foreign;
pub mod idm;
pub mod registry;

use futures_util::future::BoxFuture;
use serde_json::Value;

use crate::rethink::{BusError, Message};

/// The sender of a message a connector handles.
#[derive(Clone, Copy)]
pub struct Sender<'a> {
    /// Its runtime URL.
    pub runtime: &'a str,
    /// Its Matrix user, if any.
    pub user: Option<&'a str>,
    /// Its verified identity (`user://idp/name`), else the one its Matrix user implies
    /// (`user://<D>/<localpart>`), if any.
    pub identity: Option<&'a str>,
    /// An identity the sender names but did not verify, which the policy accepts as its
    /// own for this message (`kind: "claim"`, `identity`; off unless the policy's data says).
    pub accepted_identity: Option<&'a str>,
    /// Whether the sender's runtime holds an address (or the address it belongs to).
    pub holds: &'a (dyn Fn(&str) -> bool + Send + Sync),
}

impl Sender<'_> {
    /// Who a registration by this sender is filed under: `(user, claimed)` — `user` is its
    /// verified identity (what look-ups by user match) or the unverified one the policy
    /// accepted, `claimed` the `value.user` it gave when that is something else (kept, never
    /// trusted: runtimes send e-mail addresses).
    pub fn registrant(&self, claimed: Option<&str>) -> (Option<String>, Option<String>) {
        let user = match (self.accepted_identity, claimed) {
            (Some(accepted), Some(claimed)) if accepted == claimed => Some(accepted.to_string()),
            _ => self.identity.map(str::to_string),
        };
        let identity = user.as_deref();
        let claimed = claimed.filter(|c| Some(*c) != identity).map(str::to_string);
        (user, claimed)
    }

    /// Checks that the sender's runtime holds `url`.
    ///
    /// # Errors
    /// 403 otherwise.
    pub fn must_hold(&self, url: &str) -> Result<(), BusError> {
        if (self.holds)(url) {
            Ok(())
        } else {
            Err(BusError::Forbidden(format!(
                "'{url}' is not an address of this runtime"
            )))
        }
    }
}

/// What a connector answers.
#[derive(Debug, Default)]
pub struct Reply {
    /// A response message for the sender.
    pub response: Option<String>,
    /// A notification to publish through the bus: `(to, message)` (e.g. a registration
    /// status change to `<url>/registration` subscribers).
    pub publish: Option<Value>,
}

impl Reply {
    /// Just a response.
    pub fn response(text: String) -> Self {
        Reply {
            response: Some(text),
            publish: None,
        }
    }
}

/// The reply of `work`, or the error response for what it failed with.
pub fn answer<'a>(
    message: &'a Message,
    work: impl std::future::Future<Output = Result<Reply, BusError>> + Send + 'a,
) -> BoxFuture<'a, Reply> {
    Box::pin(async move {
        work.await
            .unwrap_or_else(|e| Reply::response(message.error_response(&e)))
    })
}

/// One kind of connector.
pub trait Connector: Send + Sync {
    /// Handles one message addressed to it (already allowed by the policy).
    fn handle<'a>(&'a self, message: &'a Message, sender: Sender<'a>) -> BoxFuture<'a, Reply>;
}

/// The body of `answer`, read up to `max` bytes: a longer one is an error, not read further.
pub(crate) async fn read_capped(
    mut answer: reqwest::Response,
    max: usize,
) -> Result<String, String> {
    let mut body = Vec::new();
    while let Some(chunk) = answer.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > max {
            return Err(format!("answer longer than {max} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|_| "answer is not UTF-8".into())
}

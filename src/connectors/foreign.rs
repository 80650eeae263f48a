//! The foreign-domain connector: messages to addresses of another domain go to that domain's
//! node (`[[bus.peers]]`), posted to its `/bus/v1/messages` with the shared token; the peer
//! routes them and may answer with a response message (e.g. 404), which is relayed to the
//! sender. Inbound, a peer presenting its token may post messages from addresses of its own
//! domain (see `bus::session`). Matrix federation as a transport is not built.

use std::time::Duration;

use crate::bus::address::domain;
use crate::bus::message::{BusError, Message};
use crate::config::Peer;

/// Route to other domains' nodes.
pub struct Foreign {
    peers: Vec<Peer>,
    http: reqwest::Client,
}

impl Foreign {
    /// The connector for `peers`.
    pub fn new(peers: Vec<Peer>) -> Self {
        Self {
            peers,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
        }
    }

    /// The peer of `domain`.
    pub fn peer(&self, domain: &str) -> Option<&Peer> {
        self.peers
            .iter()
            .find(|p| p.domain.eq_ignore_ascii_case(domain))
    }

    /// The peer presenting `token` (compared in constant time).
    pub fn peer_by_token(&self, token: &str) -> Option<&Peer> {
        self.peers
            .iter()
            .find(|p| crate::http_auth::token_matches(token, &p.token))
    }

    /// Posts `message` to the peer of each of `targets`; the first response (or error
    /// response) for the sender.
    pub async fn deliver(&self, message: &Message, targets: &[String]) -> Option<String> {
        let mut response = None;
        for to in targets {
            match self.send(message, to).await {
                Ok(Some(answer)) if response.is_none() => response = Some(answer),
                Ok(_) => {}
                Err(e) if response.is_none() => response = Some(message.error_response(&e)),
                Err(e) => tracing::warn!(%e, to, "foreign delivery failed"),
            }
        }
        response
    }

    async fn send(&self, message: &Message, to: &str) -> Result<Option<String>, BusError> {
        let target = domain(to).unwrap_or_default();
        let peer = self
            .peer(&target)
            .ok_or_else(|| BusError::NotFound(format!("no route to domain '{target}'")))?;
        let answer = self
            .http
            .post(format!(
                "{}/bus/v1/messages",
                peer.url.trim_end_matches('/')
            ))
            .bearer_auth(&peer.token)
            .header("content-type", "application/json")
            .body(message.text.as_str().to_owned())
            .send()
            .await
            .map_err(|e| BusError::Unavailable(format!("node of '{target}' unavailable: {e}")))?;
        let status = answer.status();
        let text = answer.text().await.unwrap_or_default();
        if status.is_success() {
            Ok((!text.trim().is_empty()).then_some(text))
        } else {
            Err(BusError::Unavailable(format!(
                "node of '{target}' refused the message ({status}): {text}"
            )))
        }
    }
}

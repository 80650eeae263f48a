//! The identity-management connector: verifies the user identity a message asserts in
//! `body.identity` before it reaches the policy (the verified identity is the input's
//! `subject.identity`), and answers messages to `domain://idm.<D>`.
//!
//! Local validator (default): a Matrix user may assert `user://<node domain>/<localpart>`,
//! and the identities `[bus.idm] identities` lists for it. With `[bus.idm] url`, an identity
//! provider decides: `POST url {"user", "identity", "assertion"}` → 200 `{"identity"}`.
//! Verified identities are remembered per (user, identity, assertion) for a minute; the
//! assertion by its SHA-256 digest and identities longer than a URL may be are never
//! remembered, so an entry is small whatever a sender pads its assertion with.

use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::{json, Map, Value};

use super::{Connector, Reply, Sender};
use crate::config::IdmConfig;
use crate::rethink::{BusError, Message};

/// Longest identity URL whose verification is remembered.
const MAX_REMEMBERED_IDENTITY: usize = 2048;

/// Identity verification.
pub struct Idm {
    config: IdmConfig,
    domain: String,
    http: reqwest::Client,
    /// (user, asserted identity, SHA-256 of the assertion) → verified identity.
    verified: moka::sync::Cache<(Option<String>, String, [u8; 32]), String>,
}

impl Idm {
    /// The validator of the node of `domain`.
    pub fn new(config: IdmConfig, domain: &str) -> Self {
        Self {
            config,
            domain: domain.to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
            verified: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
        }
    }

    /// The identity every Matrix user of this node has: `user://<domain>/<localpart>`.
    pub fn own_identity(&self, user: &str) -> String {
        let localpart = user.trim_start_matches('@').split(':').next().unwrap_or("");
        format!("user://{}/{localpart}", self.domain)
    }

    /// The identity URL a message body asserts: `identity` as a string, or an object carrying
    /// one (`userProfile.userURL`, `userURL`, `identity`).
    pub fn claimed(body: &Map<String, Value>) -> Option<&str> {
        let identity = body.get("identity")?;
        if let Some(s) = identity.as_str() {
            return Some(s);
        }
        identity
            .pointer("/userProfile/userURL")
            .or_else(|| identity.get("userURL"))
            .or_else(|| identity.get("identity"))
            .and_then(Value::as_str)
    }

    /// Checks that `user` may assert `identity`; the verified identity.
    ///
    /// # Errors
    /// 403 when it may not, 408 when the identity provider cannot answer.
    pub async fn verify(
        &self,
        user: Option<&str>,
        identity: &str,
        assertion: Option<&Value>,
    ) -> Result<String, BusError> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(
            assertion
                .map(Value::to_string)
                .unwrap_or_default()
                .as_bytes(),
        )
        .into();
        let key = (user.map(str::to_string), identity.to_string(), digest);
        if let Some(verified) = self.verified.get(&key) {
            return Ok(verified);
        }
        let verified = match &self.config.url {
            None => self.verify_locally(user, identity)?,
            Some(url) => self.verify_remotely(url, user, identity, assertion).await?,
        };
        if identity.len() <= MAX_REMEMBERED_IDENTITY {
            self.verified.insert(key, verified.clone());
        }
        Ok(verified)
    }

    fn verify_locally(&self, user: Option<&str>, identity: &str) -> Result<String, BusError> {
        let refused = || {
            BusError::Forbidden(format!(
                "identity '{identity}' is not verified for {}",
                user.unwrap_or("this connection")
            ))
        };
        let user = user.ok_or_else(refused)?;
        let own = self.own_identity(user);
        let listed = self
            .config
            .identities
            .get(user)
            .is_some_and(|ids| ids.iter().any(|i| i == identity));
        if identity == own || listed {
            Ok(identity.to_string())
        } else {
            Err(refused())
        }
    }

    async fn verify_remotely(
        &self,
        url: &str,
        user: Option<&str>,
        identity: &str,
        assertion: Option<&Value>,
    ) -> Result<String, BusError> {
        let answer = self
            .http
            .post(url)
            .json(&json!({"user": user, "identity": identity, "assertion": assertion}))
            .send()
            .await
            .map_err(|e| BusError::Unavailable(format!("identity provider unavailable: {e}")))?;
        if answer.status().is_server_error() {
            return Err(BusError::Unavailable(format!(
                "identity provider unavailable ({})",
                answer.status()
            )));
        }
        if !answer.status().is_success() {
            return Err(BusError::Forbidden(format!(
                "identity provider refused '{identity}' ({})",
                answer.status()
            )));
        }
        let body: Value = answer.json().await.map_err(|e| {
            BusError::Unavailable(format!("identity provider answered garbage: {e}"))
        })?;
        body.get("identity")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| BusError::Unavailable("identity provider gave no identity".into()))
    }
}

impl Connector for Idm {
    fn handle<'a>(&'a self, message: &'a Message, sender: Sender<'a>) -> BoxFuture<'a, Reply> {
        Box::pin(async move {
            if !message.kind_is("read") {
                return Reply::response(message.response(
                    400,
                    &format!("identity management answers read, not '{}'", message.kind),
                    None,
                ));
            }
            let value = json!({"user": sender.user, "identity": sender.identity});
            Reply::response(message.response(200, "", Some(value)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_validator() {
        let mut config = IdmConfig::default();
        config.identities.insert(
            "@alice:localhost".into(),
            vec!["user://idp.example/alice".into()],
        );
        let idm = Idm::new(config, "localhost");
        assert!(idm
            .verify(Some("@alice:localhost"), "user://localhost/alice", None)
            .await
            .is_ok());
        assert!(idm
            .verify(Some("@alice:localhost"), "user://idp.example/alice", None)
            .await
            .is_ok());
        let err = idm
            .verify(Some("@bob:localhost"), "user://idp.example/alice", None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), 403);
        assert!(idm
            .verify(None, "user://localhost/alice", None)
            .await
            .is_err());
    }

    #[test]
    fn claimed_identity_shapes() {
        let body = |v: Value| v.as_object().cloned().unwrap_or_default();
        assert_eq!(
            Idm::claimed(&body(json!({"identity": "user://a/b"}))),
            Some("user://a/b")
        );
        assert_eq!(
            Idm::claimed(&body(
                json!({"identity": {"userProfile": {"userURL": "user://a/c"}}})
            )),
            Some("user://a/c")
        );
        assert_eq!(Idm::claimed(&body(json!({}))), None);
    }
}

//! A stand-in origin homeserver for the policy server's tests and benchmark: its own
//! ed25519 key, events hashed and signed as a homeserver makes them, and `/sign` requests
//! signed with `X-Matrix` — all with ruma, as a real homeserver's would verify.

use ruma::api::federation::authentication::XMatrixSigningInput;
use ruma::api::federation::policy::sign_event;
use ruma::api::OutgoingRequestExt;
use ruma::canonical_json::CanonicalJsonObject;
use ruma::signatures::{Ed25519KeyPair, PublicKeySet};
use ruma::{OwnedServerName, RoomVersionId};
use serde_json::Value;

/// A homeserver that asks the policy server.
pub struct Origin {
    /// Its server name.
    pub name: OwnedServerName,
    /// Its signing key (`ed25519:origin`).
    pub key: Ed25519KeyPair,
}

impl Origin {
    /// A homeserver named `name` with a fresh key.
    ///
    /// # Errors
    /// `name` is not a server name, or the key cannot be made.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        Ok(Self {
            name: OwnedServerName::try_from(name)?,
            key: Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "origin".to_string())?,
        })
    }

    /// Its public keys, as the key server would give them.
    pub fn public_keys(&self) -> PublicKeySet {
        [(
            "ed25519:origin".to_string(),
            ruma::serde::Base64::new(self.key.public_key().to_vec()),
        )]
        .into()
    }

    /// An event (`fields`: `room_id`, `sender`, `type`, `content`, …) completed as a room
    /// version 12 event and hashed and signed by this server.
    ///
    /// # Errors
    /// `fields` is not a JSON object of canonical values.
    pub fn event(&self, fields: Value) -> anyhow::Result<CanonicalJsonObject> {
        let mut event: CanonicalJsonObject = serde_json::from_value(fields)?;
        for (field, default) in [
            ("origin_server_ts", serde_json::json!(1_764_000_000_000u64)),
            ("depth", serde_json::json!(10)),
            ("prev_events", serde_json::json!(["$prev"])),
            ("auth_events", serde_json::json!(["$auth"])),
        ] {
            if !event.contains_key(field) {
                event.insert(field.to_string(), serde_json::from_value(default)?);
            }
        }
        let rules = RoomVersionId::V12
            .rules()
            .ok_or_else(|| anyhow::anyhow!("no v12 rules"))?;
        ruma::signatures::hash_and_sign_event(
            self.name.as_str(),
            &self.key,
            &mut event,
            &rules.redaction,
        )?;
        Ok(event)
    }

    /// `POST /_matrix/policy/v1/sign` of `body` to `base_url`, addressed to `destination`
    /// and signed by this server.
    ///
    /// # Errors
    /// The body is not JSON, or the request cannot be made.
    pub fn sign_request(
        &self,
        base_url: &str,
        destination: &str,
        body: &[u8],
    ) -> anyhow::Result<axum::http::Request<Vec<u8>>> {
        let raw: Box<serde_json::value::RawValue> = serde_json::from_slice(body)?;
        let request = sign_event::v1::Request::new(raw);
        let signing = XMatrixSigningInput::new(
            self.name.clone(),
            OwnedServerName::try_from(destination)?,
            &self.key,
        );
        Ok(request.try_into_http_request::<Vec<u8>>(base_url, signing, ())?)
    }
}

/// A policy server on loopback TLS, deciding in-process with the bundle in `policies`,
/// knowing its origin's keys and one room version 12 room: what the wire tests and the
/// benchmark drive. Stopped when dropped.
pub struct Loopback {
    /// The server.
    pub server: super::PolicyServer,
    /// `https://127.0.0.1:<port>`.
    pub base: String,
    /// The homeserver that asks it (also its `[pep] server_name`).
    pub origin: Origin,
    stop: tokio_util::sync::CancellationToken,
}

impl Loopback {
    /// Starts one with its keys and certificate in `state_dir`, for `origin`'s events in
    /// `room`; `tune` adjusts the configuration.
    ///
    /// # Errors
    /// The bundle does not load, or the server cannot start.
    pub async fn start(
        policies: &std::path::Path,
        state_dir: &std::path::Path,
        origin: &str,
        room: &str,
        tune: impl FnOnce(&mut crate::config::PolicyServerConfig),
    ) -> anyhow::Result<Self> {
        let mut pdp_config = crate::config::PdpConfig {
            policies: policies.to_path_buf(),
            ..crate::config::PdpConfig::default()
        };
        pdp_config.decision_log.enabled = false;
        let pdp = crate::pdp::Pdp::builder(&pdp_config).build()?;
        pdp.reload()?;
        let mut config = crate::config::PolicyServerConfig {
            enabled: true,
            listen: "127.0.0.1:0".parse()?,
            state_dir: state_dir.to_path_buf(),
            ..crate::config::PolicyServerConfig::default()
        };
        tune(&mut config);
        let stop = tokio_util::sync::CancellationToken::new();
        let mut registry = prometheus_client::registry::Registry::default();
        let started = super::start(
            &config,
            origin,
            crate::policy::Decider::Local(pdp),
            None,
            &mut registry,
            &stop,
            &tokio_util::task::TaskTracker::new(),
        )
        .await?;
        let origin = Origin::new(origin)?;
        started
            .server
            .keyring()
            .insert_fixed(origin.name.as_str(), origin.public_keys());
        started.server.note_room(room, RoomVersionId::V12);
        Ok(Self {
            server: started.server,
            base: format!("https://{}", started.addr),
            origin,
            stop,
        })
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

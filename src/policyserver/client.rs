//! The policy server as a federation client: requests to other homeservers (their keys, a
//! join, an event), built from ruma's request types and signed with `X-Matrix` by the
//! federation key. Where a server is: `[policy_server] servers`, else `https://<name>`
//! (port 8448 unless named) after its `/.well-known/matrix/server` when the name has no
//! port and is not an IP literal. SRV records are not looked up.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ruma::api::auth_scheme::NoAuthentication;
use ruma::api::federation::authentication::{ServerSignatures, XMatrixSigningInput};
use ruma::api::path_builder::SinglePath;
use ruma::api::{IncomingResponse, IncomingResponseExt, OutgoingRequest, OutgoingRequestExt};
use ruma::{OwnedServerName, ServerName};

use super::keys::Keys;

/// Largest answer read from another server (a `send_join` answer without members).
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// Why a federation request gave no usable answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached, or did not answer in time.
    #[error("{server} unreachable: {why}")]
    Unreachable {
        /// The server name.
        server: String,
        /// What went wrong.
        why: String,
    },
    /// The server answered with an error or something unusable.
    #[error("{server} answered: {why}")]
    Answer {
        /// The server name.
        server: String,
        /// What it said.
        why: String,
    },
    /// The request could not be made (a bug, or an unusable server name).
    #[error("cannot make the request to {server}: {why}")]
    Request {
        /// The server name.
        server: String,
        /// What went wrong.
        why: String,
    },
}

/// Talks to other homeservers as the policy server.
pub struct FederationClient {
    http: reqwest::Client,
    our_name: OwnedServerName,
    keys: Arc<Keys>,
    servers: BTreeMap<String, String>,
    /// Delegations learnt from `.well-known` (name → base URL).
    resolved: moka::sync::Cache<String, String>,
}

impl FederationClient {
    /// A client signing as `our_name` with `keys`.
    ///
    /// # Errors
    /// The HTTP client cannot be built.
    pub fn new(
        our_name: OwnedServerName,
        keys: Arc<Keys>,
        servers: BTreeMap<String, String>,
        verify_certificates: bool,
        timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .danger_accept_invalid_certs(!verify_certificates)
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self {
            http,
            our_name,
            keys,
            servers,
            resolved: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(3600))
                .build(),
        })
    }

    /// `request` to `destination`, signed with `X-Matrix`.
    ///
    /// # Errors
    /// Unreachable, an error answer, or an answer that is not the endpoint's.
    pub async fn send<R>(
        &self,
        destination: &ServerName,
        request: R,
    ) -> Result<R::IncomingResponse, ClientError>
    where
        R: OutgoingRequest<Authentication = ServerSignatures, PathBuilder = SinglePath>,
    {
        let base = self.base_url(destination).await?;
        let signing = XMatrixSigningInput::new(
            self.our_name.clone(),
            destination.to_owned(),
            &self.keys.federation,
        );
        let http = request
            .try_into_http_request::<Vec<u8>>(&base, signing, ())
            .map_err(|e| self.request_error(destination, e))?;
        self.execute::<R::IncomingResponse>(destination, http).await
    }

    /// An unauthenticated `request` (the key server) to `destination`.
    ///
    /// # Errors
    /// As [`FederationClient::send`].
    pub async fn get<R>(
        &self,
        destination: &ServerName,
        request: R,
    ) -> Result<R::IncomingResponse, ClientError>
    where
        R: OutgoingRequest<Authentication = NoAuthentication, PathBuilder = SinglePath>,
    {
        let base = self.base_url(destination).await?;
        let http = request
            .try_into_http_request::<Vec<u8>>(&base, (), ())
            .map_err(|e| self.request_error(destination, e))?;
        self.execute::<R::IncomingResponse>(destination, http).await
    }

    fn request_error(&self, server: &ServerName, why: impl std::fmt::Display) -> ClientError {
        ClientError::Request {
            server: server.to_string(),
            why: why.to_string(),
        }
    }

    async fn execute<T: IncomingResponse>(
        &self,
        server: &ServerName,
        request: axum::http::Request<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let request =
            reqwest::Request::try_from(request).map_err(|e| self.request_error(server, e))?;
        let unreachable = |e: reqwest::Error| ClientError::Unreachable {
            server: server.to_string(),
            why: e.to_string(),
        };
        let mut response = self.http.execute(request).await.map_err(unreachable)?;
        let status = response.status();
        let headers = response.headers().clone();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(ClientError::Answer {
                    server: server.to_string(),
                    why: format!("answer over {MAX_ANSWER_BYTES} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        let mut answer = axum::http::Response::builder().status(status);
        if let Some(h) = answer.headers_mut() {
            *h = headers;
        }
        let answer = answer
            .body(body.as_slice())
            .map_err(|e| self.request_error(server, e))?;
        T::try_from_http_response(answer).map_err(|e| ClientError::Answer {
            server: server.to_string(),
            why: format!("{status}: {e}"),
        })
    }

    /// Where `server`'s federation API is.
    async fn base_url(&self, server: &ServerName) -> Result<String, ClientError> {
        let name = server.as_str();
        if let Some(url) = self.servers.get(name) {
            return Ok(url.trim_end_matches('/').to_string());
        }
        if server.port().is_some() || server.is_ip_literal() {
            return Ok(format!("https://{name}"));
        }
        if let Some(url) = self.resolved.get(name) {
            return Ok(url);
        }
        let url = match self.well_known(name).await {
            Some(delegated) => match delegated.rsplit_once(':') {
                Some((_, port)) if port.parse::<u16>().is_ok() && !delegated.ends_with(']') => {
                    format!("https://{delegated}")
                }
                _ => format!("https://{delegated}:8448"),
            },
            None => format!("https://{name}:8448"),
        };
        self.resolved.insert(name.to_string(), url.clone());
        Ok(url)
    }

    /// `m.server` of `https://<name>/.well-known/matrix/server`, when it is a server name.
    async fn well_known(&self, name: &str) -> Option<String> {
        let response = self
            .http
            .get(format!("https://{name}/.well-known/matrix/server"))
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        let bytes = response.bytes().await.ok()?;
        if bytes.len() > 64 * 1024 {
            return None;
        }
        let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        let delegated = value.get("m.server")?.as_str()?;
        <&ServerName>::try_from(delegated).ok()?;
        Some(delegated.to_string())
    }
}

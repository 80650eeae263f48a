//! The homeserver's client-server API as msgnode calls it: one connection pool, `/whoami`
//! with a short cache, joined members, and JSON requests — answering typed errors, never
//! HTTP responses (the edges map them: `pep` to Matrix errors, `bus` to reTHINK codes).

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// How long a refused access token is remembered as refused.
pub const REFUSED_TOKEN_TTL: Duration = Duration::from_secs(10);

/// How long the homeserver's default room version is remembered.
pub const ROOM_VERSION_TTL: Duration = Duration::from_secs(600);

/// Why a homeserver call gave no usable answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HomeserverError {
    /// The homeserver could not be reached (or its answer could not be read).
    #[error("homeserver unavailable")]
    Unavailable,
    /// The homeserver refused: its status and JSON body (`{"errcode", "error"}` as a rule).
    #[error("homeserver refused ({status}): {body}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Its JSON body (`null` when it was not JSON).
        body: Value,
    },
    /// The homeserver answered 2xx without what the call needs.
    #[error("unexpected homeserver answer: {0}")]
    Malformed(String),
}

/// Client of one homeserver.
pub struct Homeserver {
    scheme: String,
    authority: String,
    client: Client<HttpConnector, Body>,
    whoami: moka::sync::Cache<(String, Option<String>), String>,
    /// Tokens the homeserver refused (401), by digest, so that random tokens cost one
    /// `/whoami` each per [`REFUSED_TOKEN_TTL`] at most — the answer replayed meanwhile.
    refused: moka::sync::Cache<[u8; 32], Value>,
    /// The homeserver's default room version (from `/capabilities`), kept for a while.
    room_version: moka::sync::Cache<(), String>,
}

impl Homeserver {
    /// A client for `base` (e.g. `http://127.0.0.1:8008`), remembering token owners for `ttl`.
    ///
    /// # Errors
    /// `base` is not an absolute `http` URL.
    pub fn new(base: &str, whoami_ttl: Duration) -> anyhow::Result<Self> {
        let uri: Uri = base.parse()?;
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            anyhow::bail!("[pep] homeserver must be an absolute URL such as http://127.0.0.1:8008, not {base:?}");
        };
        if scheme != "http" {
            anyhow::bail!("[pep] homeserver: only http:// is supported (the homeserver is local)");
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Ok(Self {
            scheme: scheme.to_string(),
            authority: authority.to_string(),
            client: Client::builder(TokioExecutor::new()).build(connector),
            whoami: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(whoami_ttl)
                .build(),
            refused: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(REFUSED_TOKEN_TTL.min(whoami_ttl))
                .build(),
            room_version: moka::sync::Cache::builder()
                .max_capacity(1)
                .time_to_live(ROOM_VERSION_TTL)
                .build(),
        })
    }

    /// The homeserver's `host:port`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The homeserver's URI for `path_and_query`.
    ///
    /// # Errors
    /// `path_and_query` is not a valid URI path.
    pub fn uri(&self, path_and_query: &str) -> Result<Uri, axum::http::Error> {
        Uri::builder()
            .scheme(self.scheme.as_str())
            .authority(self.authority.as_str())
            .path_and_query(path_and_query)
            .build()
    }

    /// Sends `request` as it is (its URI already the homeserver's), streaming both bodies.
    ///
    /// # Errors
    /// [`HomeserverError::Unavailable`] when the homeserver cannot be reached.
    pub async fn send(
        &self,
        request: Request<Body>,
    ) -> Result<hyper::Response<Incoming>, HomeserverError> {
        self.client.request(request).await.map_err(|error| {
            tracing::warn!(%error, "homeserver unreachable");
            HomeserverError::Unavailable
        })
    }

    /// The user an access token (and, for appservices, `user_id` masquerading) acts as.
    ///
    /// # Errors
    /// [`HomeserverError::Refused`] with the homeserver's answer when it rejects the token;
    /// `Unavailable` when it cannot be reached; `Malformed` when it names no user.
    pub async fn whoami(
        &self,
        token: &str,
        user_id: Option<&str>,
    ) -> Result<String, HomeserverError> {
        let key = (token.to_string(), user_id.map(str::to_string));
        if let Some(user) = self.whoami.get(&key) {
            return Ok(user);
        }
        let digest: [u8; 32] = {
            use sha2::Digest;
            let mut hash = sha2::Sha256::new();
            hash.update(token.as_bytes());
            hash.update([0]);
            hash.update(user_id.unwrap_or_default().as_bytes());
            hash.finalize().into()
        };
        if let Some(body) = self.refused.get(&digest) {
            return Err(HomeserverError::Refused { status: 401, body });
        }
        let path = with_user_id("/_matrix/client/v3/account/whoami".to_string(), user_id);
        let (status, body) = self.request_json(Method::GET, &path, token, None).await?;
        if status == 401 {
            self.refused.insert(digest, body.clone());
        }
        if !(200..300).contains(&status) {
            return Err(HomeserverError::Refused { status, body });
        }
        let user = body
            .get("user_id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| {
                HomeserverError::Malformed("homeserver /whoami gave no user_id".into())
            })?;
        self.whoami.insert(key, user.clone());
        Ok(user)
    }

    /// The room version new rooms get (`m.room_versions.default` of `/capabilities`, asked
    /// with `token`; remembered for [`ROOM_VERSION_TTL`]).
    ///
    /// # Errors
    /// The homeserver refused, cannot be reached, or names no default.
    pub async fn default_room_version(&self, token: &str) -> Result<String, HomeserverError> {
        if let Some(version) = self.room_version.get(&()) {
            return Ok(version);
        }
        let (status, body) = self
            .request_json(Method::GET, "/_matrix/client/v3/capabilities", token, None)
            .await?;
        if !(200..300).contains(&status) {
            return Err(HomeserverError::Refused { status, body });
        }
        let version = body["capabilities"]["m.room_versions"]["default"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| {
                HomeserverError::Malformed("/capabilities names no default room version".into())
            })?;
        self.room_version.insert((), version.clone());
        Ok(version)
    }

    /// Users joined to `room_id`, as the requesting user may see them (empty when it may not).
    pub async fn joined_members(
        &self,
        room_id: &str,
        token: &str,
        user_id: Option<&str>,
    ) -> Vec<String> {
        let path = with_user_id(
            format!(
                "/_matrix/client/v3/rooms/{}/joined_members",
                encode(room_id)
            ),
            user_id,
        );
        match self.request_json(Method::GET, &path, token, None).await {
            Ok((status, body)) if (200..300).contains(&status) => body
                .get("joined")
                .and_then(Value::as_object)
                .map(|members| members.keys().cloned().collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// The rooms the caller (`token`, masquerading as `user_id` when set) is joined to.
    ///
    /// # Errors
    /// The homeserver refused, cannot be reached, or gave no list.
    pub async fn joined_rooms(
        &self,
        token: &str,
        user_id: Option<&str>,
    ) -> Result<Vec<String>, HomeserverError> {
        let path = with_user_id("/_matrix/client/v3/joined_rooms".to_string(), user_id);
        let (status, body) = self.request_json(Method::GET, &path, token, None).await?;
        if !(200..300).contains(&status) {
            return Err(HomeserverError::Refused { status, body });
        }
        body.get("joined_rooms")
            .and_then(Value::as_array)
            .map(|rooms| {
                rooms
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .ok_or_else(|| HomeserverError::Malformed("/joined_rooms gave no list".into()))
    }

    /// The room `alias` names and the servers likely in it, the alias's own server first (as
    /// Synapse orders them before a join); `None` when the directory knows no such alias.
    ///
    /// # Errors
    /// The homeserver refused otherwise, cannot be reached, or named no room.
    pub async fn resolve_alias(
        &self,
        alias: &str,
        token: &str,
    ) -> Result<Option<(String, Vec<String>)>, HomeserverError> {
        let path = format!("/_matrix/client/v3/directory/room/{}", encode(alias));
        let (status, body) = self.request_json(Method::GET, &path, token, None).await?;
        if status == 404 {
            return Ok(None);
        }
        if !(200..300).contains(&status) {
            return Err(HomeserverError::Refused { status, body });
        }
        let room_id = body
            .get("room_id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| HomeserverError::Malformed("the directory named no room".into()))?;
        let mut servers: Vec<String> = body
            .get("servers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect();
        if let Some((_, domain)) = alias.split_once(':') {
            if let Some(i) = servers.iter().position(|s| s == domain) {
                let own = servers.remove(i);
                servers.insert(0, own);
            }
        }
        Ok(Some((room_id, servers)))
    }

    /// One JSON request to the homeserver as `token`; the answer's status and JSON body
    /// (`null` when the body is not JSON), whatever the status.
    ///
    /// # Errors
    /// [`HomeserverError::Unavailable`] when the homeserver cannot be reached or its answer
    /// cannot be read.
    pub async fn request_json(
        &self,
        method: Method,
        path_and_query: &str,
        token: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), HomeserverError> {
        let uri = self
            .uri(path_and_query)
            .map_err(|_| HomeserverError::Unavailable)?;
        let body = match body {
            Some(json) => Body::from(json.to_string()),
            None => Body::empty(),
        };
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .map_err(|_| HomeserverError::Unavailable)?;
        let response = self.send(request).await?;
        let status = response.status().as_u16();
        let bytes = http_body_util::BodyExt::collect(response.into_body())
            .await
            .map_err(|_| HomeserverError::Unavailable)?
            .to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, body))
    }
}

/// One path segment or query value, percent-encoded.
pub fn encode(component: &str) -> String {
    percent_encoding::utf8_percent_encode(component, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// `path` acting as `user_id` (appservice masquerading), when there is one.
pub fn with_user_id(path: String, user_id: Option<&str>) -> String {
    match user_id {
        Some(user) => format!("{path}?user_id={}", encode(user)),
        None => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_refused_token_is_asked_about_once() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let app = axum::Router::new().route(
            "/_matrix/client/v3/account/whoami",
            axum::routing::get(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async {
                    (
                        axum::http::StatusCode::UNAUTHORIZED,
                        axum::Json(
                            serde_json::json!({"errcode": "M_UNKNOWN_TOKEN", "error": "no"}),
                        ),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let homeserver =
            Homeserver::new(&format!("http://{addr}"), Duration::from_secs(30)).expect("client");
        for _ in 0..3 {
            let refused = homeserver.whoami("random", None).await;
            assert!(
                matches!(&refused, Err(HomeserverError::Refused { status: 401, body }) if body["errcode"] == "M_UNKNOWN_TOKEN"),
                "{refused:?}"
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let _ = homeserver.whoami("another", None).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2, "each token is asked about");
    }
}

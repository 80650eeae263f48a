//! Other servers' federation keys, to verify their `X-Matrix` requests and their signatures
//! on events: fetched from `GET /_matrix/key/v2/server` on the server itself (no notary),
//! checked (the server's name, its self-signature, `valid_until_ts`), and kept for an hour
//! (bounded). A key id the cached set lacks refetches, at most every 10 s per server; a
//! server that could not be fetched is not asked again for 30 s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ruma::api::federation::discovery::get_server_keys;
use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::signatures::{PublicKeyMap, PublicKeySet};
use ruma::ServerName;

use super::client::FederationClient;

const KEEP: Duration = Duration::from_secs(3600);
const REFETCH_AFTER: Duration = Duration::from_secs(10);
const FAILURE_BACKOFF: Duration = Duration::from_secs(30);

/// Why a server's keys are not known.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyringError {
    /// Its key server could not be asked (or recently could not).
    #[error("keys of {server}: {why}")]
    Unavailable {
        /// The server.
        server: String,
        /// What went wrong.
        why: String,
    },
    /// Its answer is not a valid key set for it.
    #[error("keys of {server} are invalid: {why}")]
    Invalid {
        /// The server.
        server: String,
        /// What is wrong.
        why: String,
    },
}

#[derive(Clone)]
struct Entry {
    keys: Arc<PublicKeySet>,
    fetched: Instant,
}

/// The keys of the servers that talk to the policy server.
pub struct Keyring {
    client: Arc<FederationClient>,
    /// Keys that are never fetched (our own; tests).
    fixed: std::sync::RwLock<PublicKeyMap>,
    cache: moka::sync::Cache<String, Entry>,
    failures: moka::sync::Cache<String, String>,
}

impl Keyring {
    /// A keyring fetching with `client`.
    pub fn new(client: Arc<FederationClient>) -> Self {
        Self {
            client,
            fixed: std::sync::RwLock::new(PublicKeyMap::new()),
            cache: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(KEEP)
                .build(),
            failures: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(FAILURE_BACKOFF)
                .build(),
        }
    }

    /// Knows `server`'s `keys` without asking it (our own keys; tests and benchmarks).
    pub fn insert_fixed(&self, server: &str, keys: PublicKeySet) {
        let mut fixed = self
            .fixed
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        fixed.insert(server.to_string(), keys);
    }

    /// The keys of each of `servers`, with `key_id` among them when given (refetching once if
    /// the cached set lacks it).
    ///
    /// # Errors
    /// A server's keys cannot be fetched or are invalid.
    pub async fn key_map(
        &self,
        servers: &[(&str, Option<&str>)],
    ) -> Result<PublicKeyMap, KeyringError> {
        let mut map = PublicKeyMap::new();
        for &(server, key_id) in servers {
            let keys = self.keys(server, key_id).await?;
            map.insert(server.to_string(), (*keys).clone());
        }
        Ok(map)
    }

    async fn keys(
        &self,
        server: &str,
        key_id: Option<&str>,
    ) -> Result<Arc<PublicKeySet>, KeyringError> {
        if let Some(keys) = self
            .fixed
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(server)
        {
            return Ok(Arc::new(keys.clone()));
        }
        if let Some(entry) = self.cache.get(server) {
            let has = key_id.is_none_or(|id| entry.keys.contains_key(id));
            if has || entry.fetched.elapsed() < REFETCH_AFTER {
                return Ok(entry.keys);
            }
        }
        if let Some(why) = self.failures.get(server) {
            return Err(KeyringError::Unavailable {
                server: server.to_string(),
                why: format!("{why} (not asked again yet)"),
            });
        }
        match self.fetch(server).await {
            Ok(keys) => {
                let keys = Arc::new(keys);
                self.cache.insert(
                    server.to_string(),
                    Entry {
                        keys: Arc::clone(&keys),
                        fetched: Instant::now(),
                    },
                );
                Ok(keys)
            }
            Err(error) => {
                self.failures.insert(server.to_string(), error.to_string());
                Err(error)
            }
        }
    }

    async fn fetch(&self, server: &str) -> Result<PublicKeySet, KeyringError> {
        let invalid = |why: String| KeyringError::Invalid {
            server: server.to_string(),
            why,
        };
        let name = <&ServerName>::try_from(server).map_err(|e| invalid(e.to_string()))?;
        let answer = self
            .client
            .get(name, get_server_keys::v2::Request::new())
            .await
            .map_err(|e| KeyringError::Unavailable {
                server: server.to_string(),
                why: e.to_string(),
            })?;
        let object: CanonicalJsonObject = serde_json::from_str(answer.server_key.json().get())
            .map_err(|e| invalid(e.to_string()))?;
        verified_keys(server, object, crate::clock::now_ms()).map_err(invalid)
    }
}

/// The verify keys of a key server answer `object` for `server`, if it names `server`, is
/// still valid at `now_ms` and is signed by one of its own keys.
pub fn verified_keys(
    server: &str,
    mut object: CanonicalJsonObject,
    now_ms: u64,
) -> Result<PublicKeySet, String> {
    match object.get("server_name") {
        Some(CanonicalJsonValue::String(name)) if name == server => {}
        other => return Err(format!("server_name is {other:?}")),
    }
    let valid_until = match object.get("valid_until_ts") {
        Some(CanonicalJsonValue::Integer(ts)) => u64::try_from(i64::from(*ts)).unwrap_or(0),
        _ => return Err("no valid_until_ts".to_string()),
    };
    if valid_until < now_ms {
        return Err("expired (valid_until_ts is past)".to_string());
    }
    let Some(CanonicalJsonValue::Object(verify_keys)) = object.get("verify_keys") else {
        return Err("no verify_keys".to_string());
    };
    let mut keys = PublicKeySet::new();
    for (id, key) in verify_keys {
        let Some(CanonicalJsonValue::String(key)) = key.as_object().and_then(|k| k.get("key"))
        else {
            return Err(format!("verify_keys.{id} has no key"));
        };
        let key = ruma::serde::Base64::parse(key).map_err(|e| format!("verify_keys.{id}: {e}"))?;
        keys.insert(id.clone(), key);
    }
    // Only the server's own signatures count (a notary's would need its keys).
    if let Some(CanonicalJsonValue::Object(signatures)) = object.get_mut("signatures") {
        signatures.retain(|entity, _| entity == server);
    }
    let map = PublicKeyMap::from([(server.to_string(), keys.clone())]);
    ruma::signatures::verify_json(&map, &object).map_err(|e| format!("self-signature: {e}"))?;
    Ok(keys)
}

//! Pulling bundles from an HTTP(S) bundle server, as OPA's bundle plugin does, so that N
//! replicas serve the same revision.
//!
//! Every poll is a `GET {url}` with `If-None-Match: <etag of the active bundle>`; `304` means
//! nothing changed. Between polls the plugin waits a random time between `min_delay` and
//! `max_delay`, so replicas spread out; with `long_polling_timeout` it asks the server to
//! hold the request (`Prefer: wait=<s>`) and, when the server says it does (content type
//! `application/vnd.openpolicyagent.bundles`), polls again at once. A failed download is
//! retried with backoff.
//!
//! A downloaded bundle is verified (`[pdp.bundle.verification]`: its `.signatures.json`
//! against the configured key) before `Pdp::load` compiles it and runs the reload gate; what
//! fails any step is refused and the active revision keeps serving. An activated bundle is
//! written to `persist_dir` (with its ETag), and read from there — verified again — when the
//! node starts, so a replica starts serving even while the server is down.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use reqwest::StatusCode;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::PluginError;
use crate::config::BundleConfig;
use crate::pdp::bundle::signing::{self, VerificationKey};
use crate::pdp::bundle::{tarball, Bundle, BundleError};
use crate::pdp::{BundleStatus, LoadError, Pdp};
use crate::retry::Backoff;

/// What a long-polling OPA bundle server answers with.
const LONG_POLL_CONTENT_TYPE: &str = "application/vnd.openpolicyagent.bundles";
/// OPA's status code of a bundle that failed to download or activate.
const BUNDLE_ERROR: &str = "bundle_error";

/// The running plugin.
#[derive(Clone)]
pub struct Puller {
    poll_now: Arc<Notify>,
}

impl Puller {
    /// Polls at once instead of waiting (SIGHUP).
    pub fn poll_now(&self) {
        self.poll_now.notify_one();
    }
}

/// Why a downloaded or persisted bundle was not activated.
#[derive(Debug, thiserror::Error)]
enum PullError {
    #[error("cannot reach the bundle server: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the bundle server answered {0}")]
    Status(StatusCode),
    #[error("the bundle is larger than {0} bytes ([pdp.bundle] max_bytes)")]
    TooLarge(u64),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("cannot keep the bundle on disk: {0}")]
    Persist(std::io::Error),
}

struct Plugin {
    pdp: Pdp,
    config: BundleConfig,
    client: reqwest::Client,
    key: Option<VerificationKey>,
    poll_now: Arc<Notify>,
}

/// Starts pulling `config.url` into `pdp`: first the persisted bundle, if any, then the
/// polling task (on `tracker`, until `shutdown`).
///
/// # Errors
/// An unusable URL, verification key or HTTP client (what fails later is retried).
pub async fn start(
    pdp: Pdp,
    config: BundleConfig,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Result<Puller, PluginError> {
    super::require_http_url("[pdp.bundle] url", &config.url)?;
    let key = match &config.verification {
        None => None,
        Some(verification) => {
            let shown = verification.public_key.display().to_string();
            let pem = std::fs::read(&verification.public_key).map_err(|e| {
                PluginError::Config(format!("[pdp.bundle.verification] public_key {shown}: {e}"))
            })?;
            let alg = signing::algorithm(&verification.algorithm)
                .map_err(|e| PluginError::Config(format!("[pdp.bundle.verification] {e}")))?;
            let key = VerificationKey::new(
                alg,
                &pem,
                &shown,
                verification.key_id.clone(),
                verification.scope.clone(),
            )
            .map_err(|e| PluginError::Config(e.to_string()))?;
            Some(key)
        }
    };
    let wait = config.long_polling_timeout.unwrap_or_default();
    let client = reqwest::Client::builder()
        .connect_timeout(config.timeout)
        .timeout(config.timeout + wait)
        .build()?;
    let poll_now = Arc::new(Notify::new());
    let plugin = Arc::new(Plugin {
        pdp,
        config,
        client,
        key,
        poll_now: Arc::clone(&poll_now),
    });
    plugin.status(|s| s.url = plugin.config.url.clone());
    let etag = {
        let plugin = Arc::clone(&plugin);
        tokio::task::spawn_blocking(move || plugin.load_persisted())
            .await
            .unwrap_or(None)
    };
    tracker.spawn(Arc::clone(&plugin).run(etag, shutdown));
    Ok(Puller { poll_now })
}

/// One answer of the bundle server.
enum Polled {
    NotModified,
    Bundle {
        bytes: Vec<u8>,
        etag: Option<String>,
    },
}

impl Plugin {
    fn status(&self, update: impl FnOnce(&mut BundleStatus)) {
        self.pdp.update_bundle_status(&self.config.name, update);
    }

    fn persisted(&self) -> Option<(PathBuf, PathBuf)> {
        let dir = self.config.persist_dir.as_ref()?.join(&self.config.name);
        Some((dir.join("bundle.tar.gz"), dir.join("bundle.etag")))
    }

    /// Activates the bundle kept on disk, if any; its ETag, to ask the server with.
    fn load_persisted(&self) -> Option<String> {
        let (file, etag_file) = self.persisted()?;
        let bytes = std::fs::read(&file).ok()?;
        match self.activate(&bytes, &file.display().to_string()) {
            Ok(revision) => {
                tracing::info!(bundle = %self.config.name, %revision, file = %file.display(), "serving the bundle kept on disk until the server answers");
                self.status(|s| {
                    s.active_revision = Some(revision.to_string());
                    s.last_successful_activation = Some(SystemTime::now());
                    s.source = Some("disk");
                });
                std::fs::read_to_string(etag_file)
                    .ok()
                    .map(|e| e.trim().to_string())
            }
            Err(error) => {
                tracing::error!(bundle = %self.config.name, file = %file.display(), %error, "the bundle kept on disk is refused");
                None
            }
        }
    }

    async fn run(self: Arc<Self>, mut etag: Option<String>, shutdown: CancellationToken) {
        let config = &self.config;
        let mut backoff = Backoff::new(
            config.min_delay.min(Duration::from_secs(1)),
            config.max_delay.max(config.min_delay),
        );
        loop {
            self.status(|s| s.last_request = Some(SystemTime::now()));
            let polled = tokio::select! {
                () = shutdown.cancelled() => return,
                polled = self.poll(etag.as_deref()) => polled,
            };
            let wait = match polled {
                Ok((answer, held)) => {
                    if backoff.success() {
                        tracing::info!(bundle = %config.name, "bundle server answering again");
                    }
                    let outcome = match answer {
                        Polled::NotModified => Ok(None),
                        Polled::Bundle { bytes, etag: new } => {
                            let this = Arc::clone(&self);
                            tokio::task::spawn_blocking(move || {
                                this.accept(&bytes, new.as_deref())
                                    .map(|rev| Some((rev, new)))
                            })
                            .await
                            .unwrap_or_else(|e| Err(PullError::Persist(std::io::Error::other(e))))
                        }
                    };
                    self.status(|s| s.last_successful_download = Some(SystemTime::now()));
                    match outcome {
                        Ok(activated) => {
                            if let Some((revision, new)) = activated {
                                etag = new;
                                tracing::info!(bundle = %config.name, %revision, "bundle downloaded and activated");
                            }
                            self.status(|s| {
                                s.code = None;
                                s.message = None;
                            });
                        }
                        Err(error) => {
                            // Refused: the active revision keeps serving; ask again later.
                            tracing::error!(bundle = %config.name, %error, "downloaded bundle refused; the active revision keeps serving");
                            self.failed(&error);
                        }
                    }
                    match held {
                        true => Duration::ZERO,
                        false => random_between(config.min_delay, config.max_delay),
                    }
                }
                Err(error) => {
                    let (delay, first) = backoff.failure();
                    match first {
                        true => {
                            tracing::warn!(bundle = %config.name, %error, retry_in = ?delay, "bundle download failed; retrying with backoff")
                        }
                        false => {
                            tracing::debug!(bundle = %config.name, %error, retry_in = ?delay, "bundle download failed again")
                        }
                    }
                    self.failed(&error);
                    delay
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.poll_now.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn failed(&self, error: &PullError) {
        let message = error.to_string();
        self.status(|s| {
            s.code = Some(BUNDLE_ERROR);
            s.message = Some(message);
        });
    }

    /// One GET; whether the server held it (long polling).
    async fn poll(&self, etag: Option<&str>) -> Result<(Polled, bool), PullError> {
        let mut request = self.client.get(&self.config.url);
        if let Some(etag) = etag.and_then(|e| HeaderValue::from_str(e).ok()) {
            request = request.header(IF_NONE_MATCH, etag);
        }
        if let Some(token) = &self.config.token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(wait) = self.config.long_polling_timeout {
            request = request.header("Prefer", format!("wait={}", wait.as_secs().max(1)));
        }
        let mut response = request.send().await?;
        let held = self.config.long_polling_timeout.is_some()
            && response
                .headers()
                .get(CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(LONG_POLL_CONTENT_TYPE.as_bytes()));
        match response.status() {
            StatusCode::NOT_MODIFIED => return Ok((Polled::NotModified, held)),
            StatusCode::OK => {}
            other => return Err(PullError::Status(other)),
        }
        let etag = response
            .headers()
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let limit = self.config.max_bytes;
        if response.content_length().is_some_and(|n| n > limit) {
            return Err(PullError::TooLarge(limit));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if bytes.len() as u64 + chunk.len() as u64 > limit {
                return Err(PullError::TooLarge(limit));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok((Polled::Bundle { bytes, etag }, held))
    }

    /// Verifies, activates and persists a downloaded bundle.
    fn accept(&self, bytes: &[u8], etag: Option<&str>) -> Result<std::sync::Arc<str>, PullError> {
        let revision = self.activate(bytes, &self.config.url)?;
        self.status(|s| {
            s.active_revision = Some(revision.to_string());
            s.last_successful_activation = Some(SystemTime::now());
            s.source = Some("server");
        });
        if let Some((file, etag_file)) = self.persisted() {
            persist(&file, bytes)
                .and_then(|()| persist(&etag_file, etag.unwrap_or_default().as_bytes()))
                .map_err(PullError::Persist)?;
        }
        Ok(revision)
    }

    /// Reads, verifies and loads a tarball (`source` names it in errors).
    fn activate(&self, bytes: &[u8], source: &str) -> Result<std::sync::Arc<str>, PullError> {
        let files = tarball::read(bytes, source, self.config.max_bytes)?;
        if let Some(key) = &self.key {
            key.verify(files.signatures(), files.signed_files())
                .map_err(|e| BundleError::Signature {
                    file: source.to_string(),
                    message: e.to_string(),
                })?;
        }
        let bundle: Bundle = files.into_bundle(source)?;
        Ok(self.pdp.load(bundle)?)
    }
}

/// Writes `bytes` to `path` atomically (a partial file renamed into place).
fn persist(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes)?;
    std::fs::rename(&partial, path)
}

/// A random duration in `[min, max]`.
fn random_between(min: Duration, max: Duration) -> Duration {
    let span = max.saturating_sub(min);
    min + span.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_spread_between_the_delays() {
        let (min, max) = (Duration::from_millis(10), Duration::from_millis(20));
        for _ in 0..100 {
            let d = random_between(min, max);
            assert!(d >= min && d <= max, "{d:?}");
        }
        assert_eq!(random_between(max, min), max, "a max below min waits min");
    }
}

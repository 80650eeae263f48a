//! The PDP's network plugins, as OPA has them: pulling bundles from a bundle server
//! ([`bundle`]) and shipping decision logs to a collector ([`decision_logs`]).
//!
//! `pdp/` does no network I/O; these do it for it, on floor 3 beside `policy/`: they
//! download, verify and hand bundles to `Pdp::load`, and receive decision records through
//! the `DecisionSink` the PDP is given. Each runs on one tracked task that stops with the
//! node's cancellation token; failures are retried with backoff (`retry`), logged and
//! counted, never fatal once started.

pub mod bundle;
pub mod decision_logs;

/// Why a plugin cannot start (bad configuration; failures after start are retried).
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// A setting is unusable.
    #[error("{0}")]
    Config(String),
    /// The HTTP client cannot be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// `url` (the setting `key`) must be an `http://` or `https://` URL.
fn require_http_url(key: &str, url: &str) -> Result<(), PluginError> {
    match url.starts_with("http://") || url.starts_with("https://") {
        true => Ok(()),
        false => Err(PluginError::Config(format!(
            "{key} {url:?} must be an http:// or https:// URL"
        ))),
    }
}

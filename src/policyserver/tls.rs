//! The listener's TLS: homeservers speak federation over HTTPS only. The certificate is the
//! configured one, or a self-signed one for `server_name` made once in the state dir
//! (homeservers must then be told to accept it: `scripts/synapse` does so for loopback).
//! Connections are served by hyper, each on a tracked task, at most `max_connections` at
//! once, until shutdown.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::PolicyServerConfig;

/// How long a client has for the TLS handshake (and then for a request's head).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read, written or parsed.
    #[error("{file}: {why}")]
    File {
        /// The file.
        file: String,
        /// What went wrong.
        why: String,
    },
    /// The certificate could not be made or used.
    #[error("TLS: {0}")]
    Tls(String),
}

/// The rustls configuration of the listener: the configured certificate, or the one made
/// for `server_name` in `state_dir`.
///
/// # Errors
/// Unreadable or invalid certificate/key, or a certificate that cannot be made.
pub fn server_config(config: &PolicyServerConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (cert, key) = match (&config.tls_certificate, &config.tls_private_key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        (None, None) => {
            let cert = config.state_dir.join("tls.crt");
            let key = config.state_dir.join("tls.key");
            if !cert.exists() || !key.exists() {
                generate(&config.server_name, &cert, &key)?;
            }
            (cert, key)
        }
        _ => {
            return Err(TlsError::Tls(
                "[policy_server] tls_certificate and tls_private_key go together".to_string(),
            ))
        }
    };
    let file_error = |file: &Path, why: String| TlsError::File {
        file: file.display().to_string(),
        why,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .map_err(|e| file_error(&cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(&cert, e.to_string()))?;
    let private =
        PrivateKeyDer::from_pem_file(&key).map_err(|e| file_error(&key, e.to_string()))?;
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(chain, private)
    .map_err(|e| TlsError::Tls(e.to_string()))?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(server))
}

/// A self-signed certificate for the host of `server_name` (and `localhost`).
fn generate(server_name: &str, cert: &Path, key: &Path) -> Result<(), TlsError> {
    let host = host_of(server_name);
    let mut names = vec![host.to_string()];
    if host != "localhost" {
        names.push("localhost".to_string());
    }
    let made =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Tls(e.to_string()))?;
    if let Some(dir) = cert.parent() {
        std::fs::create_dir_all(dir).map_err(|e| TlsError::File {
            file: dir.display().to_string(),
            why: e.to_string(),
        })?;
    }
    for (path, pem) in [
        (key, made.signing_key.serialize_pem()),
        (cert, made.cert.pem()),
    ] {
        let _ = std::fs::remove_file(path);
        super::keys::write_private(path, pem.as_bytes()).map_err(|e| TlsError::File {
            file: path.display().to_string(),
            why: e.to_string(),
        })?;
    }
    tracing::info!(file = %cert.display(), %host, "self-signed policy server certificate made");
    Ok(())
}

/// The host part of a server name (`127.0.0.1:8448` → `127.0.0.1`, `[::1]:8448` → `::1`).
pub fn host_of(server_name: &str) -> &str {
    if let Some(rest) = server_name.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    server_name
        .rsplit_once(':')
        .map_or(server_name, |(host, _)| host)
}

/// Serves `app` over TLS on `listener` until `stop`, at most `max_connections` at once.
pub fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: axum::Router,
    max_connections: usize,
    stop: CancellationToken,
    tracker: &TaskTracker,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let connections = stop.clone();
    // Homeservers come from few addresses with many connections each: no per-address share.
    let places = crate::listen::Places {
        max_connections,
        per_address: max_connections,
    };
    crate::listen::accept(
        listener,
        places,
        connections,
        tracker,
        "policy server",
        move |tcp, peer, place| {
            let (acceptor, app, stop) = (acceptor.clone(), app.clone(), stop.clone());
            async move {
                connection(acceptor, tcp, peer, app, stop).await;
                drop(place);
            }
        },
    );
}

async fn connection(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    app: axum::Router,
    stop: CancellationToken,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "policy server: TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "policy server: TLS handshake timed out");
            return;
        }
    };
    // hyper's own default head size (about 400 KiB).
    crate::listen::http1(
        tls,
        peer,
        app,
        HANDSHAKE_TIMEOUT,
        400 * 1024,
        stop,
        "policy server",
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_server_names() {
        assert_eq!(host_of("127.0.0.1:8448"), "127.0.0.1");
        assert_eq!(host_of("localhost"), "localhost");
        assert_eq!(host_of("[::1]:8448"), "::1");
        assert_eq!(host_of("policy.example.org"), "policy.example.org");
    }
}

//! Serving a router over HTTP/1 from a TCP listener, as the policy server's TLS listener and
//! the bus's listener do: at most `max_connections` connections at once (more wait in the
//! kernel's backlog), each on a tracked task, given a header read timeout and a bounded
//! head, until shutdown (then a grace to finish).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long open connections get to finish at shutdown.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Accepts connections on `listener` until `stop`, at most `max_connections` at once: each
/// is handed to `serve` (on a tracked task) with its place, which is free again once dropped.
pub fn accept<F, Fut>(
    listener: tokio::net::TcpListener,
    max_connections: usize,
    stop: CancellationToken,
    tracker: &TaskTracker,
    what: &'static str,
    serve: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let places = Arc::new(Semaphore::new(max_connections.max(1)));
    let connections = tracker.clone();
    tracker.spawn(async move {
        loop {
            let place = tokio::select! {
                () = stop.cancelled() => break,
                place = Arc::clone(&places).acquire_owned() => match place {
                    Ok(place) => place,
                    Err(_) => break,
                },
            };
            let (tcp, peer) = tokio::select! {
                () = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "{what}: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            connections.spawn(serve(tcp, peer, place));
        }
    });
}

/// Serves `app` on one connection (upgrades allowed) until it ends, or `stop` (then for
/// [`CLOSE_GRACE`] at most): a request's head must come within `header_timeout` and in at
/// most `max_head` bytes.
pub async fn http1<IO>(
    io: IO,
    peer: SocketAddr,
    app: axum::Router,
    header_timeout: Duration,
    max_head: usize,
    stop: CancellationToken,
    what: &'static str,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(app);
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(max_head.max(8192))
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(served);
    tokio::select! {
        result = served.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "{what}: connection ended with an error");
            }
        }
        () = stop.cancelled() => {
            served.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CLOSE_GRACE, served).await;
        }
    }
}

//! Serving a router over HTTP/1 from a TCP listener, as the policy server's TLS listener and
//! the bus's listener do: at most `max_connections` connections at once (more wait in the
//! kernel's backlog), and at most `per_address` of them from one address block (more are
//! closed at once), each on a tracked task, given a header read timeout and a bounded
//! head, until shutdown (then a grace to finish).

use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::counted::{Counted, Counts};

/// How long open connections get to finish at shutdown.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How many connections a listener serves at once: over all, and from one address block.
#[derive(Debug, Clone, Copy)]
pub struct Places {
    /// Connections at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Connections at once from one address block ([`block`]); more are closed when
    /// accepted, so that one address cannot hold every place.
    pub per_address: usize,
}

/// The address block per-address limits count `ip` in: an IPv4 address (also written as
/// IPv6), or an IPv6 address's /64 (what one host or customer usually has).
pub fn block(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The network a second tier of per-address limits counts `ip` in: an IPv4 address's /24
/// (also written as IPv6), or an IPv6 address's /48 (what one customer or site is often
/// given) — so that many blocks of one customer cannot fill a node-wide cap between them.
pub fn network(ip: IpAddr) -> IpAddr {
    match block(ip) {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            IpAddr::from([a, b, c, 0])
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0))
        }
    }
}

/// A connection's place among `max_connections` and its block's `per_address`; both are
/// free again once it is dropped.
pub struct Place {
    _permit: OwnedSemaphorePermit,
    _block: Counted<IpAddr>,
}

/// Accepts connections on `listener` until `stop`, within `places`: each is handed to
/// `serve` (on a tracked task) with its [`Place`], which is free again once dropped. A
/// connection past its block's share is closed at once and counted in the log.
pub fn accept<F, Fut>(
    listener: tokio::net::TcpListener,
    places: Places,
    stop: CancellationToken,
    tracker: &TaskTracker,
    what: &'static str,
    serve: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr, Place) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(places.max_connections.max(1)));
    let blocks: Counts<IpAddr> = Counts::default();
    let connections = tracker.clone();
    tracker.spawn(async move {
        let mut permit = None;
        loop {
            let held = match permit.take() {
                Some(held) => held,
                None => tokio::select! {
                    () = stop.cancelled() => break,
                    place = Arc::clone(&permits).acquire_owned() => match place {
                        Ok(place) => place,
                        Err(_) => break,
                    },
                },
            };
            let (tcp, peer) = tokio::select! {
                () = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "{what}: accept failed");
                        permit = Some(held);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(share) = blocks.take(block(peer.ip()), places.per_address.max(1)) else {
                tracing::debug!(%peer, per_address = places.per_address, "{what}: this address holds its share of connections; closed");
                permit = Some(held);
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let place = Place {
                _permit: held,
                _block: share,
            };
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

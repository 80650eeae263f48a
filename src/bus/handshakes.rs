//! Limits on sockets that have not authenticated yet: per address block (`[bus]
//! handshakes_per_ip` at once, `handshake_rate` new ones per second; a block is an IPv4
//! address, or an IPv6 /64 — what one subscriber is given), per network (`[bus]
//! handshakes_per_network`; an IPv4 /24, an IPv6 /48 — what one customer often has, many
//! blocks) and over all addresses (`max_handshakes`, many times one network's share). A socket holds its place from the
//! upgrade until it has authenticated (at most `handshake_timeout` for its first frame, then
//! the token check), not while its runtime is bound; what it may hold meanwhile is one first
//! frame (`max_frame_bytes`). Refused upgrades are answered 429 (per block) or 503 (the node
//! is busy) and counted (`bus_refused`). Behind a reverse proxy every client has the
//! proxy's address: set the per-address limits for that.

use std::net::IpAddr;
use std::sync::Arc;

use axum::http::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::metrics::refused;
use crate::config::BusConfig;
use crate::counted::{Counted, Counts};
use crate::ratelimit::Limiter;

/// The handshakes under way.
pub(super) struct Handshakes {
    per_ip: Counts<IpAddr>,
    max_per_ip: usize,
    per_network: Counts<IpAddr>,
    max_per_network: usize,
    all: Arc<Semaphore>,
    rate: Limiter,
}

/// One socket's place among the handshakes under way; dropped once it is answered.
pub(super) struct Pending {
    _ip: Counted<IpAddr>,
    _network: Counted<IpAddr>,
    _permit: OwnedSemaphorePermit,
}

/// Why an upgrade was refused: the status, the `bus_refused` reason, and the text.
pub(super) type Refusal = (StatusCode, &'static str, &'static str);

impl Handshakes {
    pub(super) fn new(config: &BusConfig) -> Self {
        Self {
            per_ip: Counts::default(),
            max_per_ip: config.handshakes_per_ip.max(1),
            per_network: Counts::default(),
            max_per_network: config
                .handshakes_per_network
                .max(config.handshakes_per_ip)
                .max(1),
            all: Arc::new(Semaphore::new(config.max_handshakes.max(1))),
            rate: Limiter::new(&config.handshake_rate),
        }
    }

    /// A place for a new socket from `ip`, or why not.
    pub(super) fn begin(&self, ip: IpAddr) -> Result<Pending, Refusal> {
        let network = crate::listen::network(ip);
        let ip = crate::listen::block(ip);
        if self.rate.check(&ip.to_string()).is_err() {
            return Err((
                StatusCode::TOO_MANY_REQUESTS,
                refused::HANDSHAKE_RATE,
                "too many new sockets from this address; retry shortly",
            ));
        }
        let Ok(place) = self.per_ip.take(ip, self.max_per_ip) else {
            return Err((
                StatusCode::TOO_MANY_REQUESTS,
                refused::HANDSHAKES_PER_IP,
                "too many sockets from this address are still in their handshake",
            ));
        };
        let Ok(network) = self.per_network.take(network, self.max_per_network) else {
            return Err((
                StatusCode::TOO_MANY_REQUESTS,
                refused::HANDSHAKES_PER_NETWORK,
                "too many sockets from this network are still in their handshake",
            ));
        };
        // (Refused here, the places are given back as they drop.)
        let Ok(permit) = Arc::clone(&self.all).try_acquire_owned() else {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                refused::HANDSHAKES_BUSY,
                "too many sockets are in their handshake; retry shortly",
            ));
        };
        Ok(Pending {
            _ip: place,
            _network: network,
            _permit: permit,
        })
    }

    /// Forgets the rate buckets of quiet addresses.
    pub(super) fn forget_idle(&self) {
        self.rate.forget_idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimit;
    use std::net::Ipv4Addr;
    use std::net::Ipv6Addr;

    #[test]
    fn handshakes_are_limited_per_address_and_over_all() {
        let config = BusConfig {
            handshakes_per_ip: 2,
            max_handshakes: 3,
            handshake_rate: RateLimit::new(0, 0),
            ..BusConfig::default()
        };
        let handshakes = Handshakes::new(&config);
        let (a, b, c) = (
            IpAddr::from([10, 0, 0, 1]),
            IpAddr::from([10, 0, 0, 2]),
            IpAddr::from([10, 0, 0, 3]),
        );
        let first = handshakes.begin(a).expect("a 1");
        let _second = handshakes.begin(a).expect("a 2");
        let refused = handshakes.begin(a).err().map(|r| r.1);
        assert_eq!(refused, Some(refused::HANDSHAKES_PER_IP));
        let _third = handshakes.begin(b).expect("b 1");
        let busy = handshakes.begin(c).err().map(|r| r.1);
        assert_eq!(busy, Some(refused::HANDSHAKES_BUSY), "3 under way in all");
        drop(first);
        assert!(handshakes.begin(a).is_ok(), "one answered: room again");
        let limited = Handshakes::new(&BusConfig {
            handshake_rate: RateLimit::new(1, 1),
            ..BusConfig::default()
        });
        drop(limited.begin(a).expect("first"));
        let rate = limited.begin(a).err().map(|r| r.1);
        assert_eq!(rate, Some(refused::HANDSHAKE_RATE));
    }

    /// Review R9: every IPv6 address counted on its own, so one /64 filled the global cap.
    #[test]
    fn an_ipv6_slash_64_counts_as_one_address() {
        let config = BusConfig {
            handshakes_per_ip: 2,
            max_handshakes: 8,
            handshake_rate: RateLimit::new(0, 0),
            ..BusConfig::default()
        };
        let handshakes = Handshakes::new(&config);
        let one_block = |i: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, i, 0, 0, i));
        let _held: Vec<Pending> = (1..=2)
            .map(|i| handshakes.begin(one_block(i)).expect("place"))
            .collect();
        for i in 3..200 {
            let refused = handshakes.begin(one_block(i)).err().map(|r| r.1);
            assert_eq!(refused, Some(refused::HANDSHAKES_PER_IP), "{i}");
        }
        let other = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 3, 0, 0, 0, 1));
        assert!(handshakes.begin(other).is_ok(), "another /64 still gets in");
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 9).to_ipv6_mapped());
        let _m = handshakes.begin(mapped).expect("v4-mapped");
        let _m2 = handshakes
            .begin(IpAddr::from([10, 0, 0, 9]))
            .expect("the same address");
        let refused = handshakes.begin(mapped).err().map(|r| r.1);
        assert_eq!(
            refused,
            Some(refused::HANDSHAKES_PER_IP),
            "IPv4 written as IPv6 is that address"
        );
        let defaults = BusConfig::default();
        assert!(
            defaults.handshakes_per_ip * 16 <= defaults.max_handshakes,
            "at least 16 blocks are needed to fill the global cap"
        );
    }

    /// Review bus-3 N16: with blocks alone, 32 /64s (a /59: less than many customers are
    /// given) filled `max_handshakes`. A network (IPv6 /48, IPv4 /24) has its own share.
    #[test]
    fn the_blocks_of_one_network_share_its_places() {
        let config = BusConfig {
            handshakes_per_ip: 2,
            handshakes_per_network: 4,
            max_handshakes: 16,
            handshake_rate: RateLimit::new(0, 0),
            ..BusConfig::default()
        };
        let handshakes = Handshakes::new(&config);
        let in_48 = |i: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 7, i, 0, 0, 0, 1));
        let _held: Vec<Pending> = [1, 1, 2, 2]
            .into_iter()
            .map(|i| handshakes.begin(in_48(i)).expect("place"))
            .collect();
        for i in 3..100 {
            let refused = handshakes.begin(in_48(i)).err().map(|r| r.1);
            assert_eq!(refused, Some(refused::HANDSHAKES_PER_NETWORK), "/64 {i}");
        }
        let other = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 8, 1, 0, 0, 0, 1));
        assert!(handshakes.begin(other).is_ok(), "another /48 still gets in");
        let in_24 = |i: u8| IpAddr::from([192, 0, 2, i]);
        let _v4: Vec<Pending> = (1..=4)
            .map(|i| handshakes.begin(in_24(i)).expect("place"))
            .collect();
        let refused = handshakes.begin(in_24(5)).err().map(|r| r.1);
        assert_eq!(refused, Some(refused::HANDSHAKES_PER_NETWORK), "one /24");
        assert!(handshakes.begin(IpAddr::from([192, 0, 3, 1])).is_ok());
        // Never below the per-block limit (configurations that raise it for loopback or a
        // NAT address are not cut by the default network share).
        let raised = Handshakes::new(&BusConfig {
            handshakes_per_ip: 100,
            handshake_rate: RateLimit::new(0, 0),
            ..BusConfig::default()
        });
        let _many: Vec<Pending> = (0..100)
            .map(|_| raised.begin(IpAddr::from([127, 0, 0, 1])).expect("place"))
            .collect();
    }

    #[test]
    fn networks_are_a_v4_slash_24_and_a_v6_slash_48() {
        use crate::listen::network;
        assert_eq!(
            network(IpAddr::from([198, 51, 100, 7])),
            IpAddr::from([198, 51, 100, 0])
        );
        let mapped = IpAddr::V6(Ipv4Addr::new(198, 51, 100, 7).to_ipv6_mapped());
        assert_eq!(network(mapped), IpAddr::from([198, 51, 100, 0]));
        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xab, 0xcd, 1, 2, 3, 4));
        assert_eq!(
            network(v6),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xab, 0, 0, 0, 0, 0))
        );
    }
}

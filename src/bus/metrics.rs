//! The bus's metrics (labels are closed sets: outcomes, never addresses).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OutcomeLabel {
    pub outcome: &'static str,
}

/// Why the node refused something (or closed a socket) to keep its memory bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ReasonLabel {
    pub reason: &'static str,
}

/// The reasons `bus_refused` counts (a closed set).
pub(super) mod refused {
    /// A socket took longer than `slow_receiver_close_after` to make room for a response
    /// or a resumed message, or to take a write: closed.
    pub const SLOW_SOCKET: &str = "slow_socket";
    /// A runtime's inbox holds `inbox_max_bytes_per_runtime`: 408 to the sender.
    pub const RUNTIME_INBOX_FULL: &str = "runtime_inbox_full";
    /// The sender's principal holds `inbox_max_bytes_per_principal` in the inboxes: 408.
    pub const PRINCIPAL_INBOX_FULL: &str = "principal_inbox_full";
    /// The sender's principal holds `max_history_bytes_per_principal` (or
    /// `max_history_backlog_per_principal` messages) not yet in the history: 408.
    pub const PRINCIPAL_HISTORY_FULL: &str = "principal_history_full";
    /// A peer's queue holds `peer_queue` messages or `peer_queue_bytes`: 408.
    pub const PEER_QUEUE_FULL: &str = "peer_queue_full";
    /// A peer's answer found the sender's queue full: dropped.
    pub const PEER_ANSWER_DROPPED: &str = "peer_answer_dropped";
    /// An address with `handshakes_per_ip` sockets not yet authenticated: 429.
    pub const HANDSHAKES_PER_IP: &str = "handshakes_per_ip";
    /// A network (IPv4 /24, IPv6 /48) with `handshakes_per_network` sockets not yet
    /// authenticated: 429.
    pub const HANDSHAKES_PER_NETWORK: &str = "handshakes_per_network";
    /// An address past `handshake_rate`: 429.
    pub const HANDSHAKE_RATE: &str = "handshake_rate";
    /// `max_handshakes` sockets not yet authenticated: 503.
    pub const HANDSHAKES_BUSY: &str = "handshakes_busy";
    /// A closing socket did not take what was queued for it within `write_timeout` of its
    /// close (or another socket of its runtime began to close): dropped with the rest.
    pub const CLOSING_TIMEOUT: &str = "closing_timeout";
    /// A socket.io stub sent more than its inbound budget ahead of the node: disconnected.
    pub const INBOUND_FULL: &str = "inbound_full";
    /// A principal's turn did not come within `slow_receiver_close_after` (its other
    /// requests kept it): 408.
    pub const TURN_BUSY: &str = "turn_busy";
    /// A topic subscriber's socket queue was full at a publish: closed (1013), the publish
    /// waits in its inbox and it resumes from there; the publisher does not wait for it.
    pub const SLOW_SUBSCRIBER: &str = "slow_subscriber";
    /// A topic subscriber could take a publish neither in its socket queue nor in its full
    /// inbox: the publish is lost to that subscriber (the others get it, the publisher's
    /// answer is unchanged).
    pub const SUBSCRIBER_MISSED: &str = "subscriber_missed";
}

/// Which per-principal limit refused a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct LimitLabel {
    pub limit: &'static str,
}

pub(super) struct BusMetrics {
    /// Refusals and closes that keep memory bounded, by reason (`refused::*`).
    pub refused: Family<ReasonLabel, Counter>,
    /// Requests refused at a per-principal limit, by limit.
    pub limited: Family<LimitLabel, Counter>,
    pub messages: Family<OutcomeLabel, Counter>,
    pub deliveries: Family<OutcomeLabel, Counter>,
    /// The per-message series, looked up once.
    pub routed: Counter,
    pub direct: Counter,
    pub queued: Counter,
    pub connections: Gauge,
    /// Sockets closed but still handing over what was queued for them.
    pub closing: Gauge,
    pub handle_seconds: Histogram,
    /// Addresses claimed on first use as a `from`.
    pub claims: Counter,
    /// Deliveries that waited for a full receiver queue (the sender's socket not read
    /// meanwhile).
    pub senders_slowed: Counter,
    /// Receivers closed for staying behind past `[bus] slow_receiver_close_after`.
    pub receivers_closed: Counter,
}

impl BusMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let messages = Family::<OutcomeLabel, Counter>::default();
        let deliveries = Family::<OutcomeLabel, Counter>::default();
        let series = |family: &Family<OutcomeLabel, Counter>, outcome| {
            family.get_or_create(&OutcomeLabel { outcome }).clone()
        };
        let metrics = Self {
            refused: Family::default(),
            limited: Family::default(),
            routed: series(&messages, "routed"),
            direct: series(&deliveries, "direct"),
            queued: series(&deliveries, "queued"),
            messages,
            deliveries,
            connections: Gauge::default(),
            closing: Gauge::default(),
            handle_seconds: Histogram::new([
                0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.0025, 0.005, 0.01, 0.05,
                0.25,
            ]),
            claims: Counter::default(),
            senders_slowed: Counter::default(),
            receivers_closed: Counter::default(),
        };
        registry.register(
            "bus_refused",
            "Messages refused and sockets closed to keep memory bounded, by reason",
            metrics.refused.clone(),
        );
        registry.register(
            "bus_limited",
            "Requests refused at a per-principal limit (runtimes, addresses, registry_entries, foreign_routes, subscriptions, sockets)",
            metrics.limited.clone(),
        );
        registry.register(
            "bus_claims",
            "Addresses claimed on first use as a sender",
            metrics.claims.clone(),
        );
        registry.register(
            "bus_senders_slowed",
            "Deliveries that waited for a receiver's full queue (the sender not read meanwhile)",
            metrics.senders_slowed.clone(),
        );
        registry.register(
            "bus_receivers_closed",
            "Receivers closed for staying behind too long (they resume from their inbox)",
            metrics.receivers_closed.clone(),
        );
        registry.register(
            "bus_messages",
            "reTHINK messages received, by outcome",
            metrics.messages.clone(),
        );
        registry.register(
            "bus_deliveries",
            "Deliveries to runtimes: direct to a socket, or queued in the inbox",
            metrics.deliveries.clone(),
        );
        registry.register(
            "bus_connections",
            "Connected protocol stubs",
            metrics.connections.clone(),
        );
        registry.register(
            "bus_sockets_closing",
            "Sockets closed but still handing over what was queued for them (at most write_timeout each)",
            metrics.closing.clone(),
        );
        registry.register(
            "bus_handle_duration_seconds",
            "Time from a message read to its delivery (decision + routing)",
            metrics.handle_seconds.clone(),
        );
        metrics
    }

    /// Counts one refusal (`reason`: one of `refused::*`).
    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Counts a message by outcome.
    pub fn count(&self, outcome: &'static str) {
        self.messages.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Counts a request refused at the per-principal limit `limit`.
    pub fn limited(&self, limit: &'static str) {
        self.limited.get_or_create(&LimitLabel { limit }).inc();
    }

    /// Counts `n` deliveries of a kind other than the per-message ones.
    pub fn delivered(&self, outcome: &'static str, n: u64) {
        self.deliveries
            .get_or_create(&OutcomeLabel { outcome })
            .inc_by(n);
    }
}

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

pub(super) struct BusMetrics {
    pub messages: Family<OutcomeLabel, Counter>,
    pub deliveries: Family<OutcomeLabel, Counter>,
    /// The per-message series, looked up once.
    pub routed: Counter,
    pub direct: Counter,
    pub queued: Counter,
    pub connections: Gauge,
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
            routed: series(&messages, "routed"),
            direct: series(&deliveries, "direct"),
            queued: series(&deliveries, "queued"),
            messages,
            deliveries,
            connections: Gauge::default(),
            handle_seconds: Histogram::new([
                0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.0025, 0.005, 0.01, 0.05,
                0.25,
            ]),
            claims: Counter::default(),
            senders_slowed: Counter::default(),
            receivers_closed: Counter::default(),
        };
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
            "bus_handle_duration_seconds",
            "Time from a message read to its delivery (decision + routing)",
            metrics.handle_seconds.clone(),
        );
        metrics
    }

    /// Counts a message by outcome.
    pub fn count(&self, outcome: &'static str) {
        self.messages.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Counts `n` deliveries of a kind other than the per-message ones.
    pub fn delivered(&self, outcome: &'static str, n: u64) {
        self.deliveries
            .get_or_create(&OutcomeLabel { outcome })
            .inc_by(n);
    }
}

//! The reTHINK message bus: protocol stubs connect over WebSocket, get addresses allocated,
//! exchange messages and subscribe to objects — every message and every subscription decided
//! by the PDP first.
//!
//! - `session` — the WebSocket endpoint (End-User Device and Network Server connectors): the
//!   three stub handshakes, authentication, one reader and one writer per socket; and the
//!   peer endpoint other domains' nodes post to.
//! - `peers` — what other domains' nodes send, over HTTP or the Matrix transport.
//! - `message` — the message model, parsing with clear errors, responses.
//! - `address` — URL parts and the node's component addresses.
//! - `router` — address → runtime, and delivery (direct, or the inbox while away).
//! - `allocation` — the address-allocation components.
//! - `pubsub` — subscriptions and their fan-out.
//! - `journal`, `inbox`, `store` — what is kept in Matrix: history of routed messages,
//!   messages for runtimes that are away, and durable state (allocations, subscriptions,
//!   registry).
//! - `replicas` — several replicas on one homeserver following each other through Matrix.
//!
//! [`Bus::handle`] is the path of one message: components answer; everything else is decided
//! (`kind: "message"`), checked against spoofing, routed to runtimes (direct or inbox),
//! subscribers or a connector, and recorded in the journal.

pub mod address;
pub mod allocation;
pub mod inbox;
pub mod journal;
pub mod message;
pub mod peers;
pub mod pubsub;
pub mod replicas;
pub mod router;
pub mod session;
pub mod store;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::ws::Utf8Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{BusConfig, Durability};
use crate::connectors::foreign::Foreign;
use crate::connectors::idm::Idm;
use crate::connectors::registry::{BuiltinRegistry, HttpRegistry};
use crate::connectors::{Connector, Sender};
use crate::pdp::{Decision, Pdp};
use crate::pep::actor::Actor;
use crate::pep::decider::Decider;
use crate::pep::homeserver::Homeserver;
use address::{Component, NodeAddresses};
use inbox::Inbox;
use journal::Journal;
use message::{BusError, Message};
use pubsub::{Subscriber, Subscriptions};
use router::{Runtime, Table};
use store::{RuntimeRecord, Store};

/// How often the bus checks for a new policy revision to re-decide subscriptions.
const REVISION_POLL: Duration = Duration::from_millis(100);
/// Runtimes away too long are looked for every this many polls (~10 s).
const REAP_EVERY_TICKS: u64 = 100;
/// Most foreign addresses one runtime may use as return routes.
const MAX_FOREIGN_PER_RUNTIME: usize = 1000;
/// Most subscriptions one runtime may hold.
const MAX_SUBSCRIPTIONS_PER_RUNTIME: usize = 10_000;

/// Where one `to` of a message goes.
enum Destination {
    /// These runtimes (possibly none: a topic nobody subscribed to).
    Runtimes(Vec<Arc<Runtime>>),
    /// A peer node.
    Foreign,
    /// Nothing holds it.
    Unknown,
}

/// Who a connection is, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A Matrix user (access token checked with the homeserver).
    User(String),
    /// A configured Network Server connector.
    NetworkServer(String),
    /// Another domain's node.
    Peer(String),
}

/// One connected socket.
pub struct Connection {
    /// Unique per node run.
    pub id: u64,
    /// The runtime it speaks for.
    pub runtime: Arc<Runtime>,
    /// Who authenticated.
    pub principal: Principal,
    /// Its outbound queue (responses and deliveries).
    pub tx: mpsc::Sender<Utf8Bytes>,
    /// Cancelled when the socket must close (taken over, too slow, shutting down).
    pub close: CancellationToken,
    identity: Mutex<Option<String>>,
}

impl Connection {
    fn user(&self) -> Option<&str> {
        match &self.principal {
            Principal::User(u) => Some(u),
            _ => None,
        }
    }

    fn identity(&self) -> Option<String> {
        self.identity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

struct BusMetrics {
    messages: Family<OutcomeLabel, Counter>,
    deliveries: Family<OutcomeLabel, Counter>,
    /// The per-message series, looked up once.
    routed: Counter,
    direct: Counter,
    queued: Counter,
    connections: Gauge,
    handle_seconds: Histogram,
}

impl BusMetrics {
    fn new(registry: &mut Registry) -> Self {
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
        };
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

    fn count(&self, outcome: &'static str) {
        self.messages.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}

/// What the bus keeps in the homeserver (or, without one, in memory).
pub struct Persistence {
    /// History of routed messages.
    pub journal: Journal,
    /// Messages for runtimes that are away.
    pub inbox: Inbox,
    /// Durable state.
    pub store: Store,
    /// Acting as virtual users (registers the users behind allocated addresses).
    pub actor: Option<Arc<Actor>>,
    /// Checks Matrix access tokens.
    pub homeserver: Option<Arc<Homeserver>>,
}

impl Persistence {
    /// Everything in memory: nothing survives a restart; only Network Server tokens
    /// authenticate.
    pub fn memory() -> Self {
        Self {
            journal: Journal::memory(),
            inbox: Inbox::memory(),
            store: Store::memory(),
            actor: None,
            homeserver: None,
        }
    }
}

struct Inner {
    config: BusConfig,
    nodes: NodeAddresses,
    /// The local PDP, watched for new revisions.
    pdp: Pdp,
    /// Where decisions come from (the local PDP, or `[pep] pdp_url`).
    decider: Decider,
    table: Table,
    subscriptions: Subscriptions,
    persistence: Persistence,
    registry: Arc<dyn Connector>,
    /// The built-in registry (no `[bus.registry] url`), which other replicas' changes update.
    builtin_registry: Option<Arc<BuiltinRegistry>>,
    idm: Idm,
    foreign: Foreign,
    metrics: BusMetrics,
    next_conn: AtomicU64,
    next_id: AtomicU64,
    /// Cancelled when the node stops: every socket closes.
    shutdown: CancellationToken,
    /// The journal is more than `max_history_backlog` behind: new messages are refused.
    history_behind: std::sync::atomic::AtomicBool,
    /// Background work the node waits for at shutdown.
    tracker: TaskTracker,
    /// Peer message events handled lately (ids, oldest first): a retried transaction's
    /// repeats are skipped.
    peer_events: Mutex<(
        std::collections::HashSet<String>,
        std::collections::VecDeque<String>,
    )>,
}

/// Handle to the bus; clones share everything.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

impl Bus {
    /// Builds the bus for `config.domain` (`start_bus` sets it; `localhost` if unset), restoring runtimes, allocations, subscriptions and
    /// registry entries from the store, and starts re-deciding subscriptions when the policy
    /// changes.
    ///
    /// # Errors
    /// The stored state cannot be read.
    pub async fn start(
        config: BusConfig,
        pdp: Pdp,
        decider: Decider,
        persistence: Persistence,
        registry: &mut Registry,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) -> anyhow::Result<Bus> {
        let domain = config.domain.clone().unwrap_or_else(|| "localhost".into());
        let domain = domain.as_str();
        let follower = match (
            &config.replica,
            &persistence.actor,
            persistence.store.room(),
        ) {
            (Some(node), Some(actor), Some(state_room)) => Some(
                replicas::Follower::begin(Arc::clone(actor), node, state_room)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot follow the other replicas: {e}"))?,
            ),
            (Some(_), _, _) => {
                tracing::warn!("[bus] replica is set, but without a homeserver there is nothing to share: ignored");
                None
            }
            (None, _, _) => None,
        };
        let snapshot =
            persistence.store.load().await.map_err(|e| {
                anyhow::anyhow!("cannot read the bus state from the homeserver: {e}")
            })?;
        let (registry_connector, builtin_registry): (Arc<dyn Connector>, _) =
            match &config.registry.url {
                Some(url) => (Arc::new(HttpRegistry::new(url)), None),
                None => {
                    let builtin = Arc::new(BuiltinRegistry::new(
                        snapshot.registry,
                        persistence.store.clone(),
                    ));
                    (builtin.clone(), Some(builtin))
                }
            };
        let bus = Bus {
            inner: Arc::new(Inner {
                nodes: NodeAddresses::new(domain),
                idm: Idm::new(config.idm.clone(), domain),
                foreign: Foreign::new(config.peers.clone(), persistence.actor.clone())
                    .map_err(|e| anyhow::anyhow!(e))?,
                config,
                pdp,
                decider,
                table: Table::default(),
                subscriptions: Subscriptions::default(),
                persistence,
                registry: registry_connector,
                builtin_registry,
                metrics: BusMetrics::new(registry),
                next_conn: AtomicU64::new(1),
                next_id: AtomicU64::new(1),
                shutdown: shutdown.child_token(),
                history_behind: std::sync::atomic::AtomicBool::new(false),
                tracker: tracker.clone(),
                peer_events: Mutex::default(),
            }),
        };
        let restored = snapshot.runtimes.len();
        for (url, record) in snapshot.runtimes {
            bus.restore(&url, record);
        }
        if restored > 0 {
            tracing::info!(
                runtimes = restored,
                "bus state restored from the homeserver"
            );
        }
        tracker.spawn(bus.clone().maintain(shutdown.child_token()));
        if let Some(follower) = follower {
            tracker.spawn(follower.run(bus.clone(), shutdown.child_token()));
        }
        Ok(bus)
    }

    /// Puts a stored runtime into the table (away), with its bindings and subscriptions.
    fn restore(&self, url: &str, record: RuntimeRecord) {
        if let Some(problem) = self.inner.nodes.runtime_url_problem(url) {
            tracing::warn!(runtime = %url, %problem, "stored runtime not restored");
            return;
        }
        let runtime = self.inner.table.runtime(url, || record);
        self.subscribe_stored(&runtime);
    }

    /// Replaces `runtime`'s record (written by another replica), its bindings and
    /// subscriptions with it; the runtime itself stays (a socket may be attaching to it).
    fn rebind(&self, runtime: &Arc<Runtime>, record: RuntimeRecord) {
        self.inner.table.unbind_record(runtime);
        self.inner.subscriptions.remove_runtime(&runtime.url);
        runtime.update(|r| *r = record);
        self.inner.table.bind_record(runtime);
        self.subscribe_stored(runtime);
    }

    /// Adds the subscriptions in `runtime`'s record to the fan-out.
    fn subscribe_stored(&self, runtime: &Arc<Runtime>) {
        let (url, subscriptions) =
            runtime.with_record(|r| (runtime.url.clone(), r.subscriptions.clone()));
        for (resource, subscriber) in subscriptions {
            if !self.may_subscribe(&resource, runtime) {
                tracing::warn!(%resource, runtime = %url, "stored subscription to a non-topic not restored");
                continue;
            }
            self.inner.subscriptions.add(
                &resource,
                Subscriber {
                    address: subscriber,
                    runtime: Arc::clone(runtime),
                },
            );
        }
    }

    /// The node's addresses.
    pub fn nodes(&self) -> &NodeAddresses {
        &self.inner.nodes
    }

    /// The bus configuration.
    pub fn config(&self) -> &BusConfig {
        &self.inner.config
    }

    /// Checks a token: a Network Server's, else a Matrix access token.
    ///
    /// # Errors
    /// 401 when there is none or it is not valid; 408 when the homeserver cannot answer.
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Principal, BusError> {
        let token = token.ok_or_else(|| {
            BusError::Unauthorized(
                "no access token (Authorization: Bearer, or ?access_token=)".into(),
            )
        })?;
        if let Some(ns) = self
            .inner
            .config
            .network_servers
            .iter()
            .find(|ns| crate::http_auth::token_matches(token, &ns.token))
        {
            return Ok(Principal::NetworkServer(ns.name.clone()));
        }
        let Some(homeserver) = &self.inner.persistence.homeserver else {
            return Err(BusError::Unauthorized("unknown token".into()));
        };
        match homeserver.whoami(token, None).await {
            Ok(user) => Ok(Principal::User(user)),
            Err(response) if response.status().is_client_error() => Err(BusError::Unauthorized(
                "the homeserver does not know this access token".into(),
            )),
            Err(_) => Err(BusError::Unavailable(
                "homeserver unavailable; retry".into(),
            )),
        }
    }

    /// The runtime `runtime_url` for a socket authenticated as `principal`: created on first
    /// use (owned by that principal from then on, stored).
    ///
    /// # Errors
    /// 400 for a runtime URL that is not a URL; 403 when the runtime belongs to another
    /// principal; 408 when the store cannot record a new owner.
    pub async fn bind(
        &self,
        runtime_url: &str,
        principal: &Principal,
    ) -> Result<Arc<Runtime>, BusError> {
        if let Some(problem) = self.inner.nodes.runtime_url_problem(runtime_url) {
            return Err(BusError::BadRequest(problem));
        }
        if let Some(domain) = address::domain(runtime_url) {
            if self.inner.foreign.peer(&domain).is_some() {
                return Err(BusError::Forbidden(format!(
                    "runtimes of '{domain}' connect to that domain's node"
                )));
            }
        }
        if self
            .inner
            .table
            .holder_of(runtime_url)
            .is_some_and(|holder| holder.url != runtime_url)
        {
            return Err(BusError::Forbidden(format!(
                "'{runtime_url}' is an address of another runtime"
            )));
        }
        let owner = match principal {
            Principal::User(u) => u.clone(),
            Principal::NetworkServer(name) => format!("network-server:{name}"),
            Principal::Peer(domain) => format!("peer:{domain}"),
        };
        let runtime = self
            .inner
            .table
            .runtime(runtime_url, RuntimeRecord::default);
        match runtime.user() {
            Some(existing) if existing != owner => Err(BusError::Forbidden(format!(
                "runtime '{runtime_url}' belongs to another user"
            ))),
            Some(_) => Ok(runtime),
            None => {
                let record = runtime.update(|r| r.user = Some(owner.clone()));
                self.persist(&runtime.url, &record).await?;
                Ok(runtime)
            }
        }
    }

    /// Attaches a socket (its outbound queue `tx`) to `runtime`, taking over an earlier socket
    /// of the same runtime, hands it everything its inbox holds, then goes online.
    ///
    /// # Errors
    /// 408 when the inbox cannot be read or the socket went away meanwhile.
    pub async fn attach(
        &self,
        runtime: Arc<Runtime>,
        principal: Principal,
        tx: mpsc::Sender<Utf8Bytes>,
    ) -> Result<Arc<Connection>, BusError> {
        let conn = Arc::new(Connection {
            id: self.inner.next_conn.fetch_add(1, Ordering::Relaxed),
            runtime: Arc::clone(&runtime),
            principal,
            tx,
            close: CancellationToken::new(),
            identity: Mutex::new(None),
        });
        runtime.begin_attach(conn.id, conn.close.clone());
        let inbox = &self.inner.persistence.inbox;
        let turn = runtime.handover().await;
        let resumed = async {
            let current = self.inner.table.get_runtime(&runtime.url);
            if !current.is_some_and(|current| Arc::ptr_eq(&current, &runtime)) {
                return Err(BusError::Unavailable(
                    "the runtime was released meanwhile; reconnect".into(),
                ));
            }
            if let Some(me) = &self.inner.config.replica {
                // Tell the other replicas the runtime is here now (one closes its socket).
                let record = runtime.update(|r| {
                    r.node = Some(me.clone());
                    r.attached_ms = journal::now_ms();
                });
                self.persist(&runtime.url, &record).await?;
            }
            let taken = inbox.take(&runtime.url).await.map_err(|e| {
                BusError::Unavailable(format!("cannot read the runtime's inbox: {e}"))
            })?;
            for text in &taken.messages {
                if conn.tx.send(Utf8Bytes::from(text.clone())).await.is_err() {
                    return Err(BusError::Unavailable("socket closed while resuming".into()));
                }
            }
            if !runtime.go_online(conn.id, &conn.tx).await {
                return Err(BusError::Unavailable(
                    "another socket took the runtime over, or this one closed".into(),
                ));
            }
            Ok(taken)
        }
        .await;
        let taken = match resumed {
            Ok(taken) => taken,
            Err(e) => {
                // Whatever was buffered for this socket goes (back) to the inbox, in order;
                // the inbox itself was not acknowledged, so it is handed over again next time.
                runtime.detach(conn.id, inbox);
                return Err(e);
            }
        };
        if !taken.messages.is_empty() {
            self.inner
                .metrics
                .deliveries
                .get_or_create(&OutcomeLabel { outcome: "resumed" })
                .inc_by(taken.messages.len() as u64);
            if let Err(e) = inbox.ack(&runtime.url, &taken).await {
                // Delivered but not recorded as such: a later resume may repeat them.
                tracing::warn!(%e, runtime = %runtime.url, "cannot record the inbox cursor");
            }
        }
        drop(turn);
        self.inner.metrics.connections.inc();
        tracing::info!(runtime = %runtime.url, conn = conn.id, resumed = taken.messages.len(), "runtime connected");
        Ok(conn)
    }

    /// The socket of `conn` is gone: its runtime is away (bindings kept; messages go to the
    /// inbox) until it reconnects or disconnects.
    pub fn detach(&self, conn: &Connection) {
        conn.runtime.detach(conn.id, &self.inner.persistence.inbox);
        self.inner.metrics.connections.dec();
        tracing::info!(runtime = %conn.runtime.url, conn = conn.id, "runtime socket closed");
    }

    /// The runtime said goodbye (`disconnect`/`close`): releases everything bound to it.
    pub async fn release(&self, conn: &Connection) -> Result<(), BusError> {
        self.release_runtime(&conn.runtime).await?;
        tracing::info!(runtime = %conn.runtime.url, "runtime released its addresses");
        Ok(())
    }

    async fn release_runtime(&self, runtime: &Arc<Runtime>) -> Result<(), BusError> {
        self.persist(&runtime.url, &RuntimeRecord::default())
            .await?;
        self.inner.subscriptions.remove_runtime(&runtime.url);
        self.inner.table.remove_runtime(&runtime.url);
        Ok(())
    }

    /// Handles one message from `conn`; the response to send back, if any.
    pub async fn handle(&self, conn: &Connection, message: Message) -> Option<String> {
        let started = std::time::Instant::now();
        let result = self.dispatch(conn, &message).await;
        self.inner
            .metrics
            .handle_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(response) => response,
            Err(error) => {
                self.inner.metrics.count(match error.code() {
                    400 => "bad_request",
                    403 => "denied",
                    404 => "not_found",
                    _ => "failed",
                });
                // A response is never answered: runtimes match responses by `to` and `id`
                // only, so an error answer to one could settle an unrelated request.
                if message.kind_is("response") {
                    tracing::info!(%error, from = %message.from, "a response was not delivered");
                    return None;
                }
                Some(message.error_response(&error))
            }
        }
    }

    async fn dispatch(
        &self,
        conn: &Connection,
        message: &Message,
    ) -> Result<Option<String>, BusError> {
        let component = match message.to.as_slice() {
            [to] => self.inner.nodes.component(to),
            _ => None,
        };
        if component == Some(Component::Session) {
            return self.session_message(conn, message).await;
        }
        self.verify_identity(conn, message).await?;
        if component == Some(Component::SubscriptionManager) && message.kind_is("subscribe") {
            return self.subscribe(conn, message).await.map(Some);
        }
        let allocation = match component {
            Some(
                c @ (Component::Allocation
                | Component::HypertyAllocation
                | Component::ObjectAllocation),
            ) => Some(allocation::Request::parse(c, message)?),
            _ => None,
        };
        let mut input = self.message_input(conn, message);
        if let Some(request) = &allocation {
            input["allocation"] = request.input(conn.runtime.held());
        }
        self.allowed(input).await?;
        self.check_from(conn, message).await?;
        match (component, allocation) {
            (_, Some(request)) => self.allocate(conn, message, request).await.map(Some),
            (Some(Component::SubscriptionManager), _) => {
                self.unsubscribe(conn, message).await.map(Some)
            }
            (Some(Component::Registry), _) => Ok(self
                .to_connector(conn, message, &*self.inner.registry)
                .await),
            (Some(Component::Idm), _) => {
                Ok(self.to_connector(conn, message, &self.inner.idm).await)
            }
            _ => self.route(conn, message).await,
        }
    }

    /// The policy input for a message from `conn`.
    fn message_input(&self, conn: &Connection, message: &Message) -> Value {
        let mut subject = self.subject(conn);
        // A peer node authenticated for its domain vouches for its own addresses.
        if let Principal::Peer(domain) = &conn.principal {
            if address::domain(&message.from).as_deref() == Some(domain.as_str()) {
                if let Some(addresses) = subject["addresses"].as_array_mut() {
                    addresses.push(json!(message.from));
                }
            }
        }
        json!({
            "kind": "message",
            "message": message.value,
            "subject": subject,
            "context": self.context(),
        })
    }

    fn subject(&self, conn: &Connection) -> Value {
        let mut subject = (*conn.runtime.subject()).clone();
        if let Some(identity) = conn.identity() {
            subject["identity"] = json!(identity);
        }
        match &conn.principal {
            Principal::User(_) => {}
            Principal::NetworkServer(name) => subject["network_server"] = json!(name),
            Principal::Peer(domain) => subject["peer"] = json!(domain),
        }
        subject
    }

    fn context(&self) -> Value {
        json!({
            "node": self.inner.nodes.domain(),
            "time": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        })
    }

    /// Asks the PDP; a deny is a 403 carrying the policy's reasons.
    async fn allowed(&self, input: Value) -> Result<Decision, BusError> {
        let decision = self.inner.decider.decide(input).await;
        if decision.allow {
            return Ok(decision);
        }
        Err(BusError::Forbidden(crate::pep::decider::refusal(&decision)))
    }

    /// Verifies `body.identity`, when asserted, and remembers it for the connection.
    async fn verify_identity(&self, conn: &Connection, message: &Message) -> Result<(), BusError> {
        let Some(claimed) = Idm::claimed(message.body()) else {
            return Ok(());
        };
        if conn.identity().as_deref() == Some(claimed) {
            return Ok(());
        }
        let body = message.body();
        // The assertion: an explicit token, else the identity object runtimes send (it
        // carries the IdP's assertion).
        let assertion = body
            .get("idToken")
            .or_else(|| body.get("assertion"))
            .or_else(|| body.get("identity"));
        let verified = self
            .inner
            .idm
            .verify(conn.user(), claimed, assertion)
            .await?;
        *conn.identity.lock().unwrap_or_else(|p| p.into_inner()) = Some(verified);
        Ok(())
    }

    /// Anti-spoofing, enforced by the node whatever the policy says: `from` must be held by
    /// the connection (or be a sub-resource of what it holds). A `from` of another domain,
    /// once the policy allowed it, becomes a return route of the connection.
    async fn check_from(&self, conn: &Connection, message: &Message) -> Result<(), BusError> {
        let from = message.from.as_str();
        let spoofed = || {
            BusError::Forbidden(format!(
                "sender '{from}' is not an address of this connection (spoofed 'from')"
            ))
        };
        if let Principal::Peer(domain) = &conn.principal {
            if address::domain(from).as_deref() == Some(domain.as_str()) {
                return Ok(());
            }
        }
        match self.inner.table.holder_of(from) {
            Some(holder) if Arc::ptr_eq(&holder, &conn.runtime) => return Ok(()),
            // Held (or a sub-resource of what is held) by another runtime.
            Some(_) => return Err(spoofed()),
            None => {}
        }
        if self.inner.nodes.is_local(from) {
            return Err(spoofed());
        }
        // A domain with a configured peer node is reached through that node; nobody here may
        // stand in for its addresses.
        if let Some(domain) = address::domain(from) {
            if self.inner.foreign.peer(&domain).is_some() {
                return Err(BusError::Forbidden(format!(
                    "addresses of '{domain}' are reached through its node, not used as 'from' here"
                )));
            }
        }
        // A transient local address for the foreign hyperty: bound to this connection and
        // backed by a virtual user, like an allocated one.
        if conn.runtime.with_record(|r| r.foreign.len()) >= MAX_FOREIGN_PER_RUNTIME {
            return Err(BusError::Forbidden(format!(
                "this runtime already uses {MAX_FOREIGN_PER_RUNTIME} foreign addresses"
            )));
        }
        self.register_users(&[from.to_string()]).await?;
        if !self.inner.table.bind_if_free(from, &conn.runtime) {
            return Err(spoofed());
        }
        let record = conn.runtime.update(|r| r.foreign.push(from.to_string()));
        if let Err(e) = self.persist(&conn.runtime.url, &record).await {
            conn.runtime.update(|r| r.foreign.retain(|a| a != from));
            self.inner.table.unbind(from, &conn.runtime);
            return Err(e);
        }
        Ok(())
    }

    /// Who `to` reaches. A topic (see `pubsub::topic`) reaches its subscribers; with none, a
    /// foreign topic goes to the peer node, a children topic to the object's holder, a changes
    /// topic to nobody. Any other address reaches the runtime holding it (or the nearest
    /// address it is a sub-resource of) — never subscribers — else a peer node (another
    /// domain), else nobody (unknown).
    fn destination(&self, to: &str) -> Destination {
        let subscribers = || {
            self.inner
                .subscriptions
                .subscribers(to)
                .into_iter()
                .map(|s| s.runtime)
                .collect::<Vec<_>>()
        };
        let local = self.inner.nodes.is_local(to);
        if let Some(topic) = pubsub::topic(to) {
            let subscribed = subscribers();
            if !subscribed.is_empty() {
                return Destination::Runtimes(subscribed);
            }
            if !local {
                return Destination::Foreign;
            }
            return match topic {
                pubsub::Topic::Children => {
                    Destination::Runtimes(self.inner.table.holder_of(to).into_iter().collect())
                }
                pubsub::Topic::Changes => Destination::Runtimes(Vec::new()),
            };
        }
        if let Some(runtime) = self.inner.table.holder_of(to) {
            Destination::Runtimes(vec![runtime])
        } else if !local {
            Destination::Foreign
        } else {
            Destination::Unknown
        }
    }

    /// Routes an allowed message to every destination ([`Bus::destination`]): runtimes (direct
    /// or inbox, recorded in the journal) or a peer node. Unknown local addresses are a 404.
    async fn route(
        &self,
        conn: &Connection,
        message: &Message,
    ) -> Result<Option<String>, BusError> {
        let mut targets: Vec<Arc<Runtime>> = Vec::new();
        let mut foreign: Vec<String> = Vec::new();
        let mut unknown: Vec<&str> = Vec::new();
        for to in &message.to {
            if self.inner.nodes.component(to).is_some() {
                return Err(BusError::BadRequest(format!(
                    "node component '{to}' takes a message of its own (a single 'to')"
                )));
            }
            match self.destination(to) {
                Destination::Runtimes(runtimes) => targets.extend(runtimes),
                Destination::Foreign => foreign.push(to.clone()),
                Destination::Unknown => unknown.push(to),
            }
        }
        let targets = Table::distinct(targets);
        if !targets.is_empty() && self.inner.history_behind.load(Ordering::Relaxed) {
            return Err(BusError::Unavailable(
                "the node's history is behind the homeserver; retry shortly".into(),
            ));
        }
        let journal = &self.inner.persistence.journal;
        if !targets.is_empty() {
            let to: Vec<String> = targets.iter().map(|r| r.url.clone()).collect();
            let persisted = self.inner.config.durability == Durability::Persisted;
            let to = if persisted {
                journal
                    .record_persisted(message.text.as_str(), to)
                    .await
                    .map_err(|e| BusError::Unavailable(format!("history unavailable: {e}")))?;
                None
            } else {
                Some(to)
            };
            let metrics = &self.inner.metrics;
            for runtime in &targets {
                match runtime.deliver(&message.text, &self.inner.persistence.inbox) {
                    router::Delivered::Direct => metrics.direct.inc(),
                    router::Delivered::Queued => metrics.queued.inc(),
                };
            }
            if let Some(to) = to {
                journal.record(message.text.as_str(), to);
            }
        }
        self.inner.metrics.routed.inc();
        if !foreign.is_empty() {
            // The peer may take a while; the socket keeps reading meanwhile.
            let bus = self.clone();
            let message = message.clone();
            let tx = conn.tx.clone();
            let tickets = self.inner.foreign.tickets(&foreign);
            tokio::spawn(async move {
                if let Some(response) = bus.inner.foreign.deliver(&message, tickets).await {
                    let _ = tx.send(Utf8Bytes::from(response)).await;
                }
            });
        }
        if let Some(first) = unknown.first() {
            return Err(BusError::NotFound(format!(
                "no route to '{first}': nothing holds this address"
            )));
        }
        Ok(None)
    }

    async fn to_connector(
        &self,
        conn: &Connection,
        message: &Message,
        connector: &dyn Connector,
    ) -> Option<String> {
        let identity = conn
            .identity()
            .or_else(|| conn.user().map(|u| self.inner.idm.own_identity(u)));
        let table = &self.inner.table;
        let runtime = &conn.runtime;
        let holds = |url: &str| {
            table
                .holder_of(url)
                .is_some_and(|holder| Arc::ptr_eq(&holder, runtime))
        };
        let sender = Sender {
            runtime: &conn.runtime.url,
            user: conn.user(),
            identity: identity.as_deref(),
            holds: &holds,
        };
        let reply = connector.handle(message, sender).await;
        self.inner.metrics.count("component");
        if let Some(publish) = reply.publish {
            self.publish(publish);
        }
        reply.response
    }

    /// Sends a node-originated message (a notification) to whoever `to` reaches.
    fn publish(&self, mut notification: Value) {
        notification["id"] = json!(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        let Ok(message) = Message::from_value(notification, None) else {
            return;
        };
        let mut targets = Vec::new();
        for to in &message.to {
            if let Destination::Runtimes(runtimes) = self.destination(to) {
                targets.extend(runtimes);
            }
        }
        let targets = Table::distinct(targets);
        for runtime in &targets {
            runtime.deliver(&message.text, &self.inner.persistence.inbox);
        }
        self.inner.persistence.journal.record(
            message.text.as_str(),
            targets.iter().map(|r| r.url.clone()).collect(),
        );
    }

    /// Messages to `mn:/session`: `ping`, `read`, `open`/`re-open` after the handshake
    /// (acknowledged with the runtime URL); `close`/`disconnect` (releases everything).
    async fn session_message(
        &self,
        conn: &Connection,
        message: &Message,
    ) -> Result<Option<String>, BusError> {
        match message.kind.to_ascii_lowercase().as_str() {
            "close" | "disconnect" => {
                self.release(conn).await?;
                conn.close.cancel();
                Ok(Some(message.response(200, "closed", None)))
            }
            "open" | "re-open" | "ping" | "read" => Ok(Some(message.response(
                200,
                "",
                Some(json!({"runtimeURL": conn.runtime.url})),
            ))),
            other => Err(BusError::BadRequest(format!(
                "the session answers open, re-open, ping, read, close and disconnect, not '{other}'"
            ))),
        }
    }

    /// Writes a runtime's record to the store (an empty record deletes it).
    async fn persist(&self, runtime: &str, record: &RuntimeRecord) -> Result<(), BusError> {
        self.inner
            .persistence
            .store
            .put_runtime(runtime, record)
            .await
            .map_err(|e| BusError::Unavailable(format!("cannot store the change now: {e}")))
    }

    /// Whether `runtime` may subscribe to `resource`: only topics reach subscribers; anything
    /// else reaches its holder, so only that holder may subscribe to it (a reporter listing
    /// its own object).
    fn may_subscribe(&self, resource: &str, runtime: &Arc<Runtime>) -> bool {
        pubsub::is_topic(resource)
            || self
                .inner
                .table
                .holder_of(resource)
                .is_some_and(|h| Arc::ptr_eq(&h, runtime))
    }

    /// Subscribe: one decision per resource (`kind: "subscription"`); all allowed → all bound
    /// to the subscriber and stored, 200; any denied → none bound, 403 with every reason.
    async fn subscribe(&self, conn: &Connection, message: &Message) -> Result<String, BusError> {
        let mut resources = message.body_strings("resources")?.unwrap_or_default();
        resources.extend(message.body_strings("subscribe")?.unwrap_or_default());
        if resources.is_empty() {
            return Err(BusError::BadRequest(
                "subscribe needs body.resources (or the legacy body.subscribe)".into(),
            ));
        }
        let subscriber = message
            .body()
            .get("source")
            .and_then(Value::as_str)
            .unwrap_or(conn.runtime.url.as_str())
            .to_string();
        let runtime = self
            .inner
            .table
            .holder_of(&subscriber)
            .filter(|r| Arc::ptr_eq(r, &conn.runtime))
            .ok_or_else(|| {
                BusError::Forbidden(format!(
                    "subscriber '{subscriber}' is not an address of this connection"
                ))
            })?;
        for resource in &resources {
            if !message::is_url(resource) || !address::is_clean(resource) {
                return Err(BusError::BadRequest(format!(
                    "subscribe: {resource:?} is not a URL"
                )));
            }
            if !self.may_subscribe(resource, &runtime) {
                return Err(BusError::Forbidden(format!(
                    "'{resource}' is not a topic (…/changes, …/registration, <object>/children/…): only its holder receives what is sent to it"
                )));
            }
        }
        if runtime.with_record(|r| r.subscriptions.len()) + resources.len()
            > MAX_SUBSCRIPTIONS_PER_RUNTIME
        {
            return Err(BusError::Forbidden(format!(
                "a runtime may hold at most {MAX_SUBSCRIPTIONS_PER_RUNTIME} subscriptions"
            )));
        }
        let mut reasons = Vec::new();
        let (subject, context) = (self.subject(conn), self.context());
        for resource in &resources {
            let input = json!({
                "kind": "subscription",
                "message": message.value,
                "subscription": {"resource": resource, "subscriber": subscriber},
                "subject": subject,
                "context": context,
            });
            if let Err(e) = self.allowed(input).await {
                reasons.push(e.to_string());
            }
        }
        if !reasons.is_empty() {
            reasons.sort();
            reasons.dedup();
            return Err(BusError::Forbidden(reasons.join("; ")));
        }
        self.check_from(conn, message).await?;
        let before = runtime.record().subscriptions;
        let record = runtime.update(|r| {
            for resource in &resources {
                r.subscriptions.insert(resource.clone(), subscriber.clone());
            }
        });
        if let Err(e) = self.persist(&runtime.url, &record).await {
            runtime.update(|r| r.subscriptions = before);
            return Err(e);
        }
        for resource in &resources {
            self.inner.subscriptions.add(
                resource,
                Subscriber {
                    address: subscriber.clone(),
                    runtime: Arc::clone(&runtime),
                },
            );
        }
        self.inner.metrics.count("component");
        Ok(message.response(200, "subscribed", Some(json!({"subscribed": resources}))))
    }

    async fn unsubscribe(&self, conn: &Connection, message: &Message) -> Result<String, BusError> {
        if !message.kind_is("unsubscribe") {
            return Err(BusError::BadRequest(format!(
                "the subscription manager answers subscribe and unsubscribe, not '{}'",
                message.kind
            )));
        }
        let mut resources = message.body_strings("resources")?.unwrap_or_default();
        resources.extend(message.body_strings("unsubscribe")?.unwrap_or_default());
        if resources.is_empty() {
            return Err(BusError::BadRequest(
                "unsubscribe needs body.resources (or the legacy body.unsubscribe)".into(),
            ));
        }
        let record = conn.runtime.record();
        let mut removed = Vec::new();
        for resource in &resources {
            if let Some(subscriber) = record.subscriptions.get(resource) {
                self.inner.subscriptions.remove(resource, subscriber);
                removed.push(resource.clone());
            }
        }
        let record = conn.runtime.update(|r| {
            for resource in &removed {
                r.subscriptions.remove(resource);
            }
        });
        self.persist(&conn.runtime.url, &record).await?;
        self.inner.metrics.count("component");
        Ok(message.response(200, "unsubscribed", Some(json!({"unsubscribed": removed}))))
    }

    /// The bus's housekeeping, every [`REVISION_POLL`]: re-decides every subscription when a
    /// new policy revision is active (a revoked subscriber is unsubscribed and told why);
    /// notes whether the history is too far behind to accept more; and, now and then,
    /// releases runtimes away longer than `[bus] away_release_after`.
    async fn maintain(self, shutdown: CancellationToken) {
        let generation = |pdp: &Pdp| pdp.active().map(|a| a.generation);
        let mut seen = generation(&self.inner.pdp);
        let mut ticks: u64 = 0;
        // Look for long-away runtimes every ~10 s, or twice per grace period when shorter.
        let reap_every =
            (self.inner.config.away_release_after.as_millis() / REVISION_POLL.as_millis() / 2)
                .clamp(1, u128::from(REAP_EVERY_TICKS)) as u64;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(REVISION_POLL) => {}
            }
            ticks += 1;
            let now = generation(&self.inner.pdp);
            if now != seen {
                seen = now;
                self.revalidate().await;
            }
            let lag = self.inner.persistence.journal.stats().lag;
            let behind = lag > self.inner.config.max_history_backlog;
            if behind != self.inner.history_behind.swap(behind, Ordering::Relaxed) {
                if behind {
                    tracing::warn!(
                        lag,
                        "history is behind; refusing new messages until the homeserver catches up"
                    );
                } else {
                    tracing::info!(lag, "history caught up; accepting messages again");
                }
            }
            if ticks % reap_every == 0 {
                self.release_long_away().await;
            }
        }
    }

    /// Releases every runtime that no socket has held for `[bus] away_release_after`.
    async fn release_long_away(&self) {
        let limit = self.inner.config.away_release_after;
        for runtime in self.inner.table.runtimes() {
            if runtime.away_for().is_some_and(|away| away >= limit)
                && !self.held_elsewhere(&runtime)
            {
                match self.release_runtime(&runtime).await {
                    Ok(()) => {
                        tracing::info!(runtime = %runtime.url, ?limit, "runtime away too long: released")
                    }
                    Err(e) => {
                        tracing::warn!(%e, runtime = %runtime.url, "cannot release a runtime away too long; will retry")
                    }
                }
            }
        }
    }

    /// Re-decides every subscription now.
    pub async fn revalidate(&self) {
        for (resource, subscriber) in self.inner.subscriptions.all() {
            if self.held_elsewhere(&subscriber.runtime) {
                continue; // that replica re-decides it
            }
            let subject = (*subscriber.runtime.subject()).clone();
            let input = json!({
                "kind": "subscription",
                "subscription": {"resource": resource, "subscriber": subscriber.address},
                "subject": subject,
                "context": self.context(),
            });
            let Err(reason) = self.allowed(input).await else {
                continue;
            };
            self.inner
                .subscriptions
                .remove(&resource, &subscriber.address);
            let record = subscriber.runtime.update(|r| {
                r.subscriptions.remove(&resource);
            });
            if let Err(e) = self.persist(&subscriber.runtime.url, &record).await {
                tracing::warn!(%e, runtime = %subscriber.runtime.url, "cannot store a revoked subscription");
            }
            tracing::info!(%resource, subscriber = %subscriber.address, %reason, "subscription revoked by a policy change");
            self.inner.metrics.count("revoked");
            self.publish(json!({
                "type": "unsubscribe",
                "from": self.inner.nodes.subscription_manager,
                "to": subscriber.address,
                "body": {"resources": [resource], "code": 403, "description": reason.to_string()},
            }));
        }
    }

    /// Writes everything pending to the homeserver (at shutdown).
    pub async fn flush(&self) {
        self.inner.persistence.journal.flush().await;
    }
}

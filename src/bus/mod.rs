//! The reTHINK message bus: protocol stubs connect over WebSocket, get addresses allocated,
//! exchange messages and subscribe to objects — every message and every subscription decided
//! by the PDP first.
//!
//! [`Bus`] is the state every part shares; [`Bus::handle`] is the path of one message, read
//! top-down: the message is parsed once into a [`request::Request`] naming what it asks, then
//! - `session` answers `mn:/session` (open, ping, close), decided by no one;
//! - `decision` verifies an asserted identity and asks the PDP (`kind: "message"`, with
//!   `allocation` for allocation requests), `routing::check_from` enforces anti-spoofing;
//! - a component acts: `allocation`, `subscriptions` (the subscription manager: subscribe,
//!   unsubscribe, and re-deciding on every policy revision), `connector` (registry, IdM);
//! - anything else is routed (`routing`): to the runtimes holding the address (direct or
//!   their inbox; `flow` slows the sender while a receiver's queue is full), to subscribers
//!   of a topic, or to a peer node; then journaled.
//!
//! The rest of the bus: `claim` (addresses taken for good on first use), `lifecycle`
//! (authenticate, bind, attach, detach, release, restore),
//! `runtimes` (who holds which address, per-runtime delivery state), `pubsub` (who
//! subscribed to what), `housekeeping` (policy revisions, history backlog, reaping),
//! `replicas` (what other replicas write), `peers` (what other domains' nodes send),
//! `socket` (the WebSocket sessions) and `listener` (the HTTP routes). What it keeps in
//! Matrix is `persist`'s; the message model is `rethink`'s.

pub mod allocation;
mod claim;
mod connection;
mod connector;
mod decision;
mod flow;
mod handshakes;
mod housekeeping;
mod lifecycle;
pub mod listener;
mod metrics;
pub(crate) mod outbound;
mod owners;
mod peers;
pub mod pubsub;
mod replicas;
mod request;
mod routing;
pub mod runtimes;
mod session;
mod socket;
pub mod socketio;
mod subscriptions;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::BusConfig;
use crate::connectors::foreign::Foreign;
use crate::connectors::idm::Idm;
use crate::connectors::registry::{BuiltinRegistry, HttpRegistry};
use crate::connectors::Connector;
use crate::matrix::{Actor, Homeserver};
use crate::pdp::Pdp;
use crate::persist::follower::Follower;
use crate::persist::inbox::Inbox;
use crate::persist::journal::Journal;
use crate::persist::store::{RuntimeRecord, Store, StoreError};
use crate::policy::Decider;
use crate::rethink::address::NodeAddresses;
use crate::rethink::{BusError, Message};
use metrics::BusMetrics;
use pubsub::Subscriptions;
use request::Request;
use runtimes::Table;

pub use connection::{Connection, Principal, MAX_PENDING_ANSWERS};

/// What the bus keeps in the homeserver (or, without one, in memory), and the homeserver
/// clients it needs.
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

/// Where decisions come from.
struct Policy {
    /// The local PDP, watched for new revisions.
    pdp: Pdp,
    /// Where decisions come from (the local PDP, or `[pep] pdp_url`).
    decider: Decider,
}

/// The components messages are handed to.
struct Connectors {
    registry: Arc<dyn Connector>,
    /// The built-in registry (no `[bus.registry] url`), which other replicas' changes update.
    builtin_registry: Option<Arc<BuiltinRegistry>>,
    idm: Idm,
    foreign: Foreign,
}

struct Inner {
    config: BusConfig,
    nodes: NodeAddresses,
    policy: Policy,
    /// Who holds which address.
    table: Table,
    /// Who subscribed to what.
    subscriptions: Subscriptions,
    persistence: Persistence,
    connectors: Connectors,
    metrics: BusMetrics,
    next_conn: AtomicU64,
    /// Ids of node-originated messages (notifications).
    next_id: AtomicU64,
    /// Cancelled when the node stops: every socket closes.
    shutdown: CancellationToken,
    /// The journal is more than `max_history_backlog` behind: new messages are refused.
    history_behind: AtomicBool,
    /// Background work the node waits for at shutdown.
    tracker: TaskTracker,
    /// Peer message events handled lately: a retried transaction's repeats are skipped.
    peer_events: peers::SeenEvents,
    /// Messages per principal.
    rate: crate::ratelimit::Limiter,
    /// Sockets not authenticated yet.
    handshakes: handshakes::Handshakes,
    /// Sockets connected, per principal.
    sockets: connection::Sockets,
    /// Other replicas' records being read in parts.
    fetches: replicas::Fetches,
}

/// The answer to a change the store did not take.
fn store_error(e: StoreError) -> BusError {
    match e {
        StoreError::TooLarge(why) => BusError::TooLarge(format!("cannot store the change: {why}")),
        StoreError::Homeserver(e) => {
            BusError::Unavailable(format!("cannot store the change now: {e}"))
        }
        StoreError::Batch(e) => BusError::Unavailable(format!("cannot store the change now: {e}")),
    }
}

/// Handle to the bus; clones share everything.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

impl Bus {
    /// Builds the bus for `config.domain` (`start_bus` sets it; `localhost` if unset),
    /// restoring runtimes, allocations, subscriptions and registry entries from the store,
    /// and starts its housekeeping (and, with `[bus] replica`, following the other replicas).
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
                Follower::begin(Arc::clone(actor), node, state_room)
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
                Some(url) => (
                    Arc::new(HttpRegistry::new(url, config.max_response_bytes)),
                    None,
                ),
                None => {
                    let builtin = Arc::new(BuiltinRegistry::new(
                        snapshot.registry,
                        persistence.store.clone(),
                        config.max_response_bytes,
                    ));
                    (builtin.clone(), Some(builtin))
                }
            };
        persistence.inbox.limit_bytes(
            config.inbox_max_bytes,
            config.inbox_max_bytes_per_principal,
            config.inbox_max_bytes_per_runtime,
        );
        persistence.journal.limit_shares(
            config.max_history_bytes_per_principal,
            config.max_history_backlog_per_principal,
        );
        let rate = crate::ratelimit::Limiter::new(&config.rate_limit);
        let handshakes = handshakes::Handshakes::new(&config);
        let bus = Bus {
            inner: Arc::new(Inner {
                nodes: NodeAddresses::new(domain),
                connectors: Connectors {
                    registry: registry_connector,
                    builtin_registry,
                    idm: Idm::new(config.idm.clone(), domain),
                    foreign: Foreign::new(
                        config.peers.clone(),
                        persistence.actor.clone(),
                        crate::connectors::foreign::Limits {
                            messages: config.peer_queue,
                            bytes: config.peer_queue_bytes,
                            answer_bytes: config.max_frame_bytes,
                        },
                    )
                    .map_err(|e| anyhow::anyhow!(e))?,
                },
                config,
                policy: Policy { pdp, decider },
                table: Table::default(),
                subscriptions: Subscriptions::default(),
                persistence,
                metrics: BusMetrics::new(registry),
                next_conn: AtomicU64::new(1),
                next_id: AtomicU64::new(1),
                shutdown: shutdown.child_token(),
                history_behind: AtomicBool::new(false),
                tracker: tracker.clone(),
                peer_events: peers::SeenEvents::default(),
                rate,
                handshakes,
                sockets: connection::Sockets::default(),
                fetches: replicas::Fetches::default(),
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
            let bus = bus.clone();
            tracker.spawn(follower.run(move |seen| bus.followed(seen), shutdown.child_token()));
        }
        Ok(bus)
    }

    /// The node's addresses.
    pub fn nodes(&self) -> &NodeAddresses {
        &self.inner.nodes
    }

    /// The bus configuration.
    pub fn config(&self) -> &BusConfig {
        &self.inner.config
    }

    /// Handles one message from `conn`; the response to send back, if any.
    pub async fn handle(&self, conn: &Connection, message: Message) -> Option<String> {
        let started = std::time::Instant::now();
        let result = match self.inner.rate.check(&conn.principal.owner()) {
            Ok(()) => self.dispatch(conn, &message).await,
            Err(wait) => Err(BusError::RateLimited(format!(
                "too many messages: retry in {} ms",
                crate::ratelimit::millis(wait)
            ))),
        };
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
                    429 => "rate_limited",
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

    /// What `message` asks, decided and carried out: the session answers; everything else
    /// is decided first (the subscription manager decides each resource of a subscribe),
    /// checked against spoofing, then handed to its component or routed.
    async fn dispatch(
        &self,
        conn: &Connection,
        message: &Message,
    ) -> Result<Option<String>, BusError> {
        let request = Request::parse(&self.inner.nodes, message)?;
        if let Principal::Peer(domain) = &conn.principal {
            peers::only_routes(domain, &request, message)?;
        }
        if let Request::Session(op) = request {
            return self.session(conn, message, op).await;
        }
        self.verify_identity(conn, message).await?;
        // A request that may add to what the principal holds is decided and its change
        // counted in the principal's turn: the counts it is decided on are the counts it
        // changes. The turn is given back once the change is counted, before anything is
        // delivered (see `owners::Turns`).
        let turn = match self.may_add(conn, &request, message) {
            true => Some(
                self.turn(
                    &conn.principal.owner(),
                    self.config().slow_receiver_close_after,
                )
                .await?,
            ),
            false => None,
        };
        let claimed = self.claim_from(conn, message).await?;
        if let Request::Subscribe = request {
            // The claim's write is waited for after the turn (given back in `subscribe`),
            // whatever the subscribe's outcome, and before it is answered: the principal's
            // other runtimes' claims go out with it (a stub's `…/sm` on every subscribe).
            let answer = self.subscribe(conn, message, turn).await;
            if let Some(claimed) = claimed {
                claimed.await?;
            }
            return answer.map(Some);
        }
        if let Some(claimed) = claimed {
            claimed.await?;
        }
        if message.to.len() > self.inner.config.max_destinations {
            return Err(BusError::BadRequest(format!(
                "a message may have at most {} destinations, not {}",
                self.inner.config.max_destinations,
                message.to.len()
            )));
        }
        let allocation = match &request {
            Request::Allocation(allocation) => Some(allocation.input(conn.runtime.held())),
            _ => None,
        };
        // What the principal holds, for the requests that can add to it: allocations,
        // registrations, and a `from` not bound yet (a return route to be). Its registry
        // entries are counted (a walk over its runtimes) only for a `create`, the one
        // registry request that can add one.
        let principal = match &request {
            Request::Allocation(_) => Some(self.totals(&conn.principal.owner(), false)),
            Request::Registry => {
                Some(self.totals(&conn.principal.owner(), message.kind_is("create")))
            }
            _ if turn.is_some() => Some(self.totals(&conn.principal.owner(), false)),
            _ => None,
        };
        self.enforce_limits(&request, message, principal.as_ref())?;
        self.allowed(&self.message_input(conn, message, allocation, principal))
            .await?;
        self.check_from(conn, message).await?;
        match request {
            Request::Allocation(allocation) => self.allocate(conn, message, allocation, turn).await,
            Request::Unsubscribe => self.unsubscribe(conn, message).await.map(Some),
            Request::Registry => Ok(self
                .to_connector(conn, message, &*self.inner.connectors.registry, turn)
                .await),
            Request::Idm => {
                drop(turn);
                Ok(self
                    .to_connector(conn, message, &self.inner.connectors.idm, None)
                    .await)
            }
            Request::Route => {
                // The return route, if any, is counted: what follows waits on receivers.
                drop(turn);
                self.route(conn, message).await
            }
            Request::Session(_) | Request::Subscribe => Ok(None), // answered above
        }
    }

    /// Whether `message` may add to what `conn`'s principal holds: an allocation, a
    /// registration (a registry `create`; reads, updates and deletes add nothing, so a
    /// user's reads never wait on each other), a subscribe (its `from` may become a return
    /// route), or a `from` the connection does not hold yet (a claim or a return route to
    /// be) — not a peer's own domain, which it vouches for and which never becomes a route
    /// here.
    fn may_add(&self, conn: &Connection, request: &Request, message: &Message) -> bool {
        match request {
            Request::Allocation(_) | Request::Subscribe => true,
            Request::Registry if message.kind_is("create") => true,
            _ => !self.holds_from(conn, message),
        }
    }

    /// The principal `owner`'s turn (see `owners::Turns`), waited for at most `within` (no
    /// wait is unbounded): else 408, retry.
    async fn turn(
        &self,
        owner: &str,
        within: std::time::Duration,
    ) -> Result<owners::Turn<'_>, BusError> {
        self.inner
            .table
            .turns
            .take(owner, within)
            .await
            .ok_or_else(|| {
                self.inner.metrics.refuse(metrics::refused::TURN_BUSY);
                BusError::Unavailable(
                    "this user's other requests are still being carried out; retry shortly".into(),
                )
            })
    }

    /// The per-principal backstops (`[bus.limits]`), whatever the policy says: 403 when
    /// `request` would take the principal past one.
    fn enforce_limits(
        &self,
        request: &Request,
        message: &Message,
        totals: Option<&crate::policy::input::Totals>,
    ) -> Result<(), BusError> {
        let (Some(totals), limits) = (totals, &self.inner.config.limits) else {
            return Ok(());
        };
        let over = |what: &'static str, have: usize, limit: usize| {
            self.inner.metrics.limited(match what {
                "addresses" => "addresses",
                "registry entries" => "registry_entries",
                _ => "foreign_routes",
            });
            Err(BusError::Forbidden(format!(
                "this user holds {have} {what} (the limit is {limit})"
            )))
        };
        match request {
            Request::Allocation(allocation::AllocationRequest::Create { number, .. })
                if totals.addresses + *number as usize > limits.addresses_per_principal =>
            {
                over(
                    "addresses",
                    totals.addresses,
                    limits.addresses_per_principal,
                )
            }
            Request::Registry
                if message.kind_is("create")
                    && totals.registry_entries.unwrap_or(0)
                        >= limits.registry_entries_per_principal =>
            {
                over(
                    "registry entries",
                    totals.registry_entries.unwrap_or(0),
                    limits.registry_entries_per_principal,
                )
            }
            Request::Route if totals.foreign_routes >= limits.foreign_routes_per_principal => over(
                "foreign return routes",
                totals.foreign_routes,
                limits.foreign_routes_per_principal,
            ),
            _ => Ok(()),
        }
    }

    /// Writes a runtime's record to the store (an empty record deletes it).
    ///
    /// # Errors
    /// 413 when the record is too large to store (nothing written), 408 when the homeserver
    /// cannot store it now.
    /// As [`Bus::persist`], placed in line now and stored when the future runs.
    fn persist_queued(
        &self,
        runtime: &str,
        record: &RuntimeRecord,
    ) -> Result<futures_util::future::BoxFuture<'static, Result<(), StoreError>>, BusError> {
        self.inner
            .persistence
            .store
            .put_runtime_queued(runtime, record)
            .map_err(|too_large| store_error(too_large.into()))
    }

    async fn persist(&self, runtime: &str, record: &RuntimeRecord) -> Result<(), BusError> {
        self.inner
            .persistence
            .store
            .put_runtime(runtime, record)
            .await
            .map_err(store_error)
    }

    /// A node-originated message id.
    fn next_message_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Writes everything pending to the homeserver (at shutdown).
    pub async fn flush(&self) {
        self.inner.persistence.journal.flush().await;
    }
}

//! msgnode as a Matrix policy server (MSC4284): the homeserver asks it before accepting an
//! event — its own clients' events and events arriving over federation alike — and Rego
//! decides, through the same [`Decider`] and input contract as the proxy and the
//! appservice (with `matrix.via = "policy_server"`).
//!
//! - `listener` is this file: [`start`], the route table [`router`], [`PolicyServer`].
//! - `sign` — `POST /_matrix/policy/v1/sign`: verify, decide, sign or refuse.
//! - `auth` — `X-Matrix` verification of incoming requests.
//! - `federation` — key server, `/.well-known/matrix/policy_server`, version, `/invite`,
//!   `/send` acknowledgements.
//! - `join` — putting the policy server into rooms (invite, make_join/send_join,
//!   `m.room.policy`), and the sweep over `[policy_server] rooms`.
//! - `client`, `keyring`, `rooms` — federation requests (ruma types, `X-Matrix` signed),
//!   other servers' keys, room versions.
//! - `keys`, `tls` — the two ed25519 keys and the certificate, kept in the state dir.
//! - `error` — [`PolicyServerError`] → Matrix `{"errcode", "error"}`: the only place it
//!   becomes HTTP.
//!
//! Floor 4, beside `pep` and `bus`: it imports `policy`, `matrix`, `pdp` (through the
//! decider) and `config`, and neither `pep` nor `bus` (nor they it).

pub mod auth;
pub mod client;
pub mod error;
pub mod federation;
pub mod join;
pub mod keyring;
pub mod keys;
pub mod rooms;
pub mod sign;
pub mod testing;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::routing::{get, post, put};
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use ruma::api::path_builder::SinglePath;
use ruma::api::Metadata;
use ruma::OwnedServerName;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use error::PolicyServerError;
pub use keys::Keys;

use crate::config::PolicyServerConfig;
use crate::matrix::Actor;
use crate::policy::Decider;

/// The policy server (cheap to clone).
#[derive(Clone)]
pub struct PolicyServer {
    inner: Arc<Inner>,
}

struct Inner {
    config: PolicyServerConfig,
    /// Its server name (`via`).
    name: OwnedServerName,
    /// `@<user>:<name>`, its member of each room.
    user_id: String,
    /// The homeserver whose rooms it protects (`[pep] server_name`): create events are
    /// fetched from it, invitations accepted from it only, joins made through it.
    homeserver: OwnedServerName,
    /// `context.node` of its policy inputs.
    node: String,
    keys: Arc<Keys>,
    client: Arc<client::FederationClient>,
    keyring: keyring::Keyring,
    rooms: rooms::Rooms,
    decider: Decider,
    /// Answers by (event id, policy generation).
    answers: moka::sync::Cache<(String, u64), sign::Answer>,
    /// Rooms its user was invited to, to join at the next sweep.
    invited: moka::sync::Cache<String, ()>,
    /// Joined rooms of the node's user that are not protected (the node's own).
    not_watched: moka::sync::Cache<String, ()>,
    /// Acts as the node's appservice user (joins, invites, `m.room.policy`).
    actor: Option<Arc<Actor>>,
    metrics: Metrics,
}

impl PolicyServer {
    /// A policy server for the rooms of `homeserver` (`[pep] server_name`), deciding with
    /// `decider`, acting in the homeserver as `actor` when given.
    ///
    /// # Errors
    /// An invalid server name, or an HTTP client that cannot be built.
    pub fn new(
        config: &PolicyServerConfig,
        keys: Keys,
        homeserver: &str,
        decider: Decider,
        actor: Option<Arc<Actor>>,
        registry: &mut Registry,
    ) -> anyhow::Result<Self> {
        let name = OwnedServerName::try_from(config.server_name.as_str())
            .with_context(|| format!("[policy_server] server_name {:?}", config.server_name))?;
        let homeserver_name = OwnedServerName::try_from(homeserver)
            .with_context(|| format!("[pep] server_name {homeserver:?}"))?;
        let user_id = format!("@{}:{name}", config.user);
        ruma::UserId::parse(&user_id)
            .with_context(|| format!("[policy_server] user {:?}", config.user))?;
        let keys = Arc::new(keys);
        let client = Arc::new(client::FederationClient::new(
            name.clone(),
            Arc::clone(&keys),
            config.servers.clone(),
            config.verify_certificates,
            config.request_timeout,
        )?);
        let keyring = keyring::Keyring::new(Arc::clone(&client));
        keyring.insert_fixed(
            name.as_str(),
            [(
                keys.federation_key_id(),
                ruma::serde::Base64::new(keys.federation.public_key().to_vec()),
            )]
            .into(),
        );
        let rooms = rooms::Rooms::new(Arc::clone(&client), homeserver_name.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                config: config.clone(),
                name,
                user_id,
                homeserver: homeserver_name,
                node: homeserver.to_string(),
                keys,
                client,
                keyring,
                rooms,
                decider,
                answers: moka::sync::Cache::builder()
                    .max_capacity(config.cache_max_entries)
                    .time_to_live(config.cache_ttl)
                    .build(),
                invited: moka::sync::Cache::builder()
                    .max_capacity(1_000)
                    .time_to_live(Duration::from_secs(3600))
                    .build(),
                not_watched: moka::sync::Cache::builder().max_capacity(100_000).build(),
                actor,
                metrics: Metrics::new(registry),
            }),
        })
    }

    /// Its server name (`via`).
    pub fn server_name(&self) -> &str {
        self.inner.name.as_str()
    }

    /// Its user, the member of each protected room.
    pub fn user_id(&self) -> &str {
        &self.inner.user_id
    }

    /// The keyring (to know a server's keys without asking it: tests and benchmarks).
    pub fn keyring(&self) -> &keyring::Keyring {
        &self.inner.keyring
    }

    /// The event `event_id` as the homeserver has it, signatures included (what a policy
    /// signature can be checked on).
    ///
    /// # Errors
    /// A malformed id, or the homeserver does not give the event.
    pub async fn homeserver_event(
        &self,
        event_id: &str,
    ) -> Result<ruma::CanonicalJsonObject, client::ClientError> {
        let id =
            ruma::OwnedEventId::try_from(event_id).map_err(|e| client::ClientError::Request {
                server: self.inner.homeserver.to_string(),
                why: e.to_string(),
            })?;
        self.inner.rooms.fetch(id).await
    }

    /// Remembers `room_id`'s version (tests and benchmarks; otherwise learnt from the
    /// homeserver).
    pub fn note_room(&self, room_id: &str, version: ruma::RoomVersionId) {
        self.inner.rooms.note(room_id, version);
    }
}

/// The route table of the policy server's listener (paths from ruma's metadata).
pub fn router(server: PolicyServer) -> Router {
    use ruma::api::client::discovery::discover_policy_server;
    use ruma::api::federation::{discovery::get_server_keys, membership::create_invite};
    use ruma::api::federation::{policy::sign_event, transactions::send_transaction_message};
    Router::new()
        .route(path::<sign_event::v1::Request>(), post(sign::sign_route))
        .route(
            "/_matrix/policy/unstable/org.matrix.msc4284/sign",
            post(sign::sign_route),
        )
        .route(
            path::<get_server_keys::v2::Request>(),
            get(federation::keys_route),
        )
        .route(
            "/_matrix/key/v2/server/{key_id}",
            get(federation::keys_route),
        )
        .route(
            path::<discover_policy_server::Request>(),
            get(federation::well_known_route),
        )
        .route(
            "/_matrix/federation/v1/version",
            get(federation::version_route),
        )
        .route(
            path::<create_invite::v2::Request>(),
            put(federation::invite_route),
        )
        .route(
            path::<send_transaction_message::v1::Request>(),
            put(federation::send_route),
        )
        .fallback(federation::unrecognized_route)
        .with_state(server)
}

fn path<T: Metadata<PathBuilder = SinglePath>>() -> &'static str {
    T::PATH_BUILDER.path()
}

/// A started policy server: where it listens.
pub struct Started {
    /// The listener's address.
    pub addr: SocketAddr,
    /// The server.
    pub server: PolicyServer,
}

/// Starts the policy server `config` describes: keys and certificate from its state dir,
/// the TLS listener, and the sweep over `[policy_server] rooms` (with an `actor`).
///
/// # Errors
/// Keys or certificate unreadable, an invalid name, or the address in use.
pub async fn start(
    config: &PolicyServerConfig,
    homeserver: &str,
    decider: Decider,
    actor: Option<Arc<Actor>>,
    registry: &mut Registry,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<Started> {
    let keys = Keys::load_or_generate(&config.state_dir)?;
    let tls = tls::server_config(config)?;
    let has_actor = actor.is_some();
    let server = PolicyServer::new(config, keys, homeserver, decider, actor, registry)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} ([policy_server] listen)",
                config.listen
            )
        })?;
    let addr = listener.local_addr()?;
    tls::serve(
        listener,
        tls,
        router(server.clone()),
        config.max_connections,
        shutdown.child_token(),
        tracker,
    );
    if has_actor {
        tracker.spawn(join::sweep_loop(server.clone(), shutdown.child_token()));
    } else if !config.rooms.is_empty() {
        tracing::warn!("[policy_server] rooms need [pep] registration: only rooms whose admins invite the policy server are protected");
    }
    tracing::info!(%addr, server_name = %server.server_name(), user = %server.user_id(), "policy server listening (TLS)");
    Ok(Started { addr, server })
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
    outcome: &'static str,
}

/// The policy server's metrics (labels are closed sets).
struct Metrics {
    signs: Family<OutcomeLabel, Counter>,
    sign_seconds: Histogram,
    federation: Family<RouteLabels, Counter>,
    protect: Family<OutcomeLabel, Counter>,
}

impl Metrics {
    fn new(registry: &mut Registry) -> Self {
        let signs = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "policy_server_sign_requests",
            "Sign requests, by outcome (allowed, denied, cached, refused, unauthorized, bad_request, unknown_room, internal)",
            signs.clone(),
        );
        // 50 µs .. ~1.6 s
        let sign_seconds = Histogram::new(exponential_buckets(5e-5, 2.0, 16));
        registry.register(
            "policy_server_sign_duration_seconds",
            "Time to answer one sign request (verification, decision, signing)",
            sign_seconds.clone(),
        );
        let federation = Family::<RouteLabels, Counter>::default();
        registry.register(
            "policy_server_federation_requests",
            "Other federation requests to the policy server, by route and outcome",
            federation.clone(),
        );
        let protect = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "policy_server_protect",
            "Rooms checked or put under the policy server, by outcome",
            protect.clone(),
        );
        Self {
            signs,
            sign_seconds,
            federation,
            protect,
        }
    }

    fn signed(&self, outcome: &'static str, took: Duration) {
        self.signs.get_or_create(&OutcomeLabel { outcome }).inc();
        self.sign_seconds.observe(took.as_secs_f64());
    }

    fn federation(&self, route: &'static str, outcome: &'static str) {
        self.federation
            .get_or_create(&RouteLabels { route, outcome })
            .inc();
    }

    fn protected(&self, outcome: &'static str) {
        self.protect.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}

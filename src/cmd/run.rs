//! `msgnode run`: start the node and serve until Ctrl-C or SIGTERM.
//!
//! [`start`] wires the parts together and is what integration tests call: it builds the PDP
//! (decision log sink and metrics injected), loads the bundle (a broken or missing bundle is
//! logged and reported by `/health`, the API still starts), spawns the watcher, and binds the
//! API. All long-lived tasks hang off one `CancellationToken` and one `TaskTracker`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use ruma::api::appservice::Registration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::{self, Bus, Persistence};
use crate::cli::RunArgs;
use crate::config::{Config, JournalConfig};
use crate::matrix::{self, Actor, Homeserver};
use crate::pdp::api::{self, ApiState};
use crate::pdp::decision_log::{DecisionSink, JsonLinesSink, NullSink};
use crate::pdp::{watcher, Pdp};
use crate::pep::appservice::{Appservice, PeerEvents};
use crate::pep::{self, proxy::PepState};
use crate::persist::{follower, inbox::Inbox, journal::Journal, store::Store};
use crate::policy::Decider;
use crate::policyserver::{self, PolicyServer};

/// How long in-flight requests get to finish after a shutdown signal.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// How often the HTTP listeners forget the rate-limit state of idle clients.
const FORGET_IDLE_CLIENTS: Duration = Duration::from_secs(60);

/// Runs `work` every `period` on a tracked task until `shutdown`.
fn every(
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    period: Duration,
    work: impl Fn() + Send + 'static,
) {
    let stop = shutdown.child_token();
    tracker.spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(period) => work(),
            }
        }
    });
}

/// A started node.
pub struct Running {
    /// Where the PDP API listens.
    pub pdp_addr: SocketAddr,
    /// Where the Matrix proxy listens, when enabled.
    pub pep_addr: Option<SocketAddr>,
    /// Where protocol stubs connect, when the bus is enabled.
    pub bus_addr: Option<SocketAddr>,
    /// The bus, when enabled.
    pub bus: Option<Bus>,
    /// The decision point, for in-process callers.
    pub pdp: Pdp,
    /// Where the policy server listens (TLS), when enabled.
    pub policy_server_addr: Option<SocketAddr>,
    /// The policy server, when enabled.
    pub policy_server: Option<PolicyServer>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Running {
    /// Stops every task and waits (up to the drain deadline) for them to finish.
    pub async fn stop(self) {
        if let Some(bus) = &self.bus {
            bus.flush().await;
        }
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(DRAIN_DEADLINE, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("tasks still running after the drain deadline; exiting anyway");
        }
    }
}

/// `msgnode run` / `msgnode pdp`.
///
/// # Errors
/// The runtime cannot start, or [`start`] fails.
pub fn run(mut config: Config, args: RunArgs) -> anyhow::Result<ExitCode> {
    if let Some(policies) = args.policies {
        config.pdp.policies = policies;
    }
    if let Some(listen) = args.listen {
        config.pdp.listen = listen;
    }
    crate::telemetry::init(&config.log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let node = start(config).await?;
        println_url(node.pdp_addr);
        if let Some(addr) = node.pep_addr {
            eprintln!(
                "msgnode: Matrix client-server proxy on http://{addr}  (point Matrix clients here)"
            );
        }
        if let Some(addr) = node.bus_addr {
            eprintln!(
                "msgnode: reTHINK message bus on ws://{addr}/ws  (protocol stubs connect here)"
            );
        }
        if let (Some(addr), Some(ps)) = (node.policy_server_addr, &node.policy_server) {
            eprintln!(
                "msgnode: Matrix policy server {} on https://{addr}  (m.room.policy: {})",
                ps.server_name(),
                ps.policy_content()
            );
        }
        shutdown_signal().await;
        tracing::info!("shutting down");
        node.stop().await;
        Ok(ExitCode::SUCCESS)
    })
}

fn println_url(addr: SocketAddr) {
    eprintln!("msgnode: policy decision API on http://{addr}  (try: curl http://{addr}/health)");
}

/// Builds and starts everything `config` describes.
///
/// # Errors
/// A bad schema or decision rule, an unopenable decision log, or an address in use.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let pdp_config = &config.pdp;
    let mut registry = Registry::with_prefix("msgnode");
    let logging = pdp_config.decision_log.enabled
        && !crate::pdp::decision_log::is_off(&pdp_config.decision_log.output);
    let sink: Arc<dyn DecisionSink> = if logging {
        let sink = JsonLinesSink::open(
            &pdp_config.decision_log.output,
            &pdp_config.decision_log.mask,
        )?;
        registry.register(
            "pdp_decision_log_dropped",
            "Decision log records dropped because the writer could not keep up",
            sink.dropped_counter(),
        );
        Arc::new(sink)
    } else {
        Arc::new(NullSink)
    };
    let pdp = Pdp::builder(pdp_config)
        .sink(sink)
        .registry(&mut registry)
        .build()
        .context("cannot set up the policy decision point")?;
    {
        let pdp = pdp.clone();
        // Errors are kept in the PDP's status and logged; the API starts regardless so that
        // /health can say what is wrong and a fixed bundle is picked up by the watcher.
        let _ = tokio::task::spawn_blocking(move || pdp.reload()).await;
    }

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(watcher::watch(
        pdp.clone(),
        pdp_config.policies.clone(),
        pdp_config.reload_debounce,
        shutdown.child_token(),
    ));

    let decider = Decider::from_config(&pdp, &config.pep, &config.pdp.decision, &mut registry)?;
    if let Decider::Remote(remote) = &decider {
        tracing::info!(endpoint = %remote.endpoint(), "enforcement points decide with a remote PDP");
    }
    let (pep_addr, matrix) =
        start_pep(&config, &decider, &mut registry, &shutdown, &tracker).await?;
    let (policy_server_addr, policy_server) = match config.policy_server.enabled {
        true => {
            // The policy server acts as the node's appservice user when there is one.
            let actor = match matrix.as_ref().and_then(|m| m.actor.as_ref()) {
                Some((_, actor)) => Some(Arc::clone(actor)),
                None if config.pep.registration.is_some() => {
                    Matrix::new(&config, None)?.actor.map(|(_, actor)| actor)
                }
                None => None,
            };
            let started = policyserver::start(
                &config.policy_server,
                &config.pep.server_name,
                decider.clone(),
                actor,
                &mut registry,
                &shutdown,
                &tracker,
            )
            .await?;
            (Some(started.addr), Some(started.server))
        }
        false => (None, None),
    };
    let (bus_addr, bus) = match config.bus.enabled {
        true => {
            let (addr, bus) = start_bus(
                &config,
                &pdp,
                &decider,
                matrix,
                &mut registry,
                &shutdown,
                &tracker,
            )
            .await?;
            (Some(addr), Some(bus))
        }
        false => (None, None),
    };
    let listener = tokio::net::TcpListener::bind(pdp_config.listen)
        .await
        .with_context(|| format!("cannot listen on {} ([pdp] listen)", pdp_config.listen))?;
    let pdp_addr = listener.local_addr()?;
    let state = ApiState::new(
        pdp.clone(),
        &mut registry,
        pdp_config.token.clone(),
        pdp_config.max_body_bytes,
    )
    .with_rate_limit(&pdp_config.rate_limit);
    {
        let state = state.clone();
        every(&tracker, &shutdown, FORGET_IDLE_CLIENTS, move || {
            state.forget_idle_clients()
        });
    }
    spawn_server(
        &tracker,
        listener,
        api::router(state),
        shutdown.child_token(),
        "PDP API",
    );
    tracing::info!(%pdp_addr, "PDP API listening");

    Ok(Running {
        pdp_addr,
        pep_addr,
        bus_addr,
        bus,
        pdp,
        policy_server_addr,
        policy_server,
        shutdown,
        tracker,
    })
}

/// The node's side of Matrix: the homeserver client and, with a registration, the
/// appservice acting as its users.
struct Matrix {
    homeserver: Arc<Homeserver>,
    actor: Option<(Registration, Arc<Actor>)>,
    /// The appservice API, when this node serves it.
    appservice: Option<Arc<Appservice>>,
}

impl Matrix {
    /// The homeserver client `homeserver` (or a new one) and the actor of `[pep] registration`.
    fn new(config: &Config, homeserver: Option<Arc<Homeserver>>) -> anyhow::Result<Matrix> {
        let homeserver = match homeserver {
            Some(h) => h,
            None => Arc::new(Homeserver::new(
                &config.pep.homeserver,
                config.pep.whoami_ttl,
            )?),
        };
        let actor = match &config.pep.registration {
            Some(path) => {
                let registration = matrix::registration::read(path)?;
                let actor = Actor::new(
                    &registration,
                    &config.pep.server_name,
                    Arc::clone(&homeserver),
                )?;
                Some((registration, Arc::new(actor)))
            }
            None => None,
        };
        Ok(Matrix {
            homeserver,
            actor,
            appservice: None,
        })
    }
}

/// Starts the Matrix proxy (and, with a registration, the appservice API on the same
/// listener) when `[pep] enabled`; its address and the Matrix side it set up.
async fn start_pep(
    config: &Config,
    decider: &Decider,
    registry: &mut Registry,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<(Option<SocketAddr>, Option<Matrix>)> {
    if !config.pep.enabled {
        return Ok((None, None));
    }
    let state = PepState::new(decider.clone(), config.pep.clone(), registry)?;
    {
        let state = state.clone();
        every(tracker, shutdown, FORGET_IDLE_CLIENTS, move || {
            state.forget_idle_clients()
        });
    }
    let mut app = pep::proxy::router(state.clone());
    let mut matrix = Matrix::new(config, Some(state.homeserver()))?;
    if let Some((registration, actor)) = &matrix.actor {
        let appservice = Appservice::new(
            registration.clone(),
            Arc::clone(actor),
            &config.pep.redact_denied_rooms,
            state.homeserver(),
            decider.clone(),
            registry,
        )
        .await?;
        // The appservice routes first; everything else is the proxy.
        if config.bus.enabled {
            appservice.expect_bus();
        }
        let appservice = Arc::new(appservice);
        matrix.appservice = Some(Arc::clone(&appservice));
        app = pep::appservice::router(appservice).fallback_service(app);
    }
    let listener = tokio::net::TcpListener::bind(config.pep.listen)
        .await
        .with_context(|| format!("cannot listen on {} ([pep] listen)", config.pep.listen))?;
    let addr = listener.local_addr()?;
    spawn_server(
        tracker,
        listener,
        app,
        shutdown.child_token(),
        "Matrix proxy",
    );
    tracing::info!(%addr, homeserver = %config.pep.homeserver, "Matrix proxy listening");
    Ok((Some(addr), Some(matrix)))
}

/// Starts the reTHINK bus. With an appservice registration (`[pep] registration`) its history,
/// inboxes and state live in the homeserver; without one, in memory only (with a warning).
async fn start_bus(
    config: &Config,
    pdp: &Pdp,
    decider: &Decider,
    matrix: Option<Matrix>,
    registry: &mut Registry,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<(SocketAddr, Bus)> {
    let domain = config
        .bus
        .domain
        .clone()
        .unwrap_or_else(|| config.pep.server_name.clone());
    let matrix_peers = config.bus.peers.iter().any(|p| p.matrix_user.is_some());
    if matrix_peers && !config.pep.enabled && config.bus.replica.is_none() {
        anyhow::bail!(
            "[[bus.peers]] with matrix_user need [pep] enabled: the appservice receives their messages"
        );
    }
    // Without the proxy, the Matrix side is set up here (when a registration is configured).
    let matrix = match matrix {
        Some(matrix) => Some(matrix),
        None if config.pep.registration.is_some() => Some(Matrix::new(config, None)?),
        None => None,
    };
    let appservice = matrix.as_ref().and_then(|m| m.appservice.clone());
    let persistence = match matrix {
        Some(Matrix {
            homeserver,
            actor: Some((_, actor)),
            ..
        }) => {
            // This node's name in what it writes: the replica's, else the domain.
            let node = config.bus.replica.clone().unwrap_or_else(|| domain.clone());
            let mut journal_config = config.bus.journal.clone();
            if journal_config.node == JournalConfig::default().node {
                journal_config.node = node.clone();
            }
            let journal = Journal::start(
                Arc::clone(&actor),
                journal_config,
                shutdown.child_token(),
                tracker,
            )
            .await
            .map_err(|e| anyhow::anyhow!("cannot open the bus journal room: {e}"))?;
            journal.register_metrics(registry);
            let store = Store::open(Arc::clone(&actor), config.bus.replica.clone())
                .await
                .map_err(|e| anyhow::anyhow!("cannot open the bus state room: {e}"))?;
            let follower = config
                .bus
                .replica
                .as_ref()
                .map(|_| follower::follower_user(&actor));
            let inbox = Inbox::new(
                Arc::clone(&actor),
                &node,
                follower,
                shutdown.child_token(),
                tracker,
            );
            inbox.register_metrics(registry);
            Persistence {
                journal,
                inbox,
                store,
                actor: Some(actor),
                homeserver: Some(homeserver),
            }
        }
        other => {
            tracing::warn!("bus without [pep] registration: history, inboxes and allocations are kept in memory only; only network-server tokens authenticate");
            Persistence {
                homeserver: other.map(|m| m.homeserver),
                ..Persistence::memory()
            }
        }
    };
    let mut bus_config = config.bus.clone();
    bus_config.domain = Some(domain.clone());
    let bus = Bus::start(
        bus_config,
        pdp.clone(),
        decider.clone(),
        persistence,
        registry,
        shutdown,
        tracker,
    )
    .await?;
    if let Some(appservice) = appservice {
        appservice.serve_peer_events(Arc::new(BusPeerEvents(bus.clone())));
    }
    let listener = tokio::net::TcpListener::bind(config.bus.listen)
        .await
        .with_context(|| format!("cannot listen on {} ([bus] listen)", config.bus.listen))?;
    let addr = listener.local_addr()?;
    spawn_server(
        tracker,
        listener,
        bus::listener::router(bus.clone()),
        shutdown.child_token(),
        "bus",
    );
    tracing::info!(%addr, %domain, "reTHINK bus listening");
    Ok((addr, bus))
}

/// The bus as the appservice sees it: where the events of its Matrix peer transport go.
struct BusPeerEvents(Bus);

impl PeerEvents for BusPeerEvents {
    fn take<'a>(
        &'a self,
        event: &'a serde_json::Value,
    ) -> futures_util::future::BoxFuture<'a, bool> {
        Box::pin(self.0.matrix_peer_event(event))
    }
}

/// Serves `app` on `listener` (with the peer address available to handlers) until `stop`,
/// on a tracked task.
fn spawn_server(
    tracker: &TaskTracker,
    listener: tokio::net::TcpListener,
    app: axum::Router,
    stop: CancellationToken,
    what: &'static str,
) {
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    tracker.spawn(async move {
        let served = axum::serve(listener, service)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "{what} server failed");
        }
    });
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

//! `msgnode run` / `msgnode pdp`: start the node and serve until Ctrl-C or SIGTERM; SIGHUP
//! reloads what can change without a restart.
//!
//! [`start`] wires the parts together and is what integration tests call: it builds the PDP
//! (decision log sink and metrics injected), loads the bundle — from the policy directory,
//! then watched, or from a bundle server (`[pdp.bundle]`, `plugins::bundle`) — (a broken or
//! missing bundle is logged and reported by `/health`, the API still starts), and binds the
//! API. All long-lived tasks hang off one `CancellationToken` and one `TaskTracker`.
//!
//! SIGHUP re-reads the configuration and applies `[log] level` and `[pdp.decision_log]`
//! (the log file is reopened, for rotation), then reloads the bundle (or polls the bundle
//! server at once); other changes are reported as needing a restart. A configuration that
//! does not parse changes nothing. The node never dies of SIGHUP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
use crate::config::{Config, DecisionLogConfig, JournalConfig, LogFormat};
use crate::matrix::{self, Actor, Homeserver};
use crate::pdp::api::console::Console;
use crate::pdp::api::{self, ApiState};
use crate::pdp::console::ConsoleFeed;
use crate::pdp::decision_log::{
    DecisionSink, JsonLinesSink, Mask, NullSink, Redacted, SwappableSink, Tee,
};
use crate::pdp::{watcher, Pdp};
use crate::pep::appservice::{Appservice, PeerEvents};
use crate::pep::{self, proxy::PepState};
use crate::persist::{follower, inbox::Inbox, journal::Journal, store::Store};
use crate::plugins::bundle::Puller;
use crate::plugins::decision_logs::{self, UploadMetrics};
use crate::policy::Decider;
use crate::policyserver::{self, PolicyServer};
use crate::telemetry::LogHandle;
use prometheus_client::metrics::counter::Counter;

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
    config: Config,
    decision_logs: DecisionLogs,
    puller: Option<Puller>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// Which parts `run` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parts {
    /// Everything the configuration enables (`msgnode run`).
    Node,
    /// The PDP alone, whatever `[pep] enabled` and `[bus] enabled` say (`msgnode pdp`).
    PdpOnly,
}

impl Parts {
    fn apply(self, config: &mut Config) {
        if self == Parts::PdpOnly {
            config.pep.enabled = false;
            config.bus.enabled = false;
            config.policy_server.enabled = false;
        }
    }
}

/// The decision log's sinks, replaceable on SIGHUP, and the counters they share.
struct DecisionLogs {
    sink: Arc<SwappableSink>,
    dropped: Counter,
    upload: UploadMetrics,
    /// The console's tail (`[console] enabled`): fed inside the mask, like the outputs.
    console: Option<Arc<ConsoleFeed>>,
}

impl DecisionLogs {
    fn new(registry: &mut Registry, console: Option<Arc<ConsoleFeed>>) -> Self {
        let dropped = Counter::default();
        registry.register(
            "pdp_decision_log_dropped",
            "Decision log records dropped because the writer could not keep up",
            dropped.clone(),
        );
        Self {
            sink: Arc::new(SwappableSink::new(Box::new(NullSink))),
            dropped,
            upload: UploadMetrics::register(registry),
            console,
        }
    }

    /// Puts sinks for `config` in place (the file or stream, the uploader, and the
    /// console's tail — which gets masked records even when the log itself is off).
    fn apply(
        &self,
        config: &DecisionLogConfig,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) -> anyhow::Result<()> {
        let mut sinks: Vec<Arc<dyn DecisionSink>> = Vec::new();
        if let Some(console) = &self.console {
            sinks.push(Arc::clone(console) as Arc<dyn DecisionSink>);
        }
        if !config.enabled {
            let sink: Box<dyn DecisionSink> = match sinks.is_empty() {
                true => Box::new(NullSink),
                false => Box::new(Redacted::new(Mask::of(config), Tee(sinks))),
            };
            self.sink.replace(sink);
            return Ok(());
        }
        if !crate::pdp::decision_log::is_off(&config.output) {
            let lines = JsonLinesSink::open(&config.output, self.dropped.clone())?;
            sinks.push(Arc::new(lines));
        }
        if let Some(upload) = &config.upload {
            let uploader =
                decision_logs::start(upload, self.upload.clone(), shutdown.child_token(), tracker)?;
            sinks.push(Arc::new(uploader));
        }
        let mask = Mask::of(config);
        self.sink.replace(Box::new(Redacted::new(mask, Tee(sinks))));
        Ok(())
    }
}

impl Running {
    /// SIGHUP: re-reads `file` and applies what can change while running — the log level,
    /// the decision log — then reloads the bundle. Never fails: problems are logged.
    pub async fn reload(&mut self, file: Option<&Path>, parts: Parts, log: &LogHandle) {
        tracing::info!("SIGHUP: reloading the configuration and the policy bundle");
        match Config::load(file) {
            Err(error) => {
                tracing::error!(%error, "the configuration does not load; nothing changed")
            }
            Ok(mut config) => {
                parts.apply(&mut config);
                if let Err(error) = log.set_level(&config.log.level) {
                    tracing::error!(%error, "log level unchanged");
                }
                if config.pdp.decision_log != self.config.pdp.decision_log
                    || config.pdp.decision_log.enabled
                {
                    match self.decision_logs.apply(
                        &config.pdp.decision_log,
                        &self.shutdown,
                        &self.tracker,
                    ) {
                        Ok(()) => {
                            self.pdp
                                .shadow()
                                .set_mask(Mask::of(&config.pdp.decision_log));
                            tracing::info!("decision log reopened");
                        }
                        Err(error) => tracing::error!(%error, "decision log unchanged"),
                    }
                }
                for section in restart_needed(&self.config, &config) {
                    tracing::warn!(section, "changed; takes effect when the node restarts");
                }
                // `[pdp] shadow` is re-read; a candidate the console loaded stays unless
                // `[pdp] shadow` itself changed.
                let from_console = self
                    .pdp
                    .shadow()
                    .candidate()
                    .is_some_and(|c| c.from_console());
                if !from_console || config.pdp.shadow != self.config.pdp.shadow {
                    load_shadow(&self.pdp, config.pdp.shadow.as_deref()).await;
                }
                self.config.log = config.log;
                self.config.pdp.decision_log = config.pdp.decision_log;
                self.config.pdp.shadow = config.pdp.shadow;
            }
        }
        match &self.puller {
            Some(puller) => puller.poll_now(),
            None => {
                let pdp = self.pdp.clone();
                // The outcome is logged and kept in the status by `reload` itself.
                let _ = tokio::task::spawn_blocking(move || pdp.reload()).await;
            }
        }
    }

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

/// Configuration sections whose change needs a restart, between `old` and `new`.
fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut old_pdp = old.pdp.clone();
    old_pdp.decision_log = new.pdp.decision_log.clone();
    old_pdp.shadow = new.pdp.shadow.clone();
    if old_pdp != new.pdp {
        changed.push("[pdp]");
    }
    if old.pep != new.pep {
        changed.push("[pep]");
    }
    if old.bus != new.bus {
        changed.push("[bus]");
    }
    if old.policy_server != new.policy_server {
        changed.push("[policy_server]");
    }
    if old.console != new.console {
        changed.push("[console]");
    }
    if old.log.format != new.log.format {
        changed.push("[log] format");
    }
    changed
}

/// `msgnode run` / `msgnode pdp`: `parts` says which; `file` is re-read on SIGHUP.
///
/// # Errors
/// The runtime cannot start, or [`start`] fails.
pub fn run(
    mut config: Config,
    args: RunArgs,
    parts: Parts,
    file: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    if let Some(policies) = args.policies {
        config.pdp.policies = policies;
    }
    if let Some(listen) = args.listen {
        config.pdp.listen = listen;
    }
    parts.apply(&mut config);
    let log = crate::telemetry::init(&config.log);
    let banners = config.log.format == LogFormat::Text;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let ran = runtime.block_on(async {
        let mut node = start(config).await?;
        if banners {
            print_banners(&node);
        }
        serve(&mut node, file.as_deref(), parts, &log).await;
        tracing::info!("shutting down");
        node.stop().await;
        Ok(ExitCode::SUCCESS)
    });
    // Log lines are written by a thread of their own: all of them before the process ends.
    drop(runtime);
    log.flush();
    ran
}

/// Where to point clients, for people (text logs only: JSON logs carry the same in events).
fn print_banners(node: &Running) {
    let addr = node.pdp_addr;
    eprintln!("msgnode: policy decision API on http://{addr}  (try: curl http://{addr}/health)");
    if let Some(addr) = node.pep_addr {
        eprintln!(
            "msgnode: Matrix client-server proxy on http://{addr}  (point Matrix clients here)"
        );
    }
    if let Some(addr) = node.bus_addr {
        eprintln!("msgnode: reTHINK message bus on ws://{addr}/ws  (protocol stubs connect here)");
    }
    if let (Some(addr), Some(ps)) = (node.policy_server_addr, &node.policy_server) {
        eprintln!(
            "msgnode: Matrix policy server {} on https://{addr}  (m.room.policy: {})",
            ps.server_name(),
            ps.policy_content()
        );
    }
}

/// Loads the `[pdp] shadow` candidate (unloads it when unset). A candidate that does not load
/// is logged and kept in the shadow's status: it never stops the node.
async fn load_shadow(pdp: &Pdp, dir: Option<&Path>) {
    let Some(dir) = dir.map(Path::to_path_buf) else {
        pdp.shadow().unload();
        return;
    };
    let shadow = pdp.shadow().clone();
    // A failure is logged and kept in the shadow's status by `load_dir` itself.
    let _ = tokio::task::spawn_blocking(move || shadow.load_dir(&dir)).await;
}

/// Builds and starts everything `config` describes.
///
/// # Errors
/// A bad schema or decision rule, an unopenable decision log, or an address in use.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let pdp_config = &config.pdp;
    let problems = config.console.problems(pdp_config);
    if !problems.is_empty() {
        anyhow::bail!("invalid configuration:\n  {}", problems.join("\n  "));
    }
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut registry = Registry::with_prefix("msgnode");
    crate::telemetry::process::register(&mut registry);
    let console_feed = config
        .console
        .enabled
        .then(|| Arc::new(ConsoleFeed::new(&config.console)));
    let decision_logs = DecisionLogs::new(&mut registry, console_feed.clone());
    decision_logs.apply(&pdp_config.decision_log, &shutdown, &tracker)?;
    let sink: Arc<dyn DecisionSink> = decision_logs.sink.clone();
    let pdp = Pdp::builder(pdp_config)
        .sink(sink)
        .id(config.bus.replica.clone())
        .registry(&mut registry)
        .build()
        .context("cannot set up the policy decision point")?;
    let puller = match &pdp_config.bundle {
        Some(bundle) => Some(
            crate::plugins::bundle::start(
                pdp.clone(),
                bundle.clone(),
                shutdown.child_token(),
                &tracker,
            )
            .await?,
        ),
        None => {
            let reloaded = pdp.clone();
            // Errors are kept in the PDP's status and logged; the API starts regardless so
            // that /health can say what is wrong and a fixed bundle is picked up by the
            // watcher.
            let _ = tokio::task::spawn_blocking(move || reloaded.reload()).await;
            tracker.spawn(watcher::watch(
                pdp.clone(),
                pdp_config.policies.clone(),
                pdp_config.reload_debounce,
                shutdown.child_token(),
            ));
            None
        }
    };

    load_shadow(&pdp, pdp_config.shadow.as_deref()).await;

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
            // Events it decided are not redacted again after the fact.
            if let Some(appservice) = matrix.as_ref().and_then(|m| m.appservice.as_ref()) {
                appservice.policy_server_runs(started.server.policy_content());
            }
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
    let state = match console_feed {
        Some(feed) => {
            tracing::info!(%pdp_addr, write = config.console.write, "console at http://{pdp_addr}/console");
            state.with_console(Console::new(
                feed,
                &config.console,
                pdp_addr,
                shutdown.child_token(),
            ))
        }
        None => state,
    };
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
        config,
        decision_logs,
        puller,
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
    bus::listener::serve(listener, bus.clone(), shutdown.child_token(), tracker);
    tracing::info!(%addr, %domain, "reTHINK bus listening");
    Ok((addr, bus))
}

/// The bus as the appservice sees it: where the events of its Matrix peer transport go.
struct BusPeerEvents(Bus);

impl PeerEvents for BusPeerEvents {
    fn take<'a>(
        &'a self,
        event: &'a serde_json::Value,
        started: tokio::time::Instant,
    ) -> futures_util::future::BoxFuture<'a, bool> {
        Box::pin(self.0.matrix_peer_event(event, started))
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

/// Serves until Ctrl-C or SIGTERM; SIGHUP reloads (see [`Running::reload`]).
async fn serve(node: &mut Running, file: Option<&Path>, parts: Parts, log: &LogHandle) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(mut term), Ok(mut hup)) => loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return,
                    _ = term.recv() => return,
                    _ = hup.recv() => {
                        // A reload (the bundle's test gate may take seconds) never holds up
                        // a stop asked for meanwhile.
                        let reload = node.reload(file, parts, log);
                        tokio::pin!(reload);
                        tokio::select! {
                            _ = &mut reload => {}
                            _ = tokio::signal::ctrl_c() => return,
                            _ = term.recv() => return,
                        }
                    }
                }
            },
            _ => tracing::warn!("cannot listen for SIGTERM/SIGHUP; only Ctrl-C stops the node"),
        }
    }
    let _ = (file, parts, log, &node);
    let _ = tokio::signal::ctrl_c().await;
}

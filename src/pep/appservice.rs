//! The application-service side: what the homeserver pushes to msgnode.
//!
//! Routes (prefixed `/_matrix/app/v1` and legacy unprefixed): `PUT /transactions/{txnId}`,
//! `GET /users/{userId}`, `GET /rooms/{alias}`, `POST /ping`. Every request must carry the
//! `hs_token` (`Authorization: Bearer`, or the legacy `access_token` query parameter),
//! compared in constant time: none → 401 `M_UNAUTHORIZED`, wrong → 403 `M_FORBIDDEN`.
//!
//! Transactions are processed once: processed ids are kept in the appservice user's account
//! data (`org.msgnode.appservice.transactions`), so a retried transaction is acknowledged
//! without being processed again, also after a restart; if that record cannot be written
//! the transaction is answered 500 and the homeserver retries it. Each event is decided by
//! the PDP (`kind: "matrix_event"`). A denied event is redacted with the policy's reasons
//! in rooms matching `[pep] redact_denied_rooms` (acting as a namespace user seen joining
//! the room, else the appservice's own user) and logged everywhere — except where the node's
//! own policy server already decided it before the homeserver accepted it (the room's
//! `m.room.policy` names it, and the event is not a local membership change, which the
//! homeserver does not ask about): counted `policy_server`, not redacted again. Events sent by the
//! node's own namespace users are not decided again: they are the node's own actions (and
//! a policy that forbade redactions must not make the node redact its redactions forever).
//! Events of the bus's Matrix peer transport (invitations and messages from configured peer
//! nodes) go to the bus instead, through the [`PeerEvents`] it is given at start (the bus
//! decides each message itself); the appservice knows nothing else of the bus.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use ruma::api::appservice::Registration;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::error::{ErrorCode, MatrixError};
use crate::matrix::{encode, with_user_id, Actor, Homeserver};
use crate::policy::input::{Context, Input, MatrixEvent, MatrixEventInput};
use crate::policy::{Decider, EnforcementPoint};

/// Account-data type holding processed transaction ids.
const TXN_ACCOUNT_DATA: &str = "org.msgnode.appservice.transactions";
/// Largest transaction accepted (100 events × 64 KiB, with room to spare).
const TRANSACTION_MAX_BYTES: usize = 16 * 1024 * 1024;
/// How many recent transaction ids are remembered (the homeserver retries the latest ones).
const TXN_MEMORY: usize = 256;

/// Where pushed events of the bus's Matrix peer transport go: given to the appservice at
/// start, so that neither knows the other's type.
pub trait PeerEvents: Send + Sync {
    /// Takes `event` if it belongs to the peer transport (an invitation from, or a message
    /// of, a configured peer node); whether it did (then the appservice decides nothing).
    /// `started` is when its transaction began: the messages of one transaction share one
    /// bounded wait on their addressees, so they do not add up.
    fn take<'a>(&'a self, event: &'a Value, started: tokio::time::Instant) -> BoxFuture<'a, bool>;
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// The appservice: its registration, namespace and transaction record.
pub struct Appservice {
    /// The bus's peer transport, once started: takes the events that are its.
    peer_events: std::sync::OnceLock<Arc<dyn PeerEvents>>,
    /// A bus will be set: transactions wait for it (answered 503 until then).
    bus_expected: std::sync::atomic::AtomicBool,
    registration: Registration,
    /// Acts as the namespace's users (registers them on user queries); knows the namespace.
    actor: Arc<Actor>,
    sender: String,
    server_name: String,
    homeserver: Arc<Homeserver>,
    decider: Decider,
    /// Processed transaction ids; `None` until read from the homeserver (never overwrite a
    /// record that could not be read).
    processed: Mutex<Option<VecDeque<String>>>,
    redact_rooms: regex::RegexSet,
    /// A namespace user known to be joined to each room (learnt from pushed member events).
    agents: std::sync::Mutex<HashMap<String, String>>,
    transactions: Family<OutcomeLabel, Counter>,
    events: Family<OutcomeLabel, Counter>,
    redactions: Family<OutcomeLabel, Counter>,
    /// The `m.room.policy` content naming the node's own policy server, once it runs.
    policy_server: std::sync::OnceLock<Value>,
    /// Whether a room names that policy server (its current `m.room.policy`), by room;
    /// forgotten when a pushed event changes it.
    protected: moka::sync::Cache<String, bool>,
}

/// How long a room's `m.room.policy` is trusted without a pushed change.
const PROTECTED_TTL: std::time::Duration = std::time::Duration::from_secs(60);

impl Appservice {
    /// Builds the appservice and loads its transaction record from the homeserver (an
    /// unreachable homeserver at start-up leaves the record empty, with a warning).
    ///
    /// # Errors
    /// A namespace regex that does not compile.
    pub async fn new(
        registration: Registration,
        actor: Arc<Actor>,
        redact_denied_rooms: &[String],
        homeserver: Arc<Homeserver>,
        decider: Decider,
        registry: &mut Registry,
    ) -> anyhow::Result<Self> {
        let sender = actor.sender().to_string();
        let server_name = actor.server_name().to_string();
        let transactions = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "pep_appservice_transactions",
            "Appservice transactions, by outcome",
            transactions.clone(),
        );
        let events = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "pep_appservice_events",
            "Events pushed by the homeserver, by decision",
            events.clone(),
        );
        let redactions = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "pep_appservice_redactions",
            "Redactions of denied events, by outcome",
            redactions.clone(),
        );
        let redact_rooms =
            regex::RegexSet::new(redact_denied_rooms.iter().map(|r| format!("^(?:{r})$")))?;
        let appservice = Self {
            peer_events: std::sync::OnceLock::new(),
            bus_expected: std::sync::atomic::AtomicBool::new(false),
            registration,
            actor,
            sender,
            server_name,
            homeserver,
            decider,
            processed: Mutex::new(None),
            redact_rooms,
            agents: std::sync::Mutex::new(HashMap::new()),
            transactions,
            events,
            redactions,
            policy_server: std::sync::OnceLock::new(),
            protected: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(PROTECTED_TTL)
                .build(),
        };
        match appservice.load_processed().await {
            Ok(ids) => *appservice.processed.lock().await = Some(ids),
            Err(why) => tracing::warn!(
                %why,
                "appservice: cannot read the transaction record yet; will retry before the first transaction"
            ),
        }
        Ok(appservice)
    }

    fn account_data_path(&self) -> String {
        format!(
            "/_matrix/client/v3/user/{}/account_data/{TXN_ACCOUNT_DATA}",
            encode(&self.sender)
        )
    }

    async fn load_processed(&self) -> Result<VecDeque<String>, String> {
        let (status, body) = self
            .homeserver
            .request_json(
                Method::GET,
                &self.account_data_path(),
                &self.registration.as_token,
                None,
            )
            .await
            .map_err(|_| "homeserver unavailable".to_string())?;
        match status {
            404 => Ok(VecDeque::new()),
            s if (200..300).contains(&s) => Ok(body["processed"]
                .as_array()
                .map(|ids| {
                    ids.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()),
            s => Err(format!("homeserver answered {s}: {body}")),
        }
    }

    async fn store_processed(&self, ids: &VecDeque<String>) -> Result<(), String> {
        let body = json!({"processed": ids});
        match self
            .homeserver
            .request_json(
                Method::PUT,
                &self.account_data_path(),
                &self.registration.as_token,
                Some(&body),
            )
            .await
        {
            Ok((status, _)) if (200..300).contains(&status) => Ok(()),
            Ok((status, body)) => Err(format!("homeserver answered {status}: {body}")),
            Err(_) => Err("homeserver unavailable".to_string()),
        }
    }

    fn check_token(
        &self,
        headers: &HeaderMap,
        query: &[(String, String)],
    ) -> Result<(), MatrixError> {
        match crate::http_auth::presented(headers, query) {
            None => Err(MatrixError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "missing hs_token",
            )),
            Some(token) if crate::http_auth::token_matches(token, &self.registration.hs_token) => {
                Ok(())
            }
            Some(_) => Err(MatrixError::forbidden("wrong hs_token")),
        }
    }

    /// A bus is starting: transactions are answered 503 (the homeserver retries) until
    /// [`Appservice::serve_peer_events`].
    pub fn expect_bus(&self) {
        self.bus_expected
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Hands the events of the bus's Matrix peer transport to `peer_events` from now on.
    pub fn serve_peer_events(&self, peer_events: Arc<dyn PeerEvents>) {
        if self.peer_events.set(peer_events).is_err() {
            tracing::warn!("appservice: the bus was already set");
        }
    }

    /// The node's policy server runs and rooms name it with `content` (their
    /// `m.room.policy`): events it decided before the homeserver accepted them are not
    /// redacted again (a refused one was never stored, or was soft-failed).
    pub fn policy_server_runs(&self, content: Value) {
        if self.policy_server.set(content).is_err() {
            tracing::warn!("appservice: the policy server was already set");
        }
    }

    /// Whether the policy server already decided `event` before the homeserver accepted
    /// it: the room names it, and the event is one the homeserver asks about (not the
    /// exempt `m.room.policy`, not a membership change of its own users).
    async fn decided_by_policy_server(&self, event: &Value, room: &str) -> bool {
        let Some(expected) = self.policy_server.get() else {
            return false;
        };
        let event_type = event["type"].as_str().unwrap_or("");
        let sender_server = event["sender"]
            .as_str()
            .and_then(|s| s.split_once(':'))
            .map_or("", |(_, server)| server);
        if (event_type == "m.room.policy" && event["state_key"] == "")
            || (event_type == "m.room.member" && sender_server == self.server_name)
        {
            return false;
        }
        if let Some(protected) = self.protected.get(room) {
            return protected;
        }
        match self
            .actor
            .state_event(&self.sender, room, "m.room.policy", "")
            .await
        {
            Ok(content) => {
                let protected = content.is_some_and(|c| {
                    c["via"] == expected["via"]
                        && c["public_keys"]["ed25519"] == expected["public_keys"]["ed25519"]
                });
                self.protected.insert(room.to_string(), protected);
                protected
            }
            // Unknown: redacting is the safe side.
            Err(_) => false,
        }
    }

    /// Forgets whether `event`'s room is protected when it changes the room's policy server.
    fn learn_policy(&self, event: &Value) {
        if event["type"] == "m.room.policy" && event["state_key"] == "" {
            if let Some(room) = event["room_id"].as_str() {
                self.protected.invalidate(room);
            }
        }
    }

    /// Whether `user_id` is in the appservice's user namespace.
    pub fn owns_user(&self, user_id: &str) -> bool {
        self.actor.owns_user(user_id)
    }

    async fn on_transaction(&self, txn_id: &str, body: &Value) -> Result<(), MatrixError> {
        let mut guard = self.processed.lock().await;
        if guard.is_none() {
            let ids = self.load_processed().await.map_err(|why| {
                tracing::warn!(%why, "appservice: cannot read the transaction record; the homeserver will retry");
                MatrixError::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Unknown, "transaction record unavailable; retry")
            })?;
            *guard = Some(ids);
        }
        if self.bus_expected.load(std::sync::atomic::Ordering::Relaxed)
            && self.peer_events.get().is_none()
        {
            // Starting: events for the bus (a peer node's invitations and messages) must not
            // be taken before it can handle them.
            return Err(MatrixError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unknown,
                "starting; retry",
            ));
        }
        let Some(processed) = guard.as_mut() else {
            return Err(MatrixError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Unknown,
                "transaction record unavailable; retry",
            ));
        };
        if processed.iter().any(|id| id == txn_id) {
            self.transactions
                .get_or_create(&OutcomeLabel {
                    outcome: "duplicate",
                })
                .inc();
            return Ok(());
        }
        let context = Context::now(&self.server_name);
        let started = tokio::time::Instant::now();
        for event in body["events"].as_array().into_iter().flatten() {
            self.learn_agent(event);
            self.learn_policy(event);
            let sender = event["sender"].as_str().unwrap_or("");
            if sender == self.sender || self.owns_user(sender) {
                continue;
            }
            if let Some(peer_events) = self.peer_events.get() {
                if peer_events.take(event, started).await {
                    continue; // the bus's own traffic, decided there
                }
            }
            let input = Input::MatrixEvent(MatrixEventInput {
                matrix: MatrixEvent {
                    room_id: event["room_id"].as_str().unwrap_or_default().to_string(),
                    event_type: event["type"].as_str().unwrap_or_default().to_string(),
                    sender: sender.to_string(),
                    content: event["content"].clone(),
                    state_key: event
                        .get("state_key")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    door: Default::default(),
                },
                context: context.clone(),
            });
            let decision = self
                .decider
                .decide(&input, EnforcementPoint::Appservice)
                .await;
            if decision.failed {
                // Not a decision: redacting now could not be undone. The homeserver retries
                // the transaction until the policy can answer.
                tracing::warn!(event_id = %event["event_id"], reasons = %decision.reasons.join("; "),
                    "appservice: no policy decision for a pushed event; the homeserver will retry the transaction");
                self.events
                    .get_or_create(&OutcomeLabel {
                        outcome: "undecided",
                    })
                    .inc();
                return Err(MatrixError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::Unknown,
                    "policy unavailable; retry",
                ));
            }
            let outcome = if decision.allow { "allowed" } else { "denied" };
            self.events.get_or_create(&OutcomeLabel { outcome }).inc();
            if !decision.allow {
                let reasons = decision.reasons.join("; ");
                tracing::warn!(event_id = %event["event_id"], room_id = %event["room_id"], %reasons,
                    decision_id = %decision.decision_id, "event that did not come through the proxy is denied by policy");
                self.redact(event, &reasons).await;
            }
        }
        // Write the new record first; memory changes only once it is stored.
        let mut record = processed.clone();
        record.push_back(txn_id.to_string());
        while record.len() > TXN_MEMORY {
            record.pop_front();
        }
        if let Err(why) = self.store_processed(&record).await {
            tracing::warn!(%why, txn_id, "appservice: cannot record the transaction; the homeserver will retry it");
            return Err(MatrixError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Unknown,
                "cannot record the transaction; retry",
            ));
        }
        *processed = record;
        self.transactions
            .get_or_create(&OutcomeLabel {
                outcome: "processed",
            })
            .inc();
        Ok(())
    }

    /// Remembers which namespace user is joined to a room, to act as it there.
    fn learn_agent(&self, event: &Value) {
        let (Some(room), Some(user)) = (event["room_id"].as_str(), event["state_key"].as_str())
        else {
            return;
        };
        if event["type"] != "m.room.member" || !self.owns_user(user) {
            return;
        }
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        if event["content"]["membership"] == "join" {
            agents.insert(room.to_string(), user.to_string());
        } else if agents.get(room).is_some_and(|u| u == user) {
            agents.remove(room);
        }
    }

    /// Redacts a denied event where configured; failures are logged and counted (a retry of
    /// the transaction would not make the appservice more powerful in the room).
    async fn redact(&self, event: &Value, reasons: &str) {
        let (Some(room), Some(event_id)) = (event["room_id"].as_str(), event["event_id"].as_str())
        else {
            return;
        };
        if !self.redact_rooms.is_match(room) {
            return;
        }
        if self.decided_by_policy_server(event, room).await {
            self.redactions
                .get_or_create(&OutcomeLabel {
                    outcome: "policy_server",
                })
                .inc();
            return;
        }
        let agent = self
            .agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(room)
            .cloned()
            .unwrap_or_else(|| self.sender.clone());
        // Derived from the event, so a retried transaction does not redact twice.
        let txn = format!("msgnode-redact-{}", encode(event_id));
        let path = with_user_id(
            format!(
                "/_matrix/client/v3/rooms/{}/redact/{}/{txn}",
                encode(room),
                encode(event_id)
            ),
            Some(&agent),
        );
        let body = json!({"reason": format!("denied by policy: {reasons}")});
        let outcome = match self
            .homeserver
            .request_json(Method::PUT, &path, &self.registration.as_token, Some(&body))
            .await
        {
            Ok((status, _)) if (200..300).contains(&status) => "redacted",
            Ok((status, answer)) => {
                tracing::error!(%status, %answer, room, event_id, %agent, "cannot redact a denied event (does the appservice user have redaction power in the room?)");
                "failed"
            }
            Err(_) => {
                tracing::error!(
                    room,
                    event_id,
                    "cannot redact a denied event: homeserver unavailable"
                );
                "failed"
            }
        };
        self.redactions
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    async fn on_user_query(&self, user_id: &str) -> Result<(), MatrixError> {
        let not_found = || {
            MatrixError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "user is not in msgnode's namespace",
            )
        };
        if !self.owns_user(user_id) {
            return Err(not_found());
        }
        self.actor.ensure_user(user_id).await.map_err(|e| {
            tracing::warn!(%e, user = %user_id, "appservice: cannot register a queried user");
            not_found()
        })
    }
}

type Params = Query<Vec<(String, String)>>;

/// The appservice routes (both spellings), for the listener the homeserver pushes to.
pub fn router(appservice: Arc<Appservice>) -> Router {
    Router::new()
        .route("/_matrix/app/v1/transactions/{txn_id}", put(transaction))
        .route("/transactions/{txn_id}", put(transaction))
        .route("/_matrix/app/v1/users/{user_id}", get(user_query))
        .route("/users/{user_id}", get(user_query))
        .route("/_matrix/app/v1/rooms/{alias}", get(room_query))
        .route("/rooms/{alias}", get(room_query))
        .route("/_matrix/app/v1/ping", post(ping))
        // Synapse sends up to 100 events of up to 64 KiB per transaction.
        .layer(axum::extract::DefaultBodyLimit::max(TRANSACTION_MAX_BYTES))
        .with_state(appservice)
}

async fn transaction(
    State(appservice): State<Arc<Appservice>>,
    Path(txn_id): Path<String>,
    Query(query): Params,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, MatrixError> {
    appservice.check_token(&headers, &query)?;
    let body: Value = serde_json::from_slice(&body).map_err(|e| {
        MatrixError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::NotJson,
            format!("transaction is not JSON: {e}"),
        )
    })?;
    appservice.on_transaction(&txn_id, &body).await?;
    Ok(Json(json!({})).into_response())
}

async fn user_query(
    State(appservice): State<Arc<Appservice>>,
    Path(user_id): Path<String>,
    Query(query): Params,
    headers: HeaderMap,
) -> Result<Response, MatrixError> {
    appservice.check_token(&headers, &query)?;
    appservice.on_user_query(&user_id).await?;
    Ok(Json(json!({})).into_response())
}

async fn room_query(
    State(appservice): State<Arc<Appservice>>,
    Query(query): Params,
    headers: HeaderMap,
) -> Result<Response, MatrixError> {
    appservice.check_token(&headers, &query)?;
    Err(MatrixError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "msgnode creates no rooms on alias queries",
    ))
}

async fn ping(
    State(appservice): State<Arc<Appservice>>,
    Query(query): Params,
    headers: HeaderMap,
) -> Result<Response, MatrixError> {
    appservice.check_token(&headers, &query)?;
    Ok(Json(json!({})).into_response())
}

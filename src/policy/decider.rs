//! Where the enforcement points get their decisions: the in-process PDP or a remote,
//! OPA-compatible one.
//!
//! [`Decider::decide`] is the one call the proxy, the appservice and the bus make, with a typed
//! [`Input`](super::input::Input). The local variant
//! is `Pdp::decide` (bounded by `[pdp] eval_timeout`). The remote variant posts
//! `{"input": …}` to `{pdp_url}/v1/data/{decision path}` (another msgnode's PDP API, or OPA)
//! with an optional bearer token and a per-request timeout (`[pep] pdp_timeout`), and reads
//! `{"result": {"allow": bool, "reasons": [string]}}`.
//!
//! Fail closed: a refused connection, a timeout, a status other than 200, an undefined result
//! or one without a boolean `allow` is a deny with `failed: true` and the reason
//! [`POLICY_UNAVAILABLE`] (what went wrong is logged and counted, not told to the client).

use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde_json::{json, Value};

use super::input::Input;
use crate::config::PepConfig;
use crate::pdp::engine::DataPath;
use crate::pdp::{Decision, EnforcementPoint, Pdp};

/// The reason of every decision a remote PDP could not give.
pub const POLICY_UNAVAILABLE: &str = "policy unavailable";

/// What a refused request is told: the policy's reasons (reTHINK's "Blocked by policy" when
/// it gave none), or, when no policy decided, [`POLICY_UNAVAILABLE`] with the detail.
pub fn refusal(decision: &Decision) -> String {
    let reasons = match decision.reasons.is_empty() {
        true => "Blocked by policy".to_string(),
        false => decision.reasons.join("; "),
    };
    match decision.failed {
        false => reasons,
        true if reasons == POLICY_UNAVAILABLE => reasons,
        true => format!("{POLICY_UNAVAILABLE}: {reasons}"),
    }
}

/// Why a decider cannot be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum DeciderError {
    /// `[pep] pdp_url` is not an `http://` or `https://` URL.
    #[error("[pep] pdp_url {0:?} must be an http:// or https:// URL")]
    Url(String),
    /// `[pdp] decision` is not a data reference.
    #[error("[pdp] decision: {0}")]
    DecisionPath(#[from] crate::pdp::engine::DataPathError),
    /// The HTTP client cannot be built.
    #[error("cannot build the PDP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// The decision point the enforcement points ask.
#[derive(Clone)]
pub enum Decider {
    /// This process's PDP.
    Local(Pdp),
    /// A PDP reached over HTTP.
    Remote(RemotePdp),
}

impl Decider {
    /// The remote PDP at `[pep] pdp_url` when set (asked for `decision`, the `[pdp] decision`
    /// reference), else `local`. Registers the remote client's metrics in `registry`.
    ///
    /// # Errors
    /// An unusable URL or decision reference.
    pub fn from_config(
        local: &Pdp,
        pep: &PepConfig,
        decision: &str,
        registry: &mut Registry,
    ) -> Result<Self, DeciderError> {
        match &pep.pdp_url {
            None => Ok(Self::Local(local.clone())),
            Some(url) => Ok(Self::Remote(RemotePdp::new(
                url,
                decision,
                pep.pdp_token.clone(),
                pep.pdp_timeout,
                registry,
            )?)),
        }
    }

    /// Decides `input` for the enforcement point `asker` (named in the decision log); never
    /// fails: every failure is a deny with `failed: true`.
    pub async fn decide(&self, input: &Input<'_>, asker: EnforcementPoint) -> Decision {
        match self {
            Self::Local(pdp) => pdp.decide_async(input, asker).await,
            Self::Remote(remote) => remote.decide(input.to_value()).await,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RemoteLabels {
    /// `allowed`, `denied`, `unreachable`, `timeout`, `bad_status` or `bad_result`.
    outcome: &'static str,
}

/// An OPA-compatible PDP over HTTP.
#[derive(Clone)]
pub struct RemotePdp {
    client: reqwest::Client,
    /// `{pdp_url}/v1/data/{decision path}`.
    endpoint: String,
    token: Option<String>,
    timeout: Duration,
    requests: Family<RemoteLabels, Counter>,
    seconds: Histogram,
}

/// Why a remote decision failed (logged and counted; the client only hears
/// [`POLICY_UNAVAILABLE`]).
#[derive(Debug, thiserror::Error)]
enum RemoteError {
    #[error("PDP did not answer within {0:?}")]
    Timeout(Duration),
    #[error("PDP unreachable: {0}")]
    Unreachable(reqwest::Error),
    #[error("PDP answered {0}")]
    Status(reqwest::StatusCode),
    #[error("PDP answer unusable: {0}")]
    Result(String),
}

impl RemoteError {
    fn outcome(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::Unreachable(_) => "unreachable",
            Self::Status(_) => "bad_status",
            Self::Result(_) => "bad_result",
        }
    }
}

impl RemotePdp {
    /// A client for the PDP at `base_url` (e.g. `http://127.0.0.1:8181`), asking `decision`
    /// (`data.msgnode.authz.decision` → `POST /v1/data/msgnode/authz/decision`).
    ///
    /// # Errors
    /// A URL that is not `http://` or `https://`, a decision that is not a data reference.
    pub fn new(
        base_url: &str,
        decision: &str,
        token: Option<String>,
        timeout: Duration,
        registry: &mut Registry,
    ) -> Result<Self, DeciderError> {
        let base = base_url.trim_end_matches('/');
        let authority = base
            .strip_prefix("http://")
            .or_else(|| base.strip_prefix("https://"));
        if authority.is_none_or(str::is_empty) {
            return Err(DeciderError::Url(base_url.to_string()));
        }
        let path = DataPath::from_ref(decision)?;
        let segments: Vec<String> = path
            .segments()
            .iter()
            .map(|s| {
                percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC)
                    .to_string()
            })
            .collect();
        let endpoint = format!("{base}/v1/data/{}", segments.join("/"));
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        let requests = Family::<RemoteLabels, Counter>::default();
        registry.register(
            "pep_remote_pdp_decisions",
            "Decisions asked of the remote PDP ([pep] pdp_url), by outcome",
            requests.clone(),
        );
        // 100 µs .. ~3 s
        let seconds = Histogram::new(exponential_buckets(1e-4, 2.0, 15));
        registry.register(
            "pep_remote_pdp_duration_seconds",
            "Round trip of one remote decision, failures included",
            seconds.clone(),
        );
        Ok(Self {
            client,
            endpoint,
            token,
            timeout,
            requests,
            seconds,
        })
    }

    /// The URL decisions are posted to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Asks the remote PDP; every failure is a deny with `failed: true`.
    pub async fn decide(&self, input: Value) -> Decision {
        let started = Instant::now();
        let asked = self.ask(input).await;
        self.seconds.observe(started.elapsed().as_secs_f64());
        let outcome = match &asked {
            Ok(decision) if decision.allow => "allowed",
            Ok(_) => "denied",
            Err(error) => error.outcome(),
        };
        self.requests.get_or_create(&RemoteLabels { outcome }).inc();
        asked.unwrap_or_else(|error| {
            tracing::warn!(%error, endpoint = %self.endpoint, "remote PDP gave no decision: failing closed");
            Decision {
                allow: false,
                reasons: vec![POLICY_UNAVAILABLE.to_string()],
                decision_id: String::new(),
                failed: true,
            }
        })
    }

    async fn ask(&self, input: Value) -> Result<Decision, RemoteError> {
        let mut request = self
            .client
            .post(&self.endpoint)
            .timeout(self.timeout)
            .json(&json!({ "input": input }));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let transport = |error: reqwest::Error| {
            if error.is_timeout() {
                RemoteError::Timeout(self.timeout)
            } else {
                RemoteError::Unreachable(error)
            }
        };
        let response = request.send().await.map_err(transport)?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(RemoteError::Status(response.status()));
        }
        let body = response.bytes().await.map_err(transport)?;
        let answer: Value = serde_json::from_slice(&body)
            .map_err(|e| RemoteError::Result(format!("not JSON: {e}")))?;
        let decision_id = answer
            .get("decision_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let Some(result) = answer.get("result") else {
            return Err(RemoteError::Result("the decision is undefined".into()));
        };
        let Some(allow) = result.get("allow").and_then(Value::as_bool) else {
            return Err(RemoteError::Result(format!(
                "no boolean \"allow\" in {result}"
            )));
        };
        let reasons = match result.get("reasons") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(reasons)) => reasons
                .iter()
                .map(|r| match r {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(RemoteError::Result(format!(
                        "reason {other} is not a string"
                    ))),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(RemoteError::Result(format!(
                    "\"reasons\" is not a list: {other}"
                )))
            }
        };
        Ok(Decision {
            allow,
            reasons,
            decision_id,
            failed: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::post;
    use axum::{Json, Router};
    use std::net::SocketAddr;

    const DECISION: &str = "data.msgnode.authz.decision";

    /// Serves `app` on a loopback port of its own; the task ends with the test's runtime.
    async fn serve(app: Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// A PDP answering every decision with `status` and `body` (after `delay`).
    async fn pdp_answering(status: StatusCode, body: &'static str, delay: Duration) -> String {
        let app = Router::new().route(
            "/v1/data/msgnode/authz/decision",
            post(
                move |headers: HeaderMap, Json(request): Json<Value>| async move {
                    tokio::time::sleep(delay).await;
                    // The input arrives wrapped, and the token when one is configured.
                    if request["input"]["kind"] != json!("matrix_event") {
                        return (StatusCode::BAD_REQUEST, "no input").into_response();
                    }
                    if headers
                        .get("authorization")
                        .is_some_and(|v| v != "Bearer sesame")
                    {
                        return (StatusCode::UNAUTHORIZED, "wrong token").into_response();
                    }
                    (status, body).into_response()
                },
            ),
        );
        format!("http://{}", serve(app).await)
    }

    fn client(url: &str, timeout: Duration) -> RemotePdp {
        RemotePdp::new(
            url,
            DECISION,
            Some("sesame".into()),
            timeout,
            &mut Registry::default(),
        )
        .expect("client")
    }

    async fn decide(status: StatusCode, body: &'static str, delay: Duration) -> Decision {
        let url = pdp_answering(status, body, delay).await;
        client(&url, Duration::from_millis(200))
            .decide(json!({"kind": "matrix_event"}))
            .await
    }

    fn assert_unavailable(decision: &Decision, what: &str) {
        assert!(!decision.allow, "{what}");
        assert!(decision.failed, "{what}");
        assert_eq!(decision.reasons, vec![POLICY_UNAVAILABLE], "{what}");
    }

    #[tokio::test]
    async fn allow_and_deny_with_reasons_come_through() {
        let allowed = decide(
            StatusCode::OK,
            r#"{"decision_id": "d-1", "result": {"allow": true, "reasons": []}}"#,
            Duration::ZERO,
        )
        .await;
        assert_eq!(
            allowed,
            Decision {
                allow: true,
                reasons: vec![],
                decision_id: "d-1".into(),
                failed: false
            }
        );
        let denied = decide(
            StatusCode::OK,
            r#"{"result": {"allow": false, "reasons": ["not here", "not now"]}}"#,
            Duration::ZERO,
        )
        .await;
        assert!(!denied.allow && !denied.failed);
        assert_eq!(denied.reasons, vec!["not here", "not now"]);
    }

    #[tokio::test]
    async fn every_failure_is_a_failed_deny() {
        for (status, body, what) in [
            (StatusCode::INTERNAL_SERVER_ERROR, "{}", "500"),
            (
                StatusCode::BAD_REQUEST,
                r#"{"code": "invalid_parameter"}"#,
                "400",
            ),
            (StatusCode::OK, "<html>garbage", "garbage body"),
            (StatusCode::OK, "{}", "undefined result"),
            (StatusCode::OK, r#"{"result": null}"#, "null result"),
            (
                StatusCode::OK,
                r#"{"result": true}"#,
                "result not a decision",
            ),
            (
                StatusCode::OK,
                r#"{"result": {"allow": "yes"}}"#,
                "allow not a boolean",
            ),
            (
                StatusCode::OK,
                r#"{"result": {"allow": true, "reasons": "fine"}}"#,
                "reasons not a list",
            ),
            (
                StatusCode::OK,
                r#"{"result": {"allow": true, "reasons": [1]}}"#,
                "a reason not a string",
            ),
        ] {
            assert_unavailable(&decide(status, body, Duration::ZERO).await, what);
        }
    }

    #[tokio::test]
    async fn a_slow_pdp_is_cut_off_at_the_timeout() {
        let started = Instant::now();
        let decision = decide(
            StatusCode::OK,
            r#"{"result": {"allow": true}}"#,
            Duration::from_secs(5),
        )
        .await;
        assert_unavailable(&decision, "slow server");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "waited too long"
        );
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_failed_deny() {
        // Bind, learn the port, close: nothing listens there any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let decision = client(
            &format!("http://127.0.0.1:{port}"),
            Duration::from_millis(200),
        )
        .decide(json!({"kind": "matrix_event"}))
        .await;
        assert_unavailable(&decision, "connection refused");
    }

    #[tokio::test]
    async fn the_token_is_sent_and_the_path_is_the_decision_rule() {
        let url = pdp_answering(
            StatusCode::OK,
            r#"{"result": {"allow": true}}"#,
            Duration::ZERO,
        )
        .await;
        let remote = client(&format!("{url}/"), Duration::from_millis(500));
        assert_eq!(
            remote.endpoint(),
            format!("{url}/v1/data/msgnode/authz/decision")
        );
        assert!(remote.decide(json!({"kind": "matrix_event"})).await.allow);
        let wrong = RemotePdp::new(
            &url,
            DECISION,
            Some("wrong".into()),
            Duration::from_millis(500),
            &mut Registry::default(),
        )
        .expect("client");
        assert_unavailable(
            &wrong.decide(json!({"kind": "matrix_event"})).await,
            "wrong token",
        );
    }

    #[test]
    fn only_http_urls_are_accepted() {
        for url in [
            "ftp://pdp.example",
            "pdp.example:8181",
            "http://",
            "https://",
            "",
        ] {
            assert!(
                RemotePdp::new(
                    url,
                    DECISION,
                    None,
                    Duration::from_secs(1),
                    &mut Registry::default()
                )
                .is_err(),
                "{url}"
            );
        }
    }
}

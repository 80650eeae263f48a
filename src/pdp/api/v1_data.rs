//! `GET|POST /v1/data[/{path}]`: evaluate a document, as OPA's Data API does.
//!
//! POST takes `{"input": …}`; GET takes an optional `?input=<json>`. An undefined document is
//! `200` without `result`; a request without `input` gets OPA's `api_usage_warning`.
//! `?metrics`, `?provenance` and `?pretty` behave as in OPA.

use std::collections::BTreeMap;
use std::time::Instant;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use serde_json::Value;

use super::types::{codes, BundleProvenanceV1, DataResponseV1, MetricsV1, ProvenanceV1, WarningV1};
use super::{flag, json_response, ApiError, ApiState};
use crate::pdp::decision_log::AskedBy;
use crate::pdp::elapsed_ns;
use crate::pdp::engine::DataPath;

type Params = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// The client's address, when the server records it (it does in `msgnode run`).
type Peer = Option<Extension<ConnectInfo<std::net::SocketAddr>>>;

fn asked_by(peer: Peer) -> AskedBy {
    AskedBy::http(peer.map(|Extension(ConnectInfo(addr))| addr))
}

/// `POST /v1/data`: the whole data document.
pub async fn v1_data_post(
    State(state): State<ApiState>,
    peer: Peer,
    params: Params,
    body: Body,
) -> Result<Response, ApiError> {
    data(state, "", params, Some(body), asked_by(peer)).await
}

/// `POST /v1/data/{path}`.
pub async fn v1_data_post_path(
    State(state): State<ApiState>,
    peer: Peer,
    Path(path): Path<String>,
    params: Params,
    body: Body,
) -> Result<Response, ApiError> {
    data(state, &path, params, Some(body), asked_by(peer)).await
}

/// `GET /v1/data`.
pub async fn v1_data_get(
    State(state): State<ApiState>,
    peer: Peer,
    params: Params,
) -> Result<Response, ApiError> {
    data(state, "", params, None, asked_by(peer)).await
}

/// `GET /v1/data/{path}`.
pub async fn v1_data_get_path(
    State(state): State<ApiState>,
    peer: Peer,
    Path(path): Path<String>,
    params: Params,
) -> Result<Response, ApiError> {
    data(state, &path, params, None, asked_by(peer)).await
}

async fn data(
    state: ApiState,
    path: &str,
    params: Params,
    body: Option<Body>,
    asked_by: AskedBy,
) -> Result<Response, ApiError> {
    let start = Instant::now();
    let Query(params) =
        params.map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))?;
    let path = DataPath::from_url_path(path).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let input = match body {
        Some(body) => {
            let bytes = read_body(body, state.max_body_bytes).await?;
            parse_data_request(&bytes)?
        }
        None => match params.iter().find(|(k, _)| k == "input") {
            Some((_, text)) => Some(serde_json::from_str(text).map_err(|e| {
                ApiError::BadRequest(format!("input parameter is not valid JSON: {e}"))
            })?),
            None => None,
        },
    };
    let parsed_ns = elapsed_ns(start);
    let warning = input.is_none().then_some(WarningV1 {
        code: codes::API_USAGE_WARNING,
        message: "'input' key missing from the request",
    });
    let pdp = state.pdp.clone();
    let answer = pdp.query_async(&path, input, asked_by).await?;
    let response = DataResponseV1 {
        decision_id: answer.decision_id,
        result: answer.result.as_ref().as_ref(),
        metrics: flag(&params, "metrics").then(|| MetricsV1 {
            timer_rego_input_parse_ns: parsed_ns,
            timer_rego_query_eval_ns: answer.eval_ns,
            timer_server_handler_ns: elapsed_ns(start),
            counter_decision_cache_hit: u64::from(answer.cache_hit),
        }),
        provenance: flag(&params, "provenance").then(|| ProvenanceV1 {
            version: crate::version::VERSION,
            revision: crate::version::GIT_COMMIT,
            bundles: BTreeMap::from([(
                pdp.bundle_name().to_string(),
                BundleProvenanceV1 {
                    revision: answer.revision.to_string(),
                },
            )]),
        }),
        warning,
    };
    Ok(json_response(
        StatusCode::OK,
        &response,
        flag(&params, "pretty"),
    ))
}

/// Reads at most `limit` bytes of body.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let inner = e.into_inner();
        let too_large =
            std::iter::successors(Some(&*inner as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
            .any(|e| e.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::TooLarge(limit)
        } else {
            ApiError::BadRequest(format!("cannot read request body: {inner}"))
        }
    })
}

/// `{"input": …}` → the input; an empty body is no input (as OPA).
fn parse_data_request(bytes: &[u8]) -> Result<Option<Value>, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::BadRequest(format!("body contains malformed input document: {e}"))
    })?;
    match doc {
        Value::Object(mut members) => Ok(members.remove("input")),
        _ => Err(ApiError::BadRequest(
            "body contains malformed input document: expected a JSON object such as {\"input\": {...}}".to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn data_requests_parse_as_opa_does() {
        let ok = |body: &str| parse_data_request(body.as_bytes()).map_err(|e| e.to_string());
        assert_eq!(ok(""), Ok(None));
        assert_eq!(ok(" \n"), Ok(None));
        assert_eq!(ok("{}"), Ok(None));
        assert_eq!(ok(r#"{"input": null}"#), Ok(Some(Value::Null)));
        assert_eq!(ok(r#"{"input": {"a": 1}}"#), Ok(Some(json!({"a": 1}))));
        for bad in ["{", "[1]", "\"x\"", r#"{"input": }"#] {
            let err = ok(bad).expect_err(bad);
            assert!(
                err.starts_with("body contains malformed input document"),
                "{bad}: {err}"
            );
        }
        let deep = format!("{{\"input\": {}1{}}}", "[".repeat(200), "]".repeat(200));
        assert!(ok(&deep).expect_err("deep").contains("recursion limit"));
        let invalid_utf8 = parse_data_request(b"{\"input\": \"\xff\"}")
            .expect_err("utf8")
            .to_string();
        assert!(invalid_utf8.contains("malformed"), "{invalid_utf8}");
    }
}

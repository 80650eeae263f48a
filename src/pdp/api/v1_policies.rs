//! `GET /v1/policies` and `GET /v1/policies/{id}`: the modules of the active bundle.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;

use super::types::{PolicyV1, ResultV1};
use super::{json_response, ApiError, ApiState};

/// `GET /v1/policies`: every module, sorted by id.
pub async fn v1_policies_list(State(state): State<ApiState>) -> Response {
    let policies: Vec<PolicyV1> = state
        .pdp
        .active()
        .map(|active| active.bundle.bundle().modules.iter().map(to_v1).collect())
        .unwrap_or_default();
    json_response(StatusCode::OK, &ResultV1 { result: policies }, false)
}

/// `GET /v1/policies/{id}`: one module by its id (its path in the bundle).
pub async fn v1_policies_get(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = id.trim_start_matches('/');
    let active = state.pdp.active();
    let module = active
        .as_ref()
        .and_then(|a| a.bundle.bundle().modules.iter().find(|m| m.id == id))
        .ok_or_else(|| {
            ApiError::NotFound(format!("policy module {id} is not in the active bundle"))
        })?;
    Ok(json_response(
        StatusCode::OK,
        &ResultV1 {
            result: to_v1(module),
        },
        false,
    ))
}

fn to_v1(module: &crate::pdp::bundle::PolicyModule) -> PolicyV1 {
    PolicyV1 {
        id: module.id.clone(),
        raw: module.raw.to_string(),
    }
}

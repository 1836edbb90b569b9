//! Unit formation routes (SPEC U1): show the unit, found it, issue join
//! tokens, join it.

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::{AppState, Json};
use axum::extract::State;
use axum::http::StatusCode;
use pairvisor_unit::UnitError;
use serde::Deserialize;
use std::time::Duration;
use utoipa::ToSchema;

fn unit_err(e: UnitError) -> ApiError {
    let (status, code) = match &e {
        UnitError::AlreadyMember(_) => (StatusCode::CONFLICT, "already_member"),
        UnitError::NotMember => (StatusCode::CONFLICT, "not_member"),
        UnitError::BadToken(_) | UnitError::Invalid(_) => {
            (StatusCode::BAD_REQUEST, "invalid_input")
        }
        UnitError::Db(_) | UnitError::Health(_) => {
            (StatusCode::SERVICE_UNAVAILABLE, "unit_unavailable")
        }
    };
    ApiError::new(status, code, e.to_string())
}

fn service(st: &AppState) -> ApiResult<&std::sync::Arc<pairvisor_unit::UnitService>> {
    st.unit.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "unit_disabled",
            "this daemon runs without a unit listener; start it with --unit-listen",
        )
    })
}

/// The unit: name, members, leader, PMs, heartbeat links.
#[utoipa::path(get, path = "/api/v1/unit", responses((status = 200, body = Object)))]
pub async fn show(State(st): State<AppState>) -> ApiResult<axum::Json<serde_json::Value>> {
    let v = match &st.unit {
        Some(u) => serde_json::to_value(u.view().await).unwrap_or_default(),
        None => serde_json::json!({"name": null, "enabled": false}),
    };
    Ok(axum::Json(v))
}

/// Found a unit on this PM.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InitRequest {
    /// Unit name.
    pub name: String,
}

/// `unit init`: this PM founds a unit.
#[utoipa::path(post, path = "/api/v1/unit/init", request_body = InitRequest,
    responses((status = 200, body = Object), (status = 409, body = ErrorBody)))]
pub async fn init(
    State(st): State<AppState>,
    Json(req): Json<InitRequest>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    let v = service(&st)?.init(&req.name).await.map_err(unit_err)?;
    Ok(axum::Json(serde_json::to_value(v).unwrap_or_default()))
}

/// Ask for a join token.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// For the witness rather than the second PM.
    #[serde(default)]
    pub witness: bool,
    /// Validity in seconds (default 3600, at most 86400).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// A join token (secret: give it only to the machine that joins).
#[derive(serde::Serialize, ToSchema)]
pub struct TokenResponse {
    /// The token.
    pub token: String,
}

/// Issue a one-time join token for the second PM or the witness.
#[utoipa::path(post, path = "/api/v1/unit/join-token", request_body = TokenRequest,
    responses((status = 200, body = TokenResponse), (status = 409, body = ErrorBody)))]
pub async fn join_token(
    State(st): State<AppState>,
    Json(req): Json<TokenRequest>,
) -> ApiResult<axum::Json<TokenResponse>> {
    let ttl = req.ttl_secs.unwrap_or(3600);
    if !(1..=86_400).contains(&ttl) {
        return Err(ApiError::invalid(format!(
            "ttl_secs = {ttl} is out of range; allowed: 1 to 86400"
        )));
    }
    let token = service(&st)?
        .join_token(req.witness, Duration::from_secs(ttl))
        .await
        .map_err(unit_err)?;
    Ok(axum::Json(TokenResponse { token }))
}

/// Join with a token.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The token from `unit join-token` on the first PM.
    pub token: String,
}

/// `unit join`: this PM joins the unit named by the token.
#[utoipa::path(post, path = "/api/v1/unit/join", request_body = JoinRequest,
    responses((status = 200, body = Object), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn join(
    State(st): State<AppState>,
    Json(req): Json<JoinRequest>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    let svc = service(&st)?;
    // A joining PM adopts the unit's records; refuse rather than hide its own.
    let vms = st.agent.list_vms()?.len();
    let volumes = st.agent.list_volumes()?.len();
    if svc.db().await.is_none() && (vms > 0 || volumes > 0) {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "conflict",
            format!(
            "this PM has {vms} VM(s) and {volumes} volume(s); a PM joins a unit empty. Move or \
             remove them first (or found the unit here with `unit init` and join the other PM)"
            ),
        ));
    }
    let v = svc.join(&req.token).await.map_err(unit_err)?;
    Ok(axum::Json(serde_json::to_value(v).unwrap_or_default()))
}

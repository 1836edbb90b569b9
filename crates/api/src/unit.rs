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
    let mut v = match &st.unit {
        Some(u) => serde_json::to_value(u.view().await).unwrap_or_default(),
        None => serde_json::json!({"name": null, "enabled": false}),
    };
    if st.agent.pm_name().is_some() {
        // Unit power (U5) and this PM's lease (U6).
        v["power"] = serde_json::to_value(st.agent.unit_power()).unwrap_or_default();
        v["holds_lease"] = serde_json::json!(st.agent.holds_lease());
    }
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

/// What forcing quorum on this PM would mean (SPEC U6).
#[derive(serde::Serialize, ToSchema)]
pub struct ForceQuorumPreview {
    /// This PM.
    pub pm: String,
    /// Whether this PM can reach a majority now (then forcing is refused).
    pub has_quorum: bool,
    /// Whether this PM holds its lease.
    pub holds_lease: bool,
    /// Milliseconds since the partner was last heard (None: never).
    pub partner_silent_ms: Option<u64>,
    /// This PM's replicas and what they hold, to compare with the partner's
    /// (ask the partner's API if it still answers).
    pub replicas: Vec<pairvisor_agent::ReplicaReport>,
    /// What forcing does.
    pub effect: String,
}

/// Force quorum on this PM.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ForceQuorumRequest {
    /// Must be true: the administrator has checked the preview.
    #[serde(default)]
    pub confirm: bool,
}

async fn preview(st: &AppState) -> ApiResult<ForceQuorumPreview> {
    let svc = service(st)?;
    let db = svc
        .db()
        .await
        .ok_or_else(|| unit_err(pairvisor_unit::UnitError::NotMember))?;
    // A leader that lost its followers may still name itself leader for a
    // while: ask for a linearizable read (a majority must answer) instead.
    let has_quorum = matches!(
        tokio::time::timeout(std::time::Duration::from_millis(1500), db.linearizable()).await,
        Ok(Ok(_))
    );
    let health = svc.health().await;
    let me = svc.pm().map(|p| p.name.clone()).unwrap_or_default();
    let holds_lease = st.agent.holds_lease();
    Ok(ForceQuorumPreview {
        pm: me.clone(),
        has_quorum,
        holds_lease,
        partner_silent_ms: health.and_then(|h| h.partner_silent_ms),
        replicas: st.agent.replica_report()?,
        effect: format!(
            "{me} becomes the only voter of the unit: it regains its lease, fences its partner \
             and, after the partner's lease has certainly expired, starts the partner's VMs from \
             its own replicas. Writes the partner made alone after the two lost each other are \
             discarded when it returns and resyncs from {me}. Check the replicas above (and the \
             partner's, if it still answers) before confirming."
        ),
    })
}

/// Preview forcing quorum on this PM.
#[utoipa::path(get, path = "/api/v1/unit/force-quorum",
    responses((status = 200, body = ForceQuorumPreview), (status = 409, body = ErrorBody)))]
pub async fn force_quorum_preview(
    State(st): State<AppState>,
) -> ApiResult<axum::Json<ForceQuorumPreview>> {
    Ok(axum::Json(preview(&st).await?))
}

/// Force quorum on this PM (U6): it becomes the unit's only voter. Refused
/// without `confirm: true`; the refusal carries the preview.
#[utoipa::path(post, path = "/api/v1/unit/force-quorum", request_body = ForceQuorumRequest,
    responses((status = 200, body = Object), (status = 409, body = ErrorBody)))]
pub async fn force_quorum(
    State(st): State<AppState>,
    Json(req): Json<ForceQuorumRequest>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    let p = preview(&st).await?;
    if !req.confirm {
        let mut e = ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "confirmation_required",
            format!(
                "forcing quorum makes {} the only voter of the unit; check which PM holds the \
                 newest data (details.replicas) and repeat with confirm: true \
                 (`pairvisor unit force-quorum --yes`)",
                p.pm
            ),
        );
        e.body.details = serde_json::to_value(&p).ok();
        return Err(e);
    }
    let db = service(&st)?
        .db()
        .await
        .ok_or_else(|| unit_err(pairvisor_unit::UnitError::NotMember))?;
    let r = db
        .force_quorum()
        .await
        .map_err(|e| ApiError::new(axum::http::StatusCode::CONFLICT, "refused", e.to_string()))?;
    tracing::warn!(pm = %p.pm, removed = ?r.removed, "quorum forced by the administrator");
    Ok(axum::Json(serde_json::json!({
        "forced": true,
        "pm": p.pm,
        "removed_voters": r.removed,
        "term": r.term,
        "replicas": p.replicas,
    })))
}

fn maint_err(e: pairvisor_orchestrator::maintenance::MaintenanceError) -> ApiError {
    use pairvisor_orchestrator::maintenance::MaintenanceError as M;
    match e {
        M::Agent(a) => a.into(),
        M::Refused(r @ pairvisor_model::pm::PmRefusal::NeedsConfirmation { .. }) => ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "confirmation_required",
            r.to_string(),
        ),
        M::Refused(r) => ApiError::new(axum::http::StatusCode::CONFLICT, "refused", r.to_string()),
        M::Other(m) => ApiError::new(axum::http::StatusCode::CONFLICT, "conflict", m),
    }
}

/// The unit's PMs with their states and allowed operations (U2).
#[utoipa::path(get, path = "/api/v1/pms",
    responses((status = 200, body = Vec<pairvisor_orchestrator::maintenance::PmStatusView>)))]
pub async fn list_pms(
    State(st): State<AppState>,
) -> ApiResult<axum::Json<Vec<pairvisor_orchestrator::maintenance::PmStatusView>>> {
    let svc = service(&st)?;
    Ok(axum::Json(
        pairvisor_orchestrator::maintenance::pms(&st.agent, svc)
            .await
            .map_err(maint_err)?,
    ))
}

/// Confirmation for operations that need it.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ConfirmRequest {
    /// Confirm an operation that the unit asks to confirm (Work On with the
    /// partner not running: the VMs are shut down instead of migrated).
    #[serde(default)]
    pub confirm: bool,
}

fn check_me(st: &AppState, name: &str) -> ApiResult<()> {
    match st.agent.pm_name() {
        Some(me) if me == name => Ok(()),
        Some(me) => Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "not_found",
            format!("PM '{name}' is not this PM ({me}) and its partner could not be reached"),
        )),
        None => Err(unit_err(pairvisor_unit::UnitError::NotMember)),
    }
}

/// Work On (U3): evacuate the PM by live migration, then maintenance.
#[utoipa::path(post, path = "/api/v1/pms/{name}/work-on", params(("name" = String, Path)),
    request_body = ConfirmRequest,
    responses((status = 202, body = Object), (status = 409, body = ErrorBody)))]
pub async fn work_on(
    State(st): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
    Json(req): Json<ConfirmRequest>,
) -> ApiResult<(axum::http::StatusCode, axum::Json<serde_json::Value>)> {
    check_me(&st, &name)?;
    let svc = service(&st)?;
    pairvisor_orchestrator::maintenance::work_on(&st.agent, svc, req.confirm)
        .await
        .map_err(maint_err)?;
    Ok((
        axum::http::StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({"pm": name, "state": "evacuating",
            "follow": "GET /api/v1/pms shows the progress"})),
    ))
}

/// Finalize (U3): the PM in maintenance returns to service.
#[utoipa::path(post, path = "/api/v1/pms/{name}/finalize", params(("name" = String, Path)),
    responses((status = 200, body = Object), (status = 409, body = ErrorBody)))]
pub async fn finalize(
    State(st): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    check_me(&st, &name)?;
    let svc = service(&st)?;
    pairvisor_orchestrator::maintenance::finalize(&st.agent, svc)
        .await
        .map_err(maint_err)?;
    Ok(axum::Json(
        serde_json::json!({"pm": name, "state": "running"}),
    ))
}

/// Shutdown (U3) of a PM in maintenance; refused while a resync from it runs.
#[utoipa::path(post, path = "/api/v1/pms/{name}/shutdown", params(("name" = String, Path)),
    responses((status = 200, body = Object), (status = 409, body = ErrorBody)))]
pub async fn pm_shutdown(
    State(st): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    check_me(&st, &name)?;
    let svc = service(&st)?;
    pairvisor_orchestrator::maintenance::power_down(&st.agent, svc, false)
        .await
        .map_err(maint_err)?;
    Ok(axum::Json(
        serde_json::json!({"pm": name, "state": "off (in maintenance)"}),
    ))
}

/// Power Off (U3, hard) of a PM in maintenance; refused while a resync from
/// it runs.
#[utoipa::path(post, path = "/api/v1/pms/{name}/poweroff", params(("name" = String, Path)),
    responses((status = 200, body = Object), (status = 409, body = ErrorBody)))]
pub async fn pm_poweroff(
    State(st): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    check_me(&st, &name)?;
    let svc = service(&st)?;
    pairvisor_orchestrator::maintenance::power_down(&st.agent, svc, true)
        .await
        .map_err(maint_err)?;
    Ok(axum::Json(
        serde_json::json!({"pm": name, "state": "off (in maintenance)"}),
    ))
}

/// Unit shutdown (U5): VMs first, then both PMs; the running VMs start
/// again at unit start. Progress: `GET /api/v1/unit` (`power`).
#[utoipa::path(post, path = "/api/v1/unit/shutdown",
    responses((status = 202, body = Object), (status = 409, body = ErrorBody)))]
pub async fn unit_shutdown(
    State(st): State<AppState>,
) -> ApiResult<(axum::http::StatusCode, axum::Json<serde_json::Value>)> {
    service(&st)?;
    let r = pairvisor_orchestrator::maintenance::unit_shutdown(&st.agent)
        .await
        .map_err(maint_err)?;
    Ok((
        axum::http::StatusCode::ACCEPTED,
        axum::Json(serde_json::to_value(&r).unwrap_or_default()),
    ))
}

/// A VM's preferred PM (L2).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementRequest {
    /// The preferred PM, or null for none (automatic when load balancing is
    /// on).
    pub preferred_pm: Option<String>,
}

/// Set a VM's preferred PM (L2); it moves there when that PM is running and
/// the VM is in sync (L3).
#[utoipa::path(put, path = "/api/v1/vms/{name}/placement", params(("name" = String, Path)),
    request_body = PlacementRequest,
    responses((status = 200, body = pairvisor_agent::VmView), (status = 400, body = ErrorBody)))]
pub async fn set_placement(
    State(st): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
    Json(req): Json<PlacementRequest>,
) -> ApiResult<axum::Json<pairvisor_agent::VmView>> {
    Ok(axum::Json(
        st.agent.set_preferred_pm(&name, req.preferred_pm)?,
    ))
}

/// Promote anyway (SPEC U6): the administrator accepts that writes missing
/// from this PM's replicas of the VM's volumes are lost, and the VM moves
/// here from its fenced host. Refused unless `confirm` repeats the VM's
/// name and the host is fenced with its lease certainly expired. Runs on
/// the PM that receives it (never forwarded). The answer says what is lost.
#[utoipa::path(post, path = "/api/v1/vms/{name}/promote-anyway", params(("name" = String, Path)),
    request_body = pairvisor_agent::PromoteAnywayRequest,
    responses((status = 200, body = pairvisor_agent::PromoteAnywayReport),
        (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn promote_anyway(
    State(st): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
    Json(req): Json<pairvisor_agent::PromoteAnywayRequest>,
) -> ApiResult<axum::Json<pairvisor_agent::PromoteAnywayReport>> {
    service(&st)?;
    Ok(axum::Json(st.agent.promote_anyway(&name, &req)?))
}

/// A volume's split brain (S4): both copies side by side (generation, last
/// write, regions each wrote alone) and the choices. Answered by the
/// volume's primary PM (forwarded there).
#[utoipa::path(get, path = "/api/v1/volumes/{name}/split-brain", params(("name" = String, Path)),
    responses((status = 200, body = pairvisor_agent::SplitBrainView), (status = 409, body = ErrorBody)))]
pub async fn volume_split_brain(
    State(st): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> ApiResult<axum::Json<pairvisor_agent::SplitBrainView>> {
    service(&st)?;
    Ok(axum::Json(st.agent.split_brain(&name)?))
}

/// Resolve a split brain (S4): keep one PM's copy (`confirm` repeats the
/// volume's name); the other copy is resynced from it and both are verified.
/// Keeping the copy of the PM that is not primary needs the VM stopped; the
/// VM then runs there.
#[utoipa::path(post, path = "/api/v1/volumes/{name}/resolve", params(("name" = String, Path)),
    request_body = pairvisor_agent::ResolveRequest,
    responses((status = 200, body = pairvisor_agent::SplitBrainView),
        (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn volume_resolve(
    State(st): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
    Json(req): Json<pairvisor_agent::ResolveRequest>,
) -> ApiResult<axum::Json<pairvisor_agent::SplitBrainView>> {
    service(&st)?;
    Ok(axum::Json(st.agent.resolve_split_brain(&name, &req)?))
}

/// Reset Device (U4): a PM taken out of service after too many failures
/// returns to service (its failure counter is cleared). Works from either PM.
#[utoipa::path(post, path = "/api/v1/pms/{name}/reset-device", params(("name" = String, Path)),
    responses((status = 200, body = Object), (status = 409, body = ErrorBody)))]
pub async fn pm_reset_device(
    State(st): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    service(&st)?;
    st.agent.reset_pm(&name)?;
    Ok(axum::Json(
        serde_json::json!({"pm": name, "state": "running"}),
    ))
}

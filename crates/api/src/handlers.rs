//! Route handlers. Each starts by stating the access its caller needs.

use crate::auth::{self, AuthUser};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::{AppState, Json};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use pairvisor_agent::*;
use pairvisor_model::mtbf::MtbfThreshold;
use pairvisor_model::roles::Role;
use pairvisor_store::{Accel, AuditRecord, Settings, UserRecord};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use utoipa::{IntoParams, ToSchema};

type Caller = Extension<AuthUser>;

/// Credentials.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

/// A new session.
#[derive(Serialize, ToSchema)]
pub struct LoginResponse {
    /// Bearer token for the `Authorization` header.
    pub token: String,
    /// The user.
    pub user: String,
    /// Its role.
    pub role: String,
    /// Seconds until the token expires.
    pub expires_in: u64,
}

/// Log in and receive a bearer token.
#[utoipa::path(post, path = "/api/v1/auth/login", request_body = LoginRequest,
    responses((status = 200, body = LoginResponse), (status = 401, body = ErrorBody),
        (status = 429, description = "too many failed logins from this address or for this user, or too many at once: wait Retry-After seconds", body = ErrorBody)))]
pub async fn login(
    State(st): State<AppState>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    Json(req): Json<LoginRequest>,
) -> ApiResult<Response> {
    let addr = peer.map(|axum::Extension(c)| c.0.ip());
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    };
    // Over the failed-login limit: refused before any hashing. A try counts
    // as failed until it is known not to be.
    let throttled =
        st.logins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .begin(now_ms(), addr, &req.user);
    let result = match throttled {
        Err(t) => Err(too_many(&t)),
        Ok(()) => {
            let r = verify_login(&st, &req).await;
            let failed = r
                .as_ref()
                .is_err_and(|e| e.status == axum::http::StatusCode::UNAUTHORIZED);
            if !failed {
                st.logins
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .not_failed(addr, &req.user);
            }
            r
        }
    };
    // A throttled try is not written (a flood must not fill the disk); it
    // is counted.
    if result
        .as_ref()
        .is_err_and(|e| e.status == axum::http::StatusCode::TOO_MANY_REQUESTS)
    {
        st.unaudited.note();
    } else {
        crate::write_audit(
            &st,
            AuditRecord {
                seq: 0,
                time: now(),
                user: req.user.clone(),
                action: "POST /api/v1/auth/login".into(),
                target: "auth/login".into(),
                result: match &result {
                    Ok(_) => "ok".into(),
                    Err(e) => format!("{} {}", e.status.as_u16(), e.body.code),
                },
            },
        )
        .await;
    }
    let (token, user) = result?;
    Ok(axum::Json(LoginResponse {
        token,
        user: user.name,
        role: user.role.to_string(),
        expires_in: auth::TOKEN_LIFETIME_SECS,
    })
    .into_response())
}

/// 429 with Retry-After for a throttled login.
fn too_many(t: &pairvisor_model::throttle::Throttled) -> ApiError {
    let mut e = ApiError::new(
        axum::http::StatusCode::TOO_MANY_REQUESTS,
        "too_many_requests",
        t.to_string(),
    );
    e.retry_after = Some(t.retry_after_secs);
    e
}

/// Checks the password on the blocking pool, one Argon2id verification at a
/// time; a login that waits too long for its turn is told to retry.
async fn verify_login(
    st: &AppState,
    req: &LoginRequest,
) -> ApiResult<(String, pairvisor_store::UserRecord)> {
    let busy = || {
        too_many(&pairvisor_model::throttle::Throttled {
            who: "in progress on this PM (it is checking other passwords)".into(),
            retry_after_secs: 1,
        })
    };
    let permit = tokio::time::timeout(Duration::from_secs(2), st.hashing.clone().acquire_owned())
        .await
        .map_err(|_| busy())?
        .map_err(|_| busy())?;
    let (agent, user, password) = (st.agent.clone(), req.user.clone(), req.password.clone());
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        auth::login(agent.store(), &user, &password)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("login: {e}"),
        )
    })?
}

/// End this session (revokes the token).
#[utoipa::path(post, path = "/api/v1/auth/logout", responses((status = 204)))]
pub async fn logout(
    State(st): State<AppState>,
    _: Caller,
    headers: axum::http::HeaderMap,
) -> ApiResult<StatusCode> {
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        auth::logout(st.agent.store(), t.trim())?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The caller.
#[derive(Serialize, ToSchema)]
pub struct WhoAmI {
    /// User name.
    pub user: String,
    /// Role.
    pub role: String,
}

/// Who am I?
#[utoipa::path(get, path = "/api/v1/auth/whoami", responses((status = 200, body = WhoAmI)))]
pub async fn whoami(Extension(user): Caller) -> ApiResult<axum::Json<WhoAmI>> {
    Ok(axum::Json(WhoAmI {
        user: user.name,
        role: user.role.to_string(),
    }))
}

// ------------------------------------------------------------------------ VMs

/// List VMs.
#[utoipa::path(get, path = "/api/v1/vms", responses((status = 200, body = Vec<VmView>)))]
pub async fn list_vms(State(st): State<AppState>, _: Caller) -> ApiResult<axum::Json<Vec<VmView>>> {
    Ok(axum::Json(st.agent.list_vms()?))
}

/// Create a VM (stopped).
#[utoipa::path(post, path = "/api/v1/vms", request_body = CreateVm,
    responses((status = 201, body = VmView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_vm(
    State(st): State<AppState>,
    _: Caller,
    Json(req): Json<CreateVm>,
) -> ApiResult<(StatusCode, axum::Json<VmView>)> {
    Ok((
        StatusCode::CREATED,
        axum::Json(st.agent.create_vm(req).await?),
    ))
}

/// Show a VM.
#[utoipa::path(get, path = "/api/v1/vms/{name}", params(("name" = String, Path)),
    responses((status = 200, body = VmView), (status = 404, body = ErrorBody)))]
pub async fn get_vm(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<VmView>> {
    Ok(axum::Json(st.agent.get_vm(&name)?))
}

/// Options of VM removal.
#[derive(Deserialize, IntoParams)]
pub struct RemoveQuery {
    /// Also delete the VM's data volumes (the boot volume is always deleted).
    #[serde(default)]
    pub delete_data_volumes: bool,
}

/// Remove a VM.
#[utoipa::path(delete, path = "/api/v1/vms/{name}", params(("name" = String, Path), RemoveQuery),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn remove_vm(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> ApiResult<StatusCode> {
    st.agent.remove_vm(&name, q.delete_data_volumes).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Start a stopped VM.
#[utoipa::path(post, path = "/api/v1/vms/{name}/start", params(("name" = String, Path)),
    responses((status = 200, body = OpResult), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn start_vm(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<OpResult>> {
    Ok(axum::Json(st.agent.start(&name).await?))
}

/// ACPI shutdown (power off after the shutdown timeout).
#[utoipa::path(post, path = "/api/v1/vms/{name}/shutdown", params(("name" = String, Path)),
    responses((status = 200, body = VmView), (status = 409, body = ErrorBody)))]
pub async fn shutdown_vm(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<VmView>> {
    Ok(axum::Json(st.agent.shutdown(&name).await?))
}

/// Power off immediately.
#[utoipa::path(post, path = "/api/v1/vms/{name}/poweroff", params(("name" = String, Path)),
    responses((status = 200, body = VmView), (status = 409, body = ErrorBody)))]
pub async fn poweroff_vm(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<VmView>> {
    Ok(axum::Json(st.agent.power_off(&name).await?))
}

/// Dump guest memory to a file, then restart the VM.
#[utoipa::path(post, path = "/api/v1/vms/{name}/dump", params(("name" = String, Path)),
    responses((status = 200, body = VmView), (status = 409, body = ErrorBody)))]
pub async fn dump_vm(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<VmView>> {
    Ok(axum::Json(st.agent.dump(&name).await?))
}

/// Live-migrate a running VM to the partner PM (M1). Returns at once; follow
/// the migration with `GET /vms/{name}/migration`.
#[utoipa::path(post, path = "/api/v1/vms/{name}/migrate", params(("name" = String, Path)),
    request_body = MigrateRequest,
    responses((status = 200, body = MigrationView), (status = 409, body = ErrorBody)))]
pub async fn migrate_vm(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
    Json(req): Json<MigrateRequest>,
) -> ApiResult<axum::Json<MigrationView>> {
    if let Some(ms) = req.max_downtime_ms {
        if !(1..=60_000).contains(&ms) {
            return Err(ApiError::invalid(format!(
                "max_downtime_ms = {ms} is out of range; allowed: 1 to 60000"
            )));
        }
    }
    if req.bandwidth_mbps.is_some_and(|b| b > 100_000) {
        return Err(ApiError::invalid(
            "bandwidth_mbps is out of range; allowed: 0 (unlimited) to 100000",
        ));
    }
    Ok(axum::Json(st.agent.migrate(&name, req).await?))
}

/// The current (or last) migration of a VM: phase, M2 figures, verdict,
/// remedies, measured downtime.
#[utoipa::path(get, path = "/api/v1/vms/{name}/migration", params(("name" = String, Path)),
    responses((status = 200, body = MigrationView), (status = 404, body = ErrorBody)))]
pub async fn get_migration(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<MigrationView>> {
    Ok(axum::Json(st.agent.migration(&name)?))
}

/// Pre-flight estimate (M4): measures the guest's dirty rate for a second
/// and says whether a migration would converge (the body takes the same
/// options as migrate).
#[utoipa::path(post, path = "/api/v1/vms/{name}/migration/estimate", params(("name" = String, Path)),
    request_body = MigrateRequest,
    responses((status = 200, body = MigrationEstimate), (status = 409, body = ErrorBody)))]
pub async fn migration_estimate(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Json(req): Json<MigrateRequest>,
) -> ApiResult<axum::Json<MigrationEstimate>> {
    Ok(axum::Json(st.agent.migration_estimate(&name, req).await?))
}

/// Apply a remedy to a migration that does not converge (M3).
#[utoipa::path(post, path = "/api/v1/vms/{name}/migration/remedy", params(("name" = String, Path)),
    request_body = RemedyRequest,
    responses((status = 200, body = MigrationView), (status = 409, body = ErrorBody)))]
pub async fn migration_remedy(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
    Json(req): Json<RemedyRequest>,
) -> ApiResult<axum::Json<MigrationView>> {
    Ok(axum::Json(st.agent.migration_remedy(&name, req).await?))
}

/// Cancel a migration (before its switch-over).
#[utoipa::path(delete, path = "/api/v1/vms/{name}/migration", params(("name" = String, Path)),
    responses((status = 200, body = MigrationView), (status = 409, body = ErrorBody)))]
pub async fn cancel_migration(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<MigrationView>> {
    Ok(axum::Json(st.agent.cancel_migration(&name).await?))
}

/// Restart a critical VM and clear its crash counter.
#[utoipa::path(post, path = "/api/v1/vms/{name}/reset-device", params(("name" = String, Path)),
    responses((status = 200, body = VmView), (status = 409, body = ErrorBody)))]
pub async fn reset_device(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<VmView>> {
    Ok(axum::Json(st.agent.reset_device(&name).await?))
}

/// A VCD to use.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VcdChoice {
    /// VCD name.
    pub vcd: String,
}

/// Start a stopped VM once from a VCD.
#[utoipa::path(post, path = "/api/v1/vms/{name}/boot-from-cd", params(("name" = String, Path)), request_body = VcdChoice,
    responses((status = 200, body = OpResult), (status = 409, body = ErrorBody)))]
pub async fn boot_from_cd(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
    Json(req): Json<VcdChoice>,
) -> ApiResult<axum::Json<OpResult>> {
    Ok(axum::Json(st.agent.boot_from_cd(&name, &req.vcd).await?))
}

/// Insert a VCD into the VM's CD drive.
#[utoipa::path(put, path = "/api/v1/vms/{name}/cd", params(("name" = String, Path)), request_body = VcdChoice,
    responses((status = 200, body = VmView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn insert_cd(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
    Json(req): Json<VcdChoice>,
) -> ApiResult<axum::Json<VmView>> {
    Ok(axum::Json(st.agent.insert_cd(&name, &req.vcd).await?))
}

/// Eject the VM's CD.
#[utoipa::path(delete, path = "/api/v1/vms/{name}/cd", params(("name" = String, Path)),
    responses((status = 200, body = VmView), (status = 409, body = ErrorBody)))]
pub async fn eject_cd(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<VmView>> {
    Ok(axum::Json(st.agent.eject_cd(&name).await?))
}

/// Re-provision a stopped VM.
#[utoipa::path(post, path = "/api/v1/vms/{name}/config", params(("name" = String, Path)), request_body = ConfigVm,
    responses((status = 200, body = VmView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn config_vm(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
    Json(req): Json<ConfigVm>,
) -> ApiResult<axum::Json<VmView>> {
    Ok(axum::Json(st.agent.config_vm(&name, req).await?))
}

/// Console log options.
#[derive(Deserialize, IntoParams)]
pub struct ConsoleQuery {
    /// Bytes from the end of the log to return (default 64 KiB, at most 1 MiB).
    pub tail_bytes: Option<u64>,
    /// Keep the response open and stream new output as it arrives.
    #[serde(default)]
    pub follow: bool,
}

/// The VM's serial console output (tail, optionally followed).
#[utoipa::path(get, path = "/api/v1/vms/{name}/console", params(("name" = String, Path), ConsoleQuery),
    responses((status = 200, content_type = "text/plain", body = String), (status = 404, body = ErrorBody)))]
pub async fn console_log(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> ApiResult<Response> {
    let tail = q.tail_bytes.unwrap_or(64 * 1024).min(1024 * 1024);
    // Disk reads off the async runtime (the lease keeper and the mirror
    // share it).
    let read = |agent: pairvisor_agent::Agent, name: String, from: Option<u64>, max: u64| async move {
        tokio::task::spawn_blocking(move || agent.console_log(&name, from, max))
            .await
            .unwrap_or_else(|e| {
                Err(pairvisor_agent::AgentError::Io {
                    context: "reading the console log".into(),
                    source: std::io::Error::other(e),
                })
            })
    };
    let (first, offset) = read(st.agent.clone(), name.clone(), None, tail).await?;
    let text_plain = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if !q.follow {
        return Ok((text_plain, first).into_response());
    }
    let agent = st.agent.clone();
    let stream = futures_util::stream::unfold(
        (Some(first), offset, agent, name),
        move |(pending, offset, agent, name)| async move {
            if let Some(p) = pending {
                return Some((
                    Ok::<_, std::io::Error>(bytes::Bytes::from(p)),
                    (None, offset, agent, name),
                ));
            }
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                match read(agent.clone(), name.clone(), Some(offset), 256 * 1024).await {
                    Ok((data, next)) if !data.is_empty() => {
                        return Some((Ok(bytes::Bytes::from(data)), (None, next, agent, name)));
                    }
                    Ok(_) => continue,
                    Err(_) => return None, // VM removed
                }
            }
        },
    );
    Ok((text_plain, Body::from_stream(stream)).into_response())
}

// -------------------------------------------------------------------- volumes

/// List volumes.
#[utoipa::path(get, path = "/api/v1/volumes", responses((status = 200, body = Vec<VolumeView>)))]
pub async fn list_volumes(
    State(st): State<AppState>,
    _: Caller,
) -> ApiResult<axum::Json<Vec<VolumeView>>> {
    Ok(axum::Json(st.agent.list_volumes()?))
}

/// Create an unattached volume.
#[utoipa::path(post, path = "/api/v1/volumes", request_body = CreateVolume,
    responses((status = 201, body = VolumeView), (status = 400, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_volume(
    State(st): State<AppState>,
    _: Caller,
    Json(req): Json<CreateVolume>,
) -> ApiResult<(StatusCode, axum::Json<VolumeView>)> {
    Ok((
        StatusCode::CREATED,
        axum::Json(st.agent.create_volume(req).await?),
    ))
}

/// Show a volume.
#[utoipa::path(get, path = "/api/v1/volumes/{name}", params(("name" = String, Path)),
    responses((status = 200, body = VolumeView), (status = 404, body = ErrorBody)))]
pub async fn get_volume(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<VolumeView>> {
    Ok(axum::Json(st.agent.get_volume(&name)?))
}

/// Delete an unattached volume.
#[utoipa::path(delete, path = "/api/v1/volumes/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_volume(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    st.agent.delete_volume(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A VM to attach to.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    /// VM name.
    pub vm: String,
}

/// Attach a volume to a stopped VM.
#[utoipa::path(post, path = "/api/v1/volumes/{name}/attach", params(("name" = String, Path)), request_body = AttachRequest,
    responses((status = 200, body = VolumeView), (status = 409, body = ErrorBody)))]
pub async fn attach_volume(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
    Json(req): Json<AttachRequest>,
) -> ApiResult<axum::Json<VolumeView>> {
    Ok(axum::Json(st.agent.attach_volume(&name, &req.vm).await?))
}

/// Detach a data volume from its stopped VM (data kept).
#[utoipa::path(post, path = "/api/v1/volumes/{name}/detach", params(("name" = String, Path)),
    responses((status = 200, body = VolumeView), (status = 409, body = ErrorBody)))]
pub async fn detach_volume(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<VolumeView>> {
    Ok(axum::Json(st.agent.detach_volume(&name).await?))
}

/// List storage groups.
#[utoipa::path(get, path = "/api/v1/storage-groups", responses((status = 200, body = Vec<StorageGroupView>)))]
pub async fn list_groups(
    State(st): State<AppState>,
    _: Caller,
) -> ApiResult<axum::Json<Vec<StorageGroupView>>> {
    Ok(axum::Json(st.agent.list_storage_groups()?))
}

/// Create a storage group.
#[utoipa::path(post, path = "/api/v1/storage-groups", request_body = CreateStorageGroup,
    responses((status = 201, body = StorageGroupView), (status = 400, body = ErrorBody)))]
pub async fn create_group(
    State(st): State<AppState>,
    _: Caller,
    Json(req): Json<CreateStorageGroup>,
) -> ApiResult<(StatusCode, axum::Json<StorageGroupView>)> {
    Ok((
        StatusCode::CREATED,
        axum::Json(st.agent.create_storage_group(req).await?),
    ))
}

// ----------------------------------------------------------------------- VCDs

/// List VCDs.
#[utoipa::path(get, path = "/api/v1/vcds", responses((status = 200, body = Vec<VcdView>)))]
pub async fn list_vcds(
    State(st): State<AppState>,
    _: Caller,
) -> ApiResult<axum::Json<Vec<VcdView>>> {
    Ok(axum::Json(st.agent.list_vcds()?))
}

/// Add a VCD from an ISO file on the PM.
#[utoipa::path(post, path = "/api/v1/vcds", request_body = AddVcd,
    responses((status = 201, body = VcdView), (status = 400, body = ErrorBody)))]
pub async fn add_vcd(
    State(st): State<AppState>,
    _: Caller,
    Json(req): Json<AddVcd>,
) -> ApiResult<(StatusCode, axum::Json<VcdView>)> {
    Ok((
        StatusCode::CREATED,
        axum::Json(st.agent.add_vcd_from_path(req).await?),
    ))
}

/// Upload an ISO as a new VCD (request body: the image bytes).
#[utoipa::path(put, path = "/api/v1/vcds/{name}", params(("name" = String, Path)),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = VcdView), (status = 400, body = ErrorBody)))]
pub async fn upload_vcd(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<(StatusCode, axum::Json<VcdView>)> {
    let stream = body.into_data_stream();
    Ok((
        StatusCode::CREATED,
        axum::Json(st.agent.add_vcd_from_stream(&name, stream).await?),
    ))
}

/// Remove an unused VCD.
#[utoipa::path(delete, path = "/api/v1/vcds/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 409, body = ErrorBody)))]
pub async fn remove_vcd(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    st.agent.remove_vcd(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------- users & settings

/// A user as the API shows it (never the password hash).
#[derive(Serialize, ToSchema)]
pub struct UserView {
    /// Name.
    pub name: String,
    /// Role.
    pub role: String,
    /// Creation time, seconds since the epoch.
    pub created_at: u64,
}

/// Create a user.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    /// Name.
    pub name: String,
    /// `administrator`, `operator` or `read_only`.
    #[schema(value_type = String)]
    pub role: Role,
    /// Password (at least 8 characters).
    pub password: String,
}

/// List users.
#[utoipa::path(get, path = "/api/v1/users", responses((status = 200, body = Vec<UserView>)))]
pub async fn list_users(
    State(st): State<AppState>,
    _: Caller,
) -> ApiResult<axum::Json<Vec<UserView>>> {
    let users: Vec<UserRecord> = st.agent.store().list()?;
    Ok(axum::Json(
        users
            .into_iter()
            .map(|u| UserView {
                name: u.name,
                role: u.role.to_string(),
                created_at: u.created_at,
            })
            .collect(),
    ))
}

/// Create a user.
#[utoipa::path(post, path = "/api/v1/users", request_body = CreateUser,
    responses((status = 201, body = UserView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_user(
    State(st): State<AppState>,
    _: Caller,
    Json(req): Json<CreateUser>,
) -> ApiResult<(StatusCode, axum::Json<UserView>)> {
    let u = auth::create_user(st.agent.store(), &req.name, req.role, &req.password)?;
    Ok((
        StatusCode::CREATED,
        axum::Json(UserView {
            name: u.name,
            role: u.role.to_string(),
            created_at: u.created_at,
        }),
    ))
}

/// Delete a user.
#[utoipa::path(delete, path = "/api/v1/users/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_user(
    State(st): State<AppState>,
    _: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    auth::delete_user(st.agent.store(), &name)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Settings as the API shows and accepts them.
#[derive(Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct SettingsPatch {
    /// Memory reserved for the system, MiB (256..=65536).
    pub memory_reserve_mib: Option<u64>,
    /// `kvm` or `tcg`.
    pub accel: Option<String>,
    /// QEMU binary (name on PATH or absolute path).
    pub qemu_binary: Option<String>,
    /// Crashes tolerated in the window before a VM goes critical (1..=100).
    pub vm_mtbf_max_failures: Option<u32>,
    /// The crash window, seconds (1..=604800).
    pub vm_mtbf_window_secs: Option<u64>,
    /// ACPI shutdown timeout, seconds (1..=3600).
    pub shutdown_timeout_secs: Option<u64>,
    /// Boot grace for VMs without an instance check, seconds (1..=3600).
    pub boot_grace_secs: Option<u64>,
    /// Seconds between instance checks (1..=300).
    pub instance_check_interval_secs: Option<u64>,
    /// IANA time zone name for the console (e.g. `Europe/Paris`).
    pub timezone: Option<String>,
    /// Restart a running guest whose instance check has failed this many
    /// seconds (0: never; 10..=86400 otherwise).
    pub unresponsive_restart_secs: Option<u64>,
    /// Live migration: maximum downtime at switch-over, ms (1..=60000).
    pub migration_max_downtime_ms: Option<u64>,
    /// Live migration: bandwidth cap, MB/s (0: unlimited, up to 100000).
    pub migration_bandwidth_mbps: Option<u64>,
    /// Live migration: post-copy allowed as a remedy (M3).
    pub migration_post_copy_allowed: Option<bool>,
    /// HA load balancing (L1): spread VMs without a preferred PM by memory.
    pub load_balancing: Option<bool>,
    /// Resync rate cap, MB/s (0: unlimited, up to 100000), applied at once
    /// to running resyncs (S2).
    pub resync_rate_mbps: Option<u64>,
    /// A VM's console log is rotated above this size, MiB (1..=1024; one
    /// older generation is kept).
    pub console_log_max_mib: Option<u64>,
    /// Audit records kept on each PM, oldest dropped first (1000..=10000000).
    pub audit_max_records: Option<u64>,
    /// Audit records older than this many days are dropped (1..=3650).
    pub audit_max_days: Option<u64>,
}

fn settings_view(s: &Settings) -> SettingsPatch {
    SettingsPatch {
        memory_reserve_mib: Some(s.memory_reserve_mib),
        accel: Some(match s.accel {
            Accel::Kvm => "kvm".into(),
            Accel::Tcg => "tcg".into(),
        }),
        qemu_binary: Some(s.qemu_binary.clone()),
        vm_mtbf_max_failures: Some(s.vm_mtbf.max_failures),
        vm_mtbf_window_secs: Some(s.vm_mtbf.window_secs),
        shutdown_timeout_secs: Some(s.shutdown_timeout_secs),
        boot_grace_secs: Some(s.boot_grace_secs),
        instance_check_interval_secs: Some(s.instance_check_interval_secs),
        timezone: Some(s.timezone.clone()),
        unresponsive_restart_secs: Some(s.unresponsive_restart_secs),
        migration_max_downtime_ms: Some(s.migration_max_downtime_ms),
        migration_bandwidth_mbps: Some(s.migration_bandwidth_mbps),
        migration_post_copy_allowed: Some(s.migration_post_copy_allowed),
        load_balancing: Some(s.load_balancing),
        resync_rate_mbps: Some(s.resync_rate_mbps),
        console_log_max_mib: Some(s.console_log_max_mib),
        audit_max_records: Some(s.audit_max_records),
        audit_max_days: Some(s.audit_max_days),
    }
}

/// Show settings.
#[utoipa::path(get, path = "/api/v1/settings", responses((status = 200, body = SettingsPatch)))]
pub async fn get_settings(
    State(st): State<AppState>,
    _: Caller,
) -> ApiResult<axum::Json<SettingsPatch>> {
    Ok(axum::Json(settings_view(&st.agent.store().settings()?)))
}

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    what: &str,
    v: T,
    lo: T,
    hi: T,
) -> ApiResult<T> {
    if v < lo || v > hi {
        Err(ApiError::invalid(format!(
            "{what} = {v} is out of range; allowed: {lo} to {hi}"
        )))
    } else {
        Ok(v)
    }
}

/// Change settings (only the fields given). All values are validated before
/// any is applied.
#[utoipa::path(patch, path = "/api/v1/settings", request_body = SettingsPatch,
    responses((status = 200, body = SettingsPatch), (status = 400, body = ErrorBody)))]
pub async fn update_settings(
    State(st): State<AppState>,
    _: Caller,
    Json(p): Json<SettingsPatch>,
) -> ApiResult<axum::Json<SettingsPatch>> {
    let s = st.agent.store().write(|tx| {
        let mut s = tx.settings()?;
        if let Some(v) = p.memory_reserve_mib {
            s.memory_reserve_mib = in_range("memory_reserve_mib", v, 256, 65536)?;
        }
        if let Some(a) = &p.accel {
            s.accel = match a.as_str() {
                "kvm" => Accel::Kvm,
                "tcg" => Accel::Tcg,
                other => {
                    return Err(ApiError::invalid(format!(
                        "accel '{other}' is not known; allowed: kvm, tcg"
                    )))
                }
            };
        }
        if let Some(b) = &p.qemu_binary {
            pairvisor_model::names::validate_qemu_binary(b).map_err(ApiError::invalid)?;
            s.qemu_binary = b.clone();
        }
        let mut mtbf: MtbfThreshold = s.vm_mtbf;
        if let Some(v) = p.vm_mtbf_max_failures {
            mtbf.max_failures = in_range("vm_mtbf_max_failures", v, 1, 100)?;
        }
        if let Some(v) = p.vm_mtbf_window_secs {
            mtbf.window_secs = in_range("vm_mtbf_window_secs", v, 1, 604_800)?;
        }
        s.vm_mtbf = mtbf;
        if let Some(v) = p.shutdown_timeout_secs {
            s.shutdown_timeout_secs = in_range("shutdown_timeout_secs", v, 1, 3600)?;
        }
        if let Some(v) = p.boot_grace_secs {
            s.boot_grace_secs = in_range("boot_grace_secs", v, 1, 3600)?;
        }
        if let Some(v) = p.instance_check_interval_secs {
            s.instance_check_interval_secs = in_range("instance_check_interval_secs", v, 1, 300)?;
        }
        if let Some(tz) = &p.timezone {
            let ok = !tz.is_empty()
                && tz.len() <= 64
                && !tz.split('/').any(|c| c.is_empty() || c == "..")
                && tz
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/_-+".contains(c));
            if !ok {
                return Err(ApiError::invalid(format!(
                    "time zone '{tz}' is not an IANA zone name like Europe/Paris or UTC"
                )));
            }
            s.timezone = tz.clone();
        }
        if let Some(v) = p.unresponsive_restart_secs {
            s.unresponsive_restart_secs = if v == 0 {
                0
            } else {
                in_range("unresponsive_restart_secs", v, 10, 86_400)?
            };
        }
        if let Some(v) = p.migration_max_downtime_ms {
            s.migration_max_downtime_ms = in_range("migration_max_downtime_ms", v, 1, 60_000)?;
        }
        if let Some(v) = p.migration_bandwidth_mbps {
            s.migration_bandwidth_mbps = in_range("migration_bandwidth_mbps", v, 0, 100_000)?;
        }
        if let Some(v) = p.migration_post_copy_allowed {
            s.migration_post_copy_allowed = v;
        }
        if let Some(v) = p.load_balancing {
            s.load_balancing = v;
        }
        if let Some(v) = p.resync_rate_mbps {
            s.resync_rate_mbps = in_range("resync_rate_mbps", v, 0, 100_000)?;
        }
        if let Some(v) = p.audit_max_records {
            s.audit_max_records = in_range("audit_max_records", v, 1000, 10_000_000)?;
        }
        if let Some(v) = p.audit_max_days {
            s.audit_max_days = in_range("audit_max_days", v, 1, 3650)?;
        }
        if let Some(v) = p.console_log_max_mib {
            s.console_log_max_mib = in_range("console_log_max_mib", v, 1, 1024)?;
        }
        tx.put_settings(&s)?;
        Ok(s)
    })?;
    Ok(axum::Json(settings_view(&s)))
}

/// Audit log options.
#[derive(Deserialize, IntoParams)]
pub struct AuditQuery {
    /// Number of newest records (default 100, at most 10000).
    pub limit: Option<usize>,
}

/// The audit log, newest first.
#[utoipa::path(get, path = "/api/v1/audit", params(AuditQuery), responses((status = 200, body = Vec<Object>)))]
pub async fn audit(
    State(st): State<AppState>,
    _: Caller,
    Query(q): Query<AuditQuery>,
) -> ApiResult<axum::Json<Vec<AuditRecord>>> {
    Ok(axum::Json(
        st.agent.store().audit(q.limit.unwrap_or(100).min(10_000))?,
    ))
}

/// An active alert.
#[derive(Serialize, ToSchema)]
pub struct AlertView {
    /// `kind:subject`.
    pub id: String,
    /// What happened (`vm_crashed`, `vm_critical`, `guest_unresponsive`).
    pub kind: String,
    /// `critical` or `warning`.
    pub severity: String,
    /// The object (`vm/web`).
    pub subject: String,
    /// What happened.
    pub message: String,
    /// What to do.
    pub action: String,
    /// First raised (seconds since the epoch).
    pub raised_at: u64,
    /// Last raised.
    pub updated_at: u64,
    /// Times raised.
    pub count: u32,
}

/// Active alerts, critical first.
#[utoipa::path(get, path = "/api/v1/alerts", responses((status = 200, body = Vec<AlertView>)))]
pub async fn list_alerts(
    State(st): State<AppState>,
    _: Caller,
) -> ApiResult<axum::Json<Vec<AlertView>>> {
    Ok(axum::Json(
        st.agent
            .list_alerts()?
            .into_iter()
            .map(|a| AlertView {
                id: a.id,
                kind: a.kind,
                severity: a.severity,
                subject: a.subject,
                message: a.message,
                action: a.action,
                raised_at: a.raised_at,
                updated_at: a.updated_at,
                count: a.count,
            })
            .collect(),
    ))
}

/// Acknowledge (remove) an alert.
#[utoipa::path(delete, path = "/api/v1/alerts/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn acknowledge_alert(
    State(st): State<AppState>,
    _: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    st.agent.acknowledge_alert(&id)?;
    Ok(StatusCode::NO_CONTENT)
}

/// This PM: resources, capacity left for VMs, warnings.
#[utoipa::path(get, path = "/api/v1/pm", responses((status = 200, body = PmView)))]
pub async fn pm(State(st): State<AppState>, _: Caller) -> ApiResult<axum::Json<PmView>> {
    Ok(axum::Json(st.agent.pm_view().await?))
}

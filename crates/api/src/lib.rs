//! The Pairvisor REST API (JSON over HTTPS), served by every PM's daemon.
//!
//! Every route except `/health`, `/api/v1/auth/login` and
//! `/api/v1/openapi.json` needs a bearer token. The access each route needs
//! (read / operate / administer) is listed in one table, [`ACCESS`], checked
//! before the request body is even read; a route missing from the table is
//! refused to everyone (deny by default). Every request that changes something is written to the audit log
//! with who, what, when and the result. The OpenAPI document is generated from
//! the handlers and checked in as `docs/openapi.json` (a test keeps the two in
//! step).

pub mod auth;
pub mod error;
mod forward;
mod handlers;
pub mod https;
pub mod live;
pub mod tls;
mod unit;

use auth::AuthUser;
use axum::extract::{FromRequest, MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use error::{ApiError, ErrorInfo};
use pairvisor_agent::{now, Agent};
use pairvisor_model::roles::Access;
use pairvisor_store::AuditRecord;
use serde::de::DeserializeOwned;
use utoipa::OpenApi;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// This PM's agent.
    pub agent: Agent,
    /// Unit membership, when the daemon has a unit listener.
    pub unit: Option<std::sync::Arc<pairvisor_unit::UnitService>>,
    /// Failed-login counters (issue 13: a login flood is refused before
    /// it costs a password hash).
    pub logins: std::sync::Arc<std::sync::Mutex<pairvisor_model::throttle::LoginThrottle>>,
    /// Password verifications running at once: Argon2id is CPU- and
    /// memory-hard, and the lease keeper, the mirror and Raft share the
    /// machine.
    pub hashing: std::sync::Arc<tokio::sync::Semaphore>,
    /// Requests refused before authentication (not audited).
    pub unaudited: std::sync::Arc<Unaudited>,
}

/// Password verifications allowed at once.
const HASHING_SLOTS: usize = 1;

/// A JSON body whose rejections (malformed JSON, wrong types, unknown
/// fields) are answered in the API's error shape.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(rej) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("request body is not valid: {}", rej.body_text()),
            )),
        }
    }
}

/// The API's OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(title = "Pairvisor API", description = "Manage a Pairvisor unit: VMs, volumes, VCDs, users, settings."),
    paths(
        handlers::login, handlers::logout, handlers::whoami,
        handlers::list_vms, handlers::create_vm, handlers::get_vm, handlers::remove_vm,
        handlers::start_vm, handlers::shutdown_vm, handlers::poweroff_vm, handlers::dump_vm,
        handlers::reset_device, handlers::migrate_vm, handlers::get_migration,
        handlers::migration_remedy, handlers::cancel_migration, handlers::migration_estimate, handlers::boot_from_cd, handlers::insert_cd, handlers::eject_cd,
        handlers::config_vm, handlers::console_log,
        handlers::list_volumes, handlers::create_volume, handlers::get_volume,
        handlers::delete_volume, handlers::attach_volume, handlers::detach_volume,
        handlers::list_groups, handlers::create_group,
        handlers::list_vcds, handlers::add_vcd, handlers::upload_vcd, handlers::remove_vcd,
        handlers::list_users, handlers::create_user, handlers::delete_user,
        handlers::get_settings, handlers::update_settings,
        handlers::audit, handlers::pm, handlers::list_alerts, handlers::acknowledge_alert,
        unit::show, unit::init, unit::join_token, unit::join,
        unit::force_quorum_preview, unit::force_quorum, unit::list_pms, unit::work_on,
        unit::finalize, unit::pm_shutdown, unit::pm_poweroff, unit::unit_shutdown,
        unit::set_placement, unit::promote_anyway, unit::volume_split_brain, unit::volume_resolve, unit::pm_reset_device,
        live::events, live::vnc,
    ),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document as pretty JSON (what `docs/openapi.json` holds).
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

/// Builds the router for `agent`.
/// Builds the router for `agent` and, when enabled, the unit service.
pub fn router(agent: Agent, unit: Option<std::sync::Arc<pairvisor_unit::UnitService>>) -> Router {
    use handlers::*;
    let state = AppState {
        agent,
        unit,
        logins: std::sync::Arc::new(std::sync::Mutex::new(
            pairvisor_model::throttle::LoginThrottle::new(Default::default()),
        )),
        hashing: std::sync::Arc::new(tokio::sync::Semaphore::new(HASHING_SLOTS)),
        unaudited: Default::default(),
    };
    let api = Router::new()
        .route("/auth/logout", post(logout))
        .route("/auth/whoami", get(whoami))
        .route("/vms", get(list_vms).post(create_vm))
        .route("/vms/{name}", get(get_vm).delete(remove_vm))
        .route("/vms/{name}/start", post(start_vm))
        .route("/vms/{name}/shutdown", post(shutdown_vm))
        .route("/vms/{name}/poweroff", post(poweroff_vm))
        .route("/vms/{name}/dump", post(dump_vm))
        .route("/vms/{name}/reset-device", post(reset_device))
        .route("/vms/{name}/migrate", post(migrate_vm))
        .route(
            "/vms/{name}/migration",
            get(get_migration).delete(cancel_migration),
        )
        .route("/vms/{name}/migration/remedy", post(migration_remedy))
        .route("/vms/{name}/migration/estimate", post(migration_estimate))
        .route("/vms/{name}/boot-from-cd", post(boot_from_cd))
        .route("/vms/{name}/cd", put(insert_cd).delete(eject_cd))
        .route("/vms/{name}/config", post(config_vm))
        .route("/vms/{name}/console", get(console_log))
        .route("/volumes", get(list_volumes).post(create_volume))
        .route("/volumes/{name}", get(get_volume).delete(delete_volume))
        .route("/volumes/{name}/attach", post(attach_volume))
        .route("/volumes/{name}/detach", post(detach_volume))
        .route("/storage-groups", get(list_groups).post(create_group))
        .route("/vcds", get(list_vcds).post(add_vcd))
        .route("/vcds/{name}", put(upload_vcd).delete(remove_vcd))
        .route("/users", get(list_users).post(create_user))
        .route("/users/{name}", axum::routing::delete(delete_user))
        .route("/settings", get(get_settings).patch(update_settings))
        .route("/audit", get(audit))
        .route("/pm", get(pm))
        .route("/alerts", get(list_alerts))
        .route("/unit", get(unit::show))
        .route("/unit/init", post(unit::init))
        .route("/unit/join-token", post(unit::join_token))
        .route("/unit/join", post(unit::join))
        .route(
            "/unit/force-quorum",
            get(unit::force_quorum_preview).post(unit::force_quorum),
        )
        .route("/unit/shutdown", post(unit::unit_shutdown))
        .route("/pms", get(unit::list_pms))
        .route("/pms/{name}/work-on", post(unit::work_on))
        .route("/pms/{name}/finalize", post(unit::finalize))
        .route("/pms/{name}/shutdown", post(unit::pm_shutdown))
        .route("/pms/{name}/poweroff", post(unit::pm_poweroff))
        .route("/pms/{name}/reset-device", post(unit::pm_reset_device))
        .route("/vms/{name}/placement", put(unit::set_placement))
        .route("/vms/{name}/promote-anyway", post(unit::promote_anyway))
        .route("/volumes/{name}/split-brain", get(unit::volume_split_brain))
        .route("/volumes/{name}/resolve", post(unit::volume_resolve))
        .route("/alerts/{id}", axum::routing::delete(acknowledge_alert))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let public = Router::new().route("/auth/login", post(login)).route(
        "/openapi.json",
        get(|| async {
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                openapi_json(),
            )
        }),
    );
    // Live routes authenticate themselves (token also from query/cookie).
    let public = public.merge(live::routes(state.clone()));
    Router::new()
        .nest("/api/v1", api.merge(public))
        .route("/health", get(|| async { "ok" }))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route; see /api/v1/openapi.json",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), audit_layer))
        .with_state(state)
}

/// The access each protected route needs: (method, route, access).
pub const ACCESS: &[(&str, &str, Access)] = &[
    ("POST", "/auth/logout", Access::Read),
    ("GET", "/auth/whoami", Access::Read),
    ("GET", "/vms", Access::Read),
    ("POST", "/vms", Access::Administer),
    ("GET", "/vms/{name}", Access::Read),
    ("DELETE", "/vms/{name}", Access::Administer),
    ("POST", "/vms/{name}/start", Access::Operate),
    ("POST", "/vms/{name}/shutdown", Access::Operate),
    ("POST", "/vms/{name}/poweroff", Access::Operate),
    ("POST", "/vms/{name}/dump", Access::Operate),
    ("POST", "/vms/{name}/migrate", Access::Operate),
    ("GET", "/vms/{name}/migration", Access::Read),
    ("DELETE", "/vms/{name}/migration", Access::Operate),
    ("POST", "/vms/{name}/migration/remedy", Access::Operate),
    ("POST", "/vms/{name}/migration/estimate", Access::Read),
    ("POST", "/vms/{name}/reset-device", Access::Operate),
    ("POST", "/vms/{name}/boot-from-cd", Access::Operate),
    ("PUT", "/vms/{name}/cd", Access::Operate),
    ("DELETE", "/vms/{name}/cd", Access::Operate),
    ("POST", "/vms/{name}/config", Access::Administer),
    ("GET", "/vms/{name}/console", Access::Read),
    ("GET", "/volumes", Access::Read),
    ("POST", "/volumes", Access::Administer),
    ("GET", "/volumes/{name}", Access::Read),
    ("DELETE", "/volumes/{name}", Access::Administer),
    ("POST", "/volumes/{name}/attach", Access::Administer),
    ("POST", "/volumes/{name}/detach", Access::Administer),
    ("GET", "/storage-groups", Access::Read),
    ("POST", "/storage-groups", Access::Administer),
    ("GET", "/vcds", Access::Read),
    ("POST", "/vcds", Access::Administer),
    ("PUT", "/vcds/{name}", Access::Administer),
    ("DELETE", "/vcds/{name}", Access::Administer),
    ("GET", "/users", Access::Administer),
    ("POST", "/users", Access::Administer),
    ("DELETE", "/users/{name}", Access::Administer),
    ("GET", "/settings", Access::Read),
    ("PATCH", "/settings", Access::Administer),
    ("GET", "/audit", Access::Read),
    ("GET", "/pm", Access::Read),
    ("GET", "/alerts", Access::Read),
    ("GET", "/unit", Access::Read),
    ("POST", "/unit/init", Access::Administer),
    ("POST", "/unit/join-token", Access::Administer),
    ("POST", "/unit/join", Access::Administer),
    ("GET", "/unit/force-quorum", Access::Administer),
    ("POST", "/unit/shutdown", Access::Administer),
    ("GET", "/pms", Access::Read),
    ("POST", "/pms/{name}/work-on", Access::Administer),
    ("POST", "/pms/{name}/finalize", Access::Administer),
    ("POST", "/pms/{name}/shutdown", Access::Administer),
    ("POST", "/pms/{name}/poweroff", Access::Administer),
    ("POST", "/pms/{name}/reset-device", Access::Administer),
    ("PUT", "/vms/{name}/placement", Access::Administer),
    ("POST", "/vms/{name}/promote-anyway", Access::Administer),
    ("GET", "/volumes/{name}/split-brain", Access::Read),
    ("POST", "/volumes/{name}/resolve", Access::Administer),
    ("POST", "/unit/force-quorum", Access::Administer),
    ("DELETE", "/alerts/{id}", Access::Operate),
    ("GET", "/events", Access::Read),
    ("GET", "/vms/{name}/vnc", Access::Operate),
];

fn required_access(method: &Method, route: &str) -> Option<Access> {
    let route = route.strip_prefix("/api/v1").unwrap_or(route);
    ACCESS
        .iter()
        .find(|(m, r, _)| *m == method.as_str() && *r == route)
        .map(|(_, _, a)| *a)
}

/// Whether `user` may call `method route` (deny by default).
pub(crate) fn check_access(user: &AuthUser, method: &Method, route: &str) -> Result<(), ApiError> {
    match required_access(method, route) {
        Some(access) => user.require(access),
        None => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{method} {route} has no access rule; refused to everyone"),
        )),
    }
}

/// Bearer-token authentication and role check for every protected route;
/// puts the [`AuthUser`] into the request's extensions.
async fn authenticate(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .map(str::to_string);
    let Some(token) = token else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "this route needs an 'Authorization: Bearer <token>' header; log in with POST /api/v1/auth/login",
        )
        .into_response();
    };
    match auth::authenticate(st.agent.store(), &token) {
        Ok(user) => {
            let route = req
                .extensions()
                .get::<MatchedPath>()
                .map(|m| m.as_str().to_string())
                .unwrap_or_default();
            let check = check_access(&user, req.method(), &route);
            if let Err(e) = check {
                let mut resp = e.into_response();
                resp.extensions_mut().insert(user);
                return resp;
            }
            let (req, forwarded) = forward::to_host(&st, req).await;
            if let Some(mut resp) = forwarded {
                resp.extensions_mut().insert(user);
                return resp;
            }
            let mut req = req;
            req.extensions_mut().insert(user.clone());
            let mut resp = next.run(req).await;
            resp.extensions_mut().insert(user);
            resp
        }
        Err(e) => e.into_response(),
    }
}

/// Writes every authenticated request to a known route that may change
/// something (anything but GET/HEAD) to the audit log, with its outcome.
/// Requests without a valid token are not written (a stranger must not be
/// able to fill the disk with durable records): they are counted, and
/// logged at most once per [`UNAUDITED_LOG_EVERY`].
async fn audit_layer(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    if method == Method::GET || method == Method::HEAD || path == "/api/v1/auth/login" {
        return resp;
    }
    let Some(user) = resp.extensions().get::<AuthUser>().map(|u| u.name.clone()) else {
        st.unaudited.note();
        return resp;
    };
    let result = match resp.extensions().get::<ErrorInfo>() {
        Some(ErrorInfo(e)) => format!("{} {e}", resp.status().as_u16()),
        None if resp.status().is_success() => "ok".into(),
        None => resp.status().to_string(),
    };
    let target = path.strip_prefix("/api/v1/").unwrap_or(&path).to_string();
    write_audit(
        &st,
        AuditRecord {
            seq: 0,
            time: now(),
            user,
            action: format!("{method} {path}"),
            target,
            result,
        },
    )
    .await;
    resp
}

/// How often the count of unaudited (unauthenticated) requests is logged.
const UNAUDITED_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Requests refused before authentication, which are not audited.
#[derive(Debug, Default)]
pub struct Unaudited {
    total: std::sync::atomic::AtomicU64,
    since_log: std::sync::atomic::AtomicU64,
    last_log: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Unaudited {
    /// Counts one; logs the count at most once per [`UNAUDITED_LOG_EVERY`].
    pub fn note(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.total.fetch_add(1, Relaxed);
        self.since_log.fetch_add(1, Relaxed);
        let mut last = self.last_log.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= UNAUDITED_LOG_EVERY) {
            *last = Some(now);
            let n = self.since_log.swap(0, Relaxed);
            tracing::warn!(
                "{n} request(s) without a valid token refused since the last report ({} in all); \
                 they are not written to the audit log",
                self.total.load(Relaxed)
            );
        }
    }

    /// How many in all since the daemon started.
    pub fn total(&self) -> u64 {
        self.total.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// An audit field as stored: control characters escaped (a crafted path
/// or user name cannot forge lines or terminal escapes when the log is
/// printed) and cut to `max` characters.
pub(crate) fn audit_field(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i >= max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Appends to the audit log off the async runtime (the commit is fsynced),
/// fields sanitised, within the retention the settings ask for.
pub(crate) async fn write_audit(st: &AppState, rec: AuditRecord) {
    let rec = AuditRecord {
        user: audit_field(&rec.user, 64),
        action: audit_field(&rec.action, 300),
        target: audit_field(&rec.target, 256),
        result: audit_field(&rec.result, 1000),
        ..rec
    };
    let agent = st.agent.clone();
    let r = tokio::task::spawn_blocking(move || {
        let keep = agent
            .store()
            .settings()
            .map(|s| pairvisor_store::AuditRetention::of(&s))
            .unwrap_or_else(|_| {
                pairvisor_store::AuditRetention::of(&pairvisor_store::Settings::default())
            });
        agent.store().append_audit(rec, keep)
    })
    .await;
    match r {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!("cannot write the audit log: {e}"),
        Err(e) => tracing::error!("cannot write the audit log: {e}"),
    }
}

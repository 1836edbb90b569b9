//! "The API works on either PM": a request that acts on a VM hosted by the
//! partner PM is forwarded there, with the caller's token (tokens live in
//! the unit database, so the partner knows it). Reads of the VM record stay
//! local (the unit database is replicated). The host first catches up with
//! the unit database as far as the forwarding PM had applied it, so that
//! the request acts on what its caller saw.

use crate::AppState;
use axum::body::Body;
use axum::extract::{OriginalUri, Request};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use pairvisor_store::{MigrationRecord, VmRecord};

/// Marks a forwarded request, so that it is never forwarded twice.
const FORWARDED: &str = "x-pairvisor-forwarded";
/// The unit database log index the forwarding PM had applied: the host
/// catches up to it before it acts, so that a forwarded request sees every
/// change the caller saw (a setting just saved on the other PM, say).
const APPLIED: &str = "x-pairvisor-applied";
/// How long a host waits to catch up before it refuses a forwarded request
/// (normally milliseconds; below the forwarder's 5 s timeout for reads).
const CATCH_UP: std::time::Duration = std::time::Duration::from_secs(3);
/// Largest body forwarded (VM operations carry small JSON bodies).
const MAX_BODY: usize = 1 << 20;

/// A client for the partner's API that trusts only the certificates the
/// partner published in its unit record (never public CAs, never "any").
fn partner_client(trust_pem: Option<&str>, timeout_secs: u64) -> Result<reqwest::Client, String> {
    let pem = trust_pem.ok_or("its unit record carries no API certificate")?;
    let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
        .map_err(|e| format!("its API certificate is not valid PEM: {e}"))?;
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .connect_timeout(std::time::Duration::from_secs(1))
        .timeout(std::time::Duration::from_secs(timeout_secs));
    for c in certs {
        b = b.add_root_certificate(c);
    }
    b.build().map_err(|e| format!("cannot set up HTTPS: {e}"))
}

/// The VM a request acts on, if it needs the VM's host.
fn vm_of(method: &Method, path: &str) -> Option<String> {
    let rest = path.strip_prefix("/api/v1/vms/")?;
    let (name, sub) = match rest.split_once('/') {
        Some((n, s)) => (n, Some(s)),
        None => (rest, None),
    };
    // GET /vms/{name} goes to the host too (the guest's health is known
    // there), falling back to the local record when the host is down.
    let _ = method;
    // Promote anyway acts where it is asked: that PM takes the VM over
    // from its host, which is down.
    if sub == Some("promote-anyway") {
        return None;
    }
    (!name.is_empty()).then(|| name.to_string())
}

/// The volume whose split brain a request looks at or resolves: its
/// primary's PM holds both sides' descriptions and carries the decision out.
fn split_volume_of(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/api/v1/volumes/")?;
    let (name, op) = rest.split_once('/')?;
    (!name.is_empty() && (op == "split-brain" || op == "resolve")).then(|| name.to_string())
}

/// The PM a `/pms/{name}/...` operation is about.
fn pm_of(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/api/v1/pms/")?;
    let (name, op) = rest.split_once('/')?;
    // Reset Device changes only the unit database: any PM may do it (the
    // PM concerned may well be down).
    (!name.is_empty() && op != "reset-device").then(|| name.to_string())
}

/// Forwards `req` to the PM hosting its VM when that is the partner;
/// otherwise gives the request back.
pub async fn to_host(st: &AppState, req: Request) -> (Request, Option<Response>) {
    let Some(unit) = st.unit.as_ref() else {
        return (req, None);
    };
    if let Some(from) = req.headers().get(FORWARDED) {
        let from = from.to_str().unwrap_or("the partner").to_string();
        let index = req
            .headers()
            .get(APPLIED)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if let (Some(index), Some(db)) = (index, unit.db().await) {
            if db.wait_applied(index, CATCH_UP).await.is_err() {
                let err = crate::error::ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "behind_partner",
                    format!(
                        "changes made on PM {from} (unit database index {index}) have not reached \
                         this PM within {} s; nothing was done — retry, and check the link \
                         between the PMs if it persists",
                        CATCH_UP.as_secs()
                    ),
                );
                return (req, Some(err.into_response()));
            }
        }
        return (req, None);
    }
    let path = req
        .extensions()
        .get::<OriginalUri>()
        .map(|u| u.0.clone())
        .unwrap_or_else(|| req.uri().clone());
    let Some(me) = st.agent.pm_name() else {
        return (req, None);
    };
    let (vm, host) = if let Some(pm) = pm_of(path.path()) {
        // An operation on a PM runs on that PM.
        (format!("PM {pm}"), Some(pm))
    } else if let Some(vol) = split_volume_of(path.path()) {
        let primary = match st.agent.store().get::<pairvisor_store::VolumeRecord>(&vol) {
            Ok(Some(v)) => v.mirror.map(|m| m.primary),
            _ => None,
        };
        (format!("volume '{vol}'"), primary)
    } else {
        let Some(vm) = vm_of(req.method(), path.path()) else {
            return (req, None);
        };
        let host =
            if path.path().ends_with("/migration") || path.path().ends_with("/migration/remedy") {
                // A migration is followed (and cancelled) on the PM that drives
                // it: its source, which holds the live figures.
                match st.agent.store().get::<MigrationRecord>(&vm) {
                    Ok(Some(m)) => Some(m.source),
                    _ => None,
                }
            } else {
                match st.agent.store().get::<VmRecord>(&vm) {
                    Ok(Some(r)) => r.host,
                    _ => None,
                }
            };
        (format!("VM '{vm}'"), host)
    };
    let Some(host) = host.filter(|h| *h != me) else {
        return (req, None);
    };
    let Some(db) = unit.db().await else {
        return (req, None);
    };
    let Some(target) = pairvisor_unit::UnitService::pms_of(&db)
        .into_iter()
        .find(|p| p.addrs.name == host)
    else {
        return (req, None);
    };
    let url = format!(
        "{}{}",
        target.addrs.api_url.trim_end_matches('/'),
        path.path_and_query().map(|p| p.as_str()).unwrap_or("")
    );
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return (
                Request::from_parts(parts, Body::empty()),
                Some(
                    crate::error::ApiError::invalid("request body too large to forward")
                        .into_response(),
                ),
            )
        }
    };
    // Short connect timeout: a host that is down (or cut off) must not hold
    // a read that can be answered here.
    let client = match partner_client(
        target.addrs.api_trust_pem.as_deref(),
        if parts.method == Method::GET { 5 } else { 120 },
    ) {
        Ok(c) => c,
        Err(_) if parts.method == Method::GET => {
            return (Request::from_parts(parts, Body::from(body)), None);
        }
        Err(why) => {
            let err = crate::error::ApiError::new(
                StatusCode::BAD_GATEWAY,
                "partner_untrusted",
                format!("cannot forward to PM '{host}': {why}"),
            );
            return (
                Request::from_parts(parts, Body::empty()),
                Some(err.into_response()),
            );
        }
    };
    let mut rb = client
        .request(parts.method.clone(), &url)
        .header(
            FORWARDED,
            HeaderValue::from_str(&me).unwrap_or(HeaderValue::from_static("pm")),
        )
        .header(APPLIED, db.applied_index())
        .body(body.to_vec());
    for (k, v) in &parts.headers {
        // Ours alone: a caller cannot set what the host waits for.
        if k == axum::http::header::HOST
            || k == axum::http::header::CONTENT_LENGTH
            || k == FORWARDED
            || k == APPLIED
        {
            continue;
        }
        rb = rb.header(k, v);
    }
    let resp = match rb.send().await {
        Ok(r) => r,
        // A read answers locally when the host does not (the record is
        // replicated; only live details are missing).
        Err(_) if parts.method == Method::GET => {
            return (Request::from_parts(parts, Body::empty()), None);
        }
        Err(e) => {
            let err = crate::error::ApiError::new(
                StatusCode::BAD_GATEWAY,
                "host_unreachable",
                format!(
                    "{vm} is on PM {host}, which did not answer ({e}); if {host} has failed, \
                     the unit restarts its VMs on this PM once {host} is fenced"
                ),
            );
            return (
                Request::from_parts(parts, Body::empty()),
                Some(err.into_response()),
            );
        }
    };
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap_or_default();
    let mut out = Response::new(Body::from(bytes));
    *out.status_mut() = status;
    for (k, v) in &headers {
        if k == axum::http::header::CONTENT_LENGTH || k == axum::http::header::TRANSFER_ENCODING {
            continue;
        }
        out.headers_mut().insert(k, v.clone());
    }
    (Request::from_parts(parts, Body::empty()), Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_requests_need_the_host() {
        assert_eq!(vm_of(&Method::GET, "/api/v1/vms/web"), Some("web".into()));
        assert_eq!(
            vm_of(&Method::DELETE, "/api/v1/vms/web"),
            Some("web".into())
        );
        assert_eq!(
            vm_of(&Method::POST, "/api/v1/vms/web/start"),
            Some("web".into())
        );
        assert_eq!(
            vm_of(&Method::GET, "/api/v1/vms/web/console"),
            Some("web".into())
        );
        assert_eq!(vm_of(&Method::GET, "/api/v1/vms"), None);
        assert_eq!(vm_of(&Method::POST, "/api/v1/vms/web/promote-anyway"), None);
        assert_eq!(vm_of(&Method::GET, "/api/v1/volumes/x"), None);
        assert_eq!(pm_of("/api/v1/pms/pm-b/work-on"), Some("pm-b".into()));
        assert_eq!(pm_of("/api/v1/pms/pm-b/reset-device"), None);
        assert_eq!(pm_of("/api/v1/pms"), None);
        assert_eq!(
            split_volume_of("/api/v1/volumes/d/resolve"),
            Some("d".into())
        );
        assert_eq!(split_volume_of("/api/v1/volumes/d"), None);
    }
}

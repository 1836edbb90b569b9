//! The Pairvisor browser management console (SPEC A1).
//!
//! A dependency-free single-page application written as ES modules, served
//! by every PM's daemon: no separate web server, no CDN. All assets — the
//! console's HTML, CSS and JavaScript, and noVNC for the VMs' graphical
//! consoles — are compiled into the binary by `build.rs`.
//!
//! The console talks only to the REST API (`/api/v1`): it logs in with
//! `POST /api/v1/auth/login`, keeps the bearer token in the tab's session
//! storage, listens to `GET /api/v1/events` (server-sent events) for live
//! updates and opens `GET /api/v1/vms/{name}/vnc` (a websocket) for a VM's
//! graphical console. Pages are addressed by the URL fragment (`/#/vms/web`),
//! so the server needs only two routes:
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the application shell (`index.html`) |
//! | `GET /ui/{*path}` | assets: `app.css`, `js/…`, `novnc/…` |
//!
//! Responses carry an ETag (content hash computed at build time, answered
//! with 304 when it matches), `Cache-Control: no-cache`, and a strict
//! Content-Security-Policy (scripts and connections only from this origin).

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

include!(concat!(env!("OUT_DIR"), "/assets.rs"));

/// The Content-Security-Policy of every console response.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; \
     frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// The router serving the console at `/` and its assets under `/ui/`.
///
/// It has no fallback, so it can be merged with the API's router (which has
/// one): `pairvisor_api::router(agent).merge(pairvisor_console::router())`.
pub fn router() -> Router {
    Router::new()
        .route(
            "/",
            get(|h: HeaderMap| async move { serve("/ui/index.html", &h) }),
        )
        .route(
            "/favicon.ico",
            get(|h: HeaderMap| async move { serve("/ui/icon.svg", &h) }),
        )
        .route(
            "/ui/{*path}",
            get(
                |Path(p): Path<String>, h: HeaderMap| async move { serve(&format!("/ui/{p}"), &h) },
            ),
        )
}

/// Looks up an embedded asset by its URL path (`/ui/...`).
pub fn asset(path: &str) -> Option<&'static [u8]> {
    ASSETS
        .iter()
        .find(|(p, _, _)| *p == path)
        .map(|(_, data, _)| *data)
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or_default() {
        "html" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "json" => "application/json",
        _ => "text/plain; charset=utf-8",
    }
}

fn serve(path: &str, req: &HeaderMap) -> Response {
    let Some((_, data, etag)) = ASSETS.iter().find(|(p, _, _)| *p == path) else {
        return (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "no such console asset",
        )
            .into_response();
    };
    let common = [
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::ETAG, HeaderValue::from_static(etag)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
    ];
    let fresh = req
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == *etag));
    if fresh {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(content_type(path)),
        )],
        *data,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(uri: &str, etag: Option<&str>) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut b = Request::builder().uri(uri);
        if let Some(e) = etag {
            b = b.header(header::IF_NONE_MATCH, e);
        }
        let resp = router()
            .oneshot(b.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, headers, body)
    }

    #[tokio::test]
    async fn serves_the_shell_assets_and_novnc() {
        let (s, h, body) = get("/", None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert!(String::from_utf8_lossy(&body).contains("/ui/js/app.js"));
        assert!(h.contains_key(header::CONTENT_SECURITY_POLICY));

        let (s, h, _) = get("/ui/js/app.js", None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h[header::CONTENT_TYPE], "text/javascript; charset=utf-8");

        let (s, _, body) = get("/ui/novnc/core/rfb.js", None).await;
        assert_eq!(s, StatusCode::OK);
        assert!(String::from_utf8_lossy(&body).contains("export default class RFB"));

        let (s, _, _) = get("/ui/nope.js", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn etag_gives_304() {
        let (_, h, _) = get("/ui/app.css", None).await;
        let etag = h[header::ETAG].to_str().unwrap().to_string();
        let (s, _, body) = get("/ui/app.css", Some(&etag)).await;
        assert_eq!(s, StatusCode::NOT_MODIFIED);
        assert!(body.is_empty());
    }

    #[test]
    fn every_module_import_resolves_to_an_embedded_asset() {
        // A missing module breaks the whole page in the browser; catch it here.
        for (path, data, _) in ASSETS.iter().filter(|(p, _, _)| p.ends_with(".js")) {
            let text = String::from_utf8_lossy(data);
            for line in text.lines() {
                let line = line.trim();
                if !(line.starts_with("import ") || line.starts_with("export ")) {
                    continue;
                }
                let Some(from) = line.split(" from ").nth(1) else {
                    continue;
                };
                let spec = from.trim().trim_end_matches(';').trim_matches(['"', '\'']);
                if !spec.starts_with('.') {
                    continue;
                }
                let base = &path[..path.rfind('/').unwrap()];
                let mut parts: Vec<&str> = base.split('/').collect();
                for seg in spec.split('/') {
                    match seg {
                        "." => {}
                        ".." => {
                            parts.pop();
                        }
                        s => parts.push(s),
                    }
                }
                let target = parts.join("/");
                assert!(
                    asset(&target).is_some(),
                    "{path} imports {spec} ({target}), which is not embedded"
                );
            }
        }
    }
}

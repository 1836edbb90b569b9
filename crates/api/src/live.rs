//! Live endpoints for the browser console: the event stream
//! (`GET /api/v1/events`, server-sent events) and the VM graphical console
//! (`GET /api/v1/vms/{name}/vnc`, a websocket bridged to QEMU's VNC socket).
//!
//! Browsers cannot set an `Authorization` header on `EventSource` or
//! `WebSocket`, so these two routes — and only these — also accept the
//! bearer token from the `access_token` query parameter or from the
//! `pv_token` cookie (the header still works for other clients). The token
//! is never logged: the daemon has no request logging, and the audit log
//! records only non-GET requests, without query strings. A websocket whose
//! token comes from a cookie must come from a page of the same origin (the
//! `Origin` header must name the `Host`), so that another site cannot ride
//! on the cookie.
//!
//! The access needed is in [`crate::ACCESS`] like every other route: the
//! event stream needs read access, the console needs operate access (the
//! SPEC V4 "console" operation, allowed while the VM is booting or running).

use crate::auth::{self, AuthUser};
use crate::error::{ApiError, ErrorBody};
use crate::AppState;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use futures_util::{SinkExt, StreamExt};
use pairvisor_agent::now;
use serde::Serialize;
use std::convert::Infallible;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast::error::RecvError;
use utoipa::ToSchema;

/// Query parameter that may carry the token on the live routes.
pub const TOKEN_QUERY_PARAM: &str = "access_token";
/// Cookie that may carry the token on the live routes.
pub const TOKEN_COOKIE: &str = "pv_token";

/// The live routes, with their own authentication layer (header, query
/// parameter or cookie). Merged into the `/api/v1` router.
pub(crate) fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/events", get(events))
        .route("/vms/{name}/vnc", get(vnc))
        .route_layer(middleware::from_fn_with_state(state, authenticate_live))
}

/// Where a request's token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenSource {
    Header,
    Query,
    Cookie,
}

fn token_of(req: &Request) -> Option<(String, TokenSource)> {
    let headers = req.headers();
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some((t.trim().to_string(), TokenSource::Header));
    }
    if let Some(q) = req.uri().query() {
        for pair in q.split('&') {
            if let Some(v) = pair
                .strip_prefix(TOKEN_QUERY_PARAM)
                .and_then(|r| r.strip_prefix('='))
            {
                // Tokens are hex: no percent-decoding needed.
                return Some((v.to_string(), TokenSource::Query));
            }
        }
    }
    for cookies in headers.get_all(header::COOKIE) {
        let Ok(cookies) = cookies.to_str() else {
            continue;
        };
        for c in cookies.split(';') {
            if let Some(v) = c
                .trim()
                .strip_prefix(TOKEN_COOKIE)
                .and_then(|r| r.strip_prefix('='))
            {
                return Some((v.trim().to_string(), TokenSource::Cookie));
            }
        }
    }
    None
}

/// True when the request's `Origin` (if any) names the same host as its
/// `Host` header.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true; // not a browser
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let origin_host = origin
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(origin)
        .trim_end_matches('/');
    !host.is_empty() && origin_host.eq_ignore_ascii_case(host)
}

/// Authentication and role check of the live routes (see the module
/// documentation for where the token may come from).
async fn authenticate_live(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some((token, source)) = token_of(&req) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            format!(
                "this route needs a token: an 'Authorization: Bearer <token>' header, the \
                 '{TOKEN_QUERY_PARAM}' query parameter or the '{TOKEN_COOKIE}' cookie; \
                 log in with POST /api/v1/auth/login"
            ),
        )
        .into_response();
    };
    let user = match auth::authenticate(st.agent.store(), &token) {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_default();
    let check = crate::check_access(&user, req.method(), &route);
    if let Err(e) = check {
        return e.into_response();
    }
    if source == TokenSource::Cookie && !same_origin(req.headers()) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a token from a cookie is accepted only from pages of this server (Origin differs from Host)",
        )
        .into_response();
    }
    req.extensions_mut().insert(user);
    next.run(req).await
}

/// One life-cycle event on the event stream (`event: vm`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VmEventView {
    /// The VM.
    pub vm: String,
    /// Its new state (SPEC V4).
    pub state: String,
    /// What happened, for people.
    pub message: String,
    /// When the stream sent it, seconds since the epoch.
    pub time: u64,
}

fn json_event(kind: &str, value: &impl Serialize) -> Event {
    Event::default()
        .event(kind)
        .data(serde_json::to_string(value).unwrap_or_else(|_| "{}".into()))
}

/// Live updates as server-sent events.
///
/// Events: `hello` (once, on connection: `{"time"}`), `vm` (a VM changed
/// state: [`VmEventView`]) and `resync` (events were lost because the client
/// was too slow: reload everything). A comment line keeps the connection
/// alive every 15 s. Browsers reconnect by themselves (`retry: 1000`); after
/// a reconnection, clients should reload what they show, as they would after
/// `resync`. The request must accept `text/event-stream` (EventSource does);
/// others get 406. Besides the bearer header, the token may be given as the
/// `access_token` query parameter or the `pv_token` cookie.
#[utoipa::path(get, path = "/api/v1/events",
    params(("access_token" = Option<String>, Query, description = "Bearer token, for clients that cannot set headers (EventSource)")),
    responses((status = 200, content_type = "text/event-stream", body = VmEventView),
        (status = 401, body = ErrorBody), (status = 406, body = ErrorBody)))]
pub async fn events(
    State(st): State<AppState>,
    _: Extension<AuthUser>,
    headers: HeaderMap,
) -> Response {
    let accepts = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"));
    if !accepts {
        return ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            "not_acceptable",
            "this route streams server-sent events: send 'Accept: text/event-stream'",
        )
        .into_response();
    }
    let rx = st.agent.subscribe();
    let hello =
        json_event("hello", &serde_json::json!({ "time": now() })).retry(Duration::from_secs(1));
    let stream = futures_util::stream::unfold((Some(hello), rx), |(first, mut rx)| async move {
        if let Some(h) = first {
            return Some((Ok::<_, Infallible>(h), (None, rx)));
        }
        let ev = match rx.recv().await {
            Ok(e) => json_event(
                "vm",
                &VmEventView {
                    vm: e.vm,
                    state: e.state.to_string(),
                    message: e.message,
                    time: now(),
                },
            ),
            Err(RecvError::Lagged(n)) => json_event("resync", &serde_json::json!({ "lost": n })),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(ev), (None, rx)))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// The VM's graphical console: a websocket carrying the RFB (VNC) protocol
/// in binary frames, bridged to QEMU's VNC server on the VM's unix socket.
///
/// Needs operate access (SPEC V4 "console"); allowed while the VM is booting
/// or running. Offers the `binary` subprotocol (noVNC). Besides the bearer
/// header, the token may be given as the `access_token` query parameter or
/// the `pv_token` cookie (same origin only).
#[utoipa::path(get, path = "/api/v1/vms/{name}/vnc",
    params(("name" = String, Path),
        ("access_token" = Option<String>, Query, description = "Bearer token, for clients that cannot set headers (WebSocket)")),
    responses((status = 101, description = "Switching to the websocket protocol"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 426, body = ErrorBody)))]
pub async fn vnc(
    State(st): State<AppState>,
    Extension(user): Extension<AuthUser>,
    Path(name): Path<String>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let sock = match st.agent.vnc_socket(&name) {
        Ok(s) => s,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rej) => {
            return ApiError::new(
                StatusCode::UPGRADE_REQUIRED,
                "upgrade_required",
                format!(
                    "this route is a websocket (RFB in binary frames): {}",
                    rej.body_text()
                ),
            )
            .into_response()
        }
    };
    let unix = match tokio::net::UnixStream::connect(&sock).await {
        Ok(u) => u,
        Err(e) => {
            return ApiError::new(
                StatusCode::CONFLICT,
                "console_unavailable",
                format!("the console of VM '{name}' cannot be reached now ({e}); try again when it is running"),
            )
            .into_response()
        }
    };
    tracing::info!(vm = %name, user = %user.name, "graphical console opened");
    ws.protocols(["binary"])
        .max_message_size(16 << 20)
        .on_upgrade(move |socket| bridge(socket, unix, name))
}

async fn bridge(socket: WebSocket, unix: tokio::net::UnixStream, name: String) {
    let (mut ws_tx, mut ws_rx) = socket.split();
    let (mut rd, mut wr) = unix.into_split();
    let to_vnc = async {
        while let Some(Ok(msg)) = ws_rx.next().await {
            match msg {
                Message::Binary(b) => {
                    if wr.write_all(&b).await.is_err() {
                        break;
                    }
                }
                Message::Text(t) => {
                    if wr.write_all(t.as_str().as_bytes()).await.is_err() {
                        break;
                    }
                }
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => {}
            }
        }
        let _ = wr.shutdown().await;
    };
    let from_vnc = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let data = bytes::Bytes::copy_from_slice(&buf[..n]);
                    if ws_tx.send(Message::Binary(data)).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = ws_tx.send(Message::Close(None)).await;
    };
    tokio::select! {
        _ = to_vnc => {}
        _ = from_vnc => {}
    }
    tracing::info!(vm = %name, "graphical console closed");
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = axum::http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn token_sources_in_order_header_query_cookie() {
        let r = req(
            "/api/v1/events?access_token=q1",
            &[("authorization", "Bearer h1"), ("cookie", "pv_token=c1")],
        );
        assert_eq!(token_of(&r), Some(("h1".into(), TokenSource::Header)));
        let r = req(
            "/api/v1/events?x=1&access_token=q1",
            &[("cookie", "pv_token=c1")],
        );
        assert_eq!(token_of(&r), Some(("q1".into(), TokenSource::Query)));
        let r = req("/api/v1/events", &[("cookie", "a=b; pv_token=c1; d=e")]);
        assert_eq!(token_of(&r), Some(("c1".into(), TokenSource::Cookie)));
        let r = req(
            "/api/v1/events?not_access_token=x",
            &[("cookie", "pv_tokenx=1")],
        );
        assert_eq!(token_of(&r), None);
    }

    #[test]
    fn origin_must_match_host() {
        let mut h = HeaderMap::new();
        assert!(same_origin(&h), "no Origin: not a browser");
        h.insert(header::HOST, HeaderValue::from_static("10.0.0.5:7480"));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://10.0.0.5:7480"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&h));
    }
}

//! The API's listener: HTTPS (HTTP/1.1 and HTTP/2, websockets), and a
//! plain-HTTP answer on the same port that redirects a browser to HTTPS, so
//! that an administrator who types `http://pm-a:7480` lands on the console
//! instead of a garbled error.
//!
//! axum's own `serve` has no TLS, hence this small accept loop on hyper.

use crate::tls::ApiTls;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// A client must start its TLS handshake (or plain request) within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections get this long to finish after shutdown is asked.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest plain-HTTP request head read for the redirect.
const MAX_PLAIN_HEAD: usize = 8 << 10;
/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
/// Connections not yet past their TLS handshake (or plain redirect): each
/// is bounded by [`HANDSHAKE_TIMEOUT`]; beyond this many, new ones are
/// dropped, so that a flood of half-open connections cannot exhaust the
/// daemon (its lease keeper and mirror share the runtime).
const MAX_HANDSHAKES: usize = 128;
/// HTTP/2 streams at once on one connection.
const MAX_STREAMS: u32 = 64;
/// A client must send its request head within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves `app` on `listener` over TLS until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: ApiTls,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls.server.clone());
    let graceful = GracefulShutdown::new();
    let handshakes = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving.
                    tracing::warn!("accepting an API connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "API connection dropped: {MAX_HANDSHAKES} handshakes in progress");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
                Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => {}
                Ok(Ok(1)) => return redirect_plain(tcp).await,
                _ => return,
            }
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => return,
            };
            drop(handshake);
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            builder
                .http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS);
            // Handlers that limit per client (login throttling) see its
            // address as axum's ConnectInfo.
            let app = tower::ServiceExt::map_request(
                app,
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    req
                },
            );
            // HTTPS only, for a year: a browser that once reached the
            // console never tries plain HTTP to it again.
            let app = tower::ServiceExt::map_response(app, |mut resp: axum::response::Response| {
                resp.headers_mut().insert(
                    axum::http::header::STRICT_TRANSPORT_SECURITY,
                    axum::http::HeaderValue::from_static("max-age=31536000"),
                );
                resp
            });
            let conn = builder.serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(app),
            );
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, "API connection ended: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!("closing API connections still open after {DRAIN_TIMEOUT:?}");
    }
    Ok(())
}

/// Answers a plain-HTTP request with a redirect to the same place over HTTPS.
async fn redirect_plain(mut tcp: TcpStream) {
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while head.len() < MAX_PLAIN_HEAD && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await;
    if !matches!(read, Ok(true)) {
        return;
    }
    let reply = match redirect_target(&head) {
        Some(location) => format!(
            "HTTP/1.1 308 Permanent Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
        None => {
            let body = "This Pairvisor API speaks HTTPS only.\n";
            format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
    };
    let _ = tcp.write_all(reply.as_bytes()).await;
    let _ = tcp.shutdown().await;
}

/// `https://HOST/PATH` for a plain request head, if it names a sane host and
/// path (a header injection attempt gets no redirect).
fn redirect_target(head: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut request = lines.next()?.split(' ');
    let (_method, path) = (request.next()?, request.next()?);
    let host = lines.take_while(|l| !l.is_empty()).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case("host").then(|| v.trim())
    })?;
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    let path_ok = path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic());
    (host_ok && path_ok).then(|| format!("https://{host}{path}"))
}

#[cfg(test)]
mod tests {
    use super::redirect_target;

    #[test]
    fn redirect_target_table() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (
                b"GET /ui/vms?x=1 HTTP/1.1\r\nHost: 10.0.0.5:7480\r\n\r\n",
                Some("https://10.0.0.5:7480/ui/vms?x=1"),
            ),
            (
                b"GET / HTTP/1.1\r\nhost: [::1]:7480\r\nAccept: */*\r\n\r\n",
                Some("https://[::1]:7480/"),
            ),
            (b"GET / HTTP/1.1\r\n\r\n", None),
            (
                b"GET / HTTP/1.1\r\nHost: evil\r\nx\r\n\r\n",
                Some("https://evil/"),
            ),
            (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", None),
            (b"GET //x\x7f HTTP/1.1\r\nHost: a\r\n\r\n", None),
            (b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", None),
            (b"\xff\xfe", None),
        ];
        for (head, want) in cases {
            assert_eq!(
                redirect_target(head).as_deref(),
                *want,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }
}

//! The control protocol of `pv-mirror`: one JSON request per line on a Unix
//! socket, one JSON response per line.
//!
//! ```text
//! {"cmd":"status"}
//! {"cmd":"promote","epoch":3,"force":false}
//! {"cmd":"demote"}
//! {"cmd":"set_partner","addr":"127.0.0.1:7001"}      (null clears it)
//! {"cmd":"decide","decision":"keep_local"}           (or "discard_local")
//! {"cmd":"verify"}
//! {"cmd":"set_resync_rate","bytes_per_sec":10485760}
//! {"cmd":"set_may_degrade","allow":false}            (the lease stand-in)
//! ```
//!
//! Responses: `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`.

use crate::replica::Decision;
use crate::volume::Volume;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Report the volume's status.
    Status,
    /// Promote to primary.
    Promote {
        /// New epoch (above every epoch seen).
        epoch: u64,
        /// Promote even an inconsistent replica.
        #[serde(default)]
        force: bool,
    },
    /// Demote to secondary.
    Demote,
    /// Set or clear the partner's replication address.
    SetPartner {
        /// `host:port`, or null.
        addr: Option<String>,
    },
    /// Record a split-brain decision.
    Decide {
        /// Which replica survives.
        decision: Decision,
    },
    /// Compare both replicas.
    Verify,
    /// Change the resync rate limit.
    SetResyncRate {
        /// Bytes per second, 0 = unlimited.
        bytes_per_sec: u64,
    },
    /// Allow or forbid degraded mode (stand-in for the lease).
    SetMayDegrade {
        /// Whether the primary may acknowledge writes without its partner.
        allow: bool,
    },
}

/// A control response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Success.
    pub ok: bool,
    /// The result on success.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The error on failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    fn ok(v: impl Serialize) -> Self {
        Response {
            ok: true,
            result: Some(serde_json::to_value(v).unwrap_or(serde_json::Value::Null)),
            error: None,
        }
    }

    fn err(e: impl std::fmt::Display) -> Self {
        Response {
            ok: false,
            result: None,
            error: Some(e.to_string()),
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// Executes one request.
pub async fn handle(vol: &Arc<Volume>, lease: &Arc<AtomicBool>, req: Request) -> Response {
    match req {
        Request::Status => Response::ok(vol.status()),
        Request::Promote { epoch, force } => match vol.promote(epoch, force).await {
            Ok(()) => Response::ok(vol.status()),
            Err(e) => Response::err(chain(&e)),
        },
        Request::Demote => {
            vol.demote();
            Response::ok(vol.status())
        }
        Request::SetPartner { addr } => {
            vol.set_partner(addr);
            Response::ok(vol.status())
        }
        Request::Decide { decision } => match vol.decide(decision).await {
            Ok(()) => Response::ok(vol.status()),
            Err(e) => Response::err(chain(&e)),
        },
        Request::Verify => match vol.verify().await {
            Ok(r) => Response::ok(r),
            Err(e) => Response::err(chain(&e)),
        },
        Request::SetResyncRate { bytes_per_sec } => {
            vol.set_resync_rate(bytes_per_sec);
            Response::ok(bytes_per_sec)
        }
        Request::SetMayDegrade { allow } => {
            lease.store(allow, Ordering::SeqCst);
            vol.lease_changed();
            Response::ok(allow)
        }
    }
}

/// Serves the control protocol until the task is cancelled.
pub async fn serve(listener: UnixListener, vol: Arc<Volume>, lease: Arc<AtomicBool>) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        let vol = vol.clone();
        let lease = lease.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = s.into_split();
            let mut lines = BufReader::new(rd).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.trim().is_empty() {
                    continue;
                }
                let resp = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => handle(&vol, &lease, req).await,
                    Err(e) => Response::err(format!("bad request: {e}")),
                };
                let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                out.push(b'\n');
                if wr.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}

//! HTTPS (HTTP/2 over mutual TLS) between unit members: a small client with
//! one multiplexed connection per peer, the openraft network built on it,
//! and a record of which peers answered recently (for quorum explanations).

use crate::tls::node_name;
use crate::types::{NodeId, NodeInfo, TypeConfig};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::RPCTypes;
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Largest request or response body accepted (snapshots are sent in chunks
/// well below this).
pub const BODY_LIMIT: usize = 64 << 20;

/// Why a call to a peer failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// Could not connect or complete the TLS handshake: the request was not
    /// sent.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The peer address.
        addr: String,
        /// Why (a TLS refusal names the certificate problem).
        reason: String,
    },
    /// The request was sent but no complete answer came back.
    #[error("no answer from {addr}: {reason}")]
    Lost {
        /// The peer address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// No answer within the time limit.
    #[error("no answer from {addr} within {ms} ms")]
    Timeout {
        /// The peer address.
        addr: String,
        /// The time limit.
        ms: u128,
        /// Whether the request had been sent.
        sent: bool,
    },
    /// The peer answered with an HTTP error.
    #[error("{addr} refused the request (HTTP {status}): {body}")]
    Status {
        /// The peer address.
        addr: String,
        /// The status code.
        status: u16,
        /// The peer's explanation.
        body: String,
    },
}

impl CallError {
    /// True when the request certainly did not reach the peer.
    pub fn not_sent(&self) -> bool {
        matches!(
            self,
            CallError::Connect { .. } | CallError::Timeout { sent: false, .. }
        )
    }
}

/// A connection to one peer (reconnects on demand).
pub struct PeerClient {
    addr: String,
    name: ServerName<'static>,
    tls: TlsConnector,
    connect_timeout: Duration,
    conn: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl PeerClient {
    /// A client for the node named `server_name` at `addr`.
    pub fn new(
        addr: String,
        server_name: String,
        tls: Arc<rustls::ClientConfig>,
        connect_timeout: Duration,
    ) -> Result<PeerClient, CallError> {
        let name = ServerName::try_from(server_name.clone()).map_err(|_| CallError::Connect {
            addr: addr.clone(),
            reason: format!("'{server_name}' is not a valid server name"),
        })?;
        Ok(PeerClient {
            addr,
            name,
            tls: TlsConnector::from(tls),
            connect_timeout,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    async fn sender(&self) -> Result<SendRequest<Full<Bytes>>, CallError> {
        let mut guard = self.conn.lock().await;
        if let Some(s) = guard.as_ref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        *guard = None;
        let connect_err = |reason: String| CallError::Connect {
            addr: self.addr.clone(),
            reason,
        };
        let fut = async {
            let tcp = TcpStream::connect(&self.addr)
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let tls = self
                .tls
                .connect(self.name.clone(), tcp)
                .await
                .map_err(|e| connect_err(explain_tls(&e)))?;
            let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5))
                .handshake(TokioIo::new(tls))
                .await
                .map_err(|e| connect_err(format!("HTTP/2 handshake failed: {e}")))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok::<_, CallError>(sender)
        };
        let sender = tokio::time::timeout(self.connect_timeout, fut)
            .await
            .map_err(|_| CallError::Timeout {
                addr: self.addr.clone(),
                ms: self.connect_timeout.as_millis(),
                sent: false,
            })??;
        *guard = Some(sender.clone());
        Ok(sender)
    }

    /// POSTs `body` (JSON) to `path` and decodes the JSON answer, all within
    /// `timeout`.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let started = Instant::now();
        let timeout_err = |sent| CallError::Timeout {
            addr: self.addr.clone(),
            ms: timeout.as_millis(),
            sent,
        };
        let mut sender = tokio::time::timeout(timeout, self.sender())
            .await
            .map_err(|_| timeout_err(false))??;
        let lost = |reason: String| CallError::Lost {
            addr: self.addr.clone(),
            reason,
        };
        let bytes = serde_json::to_vec(body).map_err(|e| lost(e.to_string()))?;
        let req = hyper::Request::post(format!("https://{}{path}", node_host(&self.name)))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| lost(e.to_string()))?;
        let remaining = timeout.saturating_sub(started.elapsed());
        let exchange = async {
            sender.ready().await.map_err(|e| CallError::Connect {
                addr: self.addr.clone(),
                reason: e.to_string(),
            })?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| lost(e.to_string()))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), BODY_LIMIT)
                .collect()
                .await
                .map_err(|e| lost(e.to_string()))?
                .to_bytes();
            Ok::<_, CallError>((status, body))
        };
        let (status, body) = tokio::time::timeout(remaining, exchange)
            .await
            .map_err(|_| timeout_err(true))??;
        if !status.is_success() {
            return Err(CallError::Status {
                addr: self.addr.clone(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).chars().take(500).collect(),
            });
        }
        serde_json::from_slice(&body).map_err(|e| lost(format!("unreadable answer: {e}")))
    }
}

/// Turns a TLS failure into words for an administrator.
fn explain_tls(e: &std::io::Error) -> String {
    let raw = e.to_string();
    if raw.contains("invalid peer certificate") {
        format!("TLS handshake failed: the peer's certificate was not issued by this unit's CA for that node ({raw})")
    } else if raw.contains("alert") {
        format!("TLS handshake failed: the peer refused this node's certificate ({raw})")
    } else {
        format!("TLS handshake failed: {raw}")
    }
}

fn node_host(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        other => format!("{other:?}"),
    }
}

/// Which peers answered (or called us) recently.
#[derive(Default)]
pub struct PeerHealth {
    seen: Mutex<HashMap<NodeId, Instant>>,
}

impl PeerHealth {
    /// Records a successful exchange with `id`.
    pub fn saw(&self, id: NodeId) {
        if let Ok(mut m) = self.seen.lock() {
            m.insert(id, Instant::now());
        }
    }

    /// How long ago `id` was last seen, if ever.
    pub fn last_seen(&self, id: NodeId) -> Option<Duration> {
        self.seen.lock().ok()?.get(&id).map(|t| t.elapsed())
    }

    /// The peers seen within `window`.
    pub fn recent(&self, window: Duration) -> Vec<NodeId> {
        match self.seen.lock() {
            Ok(m) => m
                .iter()
                .filter(|(_, t)| t.elapsed() <= window)
                .map(|(id, _)| *id)
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// What every outgoing connection of this node shares.
pub struct NetShared {
    /// This node.
    pub self_id: NodeId,
    /// mTLS client configuration (unit CA, this node's certificate).
    pub tls: Arc<rustls::ClientConfig>,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Recent contacts.
    pub health: PeerHealth,
    pool: Mutex<HashMap<(NodeId, String), Arc<PeerClient>>>,
    /// Fault injection: peers this node neither calls nor answers.
    blocked: Mutex<BTreeSet<NodeId>>,
}

impl NetShared {
    /// Shared state for node `self_id`.
    pub fn new(self_id: NodeId, tls: Arc<rustls::ClientConfig>, connect_timeout: Duration) -> Self {
        NetShared {
            self_id,
            tls,
            connect_timeout,
            health: PeerHealth::default(),
            pool: Mutex::new(HashMap::new()),
            blocked: Mutex::new(BTreeSet::new()),
        }
    }

    /// Fault injection: cuts the links to `peers` (replacing the previous
    /// set; empty heals every link).
    pub fn set_blocked(&self, peers: BTreeSet<NodeId>) {
        if let Ok(mut b) = self.blocked.lock() {
            *b = peers;
        }
        // Pooled connections to a newly blocked peer must not be reused.
        self.close_all();
    }

    /// The peers whose links are cut by fault injection.
    pub fn blocked(&self) -> BTreeSet<NodeId> {
        self.blocked.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// The (pooled) client for node `id` at `addr`.
    pub fn client(&self, id: NodeId, addr: &str) -> Result<Arc<PeerClient>, CallError> {
        let mut pool = self.pool.lock().map_err(|_| CallError::Connect {
            addr: addr.to_string(),
            reason: "connection pool poisoned".into(),
        })?;
        if let Some(c) = pool.get(&(id, addr.to_string())) {
            return Ok(c.clone());
        }
        let c = Arc::new(PeerClient::new(
            addr.to_string(),
            node_name(id),
            self.tls.clone(),
            self.connect_timeout,
        )?);
        pool.insert((id, addr.to_string()), c.clone());
        Ok(c)
    }

    /// Calls `path` on node `id` and records the contact on success.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        id: NodeId,
        addr: &str,
        path: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        if self
            .blocked
            .lock()
            .map(|b| b.contains(&id))
            .unwrap_or(false)
        {
            return Err(CallError::Connect {
                addr: addr.to_string(),
                reason: format!("the link to node {id} is cut (fault injection)"),
            });
        }
        let r = self.client(id, addr)?.call(path, body, timeout).await;
        if r.is_ok() {
            self.health.saw(id);
        }
        r
    }

    /// Drops every pooled connection.
    pub fn close_all(&self) {
        if let Ok(mut p) = self.pool.lock() {
            p.clear();
        }
    }
}

/// The openraft network factory.
#[derive(Clone)]
pub struct Network {
    /// Shared connection state.
    pub shared: Arc<NetShared>,
}

/// openraft's connection to one target.
pub struct PeerNetwork {
    shared: Arc<NetShared>,
    target: NodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerNetwork {
        PeerNetwork {
            shared: self.shared.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

impl PeerNetwork {
    async fn rpc<Req: Serialize, Resp: DeserializeOwned, E>(
        &self,
        action: RPCTypes,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>
    where
        E: std::error::Error + DeserializeOwned,
    {
        let timeout = option.hard_ttl();
        let r: Result<Result<Resp, RaftError<NodeId, E>>, CallError> = self
            .shared
            .call(self.target, &self.addr, path, req, timeout)
            .await;
        match r {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Err(CallError::Timeout { .. }) => Err(RPCError::Timeout(Timeout {
                action,
                id: self.shared.self_id,
                target: self.target,
                timeout,
            })),
            Err(e @ CallError::Connect { .. }) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.rpc(RPCTypes::AppendEntries, "/raft/append", &rpc, &option)
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.rpc(RPCTypes::InstallSnapshot, "/raft/snapshot", &rpc, &option)
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.rpc(RPCTypes::Vote, "/raft/vote", &rpc, &option).await
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(Duration::from_millis(250)))
    }
}

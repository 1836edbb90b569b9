//! A running member of the unit database: the Raft engine, its storage, the
//! HTTPS endpoints, and the API the rest of Pairvisor uses.

use crate::error::{Error, OpenError, WriteError};
use crate::lease::{LeaseRefusal, LeaseRequest};
use crate::logic::{self, Reach};
use crate::net::{CallError, NetShared, Network, PeerClient, BODY_LIMIT};
use crate::storage::{LogStore, StateMachine, StateReader};
use crate::tls::{self, JoinToken, NodeIdentity, NodeNameCheck, TlsError};
use crate::types::{
    Applied, Batch, Conflict, Event, NodeId, NodeInfo, NodeRole, Op, Record, TypeConfig,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use openraft::error::{
    ChangeMembershipError, CheckIsLeaderError, ClientWriteError, InitializeError, RaftError,
};
use openraft::{ChangeMembers, Raft, ServerState, SnapshotPolicy};
use rustls::pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// Reserved table holding outstanding join tokens (by secret hash).
pub const JOIN_TOKENS_TABLE: &str = "_join_tokens";
/// Reserved table recording every node admitted with a join token.
pub const NODES_TABLE: &str = "_nodes";

/// Timeouts of the unit database. The defaults suit PMs on one LAN (U7:
/// below 10 ms round trip).
#[derive(Debug, Clone)]
pub struct Timing {
    /// Leader heartbeat interval.
    pub heartbeat: Duration,
    /// Followers start an election after a random time in
    /// `election_min..election_max` without a heartbeat.
    pub election_min: Duration,
    /// See `election_min`.
    pub election_max: Duration,
    /// TCP + TLS connect limit.
    pub connect: Duration,
    /// The limit for one write, barrier or membership step as seen by the
    /// caller (including finding the leader).
    pub request: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat: Duration::from_millis(250),
            election_min: Duration::from_millis(1000),
            election_max: Duration::from_millis(2000),
            connect: Duration::from_secs(1),
            request: Duration::from_secs(5),
        }
    }
}

/// How to run one node.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's id (unique in the unit, never reused).
    pub node_id: NodeId,
    /// Holds `log.redb`, `state.redb` and `tls/`.
    pub data_dir: PathBuf,
    /// Where to listen (port 0 picks a free port).
    pub listen: SocketAddr,
    /// The address other members use; defaults to the bound listen address.
    pub advertise: Option<String>,
    /// PM or witness.
    pub role: NodeRole,
    /// The TLS identity; `None` loads it from `data_dir/tls`.
    pub identity: Option<NodeIdentity>,
    /// Timeouts.
    pub timing: Timing,
    /// Take a snapshot after this many applied entries.
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot (for slow followers).
    pub keep_logs: u64,
}

impl Config {
    /// A configuration with default timing and snapshot policy.
    pub fn new(node_id: NodeId, data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Config {
        Config {
            node_id,
            data_dir: data_dir.into(),
            listen,
            advertise: None,
            role: NodeRole::Pm,
            identity: None,
            timing: Timing::default(),
            snapshot_every: 5000,
            keep_logs: 1000,
        }
    }

    fn tls_dir(&self) -> PathBuf {
        self.data_dir.join("tls")
    }
}

/// Raft state of a node, as shown to admins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Replicates and votes.
    Follower,
    /// Seeking votes.
    Candidate,
    /// Leads the unit.
    Leader,
    /// Receives the log but does not vote (not yet a voter).
    Learner,
    /// Stopped.
    Shutdown,
}

/// One member of the unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its id.
    pub id: NodeId,
    /// Address and role.
    pub info: NodeInfo,
    /// True for voters, false for learners.
    pub voter: bool,
}

/// Replication of one follower, as seen by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replication {
    /// The last log index known to be on that follower.
    pub matched: Option<u64>,
    /// How many entries it is behind the leader's log.
    pub lag: u64,
}

/// A node's view of the unit database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitMetrics {
    /// This node.
    pub node_id: NodeId,
    /// Its Raft state.
    pub state: NodeState,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// The current term.
    pub term: u64,
    /// Last log index on this node.
    pub last_log_index: Option<u64>,
    /// Last applied index on this node.
    pub last_applied: Option<u64>,
    /// Last index covered by this node's snapshot.
    pub snapshot: Option<u64>,
    /// Last purged log index.
    pub purged: Option<u64>,
    /// The membership (voters and learners).
    pub members: Vec<Member>,
    /// Per-follower replication (only on the leader; the leader itself is
    /// not listed).
    pub replication: BTreeMap<NodeId, Replication>,
    /// On the leader: milliseconds since a majority last acknowledged it.
    pub millis_since_quorum_ack: Option<u64>,
}

impl UnitMetrics {
    /// The voter ids.
    pub fn voters(&self) -> BTreeSet<NodeId> {
        self.members
            .iter()
            .filter(|m| m.voter)
            .map(|m| m.id)
            .collect()
    }
}

/// The answer of a leader-side operation, also sent between nodes.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Outcome<T> {
    Ok(T),
    NotLeader {
        leader: Option<NodeId>,
    },
    Rejected(Conflict),
    /// Proposed but not confirmed by a majority in time.
    Timeout(String),
    Failed(String),
}

/// A request routed to the leader, with the time the sender still waits.
#[derive(Debug, Serialize, Deserialize)]
struct Forwarded<T> {
    limit_ms: u64,
    req: T,
}

#[derive(Debug, Serialize, Deserialize)]
struct AddVoter {
    id: NodeId,
    info: NodeInfo,
}

#[derive(Serialize, Deserialize)]
struct JoinRequest {
    node_id: NodeId,
    secret: String,
    public_key: String,
}

#[derive(Serialize, Deserialize)]
struct JoinGrant {
    unit_name: String,
    ca_cert_pem: String,
    cert_pem: String,
    ca_key_pem: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct TokenRecord {
    node_id: NodeId,
    role: NodeRole,
    expires_at_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct NodeRecord {
    role: NodeRole,
    cert_fingerprint: String,
    joined_at_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

enum RouteFail {
    NoLeader,
    NotCommitted(String),
    Rejected(Conflict),
    Indeterminate { leader: NodeId, reason: String },
    Failed(String),
    Shutdown,
}

pub(crate) struct Inner {
    pub(crate) id: NodeId,
    role: NodeRole,
    addr: String,
    local_addr: SocketAddr,
    /// Replaced when force quorum restarts the engine (see `force.rs`).
    raft: std::sync::RwLock<Raft<TypeConfig>>,
    pub(crate) raft_config: Arc<openraft::Config>,
    /// Taken at shutdown so that the redb file is released.
    reader: std::sync::RwLock<Option<StateReader>>,
    /// A handle on `log.redb` shared with the engine (lease checks read the
    /// not yet applied entries; force quorum rewrites it). Taken at shutdown.
    pub(crate) log: std::sync::RwLock<Option<LogStore>>,
    /// Fails once the engine's state machine is dropped (restart barrier).
    pub(crate) sm_gone: Mutex<Option<watch::Receiver<()>>>,
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) net: Arc<NetShared>,
    identity: NodeIdentity,
    pub(crate) node_check: NodeNameCheck,
    pub(crate) timing: Timing,
    server: Mutex<Option<JoinHandle<()>>>,
    pub(crate) closed: AtomicBool,
    /// Serializes force quorum and shutdown.
    pub(crate) restart: tokio::sync::Mutex<()>,
    /// True while force quorum has the engine stopped.
    pub(crate) restarting: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut s) = self.server.lock() {
            if let Some(h) = s.take() {
                h.abort();
            }
        }
    }
}

/// A handle to this node's member of the unit database. Cheap to clone.
#[derive(Clone)]
pub struct UnitDb {
    pub(crate) inner: Arc<Inner>,
}

/// Starts an openraft engine on this node's storage.
pub(crate) async fn start_engine(
    id: NodeId,
    config: Arc<openraft::Config>,
    net: &Arc<NetShared>,
    log: LogStore,
    sm: StateMachine,
) -> Result<Raft<TypeConfig>, openraft::error::Fatal<NodeId>> {
    Raft::new(
        id,
        config,
        Network {
            shared: net.clone(),
        },
        log,
        sm,
    )
    .await
}

impl UnitDb {
    /// Opens the node: its redb files, its TLS identity and its listening
    /// socket, and starts the Raft engine. A node that was a member before
    /// rejoins the unit by itself; a new node waits for [`UnitDb::initialize`]
    /// or to be added by the leader.
    pub async fn open(config: Config) -> Result<UnitDb, OpenError> {
        let dir = config.data_dir.display().to_string();
        std::fs::create_dir_all(&config.data_dir).map_err(|source| OpenError::DataDir {
            dir: dir.clone(),
            source,
        })?;
        let identity = match &config.identity {
            Some(i) => i.clone(),
            None => NodeIdentity::load(&config.tls_dir())?,
        };
        if identity.node_id != config.node_id {
            return Err(OpenError::WrongNode {
                configured: config.node_id,
                found: identity.node_id,
            });
        }
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| OpenError::Bind {
                    addr: config.listen.to_string(),
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| OpenError::Bind {
            addr: config.listen.to_string(),
            source,
        })?;
        let addr = config
            .advertise
            .clone()
            .unwrap_or_else(|| local_addr.to_string());

        let disk = |source| OpenError::Disk {
            dir: dir.clone(),
            source,
        };
        let log = LogStore::open(&config.data_dir.join("log.redb")).map_err(disk)?;
        let (events, _) = broadcast::channel(1024);
        let sm = StateMachine::open(&config.data_dir.join("state.redb"), events.clone())
            .map_err(disk)?;
        let reader = sm.reader();

        let net = Arc::new(NetShared::new(
            config.node_id,
            identity.client_config()?,
            config.timing.connect,
        ));
        let t = &config.timing;
        // The orchestrator runs on the leader, so the witness should rarely
        // lead: it waits twice as long as the PMs before calling an election.
        let slow = if config.role == NodeRole::Witness {
            2
        } else {
            1
        };
        let raft_config = openraft::Config {
            cluster_name: identity.unit_name.clone(),
            heartbeat_interval: t.heartbeat.as_millis() as u64,
            election_timeout_min: t.election_min.as_millis() as u64 * slow,
            election_timeout_max: t.election_max.as_millis() as u64 * slow,
            install_snapshot_timeout: t.request.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            max_in_snapshot_log_to_keep: config.keep_logs,
            ..Default::default()
        }
        .validate()
        .map_err(|e| OpenError::Config(e.to_string()))?;
        let raft_config = Arc::new(raft_config);
        let sm_gone = sm.drop_signal();
        let raft = start_engine(config.node_id, raft_config.clone(), &net, log.clone(), sm)
            .await
            .map_err(|e| OpenError::Raft(e.to_string()))?;

        let acceptor = TlsAcceptor::from(identity.server_config()?);
        let node_check = identity.node_name_check()?;
        let inner = Arc::new(Inner {
            id: config.node_id,
            role: config.role,
            addr,
            local_addr,
            raft: std::sync::RwLock::new(raft),
            raft_config,
            reader: std::sync::RwLock::new(Some(reader)),
            log: std::sync::RwLock::new(Some(log)),
            sm_gone: Mutex::new(Some(sm_gone)),
            events,
            net,
            identity,
            node_check,
            timing: config.timing.clone(),
            server: Mutex::new(None),
            closed: AtomicBool::new(false),
            restart: tokio::sync::Mutex::new(()),
            restarting: AtomicBool::new(false),
        });
        let server = tokio::spawn(serve(listener, acceptor, Arc::downgrade(&inner)));
        if let Ok(mut s) = inner.server.lock() {
            *s = Some(server);
        }
        tracing::info!(node = config.node_id, addr = %inner.addr, "unit database node started");
        Ok(UnitDb { inner })
    }

    /// `unit init`: creates a new unit CA and this node's identity (saved in
    /// `data_dir/tls`), opens the node and forms a one-voter unit of it.
    /// Other nodes then join with tokens from [`UnitDb::create_join_token`].
    pub async fn init(mut config: Config, unit_name: &str) -> Result<UnitDb, OpenError> {
        if NodeIdentity::exists(&config.tls_dir()) {
            return Err(OpenError::Join(Error::AlreadyInitialized));
        }
        let identity = NodeIdentity::create_unit(unit_name, config.node_id)?;
        identity.save(&config.tls_dir())?;
        config.identity = Some(identity);
        let db = UnitDb::open(config).await?;
        db.initialize_alone().await?;
        Ok(db)
    }

    /// `unit join`: obtains a certificate from the PM named in `token`,
    /// saves it in `data_dir/tls`, opens the node and asks the unit to add it
    /// as a voter. `config.node_id` and `config.role` are taken from the
    /// token.
    pub async fn join(token: &JoinToken, mut config: Config) -> Result<UnitDb, OpenError> {
        config.node_id = token.node_id;
        config.role = token.role;
        let (key_pem, public_key) = tls::new_node_key()?;
        let client = PeerClient::new(
            token.addr.clone(),
            tls::node_name(token.issuer),
            tls::join_client_config(&token.ca_fingerprint)?,
            config.timing.connect,
        )
        .map_err(Error::from)?;
        let reply: Result<JoinGrant, String> = client
            .call(
                "/unit/join",
                &JoinRequest {
                    node_id: token.node_id,
                    secret: token.secret.clone(),
                    public_key: tls::encode_b64(&public_key),
                },
                config.timing.request * 2,
            )
            .await
            .map_err(Error::from)?;
        let grant = reply.map_err(Error::JoinRefused)?;
        let identity = NodeIdentity::from_parts(
            token.node_id,
            grant.unit_name,
            grant.ca_cert_pem,
            grant.cert_pem,
            key_pem,
            grant.ca_key_pem,
        );
        identity.save(&config.tls_dir())?;
        config.identity = Some(identity);
        let db = UnitDb::open(config).await?;
        db.request_membership(token.issuer, &token.addr).await?;
        Ok(db)
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.id
    }

    /// The address this node listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// How other members reach this node.
    pub fn node_info(&self) -> NodeInfo {
        NodeInfo::new(self.inner.addr.clone(), self.inner.role)
    }

    /// The unit's name.
    pub fn unit_name(&self) -> &str {
        &self.inner.identity.unit_name
    }

    /// This node's certificate material, for this node's other TLS
    /// endpoints (QEMU's migration stream between the PMs).
    pub fn node_pem(&self) -> crate::tls::NodePem {
        self.inner.identity.node_pem()
    }

    /// Forms a new unit with `members` as its voters (this node among them).
    /// Only for a node that never belonged to a unit.
    pub async fn initialize(&self, members: BTreeMap<NodeId, NodeInfo>) -> Result<(), Error> {
        self.check_open()?;
        match self.raft().initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                Err(Error::AlreadyInitialized)
            }
            Err(RaftError::APIError(InitializeError::NotInMembers(_))) => Err(Error::Membership(
                "this node must be one of the initial members".into(),
            )),
            Err(RaftError::Fatal(_)) => Err(Error::Shutdown),
        }
    }

    /// Forms a new one-voter unit of this node.
    pub async fn initialize_alone(&self) -> Result<(), Error> {
        let mut m = BTreeMap::new();
        m.insert(self.inner.id, self.node_info());
        self.initialize(m).await
    }

    /// Adds node `id` (reachable at `info.addr`, with a certificate of this
    /// unit's CA) as a voter: it first receives the whole log as a learner,
    /// then becomes a voter. Works on any member (forwarded to the leader).
    /// Returns the log index of the membership change.
    pub async fn add_voter(&self, id: NodeId, info: NodeInfo) -> Result<u64, Error> {
        self.add_voter_within(id, info, self.inner.timing.request * 4)
            .await
    }

    async fn add_voter_within(
        &self,
        id: NodeId,
        info: NodeInfo,
        limit: Duration,
    ) -> Result<u64, Error> {
        self.check_open()?;
        let req = AddVoter { id, info };
        let deadline = Instant::now() + limit;
        let r = self
            .route("/unit/add-voter", &req, deadline, true, |rem| {
                self.leader_add_voter(req.id, req.info.clone(), rem)
            })
            .await;
        self.route_error(r)
    }

    /// Removes node `id` from the unit (voter or learner), e.g. to replace a
    /// PM. Works on any member (forwarded to the leader).
    pub async fn remove_node(&self, id: NodeId) -> Result<u64, Error> {
        self.check_open()?;
        let deadline = Instant::now() + self.inner.timing.request * 2;
        let r = self
            .route("/unit/remove-node", &id, deadline, true, |rem| {
                self.leader_remove_node(id, rem)
            })
            .await;
        self.route_error(r)
    }

    /// Applies `batch` atomically on every node and returns its log index
    /// (the new version of every record it put). Works on any member:
    /// followers forward it to the leader over the unit's mutual-TLS channel.
    pub async fn write(&self, batch: Batch) -> Result<u64, WriteError> {
        validate_batch(&batch, false)?;
        self.write_internal(batch).await
    }

    pub(crate) async fn write_internal(&self, batch: Batch) -> Result<u64, WriteError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(WriteError::Shutdown);
        }
        let deadline = Instant::now() + self.inner.timing.request;
        let r = self
            .route("/unit/write", &batch, deadline, false, |rem| {
                self.leader_write(batch.clone(), rem)
            })
            .await;
        match r {
            Ok(i) => Ok(i),
            Err(RouteFail::NoLeader) => Err(WriteError::NoQuorum {
                detail: self.reach_detail(),
            }),
            Err(RouteFail::NotCommitted(detail)) => Err(WriteError::NotCommitted {
                secs: self.inner.timing.request.as_secs().max(1),
                detail,
            }),
            Err(RouteFail::Rejected(c)) => Err(WriteError::Rejected(c)),
            Err(RouteFail::Indeterminate { leader, reason }) => {
                Err(WriteError::Indeterminate { leader, reason })
            }
            Err(RouteFail::Failed(s)) => Err(WriteError::Invalid(s)),
            Err(RouteFail::Shutdown) => Err(WriteError::Shutdown),
        }
    }

    /// One record, from this node's applied state (may lag the leader; call
    /// [`UnitDb::linearizable`] first for an up-to-date read).
    pub fn get(&self, table: &str, key: &str) -> Result<Option<Record>, Error> {
        Ok(self.reader()?.get(table, key)?)
    }

    /// One record decoded into `T`.
    pub fn get_as<T: DeserializeOwned>(&self, table: &str, key: &str) -> Result<Option<T>, Error> {
        match self.get(table, key)? {
            Some(r) => r.decode().map(Some).map_err(|source| Error::Decode {
                table: table.into(),
                key: key.into(),
                source,
            }),
            None => Ok(None),
        }
    }

    /// Every record of `table`, ordered by key, from this node's applied
    /// state.
    pub fn list(&self, table: &str) -> Result<Vec<(String, Record)>, Error> {
        Ok(self.reader()?.list(table)?)
    }

    /// The tables holding records.
    pub fn tables(&self) -> Result<Vec<String>, Error> {
        Ok(self.reader()?.tables()?)
    }

    /// A read barrier: returns once this node has applied every change
    /// committed before the call (read index confirmed by a majority through
    /// the leader's `ensure_linearizable`). Local reads after it are
    /// linearizable. Returns the read index.
    pub async fn linearizable(&self) -> Result<u64, Error> {
        self.check_open()?;
        let deadline = Instant::now() + self.inner.timing.request;
        let r = self
            .route("/unit/read-index", &(), deadline, true, |rem| {
                self.leader_read_index(rem)
            })
            .await;
        let index = self.route_error(r)?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.wait_applied(index, remaining.max(Duration::from_millis(100)))
            .await?;
        Ok(index)
    }

    /// The last log index this node has applied (0 before any).
    pub fn applied_index(&self) -> u64 {
        self.raft()
            .metrics()
            .borrow()
            .last_applied
            .map(|l| l.index)
            .unwrap_or(0)
    }

    /// Waits until this node has applied log index `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), Error> {
        match self
            .raft()
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "applied index")
            .await
        {
            Ok(_) => Ok(()),
            Err(openraft::metrics::WaitError::ShuttingDown) => Err(Error::Shutdown),
            Err(openraft::metrics::WaitError::Timeout(..)) => Err(Error::Timeout {
                what: format!("this node to apply log index {index}"),
                secs: timeout.as_secs(),
            }),
        }
    }

    /// This node's view of the unit.
    pub fn metrics(&self) -> UnitMetrics {
        let m = self.raft().metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, info)| Member {
                id: *id,
                info: info.clone(),
                voter: voters.contains(id),
            })
            .collect();
        let last = m.last_log_index.unwrap_or(0);
        let replication = m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .filter(|(id, _)| **id != self.inner.id)
                    .map(|(id, matched)| {
                        let matched = matched.map(|l| l.index);
                        (
                            *id,
                            Replication {
                                matched,
                                lag: last.saturating_sub(matched.unwrap_or(0)),
                            },
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        UnitMetrics {
            node_id: self.inner.id,
            state: match m.state {
                ServerState::Leader => NodeState::Leader,
                ServerState::Follower => NodeState::Follower,
                ServerState::Candidate => NodeState::Candidate,
                ServerState::Learner => NodeState::Learner,
                ServerState::Shutdown => NodeState::Shutdown,
            },
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            snapshot: m.snapshot.map(|l| l.index),
            purged: m.purged.map(|l| l.index),
            members,
            replication,
            millis_since_quorum_ack: m.millis_since_quorum_ack,
        }
    }

    /// Waits (at most `timeout`) until `pred` holds for this node's metrics.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&UnitMetrics) -> bool,
    ) -> Result<UnitMetrics, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.raft().metrics();
        loop {
            rx.borrow_and_update();
            let m = self.metrics();
            if pred(&m) {
                return Ok(m);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) if !self.inner.closed.load(Ordering::SeqCst) => {
                    // The engine was restarted (force quorum): follow the new one.
                    self.renew_metrics(&mut rx).await;
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Error::Timeout {
                            what: what.to_string(),
                            secs: timeout.as_secs(),
                        });
                    }
                }
                Ok(Err(_)) => return Err(Error::Shutdown),
                Err(_) => {
                    return Err(Error::Timeout {
                        what: what.to_string(),
                        secs: timeout.as_secs(),
                    })
                }
            }
        }
    }

    /// Applied changes, in log order, from now on. A receiver that falls more
    /// than 1024 events behind gets `Lagged` and should re-read its tables.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Takes a snapshot of the applied state now and drops the log up to it.
    /// Returns the snapshot's last index.
    pub async fn compact(&self) -> Result<u64, Error> {
        self.check_open()?;
        let applied = self.metrics().last_applied.unwrap_or(0);
        self.raft()
            .trigger()
            .snapshot()
            .await
            .map_err(|_| Error::Shutdown)?;
        let m = self
            .wait_until("the snapshot", self.inner.timing.request, |m| {
                m.snapshot.unwrap_or(0) >= applied
            })
            .await?;
        let upto = m.snapshot.unwrap_or(0);
        self.raft()
            .trigger()
            .purge_log(upto)
            .await
            .map_err(|_| Error::Shutdown)?;
        self.wait_until("the log purge", self.inner.timing.request, |m| {
            m.purged.unwrap_or(0) >= upto
        })
        .await?;
        Ok(upto)
    }

    /// Creates a one-time join token for node `node_id` with `role`, valid
    /// for `ttl`. Only a node holding the CA key (a PM) can issue one; the
    /// token is recorded in the unit database (by the hash of its secret) so
    /// that it can be used once.
    pub async fn create_join_token(
        &self,
        node_id: NodeId,
        role: NodeRole,
        ttl: Duration,
    ) -> Result<JoinToken, Error> {
        self.check_open()?;
        if self.inner.identity.ca().is_none() {
            return Err(TlsError::NoCaKey.into());
        }
        if self.metrics().members.iter().any(|m| m.id == node_id) {
            return Err(Error::Membership(format!(
                "node {node_id} is already a member of the unit: choose another node id, or remove node {node_id} first"
            )));
        }
        let secret = tls::random_secret()?;
        let hash = tls::secret_hash(&secret);
        let rec = TokenRecord {
            node_id,
            role,
            expires_at_ms: now_ms() + ttl.as_millis() as u64,
        };
        let batch = Batch::new()
            .require_absent(JOIN_TOKENS_TABLE, &hash)
            .put_json(JOIN_TOKENS_TABLE, &hash, &rec)
            .map_err(|e| WriteError::Invalid(e.to_string()))?;
        let index = self.write_internal(batch).await?;
        // The token is redeemed here: make sure this node has applied it.
        self.wait_applied(index, self.inner.timing.request).await?;
        Ok(JoinToken {
            addr: self.inner.addr.clone(),
            issuer: self.inner.id,
            ca_fingerprint: self.inner.identity.ca_fingerprint()?,
            node_id,
            role,
            secret: tls::encode_b64(&secret),
        })
    }

    /// Checks that node `id` at `addr` accepts this node's certificate and
    /// presents a certificate of this unit's CA for node `id` (mutual TLS),
    /// e.g. to diagnose a join or a link. Returns the time the exchange took.
    pub async fn check_peer(&self, id: NodeId, addr: &str) -> Result<Duration, Error> {
        self.check_open()?;
        let started = Instant::now();
        let got: NodeId = self
            .inner
            .net
            .call(id, addr, "/unit/ping", &(), self.inner.timing.request)
            .await?;
        if got != id {
            return Err(Error::Membership(format!(
                "{addr} answers as node {got}, not node {id}"
            )));
        }
        Ok(started.elapsed())
    }

    /// Fault injection for tests and the loopback lab: cuts this node's
    /// links to `peers` in both directions (it neither calls them nor
    /// answers their requests), replacing the previous set; an empty set
    /// heals every link. Cutting a link on one side is enough.
    pub fn set_blocked_peers(&self, peers: impl IntoIterator<Item = NodeId>) {
        self.inner.net.set_blocked(peers.into_iter().collect());
    }

    /// Stops the node: the Raft engine, the listener and every connection.
    /// The redb files stay as they are; [`UnitDb::open`] resumes from them.
    pub async fn shutdown(&self) {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let server = self.inner.server.lock().ok().and_then(|mut s| s.take());
        if let Some(h) = server {
            h.abort();
            let _ = h.await;
        }
        // Not in the middle of a force quorum restart.
        let _restart = self.inner.restart.lock().await;
        let _ = self.raft().shutdown().await;
        self.inner.net.close_all();
        if let Ok(mut r) = self.inner.reader.write() {
            *r = None;
        }
        if let Ok(mut l) = self.inner.log.write() {
            *l = None;
        }
        tracing::info!(node = self.inner.id, "unit database node stopped");
    }

    // --- internals -------------------------------------------------------

    /// The time a forwarded request may take here: what the sender allows,
    /// capped by this node's own limits.
    fn limit(&self, limit_ms: u64) -> Duration {
        Duration::from_millis(limit_ms)
            .min(self.inner.timing.request * 4)
            .max(Duration::from_millis(10))
    }

    /// The current Raft engine (replaced by force quorum).
    pub(crate) fn raft(&self) -> Raft<TypeConfig> {
        match self.inner.raft.read() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Installs a restarted engine.
    pub(crate) fn set_raft(&self, raft: Raft<TypeConfig>) {
        match self.inner.raft.write() {
            Ok(mut r) => *r = raft,
            Err(p) => *p.into_inner() = raft,
        }
    }

    /// After the engine's metrics channel closed (restart): subscribes to
    /// the current engine, pausing briefly if it is still the stopped one.
    async fn renew_metrics(
        &self,
        rx: &mut watch::Receiver<openraft::RaftMetrics<NodeId, NodeInfo>>,
    ) {
        *rx = self.raft().metrics();
        if rx.has_changed().is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn reader(&self) -> Result<StateReader, Error> {
        self.inner
            .reader
            .read()
            .ok()
            .and_then(|r| r.clone())
            .ok_or(Error::Shutdown)
    }

    pub(crate) fn check_open(&self) -> Result<(), Error> {
        if self.inner.closed.load(Ordering::SeqCst) {
            Err(Error::Shutdown)
        } else {
            Ok(())
        }
    }

    fn reach(&self) -> Reach {
        let m = self.raft().metrics().borrow().clone();
        let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
        let window = self.inner.timing.election_max * 2;
        let mut reachable: BTreeSet<NodeId> =
            self.inner.net.health.recent(window).into_iter().collect();
        reachable.insert(self.inner.id);
        Reach { voters, reachable }
    }

    fn reach_detail(&self) -> String {
        let reach = self.reach().explain();
        match self.raft().metrics().borrow().current_leader {
            Some(l) if l == self.inner.id => format!("this node leads but {reach}"),
            Some(l) => format!("this node {reach}; last known leader: node {l}"),
            None => format!("this node {reach}; no leader elected"),
        }
    }

    fn route_error<T>(&self, r: Result<T, RouteFail>) -> Result<T, Error> {
        match r {
            Ok(v) => Ok(v),
            Err(RouteFail::NoLeader) | Err(RouteFail::NotCommitted(_)) => Err(Error::NoQuorum {
                detail: self.reach_detail(),
            }),
            Err(RouteFail::Rejected(c)) => Err(WriteError::Rejected(c).into()),
            Err(RouteFail::Indeterminate { leader, reason }) => {
                Err(WriteError::Indeterminate { leader, reason }.into())
            }
            Err(RouteFail::Failed(s)) => Err(Error::Membership(s)),
            Err(RouteFail::Shutdown) => Err(Error::Shutdown),
        }
    }

    /// Runs an operation on the leader: locally when this node leads,
    /// otherwise by calling `path` on the leader; follows leader changes
    /// until `deadline`. Non-idempotent operations are not re-sent once they
    /// may have reached a leader.
    async fn route<T, Req, F, Fut>(
        &self,
        path: &str,
        req: &Req,
        deadline: Instant,
        idempotent: bool,
        local: F,
    ) -> Result<T, RouteFail>
    where
        T: DeserializeOwned,
        Req: Serialize,
        F: Fn(Duration) -> Fut,
        Fut: Future<Output = Outcome<T>>,
    {
        let mut rx = self.raft().metrics();
        loop {
            if self.inner.closed.load(Ordering::SeqCst) {
                return Err(RouteFail::Shutdown);
            }
            if rx.has_changed().is_err() {
                // The engine was restarted (force quorum): follow the new one.
                self.renew_metrics(&mut rx).await;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(RouteFail::NoLeader);
            }
            let remaining = deadline - now;
            let (leader, node) = {
                let m = rx.borrow_and_update();
                let leader = m.current_leader;
                let node =
                    leader.and_then(|l| m.membership_config.membership().get_node(&l).cloned());
                (leader, node)
            };
            let pause = remaining.min(Duration::from_millis(100));
            match (leader, node) {
                (Some(l), _) if l == self.inner.id => match local(remaining).await {
                    Outcome::Ok(v) => return Ok(v),
                    Outcome::Rejected(c) => return Err(RouteFail::Rejected(c)),
                    Outcome::NotLeader { .. } => {
                        let _ = tokio::time::timeout(pause, rx.changed()).await;
                    }
                    Outcome::Timeout(d) => return Err(RouteFail::NotCommitted(d)),
                    Outcome::Failed(s) => return Err(RouteFail::Failed(s)),
                },
                (Some(l), Some(info)) => {
                    // The leader gets a little less time than we wait, so
                    // that its answer (even "not committed") reaches us.
                    let body = Forwarded {
                        limit_ms: remaining.as_millis() as u64 * 9 / 10,
                        req,
                    };
                    let r: Result<Outcome<T>, CallError> = self
                        .inner
                        .net
                        .call(l, &info.addr, path, &body, remaining)
                        .await;
                    match r {
                        Ok(Outcome::Ok(v)) => return Ok(v),
                        Ok(Outcome::Rejected(c)) => return Err(RouteFail::Rejected(c)),
                        Ok(Outcome::NotLeader { .. }) => {
                            let _ = tokio::time::timeout(pause, rx.changed()).await;
                        }
                        Ok(Outcome::Timeout(d)) => {
                            if !idempotent {
                                return Err(RouteFail::NotCommitted(format!(
                                    "at leader node {l}: {d}"
                                )));
                            }
                            tokio::time::sleep(pause).await;
                        }
                        Ok(Outcome::Failed(s)) => return Err(RouteFail::Failed(s)),
                        Err(e)
                            if idempotent
                                || logic::retry_advice(!e.not_sent())
                                    == logic::RetryAdvice::Retry =>
                        {
                            tracing::debug!(leader = l, error = %e, "leader not reachable, retrying");
                            tokio::time::sleep(pause).await;
                        }
                        Err(e) => {
                            return Err(RouteFail::Indeterminate {
                                leader: l,
                                reason: e.to_string(),
                            })
                        }
                    }
                }
                _ => {
                    let _ = tokio::time::timeout(remaining, rx.changed()).await;
                }
            }
        }
    }

    async fn leader_write(&self, batch: Batch, limit: Duration) -> Outcome<u64> {
        match tokio::time::timeout(limit, self.raft().client_write(batch)).await {
            Err(_) => Outcome::Timeout(self.reach_detail()),
            Ok(Ok(resp)) => match resp.data {
                Applied::Done { index } | Applied::Internal { index } => Outcome::Ok(index),
                Applied::Rejected { conflict, .. } => Outcome::Rejected(conflict),
            },
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Outcome::NotLeader {
                    leader: f.leader_id,
                }
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                Outcome::Failed(e.to_string())
            }
            Ok(Err(RaftError::Fatal(e))) => Outcome::Failed(format!(
                "the Raft engine of node {} stopped: {e}",
                self.inner.id
            )),
        }
    }

    async fn leader_read_index(&self, limit: Duration) -> Outcome<u64> {
        match tokio::time::timeout(limit, self.raft().ensure_linearizable()).await {
            Err(_) => Outcome::Timeout(self.reach_detail()),
            Ok(Ok(id)) => Outcome::Ok(id.map(|l| l.index).unwrap_or(0)),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                Outcome::NotLeader {
                    leader: f.leader_id,
                }
            }
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => {
                Outcome::Timeout(self.reach_detail())
            }
            Ok(Err(RaftError::Fatal(e))) => Outcome::Failed(format!(
                "the Raft engine of node {} stopped: {e}",
                self.inner.id
            )),
        }
    }

    async fn membership_step<F, Fut>(&self, limit: Duration, step: F) -> Outcome<u64>
    where
        F: Fn() -> Fut,
        Fut: Future<
            Output = Result<
                openraft::raft::ClientWriteResponse<TypeConfig>,
                RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>,
            >,
        >,
    {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, step()).await {
                Err(_) => return Outcome::Timeout(self.reach_detail()),
                Ok(Ok(r)) => return Outcome::Ok(r.log_id.index),
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                    return Outcome::NotLeader {
                        leader: f.leader_id,
                    }
                }
                Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                )))) => {
                    // Another change is being committed: try again shortly.
                    if tokio::time::Instant::now() + Duration::from_millis(50) >= deadline {
                        return Outcome::Timeout(
                            "another membership change is still in progress".into(),
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                    return Outcome::Failed(e.to_string())
                }
                Ok(Err(RaftError::Fatal(e))) => {
                    return Outcome::Failed(format!(
                        "the Raft engine of node {} stopped: {e}",
                        self.inner.id
                    ))
                }
            }
        }
    }

    async fn leader_add_voter(&self, id: NodeId, info: NodeInfo, limit: Duration) -> Outcome<u64> {
        let deadline = Instant::now() + limit;
        let raft = &self.raft();
        let already_voter = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == id);
        if !already_voter {
            let learner = self
                .membership_step(limit, || raft.add_learner(id, info.clone(), true))
                .await;
            let Outcome::Ok(at) = learner else {
                return learner;
            };
            // Raft would let an unreachable node become a voter (the old
            // voters alone commit the change), which only weakens the unit.
            // Promote it only once it has really received the log.
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(self.inner.timing.request * 2);
            let caught_up = raft
                .wait(Some(wait))
                .metrics(
                    |m| {
                        m.replication
                            .as_ref()
                            .and_then(|r| r.get(&id).cloned().flatten())
                            .is_some_and(|l| l.index >= at)
                    },
                    "the new node to receive the log",
                )
                .await;
            if caught_up.is_err() {
                let mut ids = BTreeSet::new();
                ids.insert(id);
                let _ = self
                    .membership_step(self.inner.timing.request, || {
                        raft.change_membership(ChangeMembers::RemoveNodes(ids.clone()), false)
                    })
                    .await;
                return Outcome::Failed(format!(
                    "node {id} at {} did not receive the log within {} s, so it was not made a voter: check that it runs, that its address is right and that its certificate comes from this unit's CA",
                    info.addr,
                    wait.as_secs()
                ));
            }
        }
        let rem = deadline.saturating_duration_since(Instant::now());
        let mut ids = BTreeSet::new();
        ids.insert(id);
        self.membership_step(rem, || {
            raft.change_membership(ChangeMembers::AddVoterIds(ids.clone()), false)
        })
        .await
    }

    async fn leader_remove_node(&self, id: NodeId, limit: Duration) -> Outcome<u64> {
        let deadline = Instant::now() + limit;
        let raft = &self.raft();
        let mut ids = BTreeSet::new();
        ids.insert(id);
        let is_voter = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == id);
        if is_voter {
            let r = self
                .membership_step(limit, || {
                    raft.change_membership(ChangeMembers::RemoveVoters(ids.clone()), true)
                })
                .await;
            if !matches!(r, Outcome::Ok(_)) {
                return r;
            }
        }
        let rem = deadline.saturating_duration_since(Instant::now());
        self.membership_step(rem, || {
            raft.change_membership(ChangeMembers::RemoveNodes(ids.clone()), false)
        })
        .await
    }

    /// The issuer's side of a join: checks the token, consumes it through
    /// Raft (so it works once), signs the new node's certificate.
    async fn grant_join(&self, req: JoinRequest) -> Result<JoinGrant, String> {
        let ca = self
            .inner
            .identity
            .ca()
            .ok_or_else(|| TlsError::NoCaKey.to_string())?;
        let secret = tls::decode_b64(&req.secret).ok_or("the join token's secret is malformed")?;
        let hash = tls::secret_hash(&secret);
        let unknown = "unknown or already used join token: create a new one on a PM";
        // See every committed token, not only those applied here so far.
        self.linearizable().await.map_err(|e| e.to_string())?;
        let rec = self
            .get(JOIN_TOKENS_TABLE, &hash)
            .map_err(|e| e.to_string())?
            .ok_or(unknown)?;
        let token: TokenRecord = rec.decode().map_err(|_| unknown)?;
        if now_ms() >= token.expires_at_ms {
            return Err("the join token has expired: create a new one on a PM".into());
        }
        if token.node_id != req.node_id {
            return Err(format!(
                "the join token is for node {}, not node {}",
                token.node_id, req.node_id
            ));
        }
        let public_key = tls::decode_b64(&req.public_key).ok_or("malformed public key")?;
        let cert_pem = ca
            .sign_node(token.node_id, &public_key)
            .map_err(|e| e.to_string())?;
        let cert_fp = rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer<'_>| tls::fingerprint(&c))
            .unwrap_or_default();
        let node = NodeRecord {
            role: token.role,
            cert_fingerprint: cert_fp,
            joined_at_ms: now_ms(),
        };
        let batch = Batch::new()
            .require_version(JOIN_TOKENS_TABLE, &hash, rec.version)
            .delete(JOIN_TOKENS_TABLE, &hash)
            .put_json(NODES_TABLE, &token.node_id.to_string(), &node)
            .map_err(|e| e.to_string())?;
        match self.write_internal(batch).await {
            Ok(_) => {}
            Err(WriteError::Rejected(_)) => return Err(unknown.into()),
            Err(e) => return Err(e.to_string()),
        }
        tracing::info!(node = token.node_id, role = %token.role, "issued a certificate for a joining node");
        Ok(JoinGrant {
            unit_name: self.inner.identity.unit_name.clone(),
            ca_cert_pem: self.inner.identity.ca_cert_pem.clone(),
            cert_pem,
            ca_key_pem: match token.role {
                NodeRole::Pm => self.inner.identity.ca_key_pem().map(str::to_string),
                NodeRole::Witness => None,
            },
        })
    }

    /// Asks node `via` (at `addr`) to add this node as a voter.
    async fn request_membership(&self, via: NodeId, addr: &str) -> Result<u64, Error> {
        let limit = self.inner.timing.request * 4;
        let req = AddVoter {
            id: self.inner.id,
            info: self.node_info(),
        };
        let r: Result<Outcome<u64>, CallError> = self
            .inner
            .net
            .call(
                via,
                addr,
                "/unit/add-voter",
                &Forwarded {
                    limit_ms: limit.as_millis() as u64 * 9 / 10,
                    req,
                },
                limit,
            )
            .await;
        match r? {
            Outcome::Ok(i) => Ok(i),
            Outcome::Timeout(d) => Err(Error::NoQuorum { detail: d }),
            Outcome::NotLeader { .. } => Err(Error::NoQuorum {
                detail: format!("node {via} could not find the leader"),
            }),
            Outcome::Rejected(c) => Err(WriteError::Rejected(c).into()),
            Outcome::Failed(s) => Err(Error::Membership(s)),
        }
    }

    /// The role a join grant gave node `id` (absent for the founding PM).
    fn granted_role(&self, id: NodeId) -> Option<NodeRole> {
        self.get_as::<NodeRecord>(NODES_TABLE, &id.to_string())
            .ok()
            .flatten()
            .map(|r| r.role)
    }

    /// Which node (and role) a peer certificate belongs to: the role its
    /// join grant recorded, else (the founding PM, which joined no one) the
    /// membership's.
    fn sender(&self, peer: Option<&CertificateDer<'static>>) -> Option<(NodeId, NodeRole)> {
        let cert = peer?;
        let check = &self.inner.node_check;
        if let Ok(granted) = self.list(NODES_TABLE) {
            for (k, _) in granted {
                let Ok(id) = k.parse::<NodeId>() else {
                    continue;
                };
                if check.names(cert, id) {
                    return self.granted_role(id).map(|r| (id, r));
                }
            }
        }
        self.metrics()
            .members
            .into_iter()
            .find(|m| check.names(cert, m.id))
            .map(|m| (m.id, m.info.role))
    }

    async fn handle(
        &self,
        path: &str,
        peer: Option<&CertificateDer<'static>>,
        body: Bytes,
    ) -> Response<Full<Bytes>> {
        if peer.is_none() && path != "/unit/join" {
            return text(
                StatusCode::UNAUTHORIZED,
                "a client certificate issued by this unit's CA is required",
            );
        }
        let raft = &self.raft();
        let health = &self.inner.net.health;
        match path {
            "/raft/append" => {
                match parse::<openraft::raft::AppendEntriesRequest<TypeConfig>>(&body) {
                    Ok(r) => {
                        if let Some(l) = r.vote.leader_id().voted_for() {
                            health.saw(l);
                        }
                        json(&raft.append_entries(r).await)
                    }
                    Err(e) => e,
                }
            }
            "/raft/vote" => match parse::<openraft::raft::VoteRequest<NodeId>>(&body) {
                Ok(r) => {
                    if let Some(c) = r.vote.leader_id().voted_for() {
                        health.saw(c);
                    }
                    json(&raft.vote(r).await)
                }
                Err(e) => e,
            },
            "/raft/snapshot" => {
                match parse::<openraft::raft::InstallSnapshotRequest<TypeConfig>>(&body) {
                    Ok(r) => {
                        if let Some(l) = r.vote.leader_id().voted_for() {
                            health.saw(l);
                        }
                        json(&raft.install_snapshot(r).await)
                    }
                    Err(e) => e,
                }
            }
            "/unit/write" => match parse::<Forwarded<Batch>>(&body) {
                // Only a PM writes records: the witness is a voter, nothing
                // more (it could otherwise write users, fences, or a PM
                // record pointing the API forwarder at itself). The batch
                // gets the same checks as a local write; reserved tables
                // are allowed because a PM's internal writes (join grants,
                // forced quorum) are forwarded here too.
                Ok(f) => match self.sender(peer) {
                    Some((_, NodeRole::Pm)) => match validate_batch(&f.req, true) {
                        Ok(()) => json(&self.leader_write(f.req, self.limit(f.limit_ms)).await),
                        Err(e) => json(&Outcome::<u64>::Failed(e.to_string())),
                    },
                    who => json(&Outcome::<u64>::Failed(refused_peer(who, "write records"))),
                },
                Err(e) => e,
            },
            "/unit/read-index" => match parse::<Forwarded<()>>(&body) {
                Ok(f) => json(&self.leader_read_index(self.limit(f.limit_ms)).await),
                Err(e) => e,
            },
            "/unit/add-voter" => match parse::<Forwarded<AddVoter>>(&body) {
                Ok(mut f) => {
                    // A PM adds anyone with a join grant; a joining node
                    // only itself, with the role its token granted (not the
                    // one it claims).
                    let sender = self.sender(peer);
                    let allowed = match sender {
                        Some((_, NodeRole::Pm)) => true,
                        Some((id, _)) => id == f.req.id,
                        None => false,
                    };
                    if !allowed {
                        return json(&Outcome::<u64>::Failed(refused_peer(
                            sender,
                            "add other nodes to the unit",
                        )));
                    }
                    if let Some(role) = self.granted_role(f.req.id) {
                        f.req.info.role = role;
                    }
                    // Any member may receive it (a joining node asks the PM
                    // that issued its token); it is routed to the leader.
                    let limit = self.limit(f.limit_ms);
                    let out = match self.add_voter_within(f.req.id, f.req.info, limit).await {
                        Ok(i) => Outcome::Ok(i),
                        Err(Error::NoQuorum { detail }) => Outcome::Timeout(detail),
                        Err(Error::Membership(s)) => Outcome::Failed(s),
                        Err(e) => Outcome::Failed(e.to_string()),
                    };
                    json(&out)
                }
                Err(e) => e,
            },
            "/unit/remove-node" => match parse::<Forwarded<NodeId>>(&body) {
                Ok(f) => match self.sender(peer) {
                    Some((_, NodeRole::Pm)) => {
                        json(&self.leader_remove_node(f.req, self.limit(f.limit_ms)).await)
                    }
                    who => json(&Outcome::<u64>::Failed(refused_peer(who, "remove nodes"))),
                },
                Err(e) => e,
            },
            "/unit/join" => match parse::<JoinRequest>(&body) {
                Ok(r) => json(&self.grant_join(r).await),
                Err(e) => e,
            },
            "/unit/lease" => match parse::<LeaseRequest>(&body) {
                Ok(r) => {
                    // Only the node itself may ask for its lease: the id it
                    // claims must be the one its certificate names.
                    let answer = if peer.is_some_and(|c| self.inner.node_check.names(c, r.node)) {
                        self.lease_decision(r.node)
                    } else {
                        crate::lease::LeaseAnswer::Refused(LeaseRefusal::WrongIdentity {
                            claimed: r.node,
                        })
                    };
                    json(&answer)
                }
                Err(e) => e,
            },
            "/unit/ping" => json(&self.inner.id),
            _ => text(StatusCode::NOT_FOUND, "no such endpoint"),
        }
    }
}

/// Why a peer request was refused (its sender and role).
fn refused_peer(who: Option<(NodeId, NodeRole)>, what: &str) -> String {
    match who {
        Some((id, role)) => format!(
            "node {id} is a {role}: only a PM may {what} (the witness votes and grants leases, \
             nothing more)"
        ),
        None => format!("the sender's certificate names no node of this unit: it may not {what}"),
    }
}

fn validate_batch(batch: &Batch, allow_reserved: bool) -> Result<(), WriteError> {
    if batch.ops.is_empty() && batch.preconditions.is_empty() {
        return Err(WriteError::Invalid("the batch is empty".into()));
    }
    for op in &batch.ops {
        let (table, key) = match op {
            Op::Put { table, key, .. } | Op::Delete { table, key } => (table, key),
        };
        logic::validate_table(table, allow_reserved).map_err(WriteError::Invalid)?;
        if key.is_empty() {
            return Err(WriteError::Invalid(format!("empty key in table '{table}'")));
        }
    }
    for p in &batch.preconditions {
        logic::validate_table(p.target().0, allow_reserved).map_err(WriteError::Invalid)?;
    }
    Ok(())
}

fn text(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(msg.to_string())));
    *r.status_mut() = status;
    r
}

fn json<T: Serialize>(v: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(v) {
        Ok(b) => {
            let mut r = Response::new(Full::new(Bytes::from(b)));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

#[allow(clippy::result_large_err)]
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Response<Full<Bytes>>> {
    serde_json::from_slice(body)
        .map_err(|e| text(StatusCode::BAD_REQUEST, &format!("malformed request: {e}")))
}

/// Largest body accepted without a client certificate (a join request:
/// a token secret and a public key).
const UNAUTHENTICATED_BODY_LIMIT: usize = 16 << 10;

/// TLS handshakes in progress at once (each bounded by a timeout): a
/// stranger opening thousands of connections must not exhaust the daemon.
const MAX_HANDSHAKES: usize = 64;

/// Connections without a client certificate served at once (only the join
/// call is served on them). Members' connections are not counted: a
/// stranger cannot crowd them out.
const MAX_UNAUTHENTICATED: usize = 8;

/// HTTP/2 streams at once on one connection.
const MAX_STREAMS: u32 = 32;

/// A connection idle (no request in flight, nothing received) this long is
/// closed; members reconnect on their next call.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

async fn serve(listener: TcpListener, acceptor: TlsAcceptor, node: Weak<Inner>) {
    let mut conns = JoinSet::new();
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let unauthenticated = Arc::new(tokio::sync::Semaphore::new(MAX_UNAUTHENTICATED));
    let mut refused = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                        refused += 1;
                        if refused.is_power_of_two() {
                            tracing::warn!(%peer, refused, "refused unit database connections: {MAX_HANDSHAKES} TLS handshakes already in progress");
                        }
                        continue;
                    };
                    conns.spawn(serve_conn(
                        tcp,
                        peer,
                        acceptor.clone(),
                        node.clone(),
                        permit,
                        unauthenticated.clone(),
                    ));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_conn(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    node: Weak<Inner>,
    handshake: tokio::sync::OwnedSemaphorePermit,
    unauthenticated: Arc<tokio::sync::Semaphore>,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "refused a unit database connection (TLS)");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "refused a unit database connection (TLS handshake too slow)");
            return;
        }
    };
    // The client certificate (already verified against the unit CA).
    let peer: Arc<Option<CertificateDer<'static>>> = Arc::new(
        tls.get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned()),
    );
    drop(handshake);
    let _stranger = if peer.is_none() {
        match unauthenticated.try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => return, // enough join attempts in progress
        }
    } else {
        None
    };
    let last_seen = Arc::new(std::sync::Mutex::new(Instant::now()));
    let seen = last_seen.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let node = node.clone();
        let peer = peer.clone();
        *seen.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        async move { Ok::<_, Infallible>(dispatch(node, peer, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(10));
    let conn = builder.serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    // Closed when idle: a request starts it counting again.
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = tokio::time::sleep(IDLE_TIMEOUT / 4) => {
                let idle = last_seen.lock().unwrap_or_else(|e| e.into_inner()).elapsed();
                if idle >= IDLE_TIMEOUT {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

async fn dispatch(
    node: Weak<Inner>,
    peer: Arc<Option<CertificateDer<'static>>>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let Some(inner) = node.upgrade() else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is shutting down",
        );
    };
    let db = UnitDb { inner };
    if db.inner.closed.load(Ordering::SeqCst) {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is shutting down",
        );
    }
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use POST");
    }
    if let Some(cert) = peer.as_ref() {
        // Fault injection: a cut link drops requests in both directions.
        let blocked = db.inner.net.blocked();
        if blocked
            .iter()
            .any(|id| db.inner.node_check.names(cert, *id))
        {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the link to this node is cut (fault injection)",
            );
        }
    }
    let path = req.uri().path().to_string();
    // Before a byte of the body is read: without a client certificate only
    // the join call is served, and its body is small.
    let limit = if peer.is_some() {
        BODY_LIMIT
    } else if path == "/unit/join" {
        UNAUTHENTICATED_BODY_LIMIT
    } else {
        return text(
            StatusCode::UNAUTHORIZED,
            "a client certificate issued by this unit's CA is required",
        );
    };
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request too large or cut off",
            )
        }
    };
    db.handle(&path, peer.as_ref().as_ref(), body).await
}

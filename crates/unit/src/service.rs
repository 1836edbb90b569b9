//! Unit formation and membership on one node (SPEC U1): `unit init` on the
//! first PM, join tokens, `unit join` on the second PM, the witness; the PM
//! records in the unit database; and heartbeats started between the two PMs
//! as soon as both are members.

use crate::health::{Health, HealthConfig, HealthStatus, LinkConfig};
use pairvisor_model::fencing::LeaseTiming;
use pairvisor_unitdb::{Batch, Config, JoinToken, NodeRole, UnitDb, UnitMetrics};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{Mutex, RwLock};

/// Table of PM descriptions, keyed by node id.
pub const PMS_TABLE: &str = "pms";
/// Table of unit-wide facts (key `secret`: the heartbeat secret).
pub const UNIT_TABLE: &str = "unit";

/// How a PM is reached on each link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmAddresses {
    /// PM name (`pm-a`).
    pub name: String,
    /// Heartbeat address on the private link (`host:port`).
    pub private_hb: String,
    /// Heartbeat address on the first business network (`host:port`).
    pub business_hb: String,
    /// Management API URL.
    pub api_url: String,
    /// The certificates that vouch for the API's HTTPS (PEM), so that the
    /// partner can forward requests here without trusting anyone else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_trust_pem: Option<String>,
}

/// A PM as recorded in the unit database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmRecord {
    /// Raft node id.
    pub node_id: u64,
    /// Addresses.
    #[serde(flatten)]
    pub addrs: PmAddresses,
}

/// What the unit looks like from this node.
#[derive(Debug, Clone, Serialize)]
pub struct UnitView {
    /// Unit name; `None` while this PM is not in a unit.
    pub name: Option<String>,
    /// This node's id.
    pub node_id: Option<u64>,
    /// Raft view (leader, term, members, replication).
    pub metrics: Option<UnitMetrics>,
    /// The PMs of the unit.
    pub pms: Vec<PmRecord>,
    /// Heartbeats to the partner PM, when there is one.
    pub health: Option<HealthStatus>,
}

/// Errors of unit operations; each says what to do.
#[derive(Debug, Error)]
pub enum UnitError {
    /// Already in a unit.
    #[error("this PM is already a member of unit '{0}'")]
    AlreadyMember(String),
    /// Not in a unit.
    #[error("this PM is not in a unit yet: run `pairvisor unit init` here, or join one")]
    NotMember,
    /// Bad token.
    #[error("the join token is not valid: {0}")]
    BadToken(String),
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// The unit database failed.
    #[error("unit database: {0}")]
    Db(String),
    /// Heartbeats could not start.
    #[error("heartbeats: {0}")]
    Health(String),
}

/// Settings of the unit service on one node.
#[derive(Debug, Clone)]
pub struct UnitConfig {
    /// Where the unit database lives (DATA/unit).
    pub data_dir: PathBuf,
    /// Raft/TLS listen address.
    pub listen: SocketAddr,
    /// Address other members use, if not the listen address.
    pub advertise: Option<String>,
    /// This PM's addresses (None for the witness).
    pub pm: Option<PmAddresses>,
    /// Heartbeat timing.
    pub timing: LeaseTiming,
}

/// Called once this node has founded or joined a unit, before `init`/`join`
/// return: the daemon moves its records into the unit database there.
pub type MemberHook = Arc<
    dyn Fn(UnitDb) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync,
>;

/// The unit membership of this node.
pub struct UnitService {
    cfg: UnitConfig,
    db: RwLock<Option<UnitDb>>,
    health: Mutex<Option<(u64, Health)>>,
    hook: std::sync::Mutex<Option<MemberHook>>,
}

fn db_err(e: impl std::fmt::Display) -> UnitError {
    UnitError::Db(e.to_string())
}

impl UnitService {
    /// Opens the service; re-joins the unit if this node was a member.
    pub async fn open(cfg: UnitConfig) -> Result<Arc<UnitService>, UnitError> {
        let svc = Arc::new(UnitService {
            cfg,
            db: RwLock::new(None),
            health: Mutex::new(None),
            hook: std::sync::Mutex::new(None),
        });
        if svc.cfg.data_dir.join("tls").exists() {
            let id_file = svc.cfg.data_dir.join("node-id");
            let id: u64 = std::fs::read_to_string(&id_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| {
                    UnitError::Db(format!(
                        "{} is missing or unreadable although this node has a unit identity",
                        id_file.display()
                    ))
                })?;
            let db = UnitDb::open(svc.db_config(id)).await.map_err(db_err)?;
            *svc.db.write().await = Some(db);
        }
        svc.clone().spawn_watcher();
        Ok(svc)
    }

    fn db_config(&self, node_id: u64) -> Config {
        let mut c = Config::new(node_id, &self.cfg.data_dir, self.cfg.listen);
        c.advertise = self.cfg.advertise.clone();
        c.role = if self.cfg.pm.is_some() {
            NodeRole::Pm
        } else {
            NodeRole::Witness
        };
        c
    }

    /// The unit database, when this node is a member.
    pub async fn db(&self) -> Option<UnitDb> {
        self.db.read().await.clone()
    }

    /// This PM's addresses (None on the witness).
    pub fn pm(&self) -> Option<&PmAddresses> {
        self.cfg.pm.as_ref()
    }

    /// Heartbeat timing.
    pub fn timing(&self) -> LeaseTiming {
        self.cfg.timing
    }

    /// The partner's health, once heartbeats run.
    pub async fn health(&self) -> Option<HealthStatus> {
        self.health.lock().await.as_ref().map(|(_, h)| h.status())
    }

    /// [`UnitService::pms_of`], failing on a read or decode error instead
    /// of answering "none" (for decisions where "no partner" must be
    /// known, not assumed).
    pub fn try_pms_of(db: &UnitDb) -> Result<Vec<PmRecord>, String> {
        db.list(PMS_TABLE)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(k, r)| {
                r.decode::<PmRecord>()
                    .map_err(|e| format!("PM record {k}: {e}"))
            })
            .collect()
    }

    /// The PM records of the unit (from this node's applied state).
    pub fn pms_of(db: &UnitDb) -> Vec<PmRecord> {
        db.list(PMS_TABLE)
            .map(|l| {
                l.into_iter()
                    .filter_map(|(_, r)| r.decode::<PmRecord>().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The unit secret (hex) shared by heartbeats and replication.
    pub fn secret_of(db: &UnitDb) -> Option<String> {
        db.get(UNIT_TABLE, "secret")
            .ok()
            .flatten()
            .and_then(|r| r.value.as_str().map(str::to_string))
    }

    /// Sets the hook run when this node founds or joins a unit.
    pub fn set_member_hook(&self, hook: MemberHook) {
        *self.hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    async fn run_hook(&self, db: &UnitDb) {
        let hook = self.hook.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(h) = hook {
            h(db.clone()).await;
        }
    }

    async fn record_self(&self, db: &UnitDb) -> Result<(), UnitError> {
        std::fs::write(self.cfg.data_dir.join("node-id"), db.node_id().to_string())
            .map_err(|e| UnitError::Db(format!("cannot record the node id: {e}")))?;
        if let Some(pm) = &self.cfg.pm {
            let rec = PmRecord {
                node_id: db.node_id(),
                addrs: pm.clone(),
            };
            let batch = Batch::new()
                .put_json(PMS_TABLE, &db.node_id().to_string(), &rec)
                .map_err(db_err)?;
            db.write(batch).await.map_err(db_err)?;
        }
        Ok(())
    }

    /// `unit init`: this PM founds a unit named `name` (node id 1).
    pub async fn init(&self, name: &str) -> Result<UnitView, UnitError> {
        pairvisor_model::names::validate_name("unit", name)
            .map_err(|e| UnitError::Invalid(e.to_string()))?;
        if self.cfg.pm.is_none() {
            return Err(UnitError::Invalid(
                "a witness cannot found a unit; run `unit init` on a PM".into(),
            ));
        }
        let mut guard = self.db.write().await;
        if let Some(db) = guard.as_ref() {
            return Err(UnitError::AlreadyMember(db.unit_name().to_string()));
        }
        let db = UnitDb::init(self.db_config(1), name)
            .await
            .map_err(db_err)?;
        // The heartbeat secret, shared through the (TLS-protected) log.
        let secret: [u8; 32] = rand::random();
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        db.write(Batch::new().put(UNIT_TABLE, "secret", serde_json::json!(hex)))
            .await
            .map_err(db_err)?;
        self.record_self(&db).await?;
        *guard = Some(db.clone());
        drop(guard);
        self.run_hook(&db).await;
        Ok(self.view().await)
    }

    /// Issues a one-time join token for the next PM or the witness.
    pub async fn join_token(&self, witness: bool, ttl: Duration) -> Result<String, UnitError> {
        let db = self.db().await.ok_or(UnitError::NotMember)?;
        let m = db.metrics();
        let next = m.members.iter().map(|m| m.id).max().unwrap_or(0) + 1;
        if m.members.len() >= 3 {
            return Err(UnitError::Invalid(
                "the unit already has two PMs and a witness".into(),
            ));
        }
        let role = if witness {
            NodeRole::Witness
        } else {
            NodeRole::Pm
        };
        let token = db
            .create_join_token(next, role, ttl)
            .await
            .map_err(db_err)?;
        Ok(token.to_string())
    }

    /// `unit join` / `witness --join`: joins the unit named by `token`.
    pub async fn join(&self, token: &str) -> Result<UnitView, UnitError> {
        let token: JoinToken = token
            .trim()
            .parse()
            .map_err(|e: pairvisor_unitdb::TlsError| UnitError::BadToken(e.to_string()))?;
        let is_pm = self.cfg.pm.is_some();
        if is_pm != (token.role == NodeRole::Pm) {
            return Err(UnitError::BadToken(format!(
                "the token is for a {:?}, but this node is a {}",
                token.role,
                if is_pm { "PM" } else { "witness" }
            )));
        }
        let mut guard = self.db.write().await;
        if let Some(db) = guard.as_ref() {
            return Err(UnitError::AlreadyMember(db.unit_name().to_string()));
        }
        let db = UnitDb::join(&token, self.db_config(token.node_id))
            .await
            .map_err(db_err)?;
        self.record_self(&db).await?;
        *guard = Some(db.clone());
        drop(guard);
        self.run_hook(&db).await;
        Ok(self.view().await)
    }

    /// The unit as this node sees it.
    pub async fn view(&self) -> UnitView {
        let Some(db) = self.db().await else {
            return UnitView {
                name: None,
                node_id: None,
                metrics: None,
                pms: vec![],
                health: None,
            };
        };
        let pms = db
            .list(PMS_TABLE)
            .map(|l| {
                l.into_iter()
                    .filter_map(|(_, r)| r.decode::<PmRecord>().ok())
                    .collect()
            })
            .unwrap_or_default();
        let health = self.health.lock().await.as_ref().map(|(_, h)| h.status());
        UnitView {
            name: Some(db.unit_name().to_string()),
            node_id: Some(db.node_id()),
            metrics: Some(db.metrics()),
            pms,
            health,
        }
    }

    /// Starts heartbeats to the partner once both PMs are recorded.
    fn spawn_watcher(self: Arc<Self>) {
        // Weak: the watcher must not keep a shut-down service (and its
        // database files) alive.
        let weak = Arc::downgrade(&self);
        drop(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let Some(svc) = weak.upgrade() else { return };
                if let Err(e) = svc.ensure_health().await {
                    tracing::warn!("{e}");
                }
            }
        });
    }

    async fn ensure_health(&self) -> Result<(), UnitError> {
        let (Some(db), Some(me)) = (self.db().await, self.cfg.pm.as_ref()) else {
            return Ok(());
        };
        let pms: Vec<PmRecord> = db
            .list(PMS_TABLE)
            .map_err(db_err)?
            .into_iter()
            .filter_map(|(_, r)| r.decode().ok())
            .collect();
        // Restarted with another address or API certificate: tell the unit
        // (best effort; retried on the next tick while there is no quorum).
        if pms
            .iter()
            .any(|p| p.node_id == db.node_id() && p.addrs != *me)
        {
            if let Err(e) = self.record_self(&db).await {
                tracing::debug!("updating this PM's record: {e}");
            }
        }
        let Some(partner) = pms.iter().find(|p| p.node_id != db.node_id()) else {
            return Ok(());
        };
        let mut h = self.health.lock().await;
        if h.as_ref().is_some_and(|(id, _)| *id == partner.node_id) {
            return Ok(());
        }
        let secret = db
            .get(UNIT_TABLE, "secret")
            .map_err(db_err)?
            .and_then(|r| r.value.as_str().map(str::to_string))
            .ok_or_else(|| UnitError::Health("the unit has no heartbeat secret yet".into()))?;
        let parse = |s: &str| {
            s.parse::<SocketAddr>()
                .map_err(|_| UnitError::Invalid(format!("'{s}' is not an address:port")))
        };
        let links = vec![
            LinkConfig {
                name: "private".into(),
                bind: parse(&me.private_hb)?,
                peer: parse(&partner.addrs.private_hb)?,
            },
            LinkConfig {
                name: "business".into(),
                bind: parse(&me.business_hb)?,
                peer: parse(&partner.addrs.business_hb)?,
            },
        ];
        let health = Health::start(HealthConfig {
            node_id: db.node_id(),
            partner_node_id: Some(partner.node_id),
            secret: secret.into_bytes(),
            links,
            timing: self.cfg.timing,
        })
        .await
        .map_err(|e| UnitError::Health(e.to_string()))?;
        tracing::info!(partner = %partner.addrs.name, "heartbeats started on the private and business links");
        *h = Some((partner.node_id, health));
        Ok(())
    }

    /// Injects faults on a heartbeat link (for the loopback lab).
    pub async fn set_link_faults(
        &self,
        link: &str,
        f: crate::health::Faults,
    ) -> Result<(), UnitError> {
        let h = self.health.lock().await;
        let (_, health) = h
            .as_ref()
            .ok_or_else(|| UnitError::Health("no partner yet".into()))?;
        health
            .set_faults(link, f)
            .map_err(|e| UnitError::Invalid(e.to_string()))
    }

    /// Stops the unit database (daemon shutdown).
    pub async fn shutdown(&self) {
        self.health.lock().await.take();
        if let Some(db) = self.db.write().await.take() {
            db.shutdown().await;
        }
    }
}

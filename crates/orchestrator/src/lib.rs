//! The orchestrator: what turns one PM's agent into half of a unit.
//!
//! - [`join_agent`] moves the PM's records into the unit database (seeding it
//!   when this PM founded the unit), gives the agent its [`UnitLink`] (PM
//!   name, partner, replication addresses, unit secret, lease) and starts the
//!   failover loop.
//! - [`failover`] watches the partner (heartbeats on two links), fences it
//!   through the unit database when it is lost, waits until its lease has
//!   certainly expired, and then takes its VMs and volumes over (SPEC U6;
//!   docs/fencing.md).

pub mod failover;
pub mod maintenance;
pub mod unitstore;

use pairvisor_agent::{Agent, PartnerLink, UnitLink, UnitTls};
use pairvisor_unit::{LeaseKeeper, UnitService};
use pairvisor_unitdb::{Batch, UnitDb};
use std::sync::Arc;
use thiserror::Error;
use tracing::info;

/// Why the agent could not be joined to the unit.
#[derive(Debug, Error)]
pub enum OrchestratorError {
    /// This node is not a PM (the witness has no agent).
    #[error("this node is not a PM")]
    NotPm,
    /// The unit database refused or failed.
    #[error("unit database: {0}")]
    Db(String),
    /// The local store failed.
    #[error("local state database: {0}")]
    Store(#[from] pairvisor_store::StoreError),
}

/// The host part of `host:port`.
fn host_of(addr: &str) -> String {
    match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_string(),
        None => addr.to_string(),
    }
}

/// The agent's view of the unit, backed by the unit database and the lease.
pub struct PmLink {
    db: UnitDb,
    timing: pairvisor_model::fencing::LeaseTiming,
    name: String,
    repl_host: String,
    secret: Vec<u8>,
    lease: Arc<LeaseKeeper>,
}

impl UnitLink for PmLink {
    fn pm_name(&self) -> String {
        self.name.clone()
    }

    fn partner(&self) -> Option<PartnerLink> {
        self.partner_checked().ok().flatten()
    }

    fn repl_host(&self) -> String {
        self.repl_host.clone()
    }

    fn mirror_secret(&self) -> Vec<u8> {
        self.secret.clone()
    }

    fn holds_lease(&self) -> bool {
        self.lease.holds()
    }

    fn lease_remaining(&self) -> Option<std::time::Duration> {
        self.lease.expires_in()
    }

    fn unit_tls(&self) -> UnitTls {
        let p = self.db.node_pem();
        UnitTls {
            ca_cert: p.ca_cert,
            cert: p.cert,
            key: p.key,
        }
    }

    fn fence_key(&self) -> (String, String) {
        (
            pairvisor_unitdb::FENCES_TABLE.to_string(),
            self.db.node_id().to_string(),
        )
    }

    fn partner_fence_key(&self) -> Option<(String, String)> {
        UnitService::pms_of(&self.db)
            .into_iter()
            .find(|p| p.node_id != self.db.node_id())
            .map(|p| {
                (
                    pairvisor_unitdb::FENCES_TABLE.to_string(),
                    p.node_id.to_string(),
                )
            })
    }

    fn partner_checked(&self) -> Result<Option<PartnerLink>, String> {
        UnitService::try_pms_of(&self.db).map(|pms| {
            pms.into_iter()
                .find(|p| p.node_id != self.db.node_id())
                .map(|p| PartnerLink {
                    name: p.addrs.name.clone(),
                    repl_host: host_of(&p.addrs.private_hb),
                    tls_name: pairvisor_unitdb::node_name(p.node_id),
                })
        })
    }

    fn lease_term(&self) -> u64 {
        self.lease.term()
    }

    fn partner_fenced_long_enough(&self) -> bool {
        let Some(partner) = UnitService::pms_of(&self.db)
            .into_iter()
            .find(|p| p.node_id != self.db.node_id())
        else {
            return false;
        };
        // The fence's time is the fencing PM's wall clock; the wait is
        // lease + drift margin, as in the failover.
        let Ok(Some(f)) = self.db.fence_of(partner.node_id) else {
            return false;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        now >= f.at_ms + self.timing.worst_case_takeover_ms()
    }

    fn read_barrier(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            self.db
                .linearizable()
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

/// A running orchestrator (keeps the lease and the failover loop alive).
pub struct Orchestrator {
    /// This PM's lease.
    pub lease: Arc<LeaseKeeper>,
    failover: tokio::task::AbortHandle,
    maintenance: tokio::task::AbortHandle,
    watchdog: tokio::task::AbortHandle,
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        self.failover.abort();
        self.maintenance.abort();
        self.watchdog.abort();
    }
}

/// Makes the unit database the home of `store`'s records. The founding PM's
/// records become the unit's; a joining PM adopts the unit's (the API
/// refuses a join while the PM has VMs or volumes).
pub async fn attach_store(
    store: &pairvisor_store::Store,
    db: UnitDb,
) -> Result<(), OrchestratorError> {
    if store.is_replicated() {
        return Ok(());
    }
    let users = db
        .list(<pairvisor_store::UserRecord as pairvisor_store::Record>::TABLE)
        .map_err(|e| OrchestratorError::Db(e.to_string()))?;
    if users.is_empty() {
        let mut batch = Batch::new();
        for (table, key, value) in store.export_local()? {
            batch = batch.put(&table, &key, value);
        }
        db.write(batch)
            .await
            .map_err(|e| OrchestratorError::Db(e.to_string()))?;
        info!("the unit database now holds this PM's records");
    }
    store.attach(Arc::new(unitstore::UnitStore::new(db)));
    Ok(())
}

/// Joins `agent` to the unit whose database is `db` (see the module doc).
pub async fn join_agent(
    agent: &Agent,
    svc: &Arc<UnitService>,
    db: UnitDb,
) -> Result<Arc<Orchestrator>, OrchestratorError> {
    let pm = svc.pm().ok_or(OrchestratorError::NotPm)?.clone();
    attach_store(agent.store(), db.clone()).await?;
    // A PM that has just joined may not have applied the founder's secret
    // yet: catch up with the leader (read barrier) and look again, for a
    // bounded time, before giving up.
    let mut secret = UnitService::secret_of(&db);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while secret.is_none() && tokio::time::Instant::now() < deadline {
        let _ = db.linearizable().await;
        secret = UnitService::secret_of(&db);
        if secret.is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    let secret = secret.ok_or_else(|| {
        OrchestratorError::Db("the unit has no secret yet (not replicated here within 30 s)".into())
    })?;
    let timing = svc.timing();
    let lease = Arc::new(LeaseKeeper::start(db.clone(), timing));
    // The watchdog kills this PM's VMs if the lease ends while the daemon
    // cannot (hung, dead): it must know every deadline before anything
    // relies on it.
    let run_dir = agent.paths().root().join("run");
    match pairvisor_unit::watchdog::Publisher::open(&run_dir) {
        Ok(p) => lease.publish_to(p),
        Err(e) => tracing::error!(
            "cannot publish the lease deadline in {}: {e}; a hung daemon's VMs would not be \
             stopped by the watchdog",
            run_dir.display()
        ),
    }
    let watchdog = tokio::spawn(keep_watchdog(run_dir)).abort_handle();
    // Give the first lease rounds a chance before the agent decides about
    // VMs still running from before a daemon restart: without a lease it
    // would stop them.
    let mut w = lease.watch();
    let _ = tokio::time::timeout(
        std::time::Duration::from_millis(timing.detection_ms()),
        w.wait_for(|held| *held),
    )
    .await;
    let link = Arc::new(PmLink {
        db: db.clone(),
        timing,
        name: pm.name.clone(),
        repl_host: host_of(&pm.private_hb),
        secret: secret.into_bytes(),
        lease: lease.clone(),
    });
    agent.set_unit(link).await;
    let failover =
        tokio::spawn(failover::run(agent.clone(), svc.clone(), db, lease.clone())).abort_handle();
    let maintenance = tokio::spawn(maintenance::run(agent.clone(), svc.clone())).abort_handle();
    info!(pm = %pm.name, "agent joined to the unit");
    Ok(Arc::new(Orchestrator {
        lease,
        failover,
        maintenance,
        watchdog,
    }))
}

/// Keeps a watchdog process running for `run_dir` (started again if it
/// died; one per data directory, so a running one is left alone). It runs
/// in its own session, so that it outlives a daemon restart.
async fn keep_watchdog(run_dir: std::path::PathBuf) {
    let data_dir = run_dir
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    loop {
        if !pairvisor_unit::watchdog::running(&run_dir) {
            match spawn_watchdog(&data_dir) {
                Ok(pid) => info!(pid, "lease watchdog started"),
                Err(e) => tracing::error!("cannot start the lease watchdog: {e}"),
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

fn spawn_watchdog(data_dir: &std::path::Path) -> std::io::Result<u32> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data_dir.join("watchdog.log"))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("watchdog")
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and only detaches the child from
    // the daemon's session (a signal to the daemon's group spares it).
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    // Reaped in the background: the watchdog outlives this task.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_of_strips_the_port() {
        assert_eq!(host_of("10.1.1.1:7482"), "10.1.1.1");
        assert_eq!(host_of("[::1]:7482"), "::1");
        assert_eq!(host_of("pm-a"), "pm-a");
    }
}

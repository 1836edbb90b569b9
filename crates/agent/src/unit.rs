//! The agent inside a unit (SPEC S1, U6): every volume is a mirror between
//! the two PMs, VMs run on the PM their record names (`host`), and the local
//! replica of each volume is primary or secondary as the unit database says
//! (`VolumeRecord::mirror`). This module reconciles the local replicas with
//! those records and serves each primary to QEMU over an NBD Unix socket.
//!
//! The unit layer itself (membership, heartbeats, leases, failover
//! decisions) lives outside the agent and is reached through [`UnitLink`].

use crate::{Agent, AgentError, Result};
use pairvisor_mirror::nbd::server::NbdServer;
use pairvisor_mirror::volume::LinkState;
use pairvisor_mirror::{CreateOptions, Replica, Role, Status, Volume, VolumeOptions};
use pairvisor_store::{MirrorRecord, StorageGroupRecord, VmRecord, VolumeRecord};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use tokio::task::AbortHandle;
use tracing::{info, warn};

/// The partner PM, as the agent needs to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartnerLink {
    /// Its PM name.
    pub name: String,
    /// Host (IP) of its replication listeners, on the private link.
    pub repl_host: String,
    /// The name its unit certificate carries (checked by the migration
    /// stream's TLS).
    pub tls_name: String,
}

/// This PM's unit certificate, key and the unit CA (PEM), for QEMU's
/// migration stream: PM-to-PM memory traffic is encrypted and both ends
/// prove they belong to the unit.
#[derive(Clone)]
pub struct UnitTls {
    /// The unit CA certificate.
    pub ca_cert: String,
    /// This PM's certificate.
    pub cert: String,
    /// This PM's private key.
    pub key: String,
}

impl std::fmt::Debug for UnitTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UnitTls { key: <redacted>, .. }")
    }
}

/// What the agent needs from the unit layer.
pub trait UnitLink: Send + Sync {
    /// This PM's name.
    fn pm_name(&self) -> String;
    /// The partner, once it has joined.
    fn partner(&self) -> Option<PartnerLink>;
    /// This PM's replication listen host (its private-link IP).
    fn repl_host(&self) -> String;
    /// The unit secret authenticating replication.
    fn mirror_secret(&self) -> Vec<u8>;
    /// Whether this PM holds its lease from the unit's majority (SPEC U6):
    /// without it, degraded writes are held and VMs must not run.
    fn holds_lease(&self) -> bool;
    /// How long the lease still runs (None: not held).
    fn lease_remaining(&self) -> Option<std::time::Duration>;
    /// This PM's unit certificate for the migration stream.
    fn unit_tls(&self) -> UnitTls;
    /// The unit database table and key whose presence means "this PM is
    /// fenced" (a precondition of the outdate-peer commit).
    fn fence_key(&self) -> (String, String);
    /// The key whose presence means "the partner is fenced".
    fn partner_fence_key(&self) -> Option<(String, String)>;
    /// The partner, or an error when the unit database cannot say (never
    /// "no partner" by mistake).
    fn partner_checked(&self) -> std::result::Result<Option<PartnerLink>, String>;
    /// This PM's lease term (see `LeaseKeeper::term`): a read barrier holds
    /// only for the term it was passed in.
    fn lease_term(&self) -> u64;
    /// Whether the partner is fenced and its lease has certainly expired
    /// (lease + drift margin since the fence), so that nothing of it can
    /// still run or write.
    fn partner_fenced_long_enough(&self) -> bool;
    /// A read barrier: returns once this PM has applied every change the
    /// unit committed before the call.
    fn read_barrier(
        &self,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = std::result::Result<(), String>> + Send + '_>,
    >;
}

/// A PM whose lease has not been renewed for this long before its expiry
/// stops its VMs, so that they are gone before the lease ends and long
/// before the partner may start them (lease + drift margin after fencing).
const STOP_BEFORE_EXPIRY: std::time::Duration = std::time::Duration::from_millis(1500);

/// First replication port; each volume gets its own, unique in the unit.
const FIRST_REPL_PORT: u16 = 7700;

/// One open local replica.
pub(crate) struct OpenMirror {
    pub(crate) vol: Arc<Volume>,
    pub(crate) socket: PathBuf,
    port: u16,
    tasks: Vec<AbortHandle>,
}

impl Drop for OpenMirror {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The local replicas of this PM.
#[derive(Default)]
pub(crate) struct Mirrors {
    open: StdMutex<HashMap<String, Arc<OpenMirror>>>,
}

/// A volume's replica state on this PM, for views.
#[derive(Debug, Clone)]
pub struct LocalReplica {
    /// The mirror's own status (role, link, resync, generation ids).
    pub status: Status,
}

impl Agent {
    /// The unit link, when this PM is in a unit.
    pub(crate) fn unit(&self) -> Option<Arc<dyn UnitLink>> {
        self.inner
            .unit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether this PM holds its lease (always true outside a unit).
    pub fn holds_lease(&self) -> bool {
        self.unit().is_none_or(|u| u.holds_lease())
    }

    /// This PM's name when it is in a unit.
    pub fn pm_name(&self) -> Option<String> {
        self.unit().map(|u| u.pm_name())
    }

    /// Joins the agent to a unit: from now on volumes are mirrors and only
    /// VMs hosted here run here. Starts the reconciler and re-attaches to (or
    /// restarts) this PM's VMs.
    pub async fn set_unit(&self, link: Arc<dyn UnitLink>) {
        *self.inner.unit.lock().unwrap_or_else(|e| e.into_inner()) = Some(link);
        self.reconcile_mirrors().await;
        // Two loops, so that a slow reconciliation never delays stopping VMs
        // when the lease runs out (200 ms: well within STOP_BEFORE_EXPIRY).
        self.every(200, |agent| async move { agent.enforce_lease().await });
        self.every(500, |agent| async move {
            agent.catch_up().await;
            agent.reconcile_mirrors().await;
            agent.clear_outdated_marks().await;
            agent.reconcile_split_brains().await;
            agent.stop_foreign_vms().await;
            agent.serve_incoming_migrations().await;
            agent.check_redundancy_alerts();
            let healthy = agent
                .unit()
                .and_then(|u| u.lease_remaining())
                .is_some_and(|r| r > STOP_BEFORE_EXPIRY * 2);
            if healthy && agent.is_caught_up() && agent.may_start_vms_here() {
                agent.ensure_running().await;
            }
        });
        self.recover().await;
    }

    /// Whether this PM may act on its records (promote, start VMs): outside
    /// a unit always; in a unit once it passed a read barrier since it last
    /// held no lease.
    pub(crate) fn is_caught_up(&self) -> bool {
        let Some(u) = self.unit() else { return true };
        // Passed in this very lease term: a lease lost and regained between
        // two ticks needs a new barrier.
        u.holds_lease()
            && self
                .inner
                .caught_up_term
                .load(std::sync::atomic::Ordering::SeqCst)
                == u.lease_term() + 1
    }

    /// After (re)gaining the lease: a read barrier, so that a PM that was
    /// fenced or partitioned acts only on the unit's current records (a
    /// takeover it missed, a new epoch).
    async fn catch_up(&self) {
        let Some(u) = self.unit() else { return };
        if !u.holds_lease() || self.is_caught_up() {
            return;
        }
        let term = u.lease_term();
        match u.read_barrier().await {
            Ok(()) => {
                info!(
                    term,
                    "caught up with the unit database: replicas and VMs may start here"
                );
                self.inner
                    .caught_up_term
                    .store(term + 1, std::sync::atomic::Ordering::SeqCst);
            }
            Err(e) => warn!("cannot catch up with the unit database yet: {e}"),
        }
    }

    /// Runs `f` every `ms` milliseconds for as long as the agent lives.
    fn every<F, Fut>(&self, ms: u64, f: F)
    where
        F: Fn(Agent) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(ms));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                f(Agent { inner }).await;
            }
        });
    }

    /// Whether `rec` runs (or would start) on this PM.
    pub(crate) fn is_mine(&self, rec: &VmRecord) -> bool {
        match self.unit() {
            None => true,
            Some(u) => rec.host.as_deref().is_none_or(|h| h == u.pm_name()),
        }
    }

    /// Refuses an operation on a VM hosted by the other PM.
    pub(crate) fn check_mine(&self, rec: &VmRecord) -> Result<()> {
        if self.is_mine(rec) {
            return Ok(());
        }
        Err(AgentError::Conflict(format!(
            "VM '{}' is hosted by PM {}; send the request to that PM (or migrate the VM)",
            rec.name,
            rec.host.as_deref().unwrap_or("?")
        )))
    }

    /// A new volume's mirror record: primary here, epoch 1, a free port.
    pub(crate) fn new_mirror_record(&self, existing: &[VolumeRecord]) -> Option<MirrorRecord> {
        let u = self.unit()?;
        let port = existing
            .iter()
            .filter_map(|v| v.mirror.as_ref().map(|m| m.port))
            .max()
            .map_or(FIRST_REPL_PORT, |p| p.saturating_add(1));
        Some(MirrorRecord {
            primary: u.pm_name(),
            epoch: 1,
            port,
            outdated: None,
            accept_loss: false,
            keep: None,
        })
    }

    /// Where this PM keeps its replica of `v`. The default group resolves
    /// to this PM's own storage directory (its record holds the founding
    /// PM's path); other groups keep a per-PM sub-directory so that two PMs
    /// sharing a file system (the lab) never share a replica.
    pub(crate) fn replica_dir(&self, v: &VolumeRecord) -> Result<PathBuf> {
        let g: StorageGroupRecord = self.load("storage group", &v.group)?;
        let me = self.pm_name().unwrap_or_default();
        let base = if g.name == "default" {
            self.paths().default_storage()
        } else {
            Path::new(&g.path).join(me)
        };
        Ok(base.join(format!("{}.mirror", v.name)))
    }

    /// The NBD socket serving the local primary replica of `volume`.
    pub(crate) fn nbd_socket(&self, volume: &str) -> Option<PathBuf> {
        self.inner
            .mirrors
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(volume)
            .map(|m| m.socket.clone())
    }

    /// The local replica of `volume`, if open.
    pub(crate) fn local_mirror(&self, volume: &str) -> Option<Arc<OpenMirror>> {
        self.inner
            .mirrors
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(volume)
            .cloned()
    }

    /// The local replica's status of `volume`.
    pub fn replica_status(&self, volume: &str) -> Option<LocalReplica> {
        self.local_mirror(volume).map(|m| LocalReplica {
            status: m.vol.status(),
        })
    }

    /// Makes the local replicas match the unit database: opens missing ones,
    /// promotes/demotes, points primaries at the partner, closes deleted
    /// volumes' replicas.
    pub async fn reconcile_mirrors(&self) {
        let Some(u) = self.unit() else { return };
        let _g = self.inner.mirror_ops.lock().await;
        let Ok(volumes) = self.store().list::<VolumeRecord>() else {
            return;
        };
        let me = u.pm_name();
        let partner = u.partner();
        // S2: the configured resync rate, applied live (a running resync
        // reads it for every piece it sends).
        let rate = self
            .store()
            .settings()
            .map(|s| s.resync_rate_mbps.saturating_mul(1_000_000))
            .unwrap_or(0);
        for v in &volumes {
            let Some(m) = &v.mirror else { continue };
            let open = match self.local_mirror(&v.name) {
                Some(o) => o,
                None => match self.open_mirror(v, m, u.as_ref()).await {
                    Ok(o) => o,
                    Err(e) => {
                        warn!(volume = %v.name, "cannot open the local replica: {e}");
                        continue;
                    }
                },
            };
            open.vol.set_resync_rate(rate);
            if m.primary == me {
                if open.vol.role() != Role::Primary || open.vol.replica().meta().epoch != m.epoch {
                    if !self.is_caught_up() {
                        continue;
                    }
                    // Never promote a replica recorded as behind, whatever
                    // path made this PM primary, unless the administrator
                    // accepted the loss.
                    if m.outdated.as_ref().is_some_and(|o| o.pm == me) && !m.accept_loss {
                        warn!(volume = %v.name, "not promoting the local replica: it is outdated");
                        continue;
                    }
                    let r = if open.vol.replica().meta().epoch == m.epoch {
                        open.vol.resume_primary(m.epoch)
                    } else {
                        open.vol.promote(m.epoch, m.accept_loss).await
                    };
                    if r.is_ok() && m.accept_loss {
                        self.accepted_loss_done(&v.name, m.epoch);
                    }
                    match r {
                        Ok(()) => info!(volume = %v.name, epoch = m.epoch, "replica is primary"),
                        Err(e) => {
                            warn!(volume = %v.name, "cannot make the replica primary: {e}");
                            continue;
                        }
                    }
                }
                let want = partner
                    .as_ref()
                    .map(|p| format!("{}:{}", p.repl_host, m.port));
                if open.vol.status().partner != want {
                    open.vol.set_partner(want);
                }
            } else if open.vol.role() == Role::Primary {
                info!(volume = %v.name, primary = %m.primary, "demoting the local replica");
                open.vol.demote();
            }
        }
        // Replicas of deleted volumes.
        let gone: Vec<String> = {
            let open = self
                .inner
                .mirrors
                .open
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            open.keys()
                .filter(|k| !volumes.iter().any(|v| &v.name == *k && v.mirror.is_some()))
                .cloned()
                .collect()
        };
        for name in gone {
            let m = self
                .inner
                .mirrors
                .open
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name);
            if let Some(m) = m {
                let dir = m.vol.replica().dir().to_path_buf();
                drop(m);
                // Let the aborted tasks release the replica before removing it.
                tokio::task::yield_now().await;
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    warn!(dir = %dir.display(), "could not delete a deleted volume's replica: {e}");
                }
            }
        }
    }

    async fn open_mirror(
        &self,
        v: &VolumeRecord,
        m: &MirrorRecord,
        u: &dyn UnitLink,
    ) -> Result<Arc<OpenMirror>> {
        let dir = self.replica_dir(v)?;
        let opts = CreateOptions {
            volume_id: v.name.clone(),
            size: v.size_bytes,
            region_size: pairvisor_mirror::replica::DEFAULT_REGION_SIZE,
            initial_gen: None,
        };
        let d = dir.clone();
        let replica = tokio::task::spawn_blocking(move || Replica::open_or_create(&d, &opts))
            .await
            .map_err(|e| AgentError::Hypervisor(e.to_string()))?
            .map_err(|e| AgentError::Invalid(format!("replica {}: {e}", dir.display())))?;
        let vol = Volume::start(
            replica,
            VolumeOptions {
                secret: u.mirror_secret(),
                ..Default::default()
            },
        );
        let unit = self.unit();
        vol.set_degraded_predicate(Arc::new(move || {
            unit.as_ref().is_some_and(|u| u.holds_lease())
        }));
        let weak = Arc::downgrade(&self.inner);
        let name = v.name.clone();
        vol.set_peer_outdater(Arc::new(move |epoch| {
            let (weak, name) = (weak.clone(), name.clone());
            Box::pin(async move {
                let inner = weak.upgrade().ok_or("the agent is shutting down")?;
                Agent { inner }
                    .outdate_partner(&name, epoch)
                    .map_err(|e| e.to_string())
            })
        }));
        let mut tasks = Vec::new();
        let addr = format!("{}:{}", u.repl_host(), m.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(AgentError::io(format!("replication listener on {addr}")))?;
        tasks.push(tokio::spawn(vol.clone().serve_replication(listener)).abort_handle());
        let socket = self
            .paths()
            .root()
            .join("run")
            .join(format!("nbd-{}.sock", v.name));
        if let Some(p) = socket.parent() {
            std::fs::create_dir_all(p)
                .map_err(AgentError::io(format!("creating {}", p.display())))?;
        }
        let _ = std::fs::remove_file(&socket);
        let nbd = tokio::net::UnixListener::bind(&socket)
            .map_err(AgentError::io(format!("NBD socket {}", socket.display())))?;
        tasks.push(
            tokio::spawn(NbdServer::new(vol.clone(), v.name.clone()).serve_unix(nbd))
                .abort_handle(),
        );
        info!(volume = %v.name, replica = %dir.display(), listen = %addr, "local replica open");
        let open = Arc::new(OpenMirror {
            vol,
            socket,
            port: m.port,
            tasks,
        });
        self.inner
            .mirrors
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(v.name.clone(), open.clone());
        Ok(open)
    }

    /// Port of the local replica's listener (for views and checks).
    pub fn replica_port(&self, volume: &str) -> Option<u16> {
        self.local_mirror(volume).map(|m| m.port)
    }

    /// SPEC U6: a PM without its lease must not run VMs. Kills this PM's
    /// QEMU processes (their records keep the state they had, so they start
    /// again here when the lease comes back, or on the partner after a
    /// takeover).
    async fn enforce_lease(&self) {
        let Some(u) = self.unit() else { return };
        if u.lease_remaining().is_some_and(|r| r > STOP_BEFORE_EXPIRY) {
            return;
        }
        let running: Vec<(String, Arc<crate::Running>)> = self
            .inner
            .running
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        for (name, run) in running {
            warn!(vm = %name, "this PM lost its lease: stopping the VM (its I/O is frozen)");
            *run.intent.lock().unwrap_or_else(|e| e.into_inner()) = crate::Intent::Fenced;
            // SIGKILL, not `quit`: QEMU would first drain the guest's
            // in-flight writes, which are held without a lease.
            let _ = run.qemu.kill();
            let _ = run.qemu.wait_exit(std::time::Duration::from_secs(5)).await;
            self.forget(&name);
        }
    }
}

impl Agent {
    /// Starts this PM's VMs that should run but have no process here: after
    /// a takeover (their host changed to this PM), after the lease came
    /// back, or after a daemon restart that found QEMU gone. Only called
    /// while the lease is held.
    pub(crate) async fn ensure_running(&self) {
        let Ok(vms) = self.store().list::<VmRecord>() else {
            return;
        };
        for rec in vms {
            let wants = matches!(
                rec.state,
                pairvisor_model::vm::VmState::Booting
                    | pairvisor_model::vm::VmState::Running
                    | pairvisor_model::vm::VmState::Crashed
            );
            if !wants
                || !self.is_mine(&rec)
                || self.running(&rec.name).is_some()
                || self.incoming(&rec.name)
                || self.migrating(&rec.name)
            {
                continue;
            }
            let _g = self.inner.ops.lock().await;
            let Ok(mut rec) = self.load_vm(&rec.name) else {
                continue;
            };
            if !self.is_mine(&rec) || self.running(&rec.name).is_some() {
                continue;
            }
            // Every volume must be primary here (the reconciler promotes
            // them once the unit database says so).
            let ready = rec.volumes().all(|v| {
                self.local_mirror(v)
                    .is_some_and(|m| m.vol.role() == Role::Primary)
            });
            if !ready {
                continue;
            }
            let started = std::time::SystemTime::now();
            match self.relaunch(&mut rec, "started on this PM").await {
                Ok(()) => info!(vm = %rec.name, at = ?started, "VM started on this PM"),
                Err(e) => warn!(vm = %rec.name, "cannot start the VM on this PM: {e}"),
            }
        }
    }
}

/// What a takeover changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Takeover {
    /// VMs now hosted here.
    pub vms: Vec<String>,
    /// Volumes whose replica here is now primary (with a new epoch).
    pub volumes: Vec<String>,
}

impl Agent {
    /// After the partner is fenced and its lease has expired: in one
    /// transaction, this PM becomes host of the partner's VMs and primary
    /// of its volumes, each with a new epoch (so that the partner's stale
    /// primary can never complete a write). The reconciler then promotes the
    /// replicas and [`Agent::ensure_running`] starts the VMs that were
    /// running.
    pub fn take_over_from(&self, partner: &str) -> Result<Takeover> {
        let me = self
            .pm_name()
            .ok_or_else(|| AgentError::Conflict("this PM is not in a unit".into()))?;
        // Only what can be promoted without losing an acknowledged write;
        // the outdated marks are checked again inside the transaction (they
        // are its preconditions), the local replicas' state just before.
        let plan = self.takeover_plan(partner)?;
        let outdated_here = |tx: &mut pairvisor_store::Tx<'_>, vol: &str| {
            tx.get::<VolumeRecord>(vol).map(|v| {
                v.and_then(|v| v.mirror)
                    .and_then(|m| m.outdated)
                    .is_some_and(|o| o.pm == me)
            })
        };
        let t = self.store().write(|tx| {
            let mut t = Takeover::default();
            for name in &plan.vms {
                let Some(vm) = tx.get::<VmRecord>(name)? else {
                    continue;
                };
                if vm.host.as_deref() != Some(partner) {
                    continue;
                }
                let mut marked = false;
                for v in vm.volumes() {
                    marked |= outdated_here(tx, v)?;
                }
                if marked {
                    continue;
                }
                hand_vm_to(tx, &vm.name, &me)?;
                t.vms.push(vm.name.clone());
                t.volumes.extend(vm.volumes().cloned());
            }
            for name in &plan.volumes {
                let Some(mut v) = tx.get::<VolumeRecord>(name)? else {
                    continue;
                };
                if let Some(m) = v.mirror.as_mut().filter(|m| {
                    m.primary == partner && m.outdated.as_ref().is_none_or(|o| o.pm != me)
                }) {
                    m.primary = me.clone();
                    m.epoch += 1;
                    m.accept_loss = false;
                    t.volumes.push(v.name.clone());
                    tx.put(&v)?;
                }
            }
            Ok::<_, AgentError>(t)
        })?;
        if !t.vms.is_empty() || !t.volumes.is_empty() {
            self.raise_alert(
                "pm-failed",
                &format!("pm/{partner}"),
                crate::Severity::Critical,
                format!(
                    "PM {partner} stopped answering on every link and was fenced; {me} took over \
                     its VMs ({}) and volumes ({})",
                    list_or_dash(&t.vms),
                    list_or_dash(&t.volumes)
                ),
                "Repair or restart the failed PM; when it is back, its replicas resync \
                 automatically and the VMs run redundantly again",
            );
        }
        Ok(t)
    }

    /// U4: counts a failure of `pm` (the failover fenced it after it went
    /// silent, whether or not it hosted anything then); 3 within an hour
    /// take it out of service until Reset Device.
    pub fn record_pm_failure(&self, pm: &str) {
        let threshold = pairvisor_model::mtbf::MtbfThreshold::PM_DEFAULT;
        let r = self.store().write(|tx| {
            let mut r = tx.get::<pairvisor_store::PmStateRecord>(pm)?.unwrap_or(
                pairvisor_store::PmStateRecord {
                    name: pm.to_string(),
                    state: pairvisor_model::pm::PmState::Running,
                    progress: None,
                    failures: Default::default(),
                    updated_at: 0,
                },
            );
            let critical = r.failures.record(crate::now(), threshold);
            if critical {
                r.state = pairvisor_model::pm::PmState::PoweredOffTooManyFailures;
            }
            r.updated_at = crate::now();
            tx.put(&r)?;
            Ok::<_, AgentError>(critical)
        });
        if let Ok(true) = r {
            self.raise_alert(
                "pm-mtbf",
                &format!("pm/{pm}"),
                crate::Severity::Critical,
                format!(
                    "PM {pm} failed {} or more times within {} s: it is out of service. Its VMs \
                     run on the partner where their replicas there are complete; a VM whose \
                     newest data is only on {pm} stays down until {pm} is back in service",
                    // Out of service above max_failures: the count that did it.
                    threshold.max_failures + 1,
                    threshold.window_secs
                ),
                "Repair the PM, then Reset Device on it to put it back in service (`pairvisor \
                 pm reset-device PM`, or the console)",
            );
        }
    }

    /// U4 Reset Device: clears a PM's failure counter and puts it back in
    /// service.
    pub fn reset_pm(&self, pm: &str) -> Result<()> {
        let state = self.pm_state(pm);
        pairvisor_model::pm::check_pm_operation(
            pm,
            pairvisor_model::pm::PmOperation::ResetDevice,
            pairvisor_model::pm::PmContext {
                state,
                partner: None,
                running_vms: 0,
                resync_from_here: None,
                confirmed: true,
            },
        )
        .map_err(|e| AgentError::Conflict(e.to_string()))?;
        self.store().write(|tx| {
            if let Some(mut r) = tx.get::<pairvisor_store::PmStateRecord>(pm)? {
                r.failures = Default::default();
                r.state = pairvisor_model::pm::PmState::Running;
                r.updated_at = crate::now();
                tx.put(&r)?;
            }
            Ok::<_, AgentError>(())
        })?;
        self.clear_alert("pm-mtbf", &format!("pm/{pm}"));
        Ok(())
    }

    /// How many VMs and primary volumes `pm` holds.
    pub fn hosted_by(&self, pm: &str) -> Result<(usize, usize)> {
        let vms = self
            .store()
            .list::<VmRecord>()?
            .iter()
            .filter(|v| v.host.as_deref() == Some(pm))
            .count();
        let vols = self
            .store()
            .list::<VolumeRecord>()?
            .iter()
            .filter(|v| v.mirror.as_ref().is_some_and(|m| m.primary == pm))
            .count();
        Ok((vms, vols))
    }
}

fn list_or_dash(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// One word (or short phrase) for a replica's state, for lists.
pub(crate) fn sync_word(s: &Status) -> String {
    match &s.link {
        LinkState::InSync => "in_sync".into(),
        LinkState::Standalone => "simplex".into(),
        LinkState::Connecting { .. } if s.degraded => "degraded".into(),
        LinkState::Connecting { .. } => "connecting".into(),
        LinkState::Resyncing => match &s.resync {
            Some(r) if r.total_regions > 0 => format!(
                "resyncing {}%",
                r.done_regions * 100 / r.total_regions.max(1)
            ),
            _ => "resyncing".into(),
        },
        LinkState::SplitBrain { .. } => "split_brain".into(),
        LinkState::Waiting => "secondary (waiting for the primary)".into(),
        LinkState::Replicating { .. } if !s.consistent => "secondary (being resynced)".into(),
        LinkState::Replicating { .. } => "secondary (replicating)".into(),
    }
}

/// One local replica, as shown before forcing quorum (SPEC U6: "after being
/// shown which PM holds the most recent data").
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ReplicaReport {
    /// Volume.
    pub volume: String,
    /// The PM the unit database names as primary.
    pub recorded_primary: String,
    /// The epoch the unit database records.
    pub recorded_epoch: u64,
    /// This replica's role.
    pub role: String,
    /// Highest epoch this replica has seen.
    pub epoch: u64,
    /// Its link state, in a word.
    pub sync: String,
    /// Not in the middle of a resync (its data is a complete image).
    pub consistent: bool,
    /// Generation identifiers (current and history), to compare with the
    /// partner's.
    #[schema(value_type = Object)]
    pub generations: serde_json::Value,
    /// What this means for this volume.
    pub verdict: String,
}

impl Agent {
    /// This PM's replicas with what they hold (see [`ReplicaReport`]).
    pub fn replica_report(&self) -> Result<Vec<ReplicaReport>> {
        let me = self.pm_name().unwrap_or_default();
        let mut out = Vec::new();
        for v in self.store().list::<VolumeRecord>()? {
            let Some(m) = &v.mirror else { continue };
            let Some(open) = self.local_mirror(&v.name) else {
                out.push(ReplicaReport {
                    volume: v.name.clone(),
                    recorded_primary: m.primary.clone(),
                    recorded_epoch: m.epoch,
                    role: "absent".into(),
                    epoch: 0,
                    sync: "not open on this PM".into(),
                    consistent: false,
                    generations: serde_json::Value::Null,
                    verdict:
                        "this PM has no replica of the volume: the partner holds its only copy"
                            .into(),
                });
                continue;
            };
            let st = open.vol.status();
            let verdict = if let Some(o) = m.outdated.as_ref().filter(|o| o.pm == me) {
                format!(
                    "OUTDATED here: {} acknowledged writes without this replica after {}; \
                     promoting it loses them",
                    o.by,
                    crate::types::iso_time(o.since)
                )
            } else if !st.consistent {
                "INCOMPLETE here (a resync into this replica was interrupted): the partner holds \
                 the newest data; forcing quorum here would start from an inconsistent image"
                    .to_string()
            } else if m.primary == me {
                "newest here: this PM was the primary".to_string()
            } else if matches!(st.link, LinkState::Replicating { .. }) || st.dirty_regions == 0 {
                format!(
                    "complete here: every write {} acknowledged while connected is on this \
                     replica; writes {} made alone after the link broke (if any) would be lost",
                    m.primary, m.primary
                )
            } else {
                format!(
                    "possibly behind: {} may have written alone after the link broke",
                    m.primary
                )
            };
            out.push(ReplicaReport {
                volume: v.name.clone(),
                recorded_primary: m.primary.clone(),
                recorded_epoch: m.epoch,
                role: match st.role {
                    Role::Primary => "primary".into(),
                    Role::Secondary => "secondary".into(),
                },
                epoch: st.epoch,
                sync: sync_word(&st),
                consistent: st.consistent,
                generations: serde_json::to_value(&st.gen).unwrap_or_default(),
                verdict,
            });
        }
        Ok(out)
    }
}

impl Agent {
    /// A PM's maintenance state (running when never recorded).
    pub fn pm_state(&self, pm: &str) -> pairvisor_model::pm::PmState {
        self.store()
            .get::<pairvisor_store::PmStateRecord>(pm)
            .ok()
            .flatten()
            .map(|r| r.state)
            .unwrap_or(pairvisor_model::pm::PmState::Running)
    }

    /// Records a PM's maintenance state (and what it is doing).
    pub fn set_pm_state(
        &self,
        pm: &str,
        state: pairvisor_model::pm::PmState,
        progress: Option<String>,
    ) -> Result<()> {
        self.store().write(|tx| {
            let mut r = tx.get::<pairvisor_store::PmStateRecord>(pm)?.unwrap_or(
                pairvisor_store::PmStateRecord {
                    name: pm.to_string(),
                    state,
                    progress: None,
                    failures: Default::default(),
                    updated_at: 0,
                },
            );
            r.state = state;
            r.progress = progress.clone();
            r.updated_at = crate::now();
            tx.put(&r)
        })?;
        Ok(())
    }

    /// The unit's power state.
    pub fn unit_power(&self) -> pairvisor_store::UnitStateRecord {
        self.store()
            .get::<pairvisor_store::UnitStateRecord>("unit")
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// Whether this PM may start VMs now: in service and the unit not
    /// shutting down.
    pub(crate) fn may_start_vms_here(&self) -> bool {
        let Some(me) = self.pm_name() else {
            return true;
        };
        self.pm_state(&me).can_host_vms()
            && self.unit_power().power == pairvisor_store::UnitPower::Running
    }

    /// SPEC L2: sets (or clears) a VM's preferred PM.
    pub fn set_preferred_pm(&self, vm: &str, pm: Option<String>) -> Result<crate::VmView> {
        let u = self
            .unit()
            .ok_or_else(|| AgentError::Conflict("this PM is not in a unit".into()))?;
        if let Some(p) = &pm {
            let known = *p == u.pm_name() || u.partner().is_some_and(|x| x.name == *p);
            if !known {
                return Err(AgentError::Invalid(format!(
                    "'{p}' is not a PM of this unit; allowed: {}{}",
                    u.pm_name(),
                    u.partner()
                        .map(|x| format!(", {}", x.name))
                        .unwrap_or_default()
                )));
            }
        }
        self.store().write(|tx| {
            let mut r: VmRecord = tx.get(vm)?.ok_or_else(|| AgentError::NotFound {
                kind: "VM",
                name: vm.to_string(),
            })?;
            r.preferred_pm = pm.clone();
            tx.put(&r).map_err(AgentError::from)
        })?;
        self.get_vm(vm)
    }

    /// VMs hosted here that are running (names).
    pub fn running_here(&self) -> Vec<String> {
        self.inner
            .running
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Why `vm` is not fully redundant (None when it is, or outside a
    /// unit): a volume not mirrored, not in sync, or the partner absent.
    pub(crate) fn redundancy_gap(&self, vm: &VmRecord) -> Option<String> {
        let u = self.unit()?;
        let mut gaps = Vec::new();
        for v in vm.volumes() {
            let rec = self.store().get::<VolumeRecord>(v).ok().flatten();
            if rec.as_ref().is_some_and(|r| r.mirror.is_none()) {
                gaps.push(format!("volume {v} is not mirrored"));
                continue;
            }
            match self.local_mirror(v).map(|m| m.vol.status()) {
                None => gaps.push(format!("volume {v}: no replica open on this PM")),
                Some(st) => match &st.link {
                    LinkState::InSync => {}
                    LinkState::Replicating { .. } if st.consistent => {}
                    _ => gaps.push(format!("volume {v} is {}", sync_word(&st))),
                },
            }
        }
        if u.partner().is_none() {
            gaps.push("the unit has no second PM".into());
        }
        (!gaps.is_empty()).then(|| {
            format!(
                "not fully redundant: {}; a failure of this PM now would stop the VM",
                gaps.join("; ")
            )
        })
    }

    /// Raises or clears the "not redundant" alert of this PM's running VMs
    /// (only on a change, so that the unit database is not rewritten every
    /// tick).
    pub(crate) fn check_redundancy_alerts(&self) {
        let Ok(vms) = self.store().list::<VmRecord>() else {
            return;
        };
        for vm in vms
            .iter()
            .filter(|v| self.is_mine(v) && v.state.has_process())
        {
            let gap = self.redundancy_gap(vm);
            let subject = format!("vm/{}", vm.name);
            let mut seen = self
                .inner
                .redundancy
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if seen.get(&vm.name) == Some(&gap) {
                continue;
            }
            seen.insert(vm.name.clone(), gap.clone());
            drop(seen);
            match gap {
                Some(why) => self.raise_alert(
                    "not-redundant",
                    &subject,
                    crate::Severity::Warning,
                    format!("VM {} is {why}", vm.name),
                    "Wait for the resync to finish, or bring the partner PM back",
                ),
                None => self.clear_alert("not-redundant", &subject),
            }
        }
    }

    /// Whether every volume of `vm` is in sync with the partner (the VM is
    /// fully redundant and may move).
    pub fn vm_redundant(&self, vm: &VmRecord) -> bool {
        vm.volumes().all(|v| {
            self.local_mirror(v)
                .is_some_and(|m| m.vol.status().link == LinkState::InSync)
        })
    }

    /// Whether a resync from this PM's replicas is running (SPEC U3: do not
    /// power off its source), with the least progress in percent.
    pub fn resync_from_here(&self) -> Option<u8> {
        let open = self
            .inner
            .mirrors
            .open
            .lock()
            .map(|m| m.values().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        open.iter()
            .filter_map(|m| {
                let st = m.vol.status();
                (st.role == Role::Primary && st.link == LinkState::Resyncing).then(|| {
                    st.resync
                        .map(|r| (r.done_regions * 100 / r.total_regions.max(1)) as u8)
                        .unwrap_or(0)
                })
            })
            .min()
    }
}

/// In a transaction: `vm` is hosted by `to`, and each of its mirrored
/// volumes gets `to` as primary with a new epoch (so that the old primary
/// can never complete a write again). False when the VM does not exist.
pub(crate) fn hand_vm_to(
    tx: &mut pairvisor_store::Tx<'_>,
    vm: &str,
    to: &str,
) -> std::result::Result<bool, pairvisor_store::StoreError> {
    let Some(mut rec) = tx.get::<VmRecord>(vm)? else {
        return Ok(false);
    };
    rec.host = Some(to.to_string());
    for v in rec.volumes() {
        if let Some(mut vol) = tx.get::<VolumeRecord>(v)? {
            if let Some(m) = vol.mirror.as_mut().filter(|m| m.primary != to) {
                m.primary = to.to_string();
                m.epoch += 1;
                m.accept_loss = false;
                tx.put(&vol)?;
            }
        }
    }
    tx.put(&rec)?;
    Ok(true)
}

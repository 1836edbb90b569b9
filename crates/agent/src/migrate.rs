//! Live migration between the two PMs of a unit (SPEC M1–M4; ARCHITECTURE
//! "Live migration").
//!
//! A migration is a workflow record in the unit database
//! ([`MigrationRecord`]); each PM acts on the phases that concern it:
//!
//! 1. The source checks the VM and its volumes (every replica in sync),
//!    measures the guest's dirty rate (M4 pre-flight) and writes `prepare`.
//! 2. The destination starts a paused QEMU (`-S`, `-incoming defer`) on its
//!    local replicas (secondaries: QEMU does not write before it runs) and
//!    writes `ready`.
//! 3. The source migrates with `pause-before-switchover`; progress, the M2
//!    figures and the convergence verdict are kept for `GET migration`.
//! 4. At `pre-switchover` the source guest is stopped and its writes
//!    flushed. In one transaction the VM's host and every volume's primary
//!    become the destination, with new epochs; the source demotes its
//!    replicas and lets QEMU send the device state.
//! 5. The destination promotes its replicas as soon as it sees the new
//!    records, and resumes the guest once QEMU has received everything and
//!    every replica is primary. The downtime reported is paused-on-source
//!    to resumed-on-destination, so it includes the hand-over.

use crate::unit::OpenMirror;
use crate::{Agent, AgentError, Intent, Result};
use pairvisor_hypervisor::migration::{
    MigrationCaps, MigrationParams, MigrationStatus, TlsEndpoint,
};
use pairvisor_hypervisor::QemuVm;
use pairvisor_mirror::volume::LinkState;
use pairvisor_mirror::Role;
use pairvisor_model::migration::{
    self as model, MigrationFigures, PostCopyPolicy, Remedy, Verdict,
};
use pairvisor_model::vm::{VmEvent, VmState};
use pairvisor_store::{MigrationPhase, MigrationRecord, VolumeRecord};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;
use tracing::{info, warn};
use utoipa::ToSchema;

/// First TCP port of migration streams on the destination.
const FIRST_MIGRATION_PORT: u16 = 7600;
/// How long the destination may take to get ready.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of `vm migrate`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Maximum downtime at switch-over, ms (default: the unit setting, 300).
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
    /// Bandwidth cap, MB/s (default: the unit setting; 0 = unlimited).
    #[serde(default)]
    pub bandwidth_mbps: Option<u64>,
    /// Throttle the guest's vCPUs if it dirties memory too fast (M3).
    #[serde(default)]
    pub auto_converge: bool,
}

/// A remedy for a migration that does not converge (M3).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemedyRequest {
    /// `raise_downtime`, `auto_converge`, `post_copy` or `pause_and_finish`.
    #[schema(value_type = String)]
    pub remedy: Remedy,
    /// For `raise_downtime`: the new maximum, ms (default: what the current
    /// figures need, plus 20 %).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
}

/// A migration as shown to the administrator (M2).
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct MigrationView {
    /// The VM.
    pub vm: String,
    /// This migration's id.
    pub id: String,
    /// Source PM.
    pub source: String,
    /// Destination PM.
    pub dest: String,
    /// Workflow phase: prepare, ready, copying, switchover, done, failed.
    pub phase: String,
    /// QEMU's migration status, while it runs.
    pub status: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// Seconds since it started.
    pub elapsed_secs: f64,
    /// Guest RAM, bytes.
    pub ram_total_bytes: u64,
    /// RAM bytes sent.
    pub ram_transferred_bytes: u64,
    /// RAM bytes still to send.
    pub ram_remaining_bytes: u64,
    /// Transfer rate, bytes/s.
    pub bandwidth_bps: f64,
    /// The guest's dirty rate used for the verdict, bytes/s (the larger of
    /// QEMU's live figure and the pre-flight measurement).
    pub dirty_rate_bps: f64,
    /// The pre-flight measurement (M4), bytes/s.
    pub preflight_dirty_rate_bps: Option<f64>,
    /// Passes over memory so far.
    pub passes: u64,
    /// Guest vCPU throttle by auto-converge, percent.
    pub cpu_throttle_percent: u64,
    /// Maximum downtime allowed, ms.
    pub max_downtime_ms: u64,
    /// QEMU's expected downtime if it switched over now, ms.
    pub expected_downtime_ms: Option<u64>,
    /// The M2 verdict, with the numbers.
    #[schema(value_type = Object)]
    pub verdict: Option<Verdict>,
    /// Remedies that apply now (M3).
    pub remedies: Vec<String>,
    /// Measured downtime (paused on the source → resumed on the
    /// destination, including the disk hand-over), ms.
    pub downtime_ms: Option<u64>,
    /// QEMU's own downtime figure, ms.
    pub qemu_downtime_ms: Option<u64>,
    /// Total time, ms.
    pub total_ms: Option<u64>,
    /// The memory stream runs over TLS with the PMs' unit certificates.
    pub encrypted: bool,
}

/// Live state of the migrations this PM drives (source side).
#[derive(Default)]
pub(crate) struct Migrations {
    views: StdMutex<HashMap<String, MigrationView>>,
    /// Destination QEMUs being filled, not yet adopted.
    incoming: StdMutex<HashMap<String, Arc<QemuVm>>>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn phase_word(p: MigrationPhase) -> String {
    serde_json::to_value(p)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn status_word(s: &MigrationStatus) -> String {
    match s {
        MigrationStatus::None => "none".into(),
        MigrationStatus::Setup => "setup".into(),
        MigrationStatus::Active => "active".into(),
        MigrationStatus::PostcopyActive => "postcopy-active".into(),
        MigrationStatus::PreSwitchover => "pre-switchover".into(),
        MigrationStatus::Device => "device".into(),
        MigrationStatus::Completed => "completed".into(),
        MigrationStatus::Failed => "failed".into(),
        MigrationStatus::Cancelled => "cancelled".into(),
        MigrationStatus::Cancelling => "cancelling".into(),
        MigrationStatus::Other(o) => o.clone(),
    }
}

/// QEMU's id of the migration stream's TLS credentials.
const MIGRATION_TLS: &str = "pv-migration-tls";

impl Agent {
    /// Puts QEMU's migration stream under TLS with this PM's unit
    /// certificate: the VM's memory crosses between the PMs encrypted, and
    /// each end checks that the other holds a certificate of the unit CA
    /// (the source also checks the destination's name). QEMU reads the
    /// files when the object is created; they are removed right after, so
    /// the key does not linger in the run directory.
    /// True when TLS was set up (always, in a unit).
    async fn migration_tls(&self, q: &QemuVm, vm_id: &str, end: TlsEndpoint) -> Result<bool> {
        let Some(unit) = self.unit() else {
            return Ok(false);
        };
        let partner = unit.partner().ok_or_else(|| {
            AgentError::Conflict("the unit has no partner PM to migrate with".into())
        })?;
        let tls = unit.unit_tls();
        let dir = self.inner.paths.vm_run_dir(vm_id).join("migration-tls");
        let side = end.qemu_name();
        let write = |name: &str, data: &str, mode: u32| -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(dir.join(name))?;
            f.write_all(data.as_bytes())
        };
        let files = (|| {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            write("ca-cert.pem", &tls.ca_cert, 0o644)?;
            write(&format!("{side}-cert.pem"), &tls.cert, 0o644)?;
            write(&format!("{side}-key.pem"), &tls.key, 0o600)
        })();
        let added = match files {
            Ok(()) => {
                crate::bounded("migration TLS", q.add_tls_creds(MIGRATION_TLS, &dir, end)).await
            }
            Err(source) => Err(AgentError::Io {
                context: format!("writing the migration TLS files in {}", dir.display()),
                source,
            }),
        };
        let _ = std::fs::remove_dir_all(&dir);
        added?;
        crate::bounded(
            "migration TLS parameters",
            q.set_migration_params(MigrationParams {
                tls_creds: Some(MIGRATION_TLS.into()),
                tls_hostname: (end == TlsEndpoint::Client).then_some(partner.tls_name),
                ..Default::default()
            }),
        )
        .await?;
        Ok(true)
    }

    fn migration_record(&self, vm: &str) -> Result<Option<MigrationRecord>> {
        Ok(self.store().get::<MigrationRecord>(vm)?)
    }

    /// Whether `vm` is being migrated (its record is in a live phase).
    pub(crate) fn migrating(&self, vm: &str) -> bool {
        self.migration_record(vm)
            .ok()
            .flatten()
            .is_some_and(|m| m.active())
    }

    /// The current (or last) migration of `vm`.
    pub fn migration(&self, vm: &str) -> Result<MigrationView> {
        self.load_vm(vm)?;
        let m = self
            .migration_record(vm)?
            .ok_or_else(|| AgentError::NotFound {
                kind: "migration of VM",
                name: vm.to_string(),
            })?;
        // The live view, when this PM drives the current migration (a view
        // of an older one is ignored).
        if let Some(v) = self
            .inner
            .migrations
            .views
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(vm)
            .filter(|v| v.id == m.id)
        {
            let mut v = v.clone();
            if v.phase != "done" && m.phase == MigrationPhase::Failed {
                v.phase = "failed".into();
                v.error = m.error.clone();
            }
            return Ok(v);
        }
        Ok(MigrationView {
            vm: m.vm.clone(),
            id: m.id.clone(),
            source: m.source.clone(),
            dest: m.dest.clone(),
            phase: phase_word(m.phase),
            error: m.error.clone(),
            max_downtime_ms: m.max_downtime_ms,
            downtime_ms: m.downtime_ms(),
            qemu_downtime_ms: m.qemu_downtime_ms,
            total_ms: m.total_ms,
            elapsed_secs: now_ms().saturating_sub(m.started_at_ms) as f64 / 1000.0,
            ..Default::default()
        })
    }

    fn set_view(&self, vm: &str, f: impl FnOnce(&mut MigrationView)) {
        let mut views = self
            .inner
            .migrations
            .views
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        f(views.entry(vm.to_string()).or_default());
    }

    fn put_migration(&self, rec: &MigrationRecord) -> Result<()> {
        self.store().write(|tx| tx.put(rec))?;
        Ok(())
    }

    /// `vm migrate`: checks, then drives the migration in the background
    /// (follow it with [`Agent::migration`]).
    pub async fn migrate(&self, name: &str, req: MigrateRequest) -> Result<MigrationView> {
        let u = self.unit().ok_or_else(|| {
            AgentError::Conflict(
                "this PM is not in a unit: there is no partner to migrate to".into(),
            )
        })?;
        let partner = u.partner().ok_or_else(|| {
            AgentError::Conflict("the unit has no second PM yet: join one with `unit join`".into())
        })?;
        let pstate = self.pm_state(&partner.name);
        if !pstate.can_host_vms() {
            return Err(AgentError::Conflict(format!(
                "PM {} is {pstate}: it cannot take VMs; Finalize it first",
                partner.name
            )));
        }
        let _g = self.inner.ops.lock().await;
        let rec = self.load_vm_here(name)?;
        pairvisor_model::vm::check_operation(
            name,
            rec.state,
            pairvisor_model::vm::Operation::Migrate,
        )?;
        if rec.state != VmState::Running {
            return Err(AgentError::Conflict(format!(
                "VM '{name}' is {}; only a running VM is live-migrated (a stopped VM starts \
                 wherever it is hosted)",
                rec.state
            )));
        }
        if self.migrating(name) {
            return Err(AgentError::Conflict(format!(
                "VM '{name}' is already being migrated; follow it with `vm migration {name}` or \
                 cancel it"
            )));
        }
        if !u.holds_lease() {
            return Err(AgentError::Conflict(
                "this PM does not hold its lease (it cannot reach a majority of the unit); \
                 migrations are refused until it does"
                    .into(),
            ));
        }
        for v in rec.volumes() {
            let vol: VolumeRecord = self.load("volume", v)?;
            if vol.mirror.is_none() {
                return Err(AgentError::Conflict(format!(
                    "volume '{v}' is not mirrored (it predates the unit), so the partner has no \
                     copy of it; the VM cannot move"
                )));
            }
            let m = self.local_mirror(v).ok_or_else(|| {
                AgentError::Conflict(format!("the replica of volume '{v}' is not open here"))
            })?;
            let st = m.vol.status();
            if st.link != LinkState::InSync {
                return Err(AgentError::Conflict(format!(
                    "volume '{v}' is not in sync with {} ({}): the partner's copy is not \
                     complete; wait until it is in sync and retry",
                    partner.name,
                    crate::unit::sync_word(&st)
                )));
            }
        }
        let settings = self.settings()?;
        let run = self.running(name).ok_or_else(|| crate::no_process(name))?;
        // M4 pre-flight: the guest's dirty rate over one second.
        let preflight = crate::bounded("dirty-rate measurement", run.qemu.measure_dirty_rate(1))
            .await
            .ok()
            .map(|d| d.bytes_per_sec);
        let used: Vec<u16> = self
            .store()
            .list::<MigrationRecord>()?
            .iter()
            .filter(|m| m.active())
            .filter_map(|m| m.listen.rsplit_once(':').and_then(|(_, p)| p.parse().ok()))
            .collect();
        let port = (FIRST_MIGRATION_PORT..FIRST_MIGRATION_PORT + 100)
            .find(|p| !used.contains(p))
            .unwrap_or(FIRST_MIGRATION_PORT);
        let mrec = MigrationRecord {
            vm: name.to_string(),
            id: uuid::Uuid::new_v4().to_string(),
            source: u.pm_name(),
            dest: partner.name.clone(),
            listen: format!("{}:{port}", partner.repl_host),
            phase: MigrationPhase::Prepare,
            error: None,
            max_downtime_ms: req
                .max_downtime_ms
                .unwrap_or(settings.migration_max_downtime_ms)
                .max(1),
            bandwidth_bps: req
                .bandwidth_mbps
                .unwrap_or(settings.migration_bandwidth_mbps)
                * 1_000_000,
            auto_converge: req.auto_converge,
            post_copy: settings.migration_post_copy_allowed,
            started_at_ms: now_ms(),
            paused_at_ms: None,
            resumed_at_ms: None,
            qemu_downtime_ms: None,
            completed_at_ms: None,
            guest_paused_at_ms: None,
            total_ms: None,
        };
        self.put_migration(&mrec)?;
        let view = MigrationView {
            vm: name.to_string(),
            id: mrec.id.clone(),
            source: mrec.source.clone(),
            dest: mrec.dest.clone(),
            phase: "prepare".into(),
            max_downtime_ms: mrec.max_downtime_ms,
            preflight_dirty_rate_bps: preflight,
            ..Default::default()
        };
        self.set_view(name, |v| *v = view.clone());
        info!(vm = name, dest = %mrec.dest, "live migration started");
        let agent = self.clone();
        let qemu = run.clone();
        tokio::spawn(async move {
            let name = mrec.vm.clone();
            if let Err(e) = agent.drive_source(mrec.clone(), qemu, preflight).await {
                warn!(vm = %name, "migration failed: {e}");
                agent.fail_migration(&name, &e.to_string());
            }
        });
        Ok(view)
    }

    fn fail_migration(&self, vm: &str, why: &str) {
        let r = self.store().write(|tx| {
            if let Some(mut m) = tx.get::<MigrationRecord>(vm)? {
                if m.active() {
                    m.phase = MigrationPhase::Failed;
                    m.error = Some(why.to_string());
                    tx.put(&m)?;
                }
            }
            Ok::<_, AgentError>(())
        });
        if let Err(e) = r {
            warn!(vm, "cannot record the migration failure: {e}");
        }
        self.set_view(vm, |v| {
            v.phase = "failed".into();
            v.error = Some(why.to_string());
        });
    }

    async fn wait_phase(
        &self,
        vm: &str,
        id: &str,
        timeout: Duration,
        done: impl Fn(MigrationPhase) -> bool,
    ) -> Result<MigrationRecord> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.migration_record(vm)? {
                Some(m) if m.id == id && m.phase == MigrationPhase::Failed => {
                    return Err(AgentError::Conflict(
                        m.error.unwrap_or_else(|| "the migration failed".into()),
                    ))
                }
                Some(m) if m.id == id && done(m.phase) => return Ok(m),
                Some(m) if m.id != id => {
                    return Err(AgentError::Conflict("the migration was replaced".into()))
                }
                _ => {}
            }
            if tokio::time::Instant::now() > deadline {
                return Err(AgentError::Conflict(format!(
                    "the destination did not answer within {} s",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn drive_source(
        &self,
        mrec: MigrationRecord,
        run: Arc<crate::Running>,
        preflight: Option<f64>,
    ) -> Result<()> {
        let name = mrec.vm.clone();
        let q = &run.qemu;
        self.wait_phase(&name, &mrec.id, PREPARE_TIMEOUT, |p| {
            p == MigrationPhase::Ready
        })
        .await?;
        crate::bounded(
            "migration capabilities",
            q.set_migration_caps(MigrationCaps {
                auto_converge: mrec.auto_converge,
                postcopy_ram: mrec.post_copy,
                pause_before_switchover: true,
            }),
        )
        .await?;
        crate::bounded(
            "migration parameters",
            q.set_migration_params(MigrationParams {
                max_bandwidth_bps: (mrec.bandwidth_bps > 0).then_some(mrec.bandwidth_bps),
                downtime_limit_ms: Some(mrec.max_downtime_ms),
                ..Default::default()
            }),
        )
        .await?;
        let vm_id = self.load_vm(&name)?.id;
        if self.migration_tls(q, &vm_id, TlsEndpoint::Client).await? {
            self.set_view(&name, |v| v.encrypted = true);
        }
        crate::bounded("migrate", q.migrate(&format!("tcp:{}", mrec.listen))).await?;
        self.store().write(|tx| {
            if let Some(mut m) = tx.get::<MigrationRecord>(&name)? {
                m.phase = MigrationPhase::Copying;
                tx.put(&m)?;
            }
            Ok::<_, AgentError>(())
        })?;
        let started = tokio::time::Instant::now();
        let mut handed_over = false;
        let mut refused: Option<String> = None;
        loop {
            let p = crate::bounded("query-migrate", q.query_migrate()).await?;
            let max_downtime = self
                .inner
                .migrations
                .views
                .lock()
                .ok()
                .and_then(|v| v.get(&name).map(|v| v.max_downtime_ms))
                .unwrap_or(mrec.max_downtime_ms);
            let dirty =
                model::effective_dirty_rate_bps(p.dirty_pages_rate as f64, p.page_size, preflight);
            let figures = MigrationFigures {
                remaining_bytes: p.remaining,
                bandwidth_bps: p.bandwidth_bps,
                dirty_pages_per_sec: dirty / p.page_size.max(1) as f64,
                page_size: p.page_size,
                max_downtime_ms: max_downtime,
            };
            let verdict =
                (p.status == MigrationStatus::Active).then(|| model::convergence(figures));
            let remedies = match &verdict {
                Some(Verdict::NotConverging { .. }) => {
                    let mut r = vec!["raise_downtime".to_string()];
                    if mrec.auto_converge {
                        r.push("auto_converge (already on)".into());
                    }
                    if mrec.post_copy {
                        r.push("post_copy".into());
                    }
                    r.push("pause_and_finish".into());
                    r
                }
                _ => vec![],
            };
            self.set_view(&name, |v| {
                v.phase = if handed_over { "switchover" } else { "copying" }.into();
                v.status = Some(status_word(&p.status));
                v.elapsed_secs = started.elapsed().as_secs_f64();
                v.ram_total_bytes = p.total;
                v.ram_transferred_bytes = p.transferred;
                v.ram_remaining_bytes = p.remaining;
                v.bandwidth_bps = p.bandwidth_bps;
                v.dirty_rate_bps = dirty;
                v.passes = p.dirty_sync_count;
                v.cpu_throttle_percent = p.cpu_throttle_percent;
                v.expected_downtime_ms = p.expected_downtime_ms;
                if verdict.is_some() {
                    v.verdict = verdict.clone();
                }
                v.remedies = remedies.clone();
            });
            match p.status {
                MigrationStatus::PreSwitchover if !handed_over && refused.is_none() => {
                    // The source guest is stopped: every volume must be in
                    // sync with nothing held, or the destination's replica
                    // may miss acknowledged writes (the link can die during
                    // the migration). Otherwise cancel; the source resumes.
                    if let Err(why) = self.handover_ready(&mrec.vm) {
                        warn!(vm = %name, "cancelling the migration at switch-over: {why}");
                        refused = Some(why);
                        crate::bounded("migrate_cancel", q.migrate_cancel()).await?;
                        continue;
                    }
                    self.hand_over(&mrec).await?;
                    handed_over = true;
                    crate::bounded("migrate-continue", q.migrate_continue()).await?;
                }
                MigrationStatus::Completed => {
                    let completed = now_ms();
                    let qemu_downtime = p.downtime_ms;
                    self.store().write(|tx| {
                        if let Some(mut m) = tx.get::<MigrationRecord>(&name)? {
                            m.qemu_downtime_ms = qemu_downtime;
                            m.completed_at_ms = Some(completed);
                            tx.put(&m)?;
                        }
                        Ok::<_, AgentError>(())
                    })?;
                    *run.intent.lock().unwrap_or_else(|e| e.into_inner()) = Intent::Migrated;
                    let _ = run.qemu.kill();
                    let _ = run.qemu.wait_exit(Duration::from_secs(10)).await;
                    self.forget(&name);
                    let done = self
                        .wait_phase(&name, &mrec.id, Duration::from_secs(60), |p| {
                            p == MigrationPhase::Done
                        })
                        .await?;
                    let total = started.elapsed().as_millis() as u64;
                    self.store().write(|tx| {
                        if let Some(mut m) = tx.get::<MigrationRecord>(&name)? {
                            m.total_ms = Some(total);
                            tx.put(&m)?;
                        }
                        Ok::<_, AgentError>(())
                    })?;
                    let done = MigrationRecord {
                        qemu_downtime_ms: qemu_downtime,
                        completed_at_ms: Some(completed),
                        ..done
                    };
                    self.set_view(&name, |v| {
                        v.phase = "done".into();
                        v.downtime_ms = done.downtime_ms();
                        v.qemu_downtime_ms = qemu_downtime;
                        v.total_ms = Some(total);
                        v.verdict = None;
                        v.remedies.clear();
                    });
                    info!(vm = %name, dest = %mrec.dest, downtime_ms = ?done.downtime_ms(), total_ms = total, "live migration done");
                    self.emit(
                        &name,
                        VmState::Running,
                        format!("migrated to {}", mrec.dest),
                    );
                    return Ok(());
                }
                MigrationStatus::Failed | MigrationStatus::Cancelled => {
                    let why = p.error.unwrap_or_else(|| status_word(&p.status));
                    if handed_over {
                        self.take_back(&mrec).await;
                    }
                    // The source guest runs on (QEMU resumes it itself
                    // before the switch-over); make sure it does.
                    let _ = crate::bounded("cont", q.cont()).await;
                    if let Some(r) = refused {
                        return Err(AgentError::Conflict(format!(
                            "migration cancelled at switch-over: {r}; the VM runs on here"
                        )));
                    }
                    return Err(AgentError::Conflict(format!("QEMU: {why}")));
                }
                _ => {}
            }
            // Fast polling: the switch-over waits for us.
            let pace = if handed_over || p.status == MigrationStatus::PreSwitchover {
                5
            } else {
                20
            };
            tokio::time::sleep(Duration::from_millis(pace)).await;
        }
    }

    /// Whether every volume of `vm` may be handed over now: in sync with the
    /// partner (the destination) and no write held.
    fn handover_ready(&self, vm: &str) -> std::result::Result<(), String> {
        let rec = self.load_vm(vm).map_err(|e| e.to_string())?;
        for v in rec.volumes() {
            let Some(m) = self.local_mirror(v) else {
                return Err(format!("volume {v} has no replica open here"));
            };
            let st = m.vol.status();
            if st.link != pairvisor_mirror::volume::LinkState::InSync || st.writes_held > 0 {
                return Err(format!(
                    "volume {v} is {} at switch-over, not in sync with the destination's replica",
                    crate::unit::sync_word(&st)
                ));
            }
        }
        Ok(())
    }

    /// The switch-over: the source guest is stopped and flushed; the host
    /// and every primary replica become the destination's, with new epochs,
    /// in one transaction, and the source replicas are demoted.
    async fn hand_over(&self, mrec: &MigrationRecord) -> Result<()> {
        let paused = now_ms();
        let dest = mrec.dest.clone();
        self.store().write(|tx| {
            if !crate::unit::hand_vm_to(tx, &mrec.vm, &dest)? {
                return Err(AgentError::NotFound {
                    kind: "VM",
                    name: mrec.vm.clone(),
                });
            }
            // Checked in sync just before with the guest stopped: neither
            // replica is behind.
            if let Some(vm) = tx.get::<pairvisor_store::VmRecord>(&mrec.vm)? {
                for n in vm.volumes() {
                    if let Some(mut v) = tx.get::<pairvisor_store::VolumeRecord>(n)? {
                        if let Some(m) = v.mirror.as_mut().filter(|m| m.outdated.is_some()) {
                            m.outdated = None;
                            tx.put(&v)?;
                        }
                    }
                }
            }
            if let Some(mut m) = tx.get::<MigrationRecord>(&mrec.vm)? {
                m.phase = MigrationPhase::Switchover;
                m.paused_at_ms = Some(paused);
                tx.put(&m)?;
            }
            Ok::<_, AgentError>(())
        })?;
        self.reconcile_mirrors().await;
        Ok(())
    }

    /// A migration failed after the hand-over: the source takes the VM
    /// and its volumes back (new epochs again).
    async fn take_back(&self, mrec: &MigrationRecord) {
        let me = mrec.source.clone();
        let r = self.store().write(|tx| {
            // The destination may have written alone after the hand-over
            // (and recorded this PM's replicas as outdated): then the VM
            // stays there rather than moving back onto a replica behind.
            if let Some(vm) = tx.get::<pairvisor_store::VmRecord>(&mrec.vm)? {
                for n in vm.volumes() {
                    let v = tx.get::<pairvisor_store::VolumeRecord>(n)?;
                    let o = v.and_then(|v| v.mirror).and_then(|m| m.outdated);
                    if o.is_some_and(|o| o.pm == me) {
                        return Err(AgentError::Conflict(format!(
                            "volume {n} on {me} is outdated: the VM stays on {}",
                            mrec.dest
                        )));
                    }
                }
            }
            crate::unit::hand_vm_to(tx, &mrec.vm, &me)?;
            Ok::<_, AgentError>(())
        });
        if let Err(e) = r {
            warn!(vm = %mrec.vm, "cannot take the VM back after a failed migration: {e}");
        }
        self.reconcile_mirrors().await;
    }

    /// Applies an M3 remedy to the running migration of `vm`.
    pub async fn migration_remedy(&self, vm: &str, req: RemedyRequest) -> Result<MigrationView> {
        let rec = self.load_vm_here(vm)?;
        let m = self
            .migration_record(vm)?
            .filter(|m| m.active())
            .ok_or_else(|| AgentError::Conflict(format!("VM '{vm}' is not being migrated")))?;
        let run = self.running(vm).ok_or_else(|| crate::no_process(vm))?;
        let q = &run.qemu;
        match req.remedy {
            Remedy::RaiseDowntime => {
                let p = crate::bounded("query-migrate", q.query_migrate()).await?;
                let needed = model::downtime_needed_ms(MigrationFigures {
                    remaining_bytes: p.remaining,
                    bandwidth_bps: p.bandwidth_bps,
                    dirty_pages_per_sec: p.dirty_pages_rate as f64,
                    page_size: p.page_size,
                    max_downtime_ms: m.max_downtime_ms,
                });
                let ms = match req.downtime_ms {
                    Some(ms) => ms,
                    None if needed.is_finite() => (needed * 1.2).ceil() as u64,
                    None => {
                        return Err(AgentError::Invalid(
                            "no bandwidth measured yet; give downtime_ms".into(),
                        ))
                    }
                };
                if !(1..=60_000).contains(&ms) {
                    return Err(AgentError::Invalid(format!(
                        "downtime_ms = {ms} is out of range; allowed: 1 to 60000"
                    )));
                }
                crate::bounded(
                    "migration parameters",
                    q.set_migration_params(MigrationParams {
                        downtime_limit_ms: Some(ms),
                        ..Default::default()
                    }),
                )
                .await?;
                self.set_view(vm, |v| v.max_downtime_ms = ms);
            }
            Remedy::AutoConverge => {
                if !m.auto_converge {
                    return Err(AgentError::Conflict(
                        "auto-converge must be chosen when the migration starts (QEMU cannot \
                         switch it on during a migration): cancel this migration and start it \
                         again with auto_converge"
                            .into(),
                    ));
                }
            }
            Remedy::PostCopy => {
                model::check_post_copy(PostCopyPolicy {
                    vm_critical: rec.state == VmState::Critical,
                    link_unstable: false,
                    automatic: false,
                })
                .map_err(AgentError::Conflict)?;
                if !m.post_copy {
                    return Err(AgentError::Conflict(
                        "post-copy is not allowed by the unit's settings \
                         (migration_post_copy_allowed = false)"
                            .into(),
                    ));
                }
                crate::bounded("migrate-start-postcopy", q.migrate_start_postcopy()).await?;
            }
            Remedy::PauseAndFinish => {
                crate::bounded("stop", q.stop()).await?;
                let at = now_ms();
                self.store().write(|tx| {
                    if let Some(mut r) = tx.get::<MigrationRecord>(vm)? {
                        if r.id == m.id {
                            r.guest_paused_at_ms = Some(at);
                            tx.put(&r)?;
                        }
                    }
                    Ok::<_, AgentError>(())
                })?;
            }
        }
        info!(vm, remedy = ?req.remedy, "migration remedy applied");
        self.migration(vm)
    }

    /// Cancels the running migration of `vm` (before the switch-over).
    pub async fn cancel_migration(&self, vm: &str) -> Result<MigrationView> {
        self.load_vm_here(vm)?;
        let m = self
            .migration_record(vm)?
            .filter(|m| m.active())
            .ok_or_else(|| AgentError::Conflict(format!("VM '{vm}' is not being migrated")))?;
        if m.phase == MigrationPhase::Switchover {
            return Err(AgentError::Conflict(
                "the switch-over has started; the migration can no longer be cancelled".into(),
            ));
        }
        if let Some(run) = self.running(vm) {
            let _ = crate::bounded("migrate-cancel", run.qemu.migrate_cancel()).await;
        }
        self.fail_migration(vm, "cancelled by the administrator");
        self.migration(vm)
    }

    // ------------------------------------------------------------------
    // Destination side.

    /// Acts on migrations whose destination is this PM (called by the
    /// reconciler): prepares the paused QEMU, and cleans up after failures.
    pub(crate) async fn serve_incoming_migrations(&self) {
        let Some(u) = self.unit() else { return };
        let me = u.pm_name();
        let Ok(list) = self.store().list::<MigrationRecord>() else {
            return;
        };
        for m in list {
            if m.dest != me {
                continue;
            }
            let have = self
                .inner
                .migrations
                .incoming
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&m.vm)
                .cloned();
            match (m.phase, have) {
                (MigrationPhase::Prepare, None) => {
                    if let Err(e) = self.prepare_incoming(&m).await {
                        warn!(vm = %m.vm, "cannot prepare the incoming migration: {e}");
                        self.fail_migration(&m.vm, &format!("destination {me}: {e}"));
                    }
                }
                (MigrationPhase::Failed, Some(q)) => {
                    warn!(vm = %m.vm, "migration failed: stopping the incoming QEMU");
                    let _ = q.kill();
                    let _ = q.wait_exit(Duration::from_secs(10)).await;
                    self.inner
                        .migrations
                        .incoming
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&m.vm);
                }
                _ => {}
            }
        }
    }

    async fn prepare_incoming(&self, m: &MigrationRecord) -> Result<()> {
        let rec = self.load_vm(&m.vm)?;
        // Local replicas must be open (secondaries until the hand-over).
        self.reconcile_mirrors().await;
        for v in rec.volumes() {
            let ok = self
                .local_mirror(v)
                .is_some_and(|o: Arc<OpenMirror>| o.vol.status().consistent);
            if !ok {
                return Err(AgentError::Conflict(format!(
                    "the replica of volume '{v}' here is not consistent"
                )));
            }
        }
        let settings = self.settings()?;
        let mut spec = self.spec_for(&rec, &settings, false)?;
        spec.start_paused = true;
        spec.incoming_defer = true;
        let run_dir = self.inner.paths.vm_run_dir(&rec.id);
        let qemu = QemuVm::launch(std::path::Path::new(&settings.qemu_binary), &spec, &run_dir)
            .await
            .map_err(|e| AgentError::Hypervisor(e.to_string()))?;
        let qemu = Arc::new(qemu);
        let r = async {
            crate::bounded(
                "migration capabilities",
                qemu.set_migration_caps(MigrationCaps {
                    auto_converge: m.auto_converge,
                    postcopy_ram: m.post_copy,
                    pause_before_switchover: false,
                }),
            )
            .await?;
            self.migration_tls(&qemu, &rec.id, TlsEndpoint::Server)
                .await?;
            crate::bounded(
                "migrate-incoming",
                qemu.migrate_incoming(&format!("tcp:{}", m.listen)),
            )
            .await
        }
        .await;
        if let Err(e) = r {
            let _ = qemu.kill();
            return Err(e);
        }
        self.inner
            .migrations
            .incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(m.vm.clone(), qemu.clone());
        self.store().write(|tx| {
            if let Some(mut r) = tx.get::<MigrationRecord>(&m.vm)? {
                if r.id == m.id && r.phase == MigrationPhase::Prepare {
                    r.phase = MigrationPhase::Ready;
                    tx.put(&r)?;
                }
            }
            Ok::<_, AgentError>(())
        })?;
        info!(vm = %m.vm, listen = %m.listen, "incoming migration ready");
        let agent = self.clone();
        let m = m.clone();
        tokio::spawn(async move { agent.finish_incoming(m, qemu).await });
        Ok(())
    }

    /// Waits for the memory and the hand-over, then resumes the guest here.
    async fn finish_incoming(&self, m: MigrationRecord, qemu: Arc<QemuVm>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
        loop {
            tokio::time::sleep(Duration::from_millis(3)).await;
            if tokio::time::Instant::now() > deadline {
                self.fail_migration(&m.vm, "the destination waited an hour for the migration");
                return;
            }
            let Ok(Some(cur)) = self.migration_record(&m.vm) else {
                return;
            };
            if cur.id != m.id || cur.phase == MigrationPhase::Failed {
                return; // serve_incoming_migrations cleans up
            }
            if cur.phase != MigrationPhase::Switchover {
                continue;
            }
            // The hand-over is committed: promote here right away.
            let Ok(rec) = self.load_vm(&m.vm) else { return };
            let all_primary = |agent: &Agent| {
                rec.volumes().all(|v| {
                    agent
                        .local_mirror(v)
                        .is_some_and(|o| o.vol.role() == Role::Primary)
                })
            };
            if !all_primary(self) {
                self.reconcile_mirrors().await;
                if !all_primary(self) {
                    continue;
                }
            }
            match qemu.status().await {
                Ok(pairvisor_hypervisor::RunState::Paused) => {}
                Ok(_) => continue,
                Err(e) => {
                    self.fail_migration(&m.vm, &format!("destination QEMU: {e}"));
                    return;
                }
            }
            if let Err(e) = qemu.cont().await {
                self.fail_migration(&m.vm, &format!("resuming on the destination: {e}"));
                return;
            }
            let resumed = now_ms();
            self.inner
                .migrations
                .incoming
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&m.vm);
            let _g = self.inner.ops.lock().await;
            let Ok(mut rec) = self.load_vm(&m.vm) else {
                return;
            };
            match Arc::try_unwrap(qemu) {
                Ok(q) => self.adopt(&rec, q),
                Err(_) => warn!(vm = %m.vm, "incoming QEMU still shared; not monitored"),
            }
            if rec.state != VmState::Running {
                let _ = self.set_state(&mut rec, VmEvent::GuestUp, "migrated here");
            }
            let r = self.store().write(|tx| {
                if let Some(mut r) = tx.get::<MigrationRecord>(&m.vm)? {
                    if r.id == m.id {
                        r.phase = MigrationPhase::Done;
                        r.resumed_at_ms = Some(resumed);
                        tx.put(&r)?;
                    }
                }
                Ok::<_, AgentError>(())
            });
            if let Err(e) = r {
                warn!(vm = %m.vm, "cannot record the end of the migration: {e}");
            }
            info!(vm = %m.vm, "VM resumed here after live migration");
            return;
        }
    }

    /// Whether a VM's process here is a migration target not yet resumed.
    pub(crate) fn incoming(&self, vm: &str) -> bool {
        self.inner
            .migrations
            .incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(vm)
    }
}

/// A pre-flight estimate (M4): will a migration of this VM converge?
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MigrationEstimate {
    /// The VM.
    pub vm: String,
    /// Guest RAM, bytes.
    pub ram_bytes: u64,
    /// Dirty rate measured by QEMU over one second, bytes/s.
    pub dirty_rate_bps: f64,
    /// Bandwidth assumed: the configured cap, or 1 Gb/s when unlimited.
    pub bandwidth_bps: f64,
    /// Maximum downtime, ms.
    pub max_downtime_ms: u64,
    /// The M2 verdict for these figures.
    #[schema(value_type = Object)]
    pub verdict: Verdict,
    /// Seconds to copy the RAM once at that bandwidth.
    pub first_pass_secs: f64,
}

/// Bandwidth assumed for an estimate without a cap: a 1 Gb/s private link.
const ASSUMED_LINK_BPS: f64 = 125_000_000.0;

impl Agent {
    /// M4: measures the guest's dirty rate (one second) and says whether a
    /// migration would converge with the unit's settings.
    pub async fn migration_estimate(
        &self,
        name: &str,
        req: MigrateRequest,
    ) -> Result<MigrationEstimate> {
        let rec = self.load_vm_here(name)?;
        let run = self.running(name).ok_or_else(|| crate::no_process(name))?;
        let settings = self.settings()?;
        let rate = crate::bounded("dirty-rate measurement", run.qemu.measure_dirty_rate(1)).await?;
        let cap = req
            .bandwidth_mbps
            .unwrap_or(settings.migration_bandwidth_mbps)
            * 1_000_000;
        let bandwidth = if cap > 0 {
            cap as f64
        } else {
            ASSUMED_LINK_BPS
        };
        let max_downtime = req
            .max_downtime_ms
            .unwrap_or(settings.migration_max_downtime_ms)
            .max(1);
        let ram = rec.memory_mib * 1024 * 1024;
        let verdict = model::convergence(MigrationFigures {
            remaining_bytes: ram,
            bandwidth_bps: bandwidth,
            dirty_pages_per_sec: rate.bytes_per_sec / 4096.0,
            page_size: 4096,
            max_downtime_ms: max_downtime,
        });
        Ok(MigrationEstimate {
            vm: name.to_string(),
            ram_bytes: ram,
            dirty_rate_bps: rate.bytes_per_sec,
            bandwidth_bps: bandwidth,
            max_downtime_ms: max_downtime,
            verdict,
            first_pass_secs: ram as f64 / bandwidth,
        })
    }
}

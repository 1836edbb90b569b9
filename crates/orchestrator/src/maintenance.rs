//! Maintenance of the unit (SPEC U3, U5, L1–L3): Work On, Finalize, PM
//! shutdown and power off, unit shutdown and start, and the balancer that
//! moves VMs to their preferred PM.
//!
//! Each PM runs its own part: Work On evacuates *this* PM (the API forwards
//! a request about the partner to the partner), the balancer moves VMs
//! hosted *here*, and during a unit shutdown each PM stops its own VMs. The
//! shared state — PM states, the unit's power state, the list of VMs to
//! restart — is in the unit database, so either PM sees all of it.

use pairvisor_agent::{Agent, AgentError, MigrateRequest};
use pairvisor_model::pm::{check_pm_operation, PmContext, PmOperation, PmState};
use pairvisor_model::vm::VmState;
use pairvisor_store::{UnitPower, UnitStateRecord, VmRecord};
use pairvisor_unit::UnitService;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{info, warn};
use utoipa::ToSchema;

/// Asks the daemon to exit (PM shutdown or power off, unit shutdown): the
/// daemon waits on it next to SIGTERM.
pub fn exit_requested() -> &'static Notify {
    static EXIT: std::sync::OnceLock<Notify> = std::sync::OnceLock::new();
    EXIT.get_or_init(Notify::new)
}

fn request_exit() {
    // notify_one stores a permit if the daemon is not waiting yet.
    exit_requested().notify_one();
}

/// A PM as the console and CLI show it (SPEC U2).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PmStatusView {
    /// Name.
    pub name: String,
    /// This PM answered the request.
    pub this_pm: bool,
    /// State (U2).
    pub state: String,
    /// Operations allowed in that state.
    pub allowed_operations: Vec<String>,
    /// What a running operation is doing.
    pub progress: Option<String>,
    /// VMs it hosts.
    pub vms: Vec<String>,
    /// Heard on at least one heartbeat link (the partner), or this PM.
    pub reachable: bool,
}

/// Errors of maintenance operations.
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    /// Refused by the U2–U4 rules (the message says why and what to do).
    #[error(transparent)]
    Refused(#[from] pairvisor_model::pm::PmRefusal),
    /// The agent refused or failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// Anything else, with what to do.
    #[error("{0}")]
    Other(String),
}

fn me(agent: &Agent) -> Result<String, MaintenanceError> {
    agent
        .pm_name()
        .ok_or_else(|| MaintenanceError::Other("this PM is not in a unit".into()))
}

async fn partner(svc: &UnitService) -> Option<(String, bool)> {
    let db = svc.db().await?;
    let p = UnitService::pms_of(&db)
        .into_iter()
        .find(|p| p.node_id != db.node_id())?;
    let reachable = svc.health().await.is_some_and(|h| !h.partner_lost);
    Some((p.addrs.name, reachable))
}

/// Both PMs with their states.
pub async fn pms(agent: &Agent, svc: &UnitService) -> Result<Vec<PmStatusView>, MaintenanceError> {
    let me = me(agent)?;
    let vms = agent.store().list::<VmRecord>().map_err(AgentError::from)?;
    let mut out = Vec::new();
    let mut names = vec![(me.clone(), true, true)];
    if let Some((p, reachable)) = partner(svc).await {
        names.push((p, false, reachable));
    }
    for (name, this_pm, reachable) in names {
        let rec = agent
            .store()
            .get::<pairvisor_store::PmStateRecord>(&name)
            .map_err(AgentError::from)?;
        let state = rec.as_ref().map(|r| r.state).unwrap_or(PmState::Running);
        out.push(PmStatusView {
            this_pm,
            state: state.to_string(),
            allowed_operations: pairvisor_model::pm::allowed_pm_operations(state)
                .iter()
                .map(|o| o.as_str().to_string())
                .collect(),
            progress: rec.and_then(|r| r.progress),
            vms: vms
                .iter()
                .filter(|v| v.host.as_deref() == Some(name.as_str()))
                .map(|v| v.name.clone())
                .collect(),
            reachable,
            name,
        });
    }
    Ok(out)
}

async fn context(
    agent: &Agent,
    svc: &UnitService,
    confirmed: bool,
) -> Result<(String, PmContext), MaintenanceError> {
    let me = me(agent)?;
    let partner_state = match partner(svc).await {
        Some((p, true)) => Some(agent.pm_state(&p)),
        _ => None,
    };
    Ok((
        me.clone(),
        PmContext {
            state: agent.pm_state(&me),
            partner: partner_state,
            running_vms: agent.running_here().len(),
            resync_from_here: agent.resync_from_here(),
            confirmed,
        },
    ))
}

/// Work On (U3): evacuates this PM by live migration (or, confirmed and with
/// the partner not running, shuts its VMs down), then puts it in
/// maintenance. Returns once started; progress shows in the PM's state.
pub async fn work_on(
    agent: &Agent,
    svc: &UnitService,
    confirm: bool,
) -> Result<(), MaintenanceError> {
    let (me, ctx) = context(agent, svc, confirm).await?;
    check_pm_operation(&me, PmOperation::WorkOn, ctx)?;
    let vms = agent.running_here();
    let migrate = ctx.partner.is_some_and(|p| p.can_host_vms());
    agent.set_pm_state(
        &me,
        PmState::Evacuating,
        Some(format!("0 of {} VM(s) moved", vms.len())),
    )?;
    info!(pm = %me, vms = vms.len(), migrate, "Work On: evacuating");
    let agent = agent.clone();
    tokio::spawn(async move {
        for (i, vm) in vms.iter().enumerate() {
            let r = if migrate {
                migrate_and_wait(&agent, vm).await
            } else {
                shutdown_and_wait(&agent, vm).await
            };
            if let Err(e) = r {
                warn!(pm = %me, vm, "Work On stopped: {e}");
                let _ = agent.set_pm_state(
                    &me,
                    PmState::Running,
                    Some(format!(
                        "Work On stopped: VM {vm} could not {}: {e}. Fix that and retry",
                        if migrate { "migrate" } else { "shut down" }
                    )),
                );
                return;
            }
            let _ = agent.set_pm_state(
                &me,
                PmState::Evacuating,
                Some(format!("{} of {} VM(s) moved", i + 1, vms.len())),
            );
        }
        let _ = agent.set_pm_state(&me, PmState::RunningInMaintenance, None);
        info!(pm = %me, "Work On done: in maintenance");
    });
    Ok(())
}

async fn migrate_and_wait(agent: &Agent, vm: &str) -> Result<(), String> {
    agent
        .migrate(vm, MigrateRequest::default())
        .await
        .map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1800);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let m = agent.migration(vm).map_err(|e| e.to_string())?;
        match m.phase.as_str() {
            "done" => return Ok(()),
            "failed" => return Err(m.error.unwrap_or_else(|| "migration failed".into())),
            _ if tokio::time::Instant::now() > deadline => {
                return Err("the migration did not finish within 30 minutes".into())
            }
            _ => {}
        }
    }
}

async fn shutdown_and_wait(agent: &Agent, vm: &str) -> Result<(), String> {
    let rec = agent.get_vm(vm).map_err(|e| e.to_string())?;
    if rec.state != VmState::Stopping.to_string() {
        agent.shutdown(vm).await.map_err(|e| e.to_string())?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1800);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let v = agent.get_vm(vm).map_err(|e| e.to_string())?;
        if v.state == VmState::Stopped.to_string() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err("the VM did not stop within 30 minutes".into());
        }
    }
}

/// Finalize (U3): back in service; VMs that prefer this PM move back (L3).
pub async fn finalize(agent: &Agent, svc: &UnitService) -> Result<(), MaintenanceError> {
    let (me, ctx) = context(agent, svc, false).await?;
    check_pm_operation(&me, PmOperation::Finalize, ctx)?;
    agent.set_pm_state(&me, PmState::Running, None)?;
    info!(pm = %me, "Finalize: back in service");
    Ok(())
}

/// Shutdown or Power Off of this PM in maintenance (U3): refused while a
/// resync from it runs; then the daemon stops (on real hardware the host is
/// powered off by the service manager).
pub async fn power_down(
    agent: &Agent,
    svc: &UnitService,
    hard: bool,
) -> Result<(), MaintenanceError> {
    let op = if hard {
        PmOperation::PowerOff
    } else {
        PmOperation::Shutdown
    };
    let (me, ctx) = context(agent, svc, false).await?;
    check_pm_operation(&me, op, ctx)?;
    agent.set_pm_state(&me, PmState::OffInMaintenance, None)?;
    warn!(pm = %me, "{op}: this PM stops now");
    request_exit();
    Ok(())
}

/// Unit shutdown (U5): every VM is shut down (guest shutdown, then power off
/// after the timeout), then both PMs stop. The VMs running now start again
/// at unit start.
pub async fn unit_shutdown(agent: &Agent) -> Result<UnitStateRecord, MaintenanceError> {
    let vms = agent.store().list::<VmRecord>().map_err(AgentError::from)?;
    let restart: Vec<String> = vms
        .iter()
        .filter(|v| matches!(v.state, VmState::Running | VmState::Booting))
        .map(|v| v.name.clone())
        .collect();
    let rec = agent.store().write(|tx| {
        let mut u = tx.get::<UnitStateRecord>("unit")?.unwrap_or_default();
        if u.power != UnitPower::Running {
            return Err(AgentError::Conflict(format!(
                "the unit is already {}",
                if u.power == UnitPower::Off {
                    "off"
                } else {
                    "shutting down"
                }
            )));
        }
        u.power = UnitPower::ShuttingDown;
        u.restart_vms = restart.clone();
        u.progress = Some(format!("stopping {} VM(s)", restart.len()));
        tx.put(&u)?;
        Ok(u)
    })?;
    warn!(vms = ?rec.restart_vms, "unit shutdown started");
    Ok(rec)
}

/// The per-PM loop: unit shutdown and start, and moving VMs to their
/// preferred PM (L1–L3).
pub async fn run(agent: Agent, svc: Arc<UnitService>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let Ok(me) = me(&agent) else { return };
    // Power On after a maintenance shutdown: back, still in maintenance.
    if agent.pm_state(&me) == PmState::OffInMaintenance {
        let _ = agent.set_pm_state(&me, PmState::RunningInMaintenance, None);
    }
    let mut stopping_sent: Vec<String> = Vec::new();
    // A daemon that took part in a unit shutdown stops with it; only one
    // started afterwards performs the unit start.
    let mut saw_shutdown = false;
    loop {
        tick.tick().await;
        if !agent.holds_lease() {
            continue;
        }
        let unit = agent.unit_power();
        match unit.power {
            UnitPower::ShuttingDown => {
                saw_shutdown = true;
                step_shutdown(&agent, &me, &unit, &mut stopping_sent).await;
                continue;
            }
            UnitPower::Off if saw_shutdown => {
                request_exit();
                continue;
            }
            UnitPower::Off => {
                // Unit start: this PM is back; start what ran at shutdown.
                let r = agent.store().write(|tx| {
                    let mut u = tx.get::<UnitStateRecord>("unit")?.unwrap_or_default();
                    u.power = UnitPower::Running;
                    u.progress = Some(format!("starting {} VM(s)", u.restart_vms.len()));
                    tx.put(&u)
                });
                if r.is_ok() {
                    info!("unit start: restarting the VMs that ran at shutdown");
                }
                continue;
            }
            UnitPower::Running => {}
        }
        if !unit.restart_vms.is_empty() {
            restart_after_unit_start(&agent, &me, &unit).await;
            continue;
        }
        balance(&agent, &svc, &me).await;
    }
}

async fn step_shutdown(agent: &Agent, me: &str, unit: &UnitStateRecord, sent: &mut Vec<String>) {
    let Ok(vms) = agent.store().list::<VmRecord>() else {
        return;
    };
    for v in vms.iter().filter(|v| v.host.as_deref() == Some(me)) {
        if matches!(v.state, VmState::Running | VmState::Booting) && !sent.contains(&v.name) {
            match agent.shutdown(&v.name).await {
                Ok(_) => sent.push(v.name.clone()),
                Err(e) => warn!(vm = %v.name, "unit shutdown: {e}"),
            }
        }
    }
    let left = vms
        .iter()
        .filter(|v| v.state.has_process() || v.state == VmState::Booting)
        .count();
    let progress = format!(
        "{} of {} VM(s) stopped",
        unit.restart_vms.len().saturating_sub(left),
        unit.restart_vms.len()
    );
    if left == 0 {
        let r = agent.store().write(|tx| {
            let mut u = tx.get::<UnitStateRecord>("unit")?.unwrap_or_default();
            if u.power == UnitPower::ShuttingDown {
                u.power = UnitPower::Off;
                u.progress = Some("every VM stopped; PMs powering off".into());
                tx.put(&u)?;
            }
            Ok::<_, AgentError>(())
        });
        if r.is_ok() {
            warn!("unit shutdown: every VM is stopped; this PM stops now");
            request_exit();
        }
    } else if unit.progress.as_deref() != Some(progress.as_str()) {
        let _ = agent.store().write(|tx| {
            let mut u = tx.get::<UnitStateRecord>("unit")?.unwrap_or_default();
            u.progress = Some(progress.clone());
            tx.put(&u)
        });
    }
}

async fn restart_after_unit_start(agent: &Agent, me: &str, unit: &UnitStateRecord) {
    for name in &unit.restart_vms {
        let Ok(Some(v)) = agent.store().get::<VmRecord>(name) else {
            continue;
        };
        if v.host.as_deref() != Some(me) {
            continue;
        }
        let started = v.state != VmState::Stopped || agent.start(name).await.is_ok();
        if started {
            let _ = agent.store().write(|tx| {
                let mut u = tx.get::<UnitStateRecord>("unit")?.unwrap_or_default();
                u.restart_vms.retain(|n| n != name);
                u.progress = if u.restart_vms.is_empty() {
                    None
                } else {
                    Some(format!("{} VM(s) still to start", u.restart_vms.len()))
                };
                tx.put(&u)
            });
            info!(vm = %name, "unit start: VM started again");
        }
    }
}

/// L1–L3: a running VM hosted here whose preferred PM (set by the
/// administrator, or computed when load balancing is on) is the partner
/// moves there, once the partner is running and the VM fully redundant.
async fn balance(agent: &Agent, svc: &UnitService, me: &str) {
    let Some((partner, reachable)) = partner(svc).await else {
        return;
    };
    if !reachable || agent.pm_state(&partner) != PmState::Running {
        return;
    }
    if agent.pm_state(me) != PmState::Running {
        return;
    }
    let Ok(vms) = agent.store().list::<VmRecord>() else {
        return;
    };
    let auto = agent
        .store()
        .settings()
        .map(|s| s.load_balancing)
        .unwrap_or(false);
    let assignment = if auto {
        let load: Vec<(String, u64)> = vms
            .iter()
            .filter(|v| v.preferred_pm.is_none() && v.state.has_process())
            .map(|v| (v.name.clone(), v.memory_mib))
            .collect();
        let mut pms = vec![me.to_string(), partner.clone()];
        pms.sort();
        pairvisor_model::placement::balance(&load, &pms)
    } else {
        Vec::new()
    };
    for v in &vms {
        if v.host.as_deref() != Some(me) || v.state != VmState::Running {
            continue;
        }
        let want = v.preferred_pm.clone().or_else(|| {
            assignment
                .iter()
                .find(|(vm, _)| *vm == v.name)
                .map(|(_, pm)| pm.clone())
        });
        if want.as_deref() != Some(partner.as_str()) || !agent.vm_redundant(v) {
            continue;
        }
        if agent
            .migration(&v.name)
            .is_ok_and(|m| m.phase != "done" && m.phase != "failed")
        {
            continue;
        }
        info!(vm = %v.name, to = %partner, "moving the VM to its preferred PM");
        if let Err(e) = migrate_and_wait(agent, &v.name).await {
            warn!(vm = %v.name, "could not move the VM to its preferred PM: {e}");
        }
        // One at a time.
        return;
    }
}

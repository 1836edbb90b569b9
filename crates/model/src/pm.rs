//! Physical machine states and the maintenance operations allowed in each
//! (SPEC U2, U3, U4, U5).

use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

/// A PM's state as SPEC U2 names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PmState {
    /// Starting up, not yet part of the unit.
    Booting,
    /// In service.
    Running,
    /// In service but in maintenance: runs no VMs, may be serviced.
    RunningInMaintenance,
    /// Work On in progress: its VMs are migrating away.
    Evacuating,
    /// Shut down through maintenance.
    OffInMaintenance,
    /// Being re-imaged or recovered.
    Recovering,
    /// Failure predicted or occurred.
    Broken,
    /// Failed too often (U4); stays out until Reset Device.
    PoweredOffTooManyFailures,
}

impl PmState {
    /// The text the console shows.
    pub fn as_str(self) -> &'static str {
        match self {
            PmState::Booting => "booting",
            PmState::Running => "running",
            PmState::RunningInMaintenance => "running (in maintenance)",
            PmState::Evacuating => "evacuating",
            PmState::OffInMaintenance => "off (in maintenance)",
            PmState::Recovering => "imaging/recovering",
            PmState::Broken => "broken",
            PmState::PoweredOffTooManyFailures => "powered off (too many failures)",
        }
    }

    /// Whether VMs may run on a PM in this state.
    pub fn can_host_vms(self) -> bool {
        matches!(self, PmState::Running | PmState::Evacuating)
    }
}

impl fmt::Display for PmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A maintenance operation on a PM (SPEC U3, U4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PmOperation {
    /// Evacuate by live migration and enter maintenance.
    WorkOn,
    /// Leave maintenance.
    Finalize,
    /// Shut the PM down (from maintenance).
    Shutdown,
    /// Hard power off (from maintenance, when shutdown failed).
    PowerOff,
    /// Power on a PM that is off in maintenance.
    PowerOn,
    /// Re-image a broken PM.
    Recover,
    /// Drop the PM from the unit and accept a new machine in its place.
    Replace,
    /// Clear the failure counter of a PM taken out of service.
    ResetDevice,
}

impl PmOperation {
    /// Name used in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            PmOperation::WorkOn => "work on",
            PmOperation::Finalize => "finalize",
            PmOperation::Shutdown => "shutdown",
            PmOperation::PowerOff => "power off",
            PmOperation::PowerOn => "power on",
            PmOperation::Recover => "recover",
            PmOperation::Replace => "replace",
            PmOperation::ResetDevice => "reset device",
        }
    }
}

impl fmt::Display for PmOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The operations the console offers for a PM in `state` (U2: "only the
/// operations allowed in it").
pub fn allowed_pm_operations(state: PmState) -> &'static [PmOperation] {
    use PmOperation::*;
    match state {
        PmState::Booting => &[],
        PmState::Running => &[WorkOn],
        PmState::Evacuating => &[],
        PmState::RunningInMaintenance => &[Finalize, Shutdown, PowerOff, Recover, Replace],
        PmState::OffInMaintenance => &[PowerOn, Replace],
        PmState::Recovering => &[],
        PmState::Broken => &[WorkOn, Recover, Replace],
        PmState::PoweredOffTooManyFailures => &[ResetDevice, Replace],
    }
}

/// Why a PM operation is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PmRefusal {
    /// Not allowed in the PM's state.
    #[error("cannot {op} PM '{pm}': it is {state}; {}", pm_allowed_text(*state))]
    State {
        /// PM name.
        pm: String,
        /// Its state.
        state: PmState,
        /// The operation.
        op: PmOperation,
    },
    /// U3: powering off the source of a running resync loses data.
    #[error(
        "cannot {op} PM '{pm}': the partner is resynchronising from it ({percent}% done); \
         powering it off now would lose data. Wait for the resync to finish"
    )]
    ResyncSource {
        /// PM name.
        pm: String,
        /// The operation.
        op: PmOperation,
        /// Resync progress.
        percent: u8,
    },
    /// U3: Work On with VMs running and no partner to take them needs
    /// explicit confirmation (the VMs are shut down instead of migrated).
    #[error(
        "PM '{pm}' runs {vms} VM(s) and its partner is not running, so they cannot migrate; \
         confirm to shut them down instead"
    )]
    NeedsConfirmation {
        /// PM name.
        pm: String,
        /// Number of VMs that would be shut down.
        vms: usize,
    },
}

fn pm_allowed_text(state: PmState) -> String {
    let ops = allowed_pm_operations(state);
    if ops.is_empty() {
        format!("no operation is allowed while a PM is {state}")
    } else {
        let l: Vec<&str> = ops.iter().map(|o| o.as_str()).collect();
        format!("allowed while {state}: {}", l.join(", "))
    }
}

/// What the unit knows when a PM operation is requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PmContext {
    /// The PM's state.
    pub state: PmState,
    /// The partner's state, if there is a partner.
    pub partner: Option<PmState>,
    /// VMs running on the PM.
    pub running_vms: usize,
    /// Progress of a resync whose source is this PM, if one runs.
    pub resync_from_here: Option<u8>,
    /// The administrator confirmed a destructive variant.
    pub confirmed: bool,
}

/// Decides whether `op` may proceed on PM `pm` (SPEC U3, U5).
pub fn check_pm_operation(pm: &str, op: PmOperation, ctx: PmContext) -> Result<(), PmRefusal> {
    if !allowed_pm_operations(ctx.state).contains(&op) {
        return Err(PmRefusal::State {
            pm: pm.into(),
            state: ctx.state,
            op,
        });
    }
    if matches!(op, PmOperation::Shutdown | PmOperation::PowerOff) {
        if let Some(percent) = ctx.resync_from_here {
            return Err(PmRefusal::ResyncSource {
                pm: pm.into(),
                op,
                percent,
            });
        }
    }
    if op == PmOperation::WorkOn
        && ctx.running_vms > 0
        && !ctx.partner.is_some_and(|p| p.can_host_vms())
        && !ctx.confirmed
    {
        return Err(PmRefusal::NeedsConfirmation {
            pm: pm.into(),
            vms: ctx.running_vms,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use PmOperation::*;

    fn ctx(state: PmState) -> PmContext {
        PmContext {
            state,
            partner: Some(PmState::Running),
            running_vms: 0,
            resync_from_here: None,
            confirmed: false,
        }
    }

    #[test]
    fn state_table() {
        let all = [
            WorkOn,
            Finalize,
            Shutdown,
            PowerOff,
            PowerOn,
            Recover,
            Replace,
            ResetDevice,
        ];
        let table: &[(PmState, &[PmOperation])] = &[
            (PmState::Running, &[WorkOn]),
            (
                PmState::RunningInMaintenance,
                &[Finalize, Shutdown, PowerOff, Recover, Replace],
            ),
            (PmState::OffInMaintenance, &[PowerOn, Replace]),
            (PmState::Evacuating, &[]),
            (PmState::PoweredOffTooManyFailures, &[ResetDevice, Replace]),
        ];
        for (state, allowed) in table {
            for op in all {
                let r = check_pm_operation("pm-a", op, ctx(*state));
                assert_eq!(r.is_ok(), allowed.contains(&op), "{state} {op}: {r:?}");
            }
        }
        let e = check_pm_operation("pm-a", Finalize, ctx(PmState::Running)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot finalize PM 'pm-a': it is running; allowed while running: work on"
        );
    }

    #[test]
    fn refuse_power_off_of_a_resync_source() {
        let mut c = ctx(PmState::RunningInMaintenance);
        c.resync_from_here = Some(40);
        for op in [Shutdown, PowerOff] {
            let e = check_pm_operation("pm-a", op, c).unwrap_err();
            assert!(e.to_string().contains("would lose data"), "{e}");
        }
        assert!(check_pm_operation("pm-a", Finalize, c).is_ok());
    }

    #[test]
    fn work_on_without_partner_needs_confirmation() {
        let mut c = ctx(PmState::Running);
        c.running_vms = 2;
        assert!(
            check_pm_operation("pm-a", WorkOn, c).is_ok(),
            "partner takes them"
        );
        c.partner = Some(PmState::OffInMaintenance);
        let e = check_pm_operation("pm-a", WorkOn, c).unwrap_err();
        assert!(e.to_string().contains("confirm to shut them down"));
        c.confirmed = true;
        assert!(check_pm_operation("pm-a", WorkOn, c).is_ok());
        c.running_vms = 0;
        c.confirmed = false;
        assert!(
            check_pm_operation("pm-a", WorkOn, c).is_ok(),
            "nothing to move"
        );
    }
}

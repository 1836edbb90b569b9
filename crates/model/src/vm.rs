//! VM states and the operations allowed in each (SPEC V4), plus the
//! life-cycle transitions driven by requests and hypervisor observations.
//!
//! This is the single place where "may I do X to this VM now?" is decided.

use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

/// The state of a VM as SPEC V4 names it. `alert` is not a separate state
/// here: it is `running` while the VM is not fully redundant, and is derived
/// by [`display_state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Installing: the boot volume is being prepared.
    Busy,
    /// Not running.
    Stopped,
    /// QEMU runs; the guest has not yet reported that it is up.
    Booting,
    /// The guest is up.
    Running,
    /// A guest shutdown is in progress.
    Stopping,
    /// The VM crashed and is being restarted automatically.
    Crashed,
    /// The VM crashed more often than its MTBF threshold allows; it stays down
    /// until *Reset Device*.
    Critical,
    /// A memory dump is being written.
    Dumping,
}

impl VmState {
    /// Every state, in SPEC order.
    pub const ALL: [VmState; 8] = [
        VmState::Busy,
        VmState::Stopped,
        VmState::Booting,
        VmState::Running,
        VmState::Stopping,
        VmState::Crashed,
        VmState::Critical,
        VmState::Dumping,
    ];

    /// The lowercase name used in the API, CLI and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Busy => "busy",
            VmState::Stopped => "stopped",
            VmState::Booting => "booting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Crashed => "crashed",
            VmState::Critical => "critical",
            VmState::Dumping => "dumping",
        }
    }

    /// Whether a QEMU process is expected to exist in this state.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            VmState::Booting | VmState::Running | VmState::Stopping | VmState::Dumping
        )
    }

    /// What the VM is doing, for the "activity" column of SPEC V4.
    pub fn activity(self) -> &'static str {
        match self {
            VmState::Busy => "installing",
            VmState::Crashed => "restarting",
            VmState::Critical => "crashed",
            VmState::Running => "running",
            _ => "",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state shown to the administrator: `alert` when a running VM is not
/// fully redundant (SPEC V4).
pub fn display_state(state: VmState, redundant: bool) -> &'static str {
    if state == VmState::Running && !redundant {
        "alert"
    } else {
        state.as_str()
    }
}

/// An operation an administrator can ask for (SPEC V5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Start the VM.
    Start,
    /// Change vCPUs, memory, volumes, MAC (re-provisioning).
    Config,
    /// Export to OVF/OVA.
    Export,
    /// Snapshot the volumes.
    Snapshot,
    /// Start once from a VCD.
    BootFromCd,
    /// Delete the VM.
    Remove,
    /// Open the graphical or serial console.
    Console,
    /// ACPI shutdown.
    Shutdown,
    /// Stop immediately.
    PowerOff,
    /// Write guest memory to a dump file, then restart.
    Dump,
    /// Live-migrate to the partner.
    Migrate,
    /// Restart a critical VM and clear its MTBF counter.
    ResetDevice,
    /// Insert a VCD into, or eject it from, the VM's CD drive. The SPEC's
    /// table does not list it; like a real drive it works whether or not the
    /// VM runs, but not while the VM is in transition.
    ChangeCd,
}

impl Operation {
    /// The name used in the API, CLI and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Start => "start",
            Operation::Config => "config",
            Operation::Export => "export",
            Operation::Snapshot => "snapshot",
            Operation::BootFromCd => "boot from CD",
            Operation::Remove => "remove",
            Operation::Console => "console",
            Operation::Shutdown => "shutdown",
            Operation::PowerOff => "power off",
            Operation::Dump => "dump",
            Operation::Migrate => "migrate",
            Operation::ResetDevice => "reset device",
            Operation::ChangeCd => "insert/eject CD",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The operations allowed in `state`: SPEC V4's table, verbatim, plus
/// [`Operation::ChangeCd`].
pub fn allowed_operations(state: VmState) -> &'static [Operation] {
    use Operation::*;
    match state {
        VmState::Busy => &[],
        VmState::Stopped => &[
            Start, Config, Export, Snapshot, BootFromCd, Remove, ChangeCd,
        ],
        VmState::Booting => &[Console, PowerOff, Dump, ChangeCd],
        VmState::Running => &[Console, Shutdown, PowerOff, Dump, Migrate, ChangeCd],
        VmState::Stopping => &[PowerOff, Remove],
        VmState::Crashed => &[],
        VmState::Critical => &[ResetDevice],
        VmState::Dumping => &[PowerOff],
    }
}

/// An operation refused because of the VM's state.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("cannot {op} VM '{vm}': it is {state}; {}", allowed_text(*state))]
pub struct NotAllowed {
    /// The VM's name.
    pub vm: String,
    /// Its current state.
    pub state: VmState,
    /// What was asked.
    pub op: Operation,
}

fn allowed_text(state: VmState) -> String {
    let ops = allowed_operations(state);
    if ops.is_empty() {
        format!("no operation is allowed while a VM is {state}")
    } else {
        let list: Vec<&str> = ops.iter().map(|o| o.as_str()).collect();
        format!("allowed while {state}: {}", list.join(", "))
    }
}

/// Checks `op` against the V4 table for a VM in `state`.
pub fn check_operation(vm: &str, state: VmState, op: Operation) -> Result<(), NotAllowed> {
    if allowed_operations(state).contains(&op) {
        Ok(())
    } else {
        Err(NotAllowed {
            vm: vm.to_string(),
            state,
            op,
        })
    }
}

/// Something that happened to a VM, as observed by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmEvent {
    /// The agent launched QEMU (start, boot from CD, restart after a crash,
    /// reset device, restart after a dump).
    Launched,
    /// The instance check succeeded for the first time since launch.
    GuestUp,
    /// An ACPI shutdown was sent to the guest.
    ShutdownSent,
    /// The process ended after a guest shutdown or a power off we asked for.
    Stopped,
    /// The process died or the guest panicked without being asked to stop.
    /// `critical` tells whether the MTBF threshold has been exceeded.
    Crashed {
        /// The MTBF counter is over its threshold: stay down.
        critical: bool,
    },
    /// A memory dump started.
    DumpStarted,
}

/// A transition the life cycle does not allow (a bug or a stale event, never
/// an administrator's mistake: those are caught by [`check_operation`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("event {event:?} does not apply to a VM that is {state}")]
pub struct BadTransition {
    /// The state the VM was in.
    pub state: VmState,
    /// The event that did not fit.
    pub event: VmEvent,
}

/// The state after `event` happens to a VM in `state`.
pub fn next_state(state: VmState, event: VmEvent) -> Result<VmState, BadTransition> {
    use VmState::*;
    let next = match (state, event) {
        (Stopped | Crashed | Critical | Dumping | Booting | Running, VmEvent::Launched) => Booting,
        (Booting, VmEvent::GuestUp) => Running,
        (Running, VmEvent::GuestUp) => Running,
        (Running | Booting, VmEvent::ShutdownSent) => Stopping,
        (Stopping, VmEvent::ShutdownSent) => Stopping,
        (Booting | Running | Stopping | Dumping | Crashed, VmEvent::Stopped) => Stopped,
        (Stopped, VmEvent::Stopped) => Stopped,
        (Booting | Running | Stopping | Dumping | Crashed, VmEvent::Crashed { critical }) => {
            if critical {
                Critical
            } else {
                Crashed
            }
        }
        (Booting | Running, VmEvent::DumpStarted) => Dumping,
        _ => return Err(BadTransition { state, event }),
    };
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Operation::*;

    /// SPEC V4, row by row: (state, allowed operations).
    const V4: &[(VmState, &[Operation])] = &[
        (VmState::Busy, &[]),
        (
            VmState::Stopped,
            &[
                Start, Config, Export, Snapshot, BootFromCd, Remove, ChangeCd,
            ],
        ),
        (VmState::Booting, &[Console, PowerOff, Dump, ChangeCd]),
        (
            VmState::Running,
            &[Console, Shutdown, PowerOff, Dump, Migrate, ChangeCd],
        ),
        (VmState::Stopping, &[PowerOff, Remove]),
        (VmState::Crashed, &[]),
        (VmState::Critical, &[ResetDevice]),
        (VmState::Dumping, &[PowerOff]),
    ];

    const ALL_OPS: [Operation; 13] = [
        Start,
        Config,
        Export,
        Snapshot,
        BootFromCd,
        Remove,
        Console,
        Shutdown,
        PowerOff,
        Dump,
        Migrate,
        ResetDevice,
        ChangeCd,
    ];

    #[test]
    fn v4_table_every_state_and_operation() {
        assert_eq!(V4.len(), VmState::ALL.len());
        for (state, allowed) in V4 {
            for op in ALL_OPS {
                let r = check_operation("web1", *state, op);
                assert_eq!(r.is_ok(), allowed.contains(&op), "{state} / {op}");
            }
        }
    }

    #[test]
    fn refusal_names_state_and_allowed_operations() {
        let e = check_operation("web1", VmState::Stopped, Shutdown).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot shutdown VM 'web1': it is stopped; allowed while stopped: start, config, \
             export, snapshot, boot from CD, remove, insert/eject CD"
        );
        let e = check_operation("db", VmState::Crashed, PowerOff).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot power off VM 'db': it is crashed; no operation is allowed while a VM is crashed"
        );
    }

    #[test]
    fn alert_is_running_without_redundancy() {
        assert_eq!(display_state(VmState::Running, false), "alert");
        assert_eq!(display_state(VmState::Running, true), "running");
        assert_eq!(display_state(VmState::Stopped, false), "stopped");
    }

    #[test]
    fn transitions() {
        use VmState::*;
        let ok: &[(VmState, VmEvent, VmState)] = &[
            (Stopped, VmEvent::Launched, Booting),
            (Booting, VmEvent::GuestUp, Running),
            (Running, VmEvent::ShutdownSent, Stopping),
            (Stopping, VmEvent::Stopped, Stopped),
            (Running, VmEvent::Stopped, Stopped),
            (Running, VmEvent::Crashed { critical: false }, Crashed),
            (Booting, VmEvent::Crashed { critical: true }, Critical),
            (Crashed, VmEvent::Launched, Booting),
            (Critical, VmEvent::Launched, Booting),
            (Running, VmEvent::DumpStarted, Dumping),
            (Dumping, VmEvent::Launched, Booting),
            (Dumping, VmEvent::Stopped, Stopped),
        ];
        for (from, ev, to) in ok {
            assert_eq!(next_state(*from, *ev), Ok(*to), "{from} {ev:?}");
        }
        let bad: &[(VmState, VmEvent)] = &[
            (Stopped, VmEvent::GuestUp),
            (Stopped, VmEvent::ShutdownSent),
            (Critical, VmEvent::Crashed { critical: true }),
            (Stopped, VmEvent::DumpStarted),
            (Busy, VmEvent::Launched),
        ];
        for (from, ev) in bad {
            assert!(next_state(*from, *ev).is_err(), "{from} {ev:?}");
        }
    }

    #[test]
    fn serde_names() {
        assert_eq!(
            serde_json::to_string(&VmState::Critical).unwrap(),
            "\"critical\""
        );
        assert_eq!(serde_json::to_string(&PowerOff).unwrap(), "\"power_off\"");
    }
}

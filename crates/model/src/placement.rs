//! Where VMs run: preferred PMs and HA load balancing (SPEC L1–L3).

use crate::pm::PmState;
use serde::{Deserialize, Serialize};

/// A PM as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmPlace {
    /// PM name.
    pub name: String,
    /// Its state.
    pub state: PmState,
    /// Its replicas are fully synchronised.
    pub synced: bool,
}

/// A VM's placement mode (L2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "mode", content = "pm", rename_all = "snake_case")]
pub enum PlacementMode {
    /// The unit chooses.
    #[default]
    Automatic,
    /// The administrator pinned a preferred PM.
    Manual(String),
}

/// L1 with balancing on: spreads VMs over the PMs by memory, largest first,
/// each to the PM with the least memory assigned so far. Returns the
/// preferred PM per VM, in input order. Ties go to the first PM (the
/// primary), so the assignment is deterministic.
pub fn balance(vms: &[(String, u64)], pms: &[String]) -> Vec<(String, String)> {
    if pms.is_empty() {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..vms.len()).collect();
    order.sort_by(|a, b| vms[*b].1.cmp(&vms[*a].1).then(vms[*a].0.cmp(&vms[*b].0)));
    let mut load = vec![0u64; pms.len()];
    let mut chosen = vec![String::new(); vms.len()];
    for i in order {
        let (idx, _) = load
            .iter()
            .enumerate()
            .min_by_key(|(i, l)| (**l, *i))
            .unwrap_or((0, &0));
        load[idx] += vms[i].1;
        chosen[i] = pms[idx].clone();
    }
    vms.iter()
        .zip(chosen)
        .map(|((n, _), p)| (n.clone(), p))
        .collect()
}

/// The preferred PM of a VM: its pin, else the balanced choice when
/// balancing is on, else the primary PM (L1 off: everything on the primary).
pub fn preferred_pm(
    mode: &PlacementMode,
    balancing: bool,
    balanced_choice: Option<&str>,
    primary: &str,
) -> String {
    match mode {
        PlacementMode::Manual(pm) => pm.clone(),
        PlacementMode::Automatic if balancing => balanced_choice.unwrap_or(primary).to_string(),
        PlacementMode::Automatic => primary.to_string(),
    }
}

/// Where the VM should run now (L3): its preferred PM when that PM can host
/// VMs and is synchronised; otherwise a synchronised PM that can host VMs (a
/// resyncing replica is behind and must not become primary); as a last
/// resort any PM that can host VMs. `None` only when no PM can host VMs.
pub fn target_pm(preferred: &str, pms: &[PmPlace]) -> Option<String> {
    let ok = |p: &&PmPlace| p.state.can_host_vms();
    if let Some(p) = pms
        .iter()
        .filter(ok)
        .find(|p| p.name == preferred && p.synced)
    {
        return Some(p.name.clone());
    }
    pms.iter()
        .filter(ok)
        .find(|p| p.synced)
        .or_else(|| pms.iter().find(|p| p.state.can_host_vms()))
        .map(|p| p.name.clone())
}

/// L3: a VM running elsewhere moves back once its preferred PM runs and is
/// fully synchronised.
pub fn should_move_back(current: &str, preferred: &str, pms: &[PmPlace]) -> bool {
    current != preferred
        && pms
            .iter()
            .any(|p| p.name == preferred && p.state == PmState::Running && p.synced)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm(name: &str, state: PmState, synced: bool) -> PmPlace {
        PmPlace {
            name: name.into(),
            state,
            synced,
        }
    }

    #[test]
    fn balance_spreads_memory() {
        let vms: Vec<(String, u64)> = [("a", 4096), ("b", 2048), ("c", 2048), ("d", 1024)]
            .iter()
            .map(|(n, m)| (n.to_string(), *m))
            .collect();
        let got = balance(&vms, &["pm-a".into(), "pm-b".into()]);
        let on = |vm: &str| got.iter().find(|(n, _)| n == vm).unwrap().1.clone();
        assert_eq!(on("a"), "pm-a");
        assert_eq!(on("b"), "pm-b");
        assert_eq!(on("c"), "pm-b");
        assert_eq!(on("d"), "pm-a");
    }

    #[test]
    fn preferred_table() {
        let manual = PlacementMode::Manual("pm-b".into());
        assert_eq!(preferred_pm(&manual, false, None, "pm-a"), "pm-b");
        assert_eq!(
            preferred_pm(&PlacementMode::Automatic, false, Some("pm-b"), "pm-a"),
            "pm-a"
        );
        assert_eq!(
            preferred_pm(&PlacementMode::Automatic, true, Some("pm-b"), "pm-a"),
            "pm-b"
        );
    }

    #[test]
    fn target_and_move_back_table() {
        let both = [
            pm("pm-a", PmState::Running, true),
            pm("pm-b", PmState::Running, true),
        ];
        assert_eq!(target_pm("pm-b", &both).as_deref(), Some("pm-b"));
        let b_maint = [
            pm("pm-a", PmState::Running, true),
            pm("pm-b", PmState::RunningInMaintenance, true),
        ];
        assert_eq!(
            target_pm("pm-b", &b_maint).as_deref(),
            Some("pm-a"),
            "runs on the other"
        );
        let b_resync = [
            pm("pm-a", PmState::Running, true),
            pm("pm-b", PmState::Running, false),
        ];
        assert_eq!(
            target_pm("pm-b", &b_resync).as_deref(),
            Some("pm-a"),
            "waits for sync"
        );
        assert!(!should_move_back("pm-a", "pm-b", &b_resync));
        assert!(should_move_back("pm-a", "pm-b", &both));
        assert!(!should_move_back("pm-b", "pm-b", &both));
        let none = [
            pm("pm-a", PmState::Broken, false),
            pm("pm-b", PmState::OffInMaintenance, true),
        ];
        assert_eq!(target_pm("pm-a", &none), None);
    }
}

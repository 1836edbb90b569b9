//! Data safety in a unit (ARCHITECTURE "Fencing"; SPEC S3, U6): the
//! partner's replica is recorded as *outdated* before the first write
//! acknowledged without it, and nothing promotes a replica that may be
//! behind without an administrator's explicit, informed decision.
//!
//! - [`Agent::outdate_partner`] is the mirror's outdate-peer step: a unit
//!   database commit guarded by "this PM holds its lease, is not fenced, and
//!   is still the volume's primary with this epoch".
//! - [`Agent::clear_outdated_marks`] clears the mark once the pair is in
//!   sync again (serialised with the outdate step inside the mirror).
//! - [`Agent::takeover_plan`] says which of the partner's VMs and volumes
//!   can be taken over here without losing an acknowledged write, and why
//!   the others cannot.
//! - [`Agent::promote_anyway`] is the administrator's "accept data loss".

use crate::{Agent, AgentError, Result};
use pairvisor_mirror::volume::LinkState;
use pairvisor_store::{Outdated, VmRecord, VolumeRecord};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Why a replica on this PM may not be promoted automatically (None: it may).
pub(crate) fn refusal(agent: &Agent, me: &str, v: &VolumeRecord) -> Option<String> {
    let Some(m) = v.mirror.as_ref() else {
        return Some(format!(
            "volume {} is not mirrored: its only copy is on the failed PM",
            v.name
        ));
    };
    if let Some(o) = m.outdated.as_ref().filter(|o| o.pm == me) {
        return Some(format!(
            "volume {}: the replica on {me} is outdated — {} acknowledged writes without it \
             after {}",
            v.name,
            o.by,
            crate::types::iso_time(o.since)
        ));
    }
    let Some(open) = agent.local_mirror(&v.name) else {
        return Some(format!("volume {}: no replica is open on {me}", v.name));
    };
    let st = open.vol.status();
    if !st.consistent {
        return Some(format!(
            "volume {}: the replica on {me} is incomplete (a resync into it was interrupted)",
            v.name
        ));
    }
    if st.gen.current == 0 {
        return Some(format!(
            "volume {}: the replica on {me} never held the volume's data (it was created empty \
             here)",
            v.name
        ));
    }
    None
}

/// What a takeover of the partner's VMs and volumes can do now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TakeoverPlan {
    /// VMs and primary volumes the partner holds.
    pub held: usize,
    /// VMs that can be taken over here.
    pub vms: Vec<String>,
    /// Volumes of no VM that can be taken over here.
    pub volumes: Vec<String>,
    /// VMs (or lone volumes) that cannot, with the reason.
    pub refused: Vec<(String, String)>,
}

impl TakeoverPlan {
    /// How many items can be taken over.
    pub fn promotable(&self) -> usize {
        self.vms.len() + self.volumes.len()
    }
}

/// The administrator's "promote anyway" (accept data loss) for a VM.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PromoteAnywayRequest {
    /// Must be the VM's name, typed again: the administrator confirms that
    /// writes missing from this PM's replicas are lost.
    pub confirm: String,
}

/// What a promote-anyway did and what it cost.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PromoteAnywayReport {
    /// The VM, now hosted here.
    pub vm: String,
    /// The PM it runs on now.
    pub host: String,
    /// Per volume: what is known to be lost.
    pub volumes: Vec<LossReport>,
}

/// What is known to be lost on one volume.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LossReport {
    /// Volume.
    pub volume: String,
    /// Why this replica was not promoted automatically (None: it was
    /// complete).
    pub refused_because: Option<String>,
    /// When the pair was last known in sync (seconds since the epoch), if
    /// the replica was outdated: writes after it are lost.
    pub last_in_sync: Option<u64>,
    /// The PM whose newer writes are abandoned.
    pub newer_data_on: Option<String>,
}

/// The partner's fence key, once it is fenced with its lease certainly
/// expired (a precondition of promote anyway).
fn fenced_partner(agent: &Agent, partner: &str) -> Result<(String, String)> {
    let u = agent
        .unit()
        .ok_or_else(|| AgentError::Conflict("this PM is not in a unit".into()))?;
    let key = u.partner_fence_key();
    if !u.partner_fenced_long_enough() || key.is_none() {
        return Err(AgentError::Conflict(format!(
            "PM {partner} is not fenced with its lease certainly expired: promoting here could \
             run the VM on both PMs. Wait until the failover has fenced it (it must be silent \
             on every link), or bring it back"
        )));
    }
    key.ok_or_else(|| AgentError::Conflict("the partner is unknown".into()))
}

impl Agent {
    /// The mirror's outdate-peer step for `volume` (see the module doc).
    /// `Ok(false)` without a commit when the unit has no second PM (nothing
    /// to outdate) — known, not assumed: a unit database that cannot say
    /// is an error, and the write waits.
    pub(crate) fn outdate_partner(&self, volume: &str, epoch: u64) -> Result<bool> {
        let u = self
            .unit()
            .ok_or_else(|| AgentError::Conflict("this PM is not in a unit".into()))?;
        let Some(partner) = u.partner_checked().map_err(AgentError::Conflict)? else {
            return Ok(false);
        };
        if !u.holds_lease() {
            return Err(AgentError::Conflict("this PM holds no lease".into()));
        }
        let me = u.pm_name();
        let (ftable, fkey) = u.fence_key();
        let now = crate::now();
        self.store().write(|tx| {
            if tx.exists_raw(&ftable, &fkey)? {
                return Err(AgentError::Conflict("this PM is fenced".into()));
            }
            let mut v: VolumeRecord = tx.get(volume)?.ok_or_else(|| AgentError::NotFound {
                kind: "volume",
                name: volume.to_string(),
            })?;
            let Some(m) = v.mirror.as_mut() else {
                return Ok(());
            };
            if m.primary != me || m.epoch != epoch {
                return Err(AgentError::Conflict(format!(
                    "this PM is no longer the volume's primary with epoch {epoch} (the unit \
                     database says {} with epoch {})",
                    m.primary, m.epoch
                )));
            }
            let since = m
                .outdated
                .as_ref()
                .filter(|o| o.pm == partner.name)
                .map_or(now, |o| o.since);
            m.outdated = Some(Outdated {
                pm: partner.name.clone(),
                by: me.clone(),
                epoch,
                since,
            });
            tx.put(&v)?;
            Ok(())
        })?;
        warn!(volume, partner = %partner.name, epoch, "partner's replica recorded as outdated");
        Ok(true)
    }

    /// The volumes the unit database makes this PM the primary of, with
    /// their open local replicas.
    pub(crate) fn my_primaries(
        &self,
    ) -> Vec<(VolumeRecord, std::sync::Arc<crate::unit::OpenMirror>)> {
        let Some(me) = self.pm_name() else {
            return Vec::new();
        };
        let Ok(volumes) = self.store().list::<VolumeRecord>() else {
            return Vec::new();
        };
        volumes
            .into_iter()
            .filter(|v| v.mirror.as_ref().is_some_and(|m| m.primary == me))
            .filter_map(|v| self.local_mirror(&v.name).map(|o| (v, o)))
            .collect()
    }

    /// Clears the outdated marks of this PM's primary volumes that are in
    /// sync with the partner again.
    pub(crate) async fn clear_outdated_marks(&self) {
        let Some(me) = self.pm_name() else { return };
        for (v, open) in self.my_primaries() {
            let st = open.vol.status();
            if st.link != LinkState::InSync {
                continue;
            }
            let Some(m) = v.mirror.as_ref().filter(|m| m.outdated.is_some()) else {
                // No mark, yet the mirror believes one is recorded (it was
                // dropped elsewhere): forget it, so that the next degraded
                // period records the partner again.
                if st.peer_outdated {
                    let _ = open.vol.clear_peer_outdated(async { Ok(()) }).await;
                }
                continue;
            };
            let epoch = m.epoch;
            let name = v.name.clone();
            let agent = self.clone();
            let me = me.clone();
            let r = open
                .vol
                .clear_peer_outdated(async move {
                    agent
                        .store()
                        .write(|tx| {
                            let Some(mut v) = tx.get::<VolumeRecord>(&name)? else {
                                return Ok(());
                            };
                            if let Some(m) = v.mirror.as_mut() {
                                if m.primary != me || m.epoch != epoch {
                                    return Err(AgentError::Conflict(
                                        "no longer the primary".into(),
                                    ));
                                }
                                m.outdated = None;
                            }
                            tx.put(&v)?;
                            Ok::<_, AgentError>(())
                        })
                        .map_err(|e| e.to_string())
                })
                .await;
            match r {
                Ok(true) => info!(volume = %v.name, "in sync again: the outdated mark is cleared"),
                Ok(false) => {}
                Err(e) => warn!(volume = %v.name, "cannot clear the outdated mark: {e}"),
            }
        }
    }

    /// Which of `partner`'s VMs and volumes this PM can take over without
    /// losing an acknowledged write (see [`TakeoverPlan`]).
    pub fn takeover_plan(&self, partner: &str) -> Result<TakeoverPlan> {
        let me = self.pm_name().unwrap_or_default();
        let volumes = self.store().list::<VolumeRecord>()?;
        let vol = |n: &str| volumes.iter().find(|v| v.name == n);
        let mut plan = TakeoverPlan::default();
        let mut of_vms = std::collections::HashSet::new();
        for vm in self.store().list::<VmRecord>()? {
            if vm.host.as_deref() != Some(partner) {
                continue;
            }
            plan.held += 1;
            let why: Vec<String> = vm
                .volumes()
                .filter_map(|n| {
                    of_vms.insert(n.clone());
                    vol(n).and_then(|v| refusal(self, &me, v))
                })
                .collect();
            if why.is_empty() {
                plan.vms.push(vm.name.clone());
            } else {
                plan.refused.push((vm.name.clone(), why.join("; ")));
            }
        }
        for v in &volumes {
            if v.mirror.as_ref().is_none_or(|m| m.primary != partner) {
                continue;
            }
            if of_vms.contains(&v.name) {
                continue;
            }
            plan.held += 1;
            match refusal(self, &me, v) {
                None => plan.volumes.push(v.name.clone()),
                Some(why) => plan.refused.push((v.name.clone(), why)),
            }
        }
        Ok(plan)
    }

    /// Raises (or refreshes) the critical alert of each VM that cannot be
    /// taken over, with the choices the administrator has.
    pub fn alert_stranded(&self, partner: &str, plan: &TakeoverPlan) {
        let me = self.pm_name().unwrap_or_default();
        for (item, why) in &plan.refused {
            self.raise_alert(
                "failover-refused",
                &format!("vm/{item}"),
                crate::Severity::Critical,
                format!(
                    "{item} stays down: PM {partner} failed and it cannot be restarted on {me} \
                     without losing acknowledged writes ({why}). The newest data is on {partner}"
                ),
                &format!(
                    "Bring PM {partner} back: {item} then runs there again with all its data. \
                     Only if {partner} is lost for good: promote anyway on {me} (`pairvisor vm \
                     promote-anyway {item} --yes`, or the console), which loses the writes \
                     missing here"
                ),
            );
        }
    }

    /// Clears the failover-refused alerts of items no longer refused.
    pub fn clear_stranded(&self, still: &TakeoverPlan) {
        let Ok(alerts) = self.store().list::<pairvisor_store::AlertRecord>() else {
            return;
        };
        for a in alerts.iter().filter(|a| a.kind == "failover-refused") {
            let item = a.subject.trim_start_matches("vm/");
            if !still.refused.iter().any(|(n, _)| n == item) {
                self.clear_alert("failover-refused", &a.subject);
            }
        }
    }

    /// SPEC U6 "promote anyway": the administrator accepts that writes
    /// missing from this PM's replicas of `vm`'s volumes are lost. Only
    /// while the VM's host is fenced with its lease certainly expired, so
    /// that the VM can never run on both PMs. The VM and its volumes move
    /// here with new epochs; outdated marks are dropped; the reconciler
    /// promotes (even an incomplete replica) and the VM starts if it was
    /// running.
    pub fn promote_anyway(
        &self,
        vm: &str,
        req: &PromoteAnywayRequest,
    ) -> Result<PromoteAnywayReport> {
        if req.confirm != vm {
            return Err(AgentError::Invalid(format!(
                "confirm must be the VM's name ('{vm}'), typed again: promoting anyway loses \
                 every write missing from this PM's replicas"
            )));
        }
        let me = self
            .pm_name()
            .ok_or_else(|| AgentError::Conflict("this PM is not in a unit".into()))?;
        let rec: VmRecord = self.load("VM", vm)?;
        let host = rec.host.clone().unwrap_or_default();
        if host == me {
            return Err(AgentError::Conflict(format!(
                "VM '{vm}' is already hosted by {me}: nothing to promote"
            )));
        }
        let (ftable, fkey) = fenced_partner(self, &host)?;
        let mut report = PromoteAnywayReport {
            vm: vm.to_string(),
            host: me.clone(),
            volumes: Vec::new(),
        };
        for n in rec.volumes() {
            let v: VolumeRecord = self.load("volume", n)?;
            let o = v.mirror.as_ref().and_then(|m| m.outdated.clone());
            report.volumes.push(LossReport {
                volume: n.clone(),
                refused_because: refusal(self, &me, &v),
                last_in_sync: o.as_ref().map(|o| o.since),
                newer_data_on: o.map(|o| o.by),
            });
        }
        self.store().write(|tx| {
            let Some(cur) = tx.get::<VmRecord>(vm)? else {
                return Err(AgentError::NotFound {
                    kind: "VM",
                    name: vm.to_string(),
                });
            };
            if cur.host != rec.host {
                return Err(AgentError::Conflict(format!(
                    "VM '{vm}' moved meanwhile (now hosted by {}); nothing done",
                    cur.host.as_deref().unwrap_or("?")
                )));
            }
            // Still fenced at the commit (a precondition): an unfence racing
            // with this would let both PMs run the VM.
            if !tx.exists_raw(&ftable, &fkey)? {
                return Err(AgentError::Conflict(format!(
                    "PM {host} was unfenced meanwhile (it is back): it runs {vm} with its data; \
                     nothing done"
                )));
            }
            crate::unit::hand_vm_to(tx, vm, &me)?;
            for n in cur.volumes() {
                if let Some(mut v) = tx.get::<VolumeRecord>(n)? {
                    if let Some(m) = v.mirror.as_mut() {
                        m.outdated = None;
                        m.accept_loss = true;
                    }
                    tx.put(&v)?;
                }
            }
            Ok::<_, AgentError>(())
        })?;
        self.clear_alert("failover-refused", &format!("vm/{vm}"));
        self.raise_alert(
            "data-loss-accepted",
            &format!("vm/{vm}"),
            crate::Severity::Critical,
            format!(
                "VM {vm} was promoted anyway on {me}: writes made on {host} after the last sync \
                 are lost ({})",
                report
                    .volumes
                    .iter()
                    .map(|l| match l.last_in_sync {
                        Some(t) => format!("{}: since {}", l.volume, crate::types::iso_time(t)),
                        None => format!(
                            "{}: {}",
                            l.volume,
                            l.refused_because.as_deref().unwrap_or("complete")
                        ),
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            &format!(
                "When {host} comes back its replicas are split-brain or behind: resolve each \
                 volume keeping {me}'s copy (`pairvisor volume resolve VOLUME --keep {me} \
                 --yes`, or Keep this copy on the volume's page) after saving anything needed \
                 from {host}"
            ),
        );
        warn!(vm, host = %me, "promoted anyway: the administrator accepted data loss");
        Ok(report)
    }

    /// After a forced promotion: the administrator's acceptance applied once,
    /// not to a later promotion of the same volume.
    pub(crate) fn accepted_loss_done(&self, volume: &str, epoch: u64) {
        let r = self.store().write(|tx| {
            if let Some(mut v) = tx.get::<VolumeRecord>(volume)? {
                if let Some(m) = v
                    .mirror
                    .as_mut()
                    .filter(|m| m.epoch == epoch && m.accept_loss)
                {
                    m.accept_loss = false;
                    tx.put(&v)?;
                }
            }
            Ok::<_, AgentError>(())
        });
        if let Err(e) = r {
            warn!(volume, "cannot record the forced promotion as done: {e}");
        }
    }

    /// Kills QEMU processes here whose VM the unit database hosts on the
    /// other PM (a takeover or a hand-over this PM missed), unless a
    /// migration is moving it. Runs at any time, not only at daemon start.
    pub(crate) async fn stop_foreign_vms(&self) {
        for name in self.running_here() {
            let Ok(Some(rec)) = self.store().get::<VmRecord>(&name) else {
                continue;
            };
            if self.is_mine(&rec) || self.migrating(&name) || self.incoming(&name) {
                continue;
            }
            let _g = self.inner.ops.lock().await;
            let Some(run) = self.running(&name) else {
                continue;
            };
            warn!(
                vm = %name,
                host = rec.host.as_deref().unwrap_or("?"),
                "stopping a QEMU here: the unit database hosts the VM on the other PM"
            );
            *run.intent.lock().unwrap_or_else(|e| e.into_inner()) = crate::Intent::Fenced;
            let _ = run.qemu.kill();
            let _ = run.qemu.wait_exit(std::time::Duration::from_secs(5)).await;
            self.forget(&name);
        }
    }
}

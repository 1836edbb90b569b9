//! Split-brain resolution (SPEC S4): both copies of a volume were written
//! independently (e.g. after a "promote anyway"). The unit never merges them
//! silently: the primary's mirror refuses to replicate, the administrator
//! sees both sides (generations, last write, what each wrote alone) and
//! names the copy to keep. The other replica is resynced from it (from the
//! dirty bitmaps, or in full when they do not cover the difference), both
//! are verified afterwards, and the decision is recorded in the unit
//! database (`MirrorRecord::keep`) so that either PM carries it out.

use crate::{Agent, AgentError, Result};
use pairvisor_mirror::replica::Decision;
use pairvisor_mirror::volume::LinkState;
use pairvisor_store::{VmRecord, VolumeRecord};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// One side of a split volume.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SplitSide {
    /// The PM holding this copy.
    pub pm: String,
    /// Its role now.
    pub role: String,
    /// Its current generation (hex): two copies with the same one hold the
    /// same data.
    pub generation: String,
    /// A complete image (not interrupted in a resync).
    pub consistent: bool,
    /// Regions it wrote without the other copy (from its dirty bitmap).
    pub dirty_regions: u64,
    /// The same in bytes (upper bound: whole regions).
    pub dirty_bytes: u64,
    /// When its data was last written (RFC 3339), if known.
    pub last_write: Option<String>,
}

/// A volume's split-brain state, both sides next to each other.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SplitBrainView {
    /// Volume.
    pub volume: String,
    /// Whether the copies diverged and a decision is needed.
    pub split_brain: bool,
    /// The replica link's state in a word.
    pub sync: String,
    /// The VM using the volume, and its state.
    pub vm: Option<String>,
    /// A resolution in progress: the PM whose copy is kept.
    pub resolving_keep: Option<String>,
    /// Both sides (the primary's first) when split.
    pub sides: Vec<SplitSide>,
    /// What the administrator can do.
    pub choices: String,
}

/// The administrator's decision.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    /// The PM whose copy is kept; the other copy is overwritten.
    pub keep: String,
    /// The volume's name typed again: the other copy's independent writes
    /// are discarded.
    pub confirm: String,
}

fn hex(g: u64) -> String {
    format!("{g:016x}")
}

impl Agent {
    /// The split-brain view of `volume` (answered by its primary's PM,
    /// which holds both sides' descriptions).
    pub fn split_brain(&self, volume: &str) -> Result<SplitBrainView> {
        let u = self
            .unit()
            .ok_or_else(|| AgentError::Conflict("this PM is not in a unit".into()))?;
        let me = u.pm_name();
        let v: VolumeRecord = self.load("volume", volume)?;
        let m = v
            .mirror
            .clone()
            .ok_or_else(|| AgentError::Conflict(format!("volume '{volume}' is not mirrored")))?;
        let open = self.local_mirror(volume).ok_or_else(|| {
            AgentError::Conflict(format!("volume '{volume}' has no replica open on {me}"))
        })?;
        let st = open.vol.status();
        let split = matches!(st.link, LinkState::SplitBrain { .. });
        let region = st.region_size;
        let mut sides = Vec::new();
        if split {
            sides.push(SplitSide {
                pm: me.clone(),
                role: "primary".into(),
                generation: hex(st.gen.current),
                consistent: st.consistent,
                dirty_regions: st.dirty_regions,
                dirty_bytes: st.dirty_regions * region,
                last_write: st.last_write_unix.map(crate::types::iso_time),
            });
            if let Some(p) = &st.split_brain_peer {
                sides.push(SplitSide {
                    pm: u.partner().map(|p| p.name).unwrap_or_default(),
                    role: "secondary".into(),
                    generation: hex(p.gen.current),
                    consistent: p.consistent,
                    dirty_regions: p.dirty_regions,
                    dirty_bytes: p.dirty_regions * region,
                    last_write: p.last_write_unix.map(crate::types::iso_time),
                });
            }
        }
        let choices = if split {
            format!(
                "Keep one copy: `pairvisor volume resolve {volume} --keep PM --yes` (or \"Keep \
                 this copy\" on the volume's page in the console). The other copy's independent \
                 writes are discarded; it is resynced from the kept one and both are verified. \
                 Keeping the copy of the PM that is not primary ({}) needs the VM stopped first",
                m.primary
            )
        } else {
            "nothing to resolve: the copies have not diverged".into()
        };
        Ok(SplitBrainView {
            volume: volume.to_string(),
            split_brain: split,
            sync: crate::unit::sync_word(&st),
            vm: v.vm.clone(),
            resolving_keep: m.keep.clone(),
            sides,
            choices,
        })
    }

    /// S4: keeps `req.keep`'s copy of `volume`; see the module doc.
    pub fn resolve_split_brain(
        &self,
        volume: &str,
        req: &ResolveRequest,
    ) -> Result<SplitBrainView> {
        if req.confirm != volume {
            return Err(AgentError::Invalid(format!(
                "confirm must be the volume's name ('{volume}'), typed again: the other copy's \
                 independent writes are discarded"
            )));
        }
        let u = self
            .unit()
            .ok_or_else(|| AgentError::Conflict("this PM is not in a unit".into()))?;
        let me = u.pm_name();
        let partner = u.partner().map(|p| p.name).unwrap_or_default();
        if req.keep != me && req.keep != partner {
            return Err(AgentError::Invalid(format!(
                "keep must name a PM of this unit: {me} or {partner}"
            )));
        }
        let view = self.split_brain(volume)?;
        if !view.split_brain {
            return Err(AgentError::Conflict(format!(
                "volume '{volume}' is {}, not split-brain: nothing to resolve",
                view.sync
            )));
        }
        let v: VolumeRecord = self.load("volume", volume)?;
        if req.keep != me {
            if let Some(vm) = &v.vm {
                let rec: VmRecord = self.load("VM", vm)?;
                if rec.state.has_process() {
                    return Err(AgentError::Conflict(format!(
                        "VM '{vm}' runs on {me}'s copy: stop it before keeping {}'s copy (its \
                         disk would change under it)",
                        req.keep
                    )));
                }
            }
        }
        let keep = req.keep.clone();
        self.store().write(|tx| {
            let Some(mut cur) = tx.get::<VolumeRecord>(volume)? else {
                return Err(AgentError::NotFound {
                    kind: "volume",
                    name: volume.to_string(),
                });
            };
            if cur.mirror.as_ref().map(|m| &m.primary) != Some(&me) {
                return Err(AgentError::Conflict(
                    "the volume's primary changed meanwhile; nothing done".into(),
                ));
            }
            if keep != me {
                match &cur.vm {
                    Some(vm) => {
                        crate::unit::hand_vm_to(tx, vm, &keep)?;
                    }
                    None => {
                        if let Some(m) = cur.mirror.as_mut() {
                            m.primary = keep.clone();
                            m.epoch += 1;
                            m.accept_loss = false;
                        }
                        tx.put(&cur)?;
                    }
                }
                cur = tx.get::<VolumeRecord>(volume)?.unwrap_or(cur);
            }
            let loser = if keep == me {
                partner.clone()
            } else {
                me.clone()
            };
            if let Some(m) = cur.mirror.as_mut() {
                m.keep = Some(keep.clone());
                // The copy being overwritten is behind from now on: never
                // promoted automatically until the pair is in sync again
                // (the kept side's primary clears the mark then).
                let since = m
                    .outdated
                    .as_ref()
                    .filter(|o| o.pm == loser)
                    .map_or(crate::now(), |o| o.since);
                m.outdated = Some(pairvisor_store::Outdated {
                    pm: loser.clone(),
                    by: keep.clone(),
                    epoch: m.epoch,
                    since,
                });
            }
            tx.put(&cur)?;
            Ok::<_, AgentError>(())
        })?;
        warn!(volume, keep = %req.keep, "split brain resolved by the administrator");
        self.clear_alert("split-brain", &format!("volume/{volume}"));
        Ok(SplitBrainView {
            resolving_keep: Some(req.keep.clone()),
            ..view
        })
    }

    /// Reconciler step for split brains: raises the alert of a split
    /// volume, applies the administrator's decision on the kept side, and
    /// verifies once the pair is in sync again.
    pub(crate) async fn reconcile_split_brains(&self) {
        let Some(me) = self.pm_name() else { return };
        for (v, open) in self.my_primaries() {
            let Some(m) = v.mirror.as_ref() else {
                continue;
            };
            let st = open.vol.status();
            let split = matches!(st.link, LinkState::SplitBrain { .. });
            let subject = format!("volume/{}", v.name);
            match m.keep.as_deref() {
                None if split && !self.alert_active("split-brain", &subject) => {
                    self.raise_alert(
                        "split-brain",
                        &subject,
                        crate::Severity::Critical,
                        format!(
                            "Volume {} is split-brain: both copies were written \
                                 independently and are not replicated",
                            v.name
                        ),
                        &format!(
                            "Compare both sides (`pairvisor volume split-brain {0}`) and \
                                 keep one: `pairvisor volume resolve {0} --keep PM --yes`",
                            v.name
                        ),
                    );
                }
                Some(k) if k == me => {
                    if st.decision != Some(Decision::KeepLocal) && st.link != LinkState::InSync {
                        if let Err(e) = open.vol.decide(Decision::KeepLocal).await {
                            warn!(volume = %v.name, "cannot record the split-brain decision: {e}");
                        }
                        continue;
                    }
                    if st.link != LinkState::InSync {
                        continue;
                    }
                    // Resynced from the kept copy: verify both.
                    let report = open.vol.verify().await;
                    let epoch = m.epoch;
                    let name = v.name.clone();
                    let r = self.store().write(|tx| {
                        if let Some(mut cur) = tx.get::<VolumeRecord>(&name)? {
                            if let Some(m) = cur.mirror.as_mut().filter(|m| m.epoch == epoch) {
                                m.keep = None;
                            }
                            tx.put(&cur)?;
                        }
                        Ok::<_, AgentError>(())
                    });
                    if let Err(e) = r {
                        warn!(volume = %v.name, "cannot record the resolution: {e}");
                        continue;
                    }
                    match report {
                        Ok(rep) if rep.differing_count == 0 => {
                            info!(volume = %v.name, "split brain resolved: resynced and verified");
                            self.clear_alert("split-brain", &subject);
                        }
                        Ok(rep) => self.raise_alert(
                            "split-brain",
                            &subject,
                            crate::Severity::Critical,
                            format!(
                                "Volume {}: after resolving the split brain, verify found {} \
                                 differing regions",
                                v.name, rep.differing_count
                            ),
                            "Run the resolution again; if it persists, check the disks of both PMs",
                        ),
                        Err(e) => warn!(volume = %v.name, "verify after resolution failed: {e}"),
                    }
                }
                _ => {}
            }
        }
    }

    fn alert_active(&self, kind: &str, subject: &str) -> bool {
        self.store()
            .get::<pairvisor_store::AlertRecord>(&format!("{kind}:{subject}"))
            .ok()
            .flatten()
            .is_some()
    }
}

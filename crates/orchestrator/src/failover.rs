//! Failover (SPEC U6, "Failover timeline" of ARCHITECTURE): each PM watches
//! its partner and, when the partner is silent on every link,
//!
//! 1. fences it through the unit database — a Raft commit, so it needs a
//!    majority: with a witness the survivor and the witness suffice; a lone
//!    PM without a witness cannot, and never takes over by itself — and,
//!    unless the silence was planned, counts it as a PM failure (U4);
//! 2. waits until the partner's lease has certainly expired: every voter
//!    refuses the partner's lease requests from the moment it has applied
//!    the fence, so the partner's last lease ends at most `lease_ms` after
//!    the fence, plus `drift_margin_ms`;
//! 3. takes the partner's VMs and volumes over ([`Agent::take_over_from`]):
//!    new epochs, replicas promoted here, VMs that were running started
//!    here.
//!
//! Only what can be promoted without losing an acknowledged write is taken
//! over ([`Agent::takeover_plan`]): a replica the partner outdated (it wrote
//! without it), an incomplete one, or one created empty here is never
//! promoted; such VMs stay down with a critical alert until the partner
//! returns or the administrator promotes anyway.
//!
//! When the fenced partner is heard again and holds nothing this PM could
//! take over, it is unfenced: it regains its lease, runs what it still
//! hosts, its secondaries resync from this PM, and it is a redundant
//! partner again.
//!
//! The decisions are [`pairvisor_model::fencing::failover`] (table-tested);
//! this loop gathers what it needs and carries them out.

use pairvisor_agent::Agent;
use pairvisor_model::fencing::{failover, FailoverAction, FailoverView};
use pairvisor_unit::{LeaseKeeper, UnitService};
use pairvisor_unitdb::{Batch, Fence, UnitDb, FENCES_TABLE};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// The failover loop of one PM (runs until aborted).
pub async fn run(agent: Agent, svc: Arc<UnitService>, db: UnitDb, lease: Arc<LeaseKeeper>) {
    let timing = svc.timing();
    let mut tick = tokio::time::interval(Duration::from_millis(timing.heartbeat_ms.max(50) / 2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let me = db.node_id();
    // When this PM saw the partner's fence applied (its own clock).
    let mut fence_seen: Option<(u64, Instant)> = None;
    let mut lost_since: Option<Instant> = None;
    let mut heard_since: Option<Instant> = None;
    let mut health_since: Option<Instant> = None;
    let mut last_wait = String::new();
    let mut refused_shown: Vec<(String, String)> = Vec::new();
    loop {
        tick.tick().await;
        let Some(partner) = UnitService::pms_of(&db)
            .into_iter()
            .find(|p| p.node_id != me)
        else {
            continue;
        };
        let now = Instant::now();
        let health = svc.health().await;
        if health.is_none() {
            health_since = None;
        }
        // Heartbeats need a detection period after they start before
        // "never heard" means "lost" (a PM that just joined, or restarted).
        let settled = health.is_some()
            && now.duration_since(*health_since.get_or_insert(now))
                >= Duration::from_millis(timing.detection_ms() + timing.heartbeat_ms);
        let lost = settled && health.is_some_and(|h| h.partner_lost);
        if lost {
            heard_since = None;
            lost_since.get_or_insert(now);
        } else {
            lost_since = None;
            if settled {
                heard_since.get_or_insert(now);
            }
        }
        let partner_fenced = db.fenced(partner.node_id);
        if !partner_fenced {
            fence_seen = None;
        }
        let ms = |since: Option<Instant>| since.map(|t| now.duration_since(t).as_millis() as u64);
        let name = partner.addrs.name.clone();
        let (my_vms, _) = agent.hosted_by(&svc_name(&svc)).unwrap_or((0, 0));
        let (partner_vms, _) = agent.hosted_by(&name).unwrap_or((0, 0));
        let plan = if partner_fenced {
            agent.takeover_plan(&name).ok()
        } else {
            None
        };
        let view = FailoverView {
            me_fenced: db.fenced(me),
            holds_lease: lease.holds(),
            partner_lost_ms: ms(lost_since),
            partner_heard_ms: ms(heard_since),
            partner_fenced_ms: partner_fenced.then(|| {
                let (_, seen) = *fence_seen.get_or_insert((partner.node_id, now));
                now.duration_since(seen).as_millis() as u64
            }),
            planned: planned(&agent, &name),
            my_vms,
            partner_vms,
            partner_holds: plan.as_ref().map_or(0, |p| p.held),
            partner_promotable: plan.as_ref().map_or(0, |p| p.promotable()),
        };
        // A planned absence (maintenance, unit shutdown) strands nothing.
        // The VMs are stranded (and "promote anyway" offered) only once the
        // fenced partner's lease has certainly lapsed: before that, promote
        // anyway is refused, and an admin shown the offer would hit a 409.
        let lease_lapsed = view
            .partner_fenced_ms
            .is_some_and(|f| f >= timing.worst_case_takeover_ms());
        let refused = plan
            .as_ref()
            .filter(|_| !view.planned && lease_lapsed)
            .map(|p| p.refused.clone())
            .unwrap_or_default();
        if refused != refused_shown {
            let shown = pairvisor_agent::TakeoverPlan {
                refused: refused.clone(),
                ..Default::default()
            };
            agent.alert_stranded(&name, &shown);
            agent.clear_stranded(&shown);
            refused_shown = refused;
        }
        match failover(view, timing) {
            FailoverAction::Wait { reason } => {
                if reason != last_wait {
                    debug!(partner = %name, "failover: {reason}");
                    last_wait = reason;
                }
            }
            FailoverAction::Fence { count_failure } => {
                let reason = format!(
                    "PM {name} silent on every link; fenced by {}",
                    svc_name(&svc)
                );
                match fence_unless_fenced(&db, partner.node_id, &reason).await {
                    Ok(index) => {
                        warn!(partner = %name, index, "partner fenced");
                        fence_seen = Some((partner.node_id, Instant::now()));
                        // A failure (U4) even when it hosted nothing at that
                        // moment, e.g. it died while a VM was migrating to
                        // it and the VM stayed here.
                        if count_failure {
                            agent.record_pm_failure(&name);
                        }
                    }
                    Err(e) => warn!(partner = %name, "cannot fence the partner: {e}"),
                }
            }
            FailoverAction::TakeOver => match agent.take_over_from(&name) {
                Ok(t) => info!(
                    partner = %name,
                    vms = ?t.vms,
                    volumes = ?t.volumes,
                    "took over the fenced partner's VMs and volumes"
                ),
                Err(e) => warn!("takeover failed (will retry): {e}"),
            },
            FailoverAction::Refuse { reason } => {
                if reason != last_wait {
                    warn!(partner = %name, "failover refused: {reason}");
                    last_wait = reason;
                }
            }
            FailoverAction::Unfence => match db.unfence(partner.node_id).await {
                Ok(_) => {
                    info!(partner = %name, "partner is back: unfenced");
                    fence_seen = None;
                    heard_since = None;
                }
                Err(e) => warn!("cannot unfence the partner: {e}"),
            },
        }
    }
}

/// A unit shutdown, or a partner shut down in maintenance, is not a
/// failure: nothing to take over and nothing to count.
fn planned(agent: &Agent, partner: &str) -> bool {
    agent.unit_power().power != pairvisor_store::UnitPower::Running
        || agent.pm_state(partner) == pairvisor_model::pm::PmState::OffInMaintenance
}

fn svc_name(svc: &UnitService) -> String {
    svc.pm().map(|p| p.name.clone()).unwrap_or_default()
}

/// Fences `partner` only if this PM is not fenced itself: when both PMs lost
/// each other but each reaches the witness, both try, Raft orders the two
/// batches, and the second one is rejected — exactly one PM survives.
async fn fence_unless_fenced(
    db: &UnitDb,
    partner: u64,
    reason: &str,
) -> Result<u64, pairvisor_unitdb::WriteError> {
    let me = db.node_id();
    let fence = Fence {
        node: partner,
        fenced_at: 0,
        reason: reason.to_string(),
        by: me,
        at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    };
    let batch = Batch::new()
        .require_absent(FENCES_TABLE, &me.to_string())
        .put_json(FENCES_TABLE, &partner.to_string(), &fence)
        .map_err(|e| pairvisor_unitdb::WriteError::Invalid(e.to_string()))?;
    let index = db.write(batch).await?;
    let _ = db.wait_applied(index, Duration::from_secs(5)).await;
    Ok(index)
}

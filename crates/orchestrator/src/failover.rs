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
//! When the fenced partner is heard again and hosts nothing any more, it is
//! unfenced: it regains its lease, its replicas (now secondaries) resync
//! from this PM, and it is a redundant partner again.

use pairvisor_agent::Agent;
use pairvisor_unit::{LeaseKeeper, UnitService};
use pairvisor_unitdb::{Batch, Fence, UnitDb, FENCES_TABLE};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long the partner must be heard again before it is unfenced.
const HEARD_BEFORE_UNFENCE: Duration = Duration::from_secs(2);

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
    loop {
        tick.tick().await;
        let Some(partner) = UnitService::pms_of(&db)
            .into_iter()
            .find(|p| p.node_id != me)
        else {
            continue;
        };
        if db.fenced(me) {
            // This PM is fenced: its lease lapses and the agent stops its
            // VMs; the partner unfences it once it has taken over.
            continue;
        }
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
            let since = *lost_since.get_or_insert(now);
            if !db.fenced(partner.node_id) {
                fence_seen = None;
                if !lease.holds() {
                    continue;
                }
                // Of two PMs that lost each other but both reach the
                // witness, the one running VMs should win the fence race:
                // the other gives it one more detection period.
                let (my_vms, _) = agent.hosted_by(&svc_name(&svc)).unwrap_or((0, 0));
                let (their_vms, _) = agent.hosted_by(&partner.addrs.name).unwrap_or((0, 0));
                if my_vms == 0
                    && their_vms > 0
                    && now.duration_since(since) < Duration::from_millis(timing.detection_ms())
                {
                    continue;
                }
                let reason = format!(
                    "PM {} silent on every link; fenced by {}",
                    partner.addrs.name,
                    svc_name(&svc)
                );
                match fence_unless_fenced(&db, partner.node_id, &reason).await {
                    Ok(index) => {
                        warn!(partner = %partner.addrs.name, index, "partner fenced");
                        fence_seen = Some((partner.node_id, Instant::now()));
                        // A failure (U4) even when it hosted nothing at that
                        // moment, e.g. it died while a VM was migrating to
                        // it and the VM stayed here.
                        if !planned(&agent, &partner.addrs.name) {
                            agent.record_pm_failure(&partner.addrs.name);
                        }
                    }
                    Err(e) => warn!(partner = %partner.addrs.name, "cannot fence the partner: {e}"),
                }
                continue;
            }
        } else {
            lost_since = None;
        }
        if !db.fenced(partner.node_id) {
            fence_seen = None;
            continue;
        }
        // The partner is fenced.
        let (_, seen) = *fence_seen.get_or_insert((partner.node_id, Instant::now()));
        let (vms, vols) = agent.hosted_by(&partner.addrs.name).unwrap_or((0, 0));
        if vms + vols > 0 && !planned(&agent, &partner.addrs.name) {
            let wait = Duration::from_millis(timing.lease_ms + timing.drift_margin_ms);
            if now < seen + wait || !lease.holds() {
                continue;
            }
            match agent.take_over_from(&partner.addrs.name) {
                Ok(t) => info!(
                    partner = %partner.addrs.name,
                    vms = ?t.vms,
                    volumes = ?t.volumes,
                    "took over the fenced partner's VMs and volumes"
                ),
                Err(e) => warn!("takeover failed (will retry): {e}"),
            }
            continue;
        }
        if lost {
            continue;
        }
        // Heard again and hosting nothing: let it back in.
        let since = *heard_since.get_or_insert(now);
        if now.duration_since(since) >= HEARD_BEFORE_UNFENCE {
            match db.unfence(partner.node_id).await {
                Ok(_) => {
                    info!(partner = %partner.addrs.name, "partner is back: unfenced");
                    fence_seen = None;
                    heard_since = None;
                }
                Err(e) => warn!("cannot unfence the partner: {e}"),
            }
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

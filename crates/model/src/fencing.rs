//! Leases, quorum and failover decisions (SPEC U6; ARCHITECTURE "Fencing").
//!
//! Times are milliseconds on the deciding PM's monotonic clock; the lease
//! holder and the survivor never compare clocks directly: the holder stops
//! at its own expiry, the survivor waits for its own view of that expiry plus
//! a drift margin.

use serde::{Deserialize, Serialize};

/// Timing of leases and heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTiming {
    /// Heartbeat interval on each link.
    pub heartbeat_ms: u64,
    /// Missed heartbeats on every link before the partner counts as lost.
    pub missed_heartbeats: u32,
    /// Lease duration granted by the majority.
    pub lease_ms: u64,
    /// Safety margin for clock drift between PMs.
    pub drift_margin_ms: u64,
}

impl Default for LeaseTiming {
    /// ARCHITECTURE's failover timeline: partner lost within 2 s, lease
    /// expiry within 5 s.
    fn default() -> Self {
        LeaseTiming {
            heartbeat_ms: 500,
            missed_heartbeats: 4,
            lease_ms: 4000,
            drift_margin_ms: 500,
        }
    }
}

impl LeaseTiming {
    /// Time after the last heartbeat at which a partner counts as lost.
    pub fn detection_ms(&self) -> u64 {
        self.heartbeat_ms * self.missed_heartbeats as u64
    }

    /// Worst-case time from a PM's death to the survivor being allowed to
    /// take over its VMs: the lease it last renewed just before dying must
    /// expire, plus the drift margin.
    pub fn worst_case_takeover_ms(&self) -> u64 {
        self.lease_ms + self.drift_margin_ms
    }
}

/// A PM's own lease, as it sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// When the lease ends on this PM's clock.
    pub expires_at_ms: u64,
}

impl Lease {
    /// Whether the holder may still run VMs and acknowledge degraded writes.
    pub fn valid(&self, now_ms: u64) -> bool {
        now_ms < self.expires_at_ms
    }
}

/// How many voters make a majority.
pub fn majority(voters: usize) -> usize {
    voters / 2 + 1
}

/// How long a fenced partner must be heard again before it is unfenced.
pub const HEARD_BEFORE_UNFENCE_MS: u64 = 2000;

/// What one PM knows about its partner when its failover loop decides
/// (SPEC U6; docs/fencing.md). Durations are on this PM's own clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FailoverView {
    /// This PM is fenced itself.
    pub me_fenced: bool,
    /// This PM holds its lease.
    pub holds_lease: bool,
    /// The partner has been silent on every link for this long (`None`:
    /// heard, or heartbeats have not run for a detection period yet).
    pub partner_lost_ms: Option<u64>,
    /// The partner has been heard again without a gap for this long.
    pub partner_heard_ms: Option<u64>,
    /// The partner is fenced, seen applied here this long ago.
    pub partner_fenced_ms: Option<u64>,
    /// The partner's silence is planned (unit shutdown, maintenance).
    pub planned: bool,
    /// VMs hosted by this PM.
    pub my_vms: usize,
    /// VMs hosted by the partner.
    pub partner_vms: usize,
    /// VMs and primary volumes the partner holds.
    pub partner_holds: usize,
    /// Of those, how many this PM could take over without losing an
    /// acknowledged write (its replicas not outdated, consistent, and
    /// having held the volume's data).
    pub partner_promotable: usize,
}

/// What the failover loop does next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum FailoverAction {
    /// Nothing to do now.
    Wait {
        /// Why.
        reason: String,
    },
    /// Fence the partner through the unit database (only if this PM is not
    /// fenced itself); `count_failure`: it went silent unplanned (U4).
    Fence {
        /// Count a PM failure.
        count_failure: bool,
    },
    /// Take over the partner's VMs and volumes that can be taken over.
    TakeOver,
    /// Let the fenced partner back in (it regains its lease).
    Unfence,
    /// The partner's VMs cannot be taken over without losing acknowledged
    /// writes: they stay down (critical alert) until the partner returns or
    /// the administrator promotes anyway.
    Refuse {
        /// Why.
        reason: String,
    },
}

/// The failover state machine: one decision per tick from what the PM
/// observes. Pure: the orchestrator gathers the view and carries the action
/// out.
pub fn failover(v: FailoverView, t: LeaseTiming) -> FailoverAction {
    let wait = |reason: &str| FailoverAction::Wait {
        reason: reason.to_string(),
    };
    if v.me_fenced {
        return wait(
            "this PM is fenced: its lease lapses and its VMs stop; the partner unfences it once \
             it has applied its takeover",
        );
    }
    let Some(fenced_ms) = v.partner_fenced_ms else {
        let Some(lost_ms) = v.partner_lost_ms else {
            return wait("the partner is heard");
        };
        if !v.holds_lease {
            return wait("the partner is lost but this PM holds no lease: it cannot fence");
        }
        // Of two PMs that lost each other but both reach the witness, the
        // one running VMs should win the fence race: the other gives it one
        // more detection period.
        if v.my_vms == 0 && v.partner_vms > 0 && lost_ms < t.detection_ms() {
            return wait(
                "the partner runs VMs and this PM none: it gets the first chance to fence",
            );
        }
        return FailoverAction::Fence {
            count_failure: !v.planned,
        };
    };
    let heard_long_enough = v
        .partner_heard_ms
        .is_some_and(|h| h >= HEARD_BEFORE_UNFENCE_MS);
    if v.partner_holds > 0 && !v.planned {
        if fenced_ms < t.worst_case_takeover_ms() {
            return wait("the fenced partner's lease may still be valid");
        }
        if v.partner_promotable > 0 {
            if !v.holds_lease {
                return wait("this PM holds no lease: it cannot take over");
            }
            return FailoverAction::TakeOver;
        }
        // Nothing here can be promoted without losing writes: the partner
        // holds the newest data. Once it is back, it runs its VMs again.
        if heard_long_enough {
            return FailoverAction::Unfence;
        }
        return FailoverAction::Refuse {
            reason: "the partner's VMs cannot be taken over without losing acknowledged \
                     writes: the replicas here are outdated, incomplete or empty"
                .into(),
        };
    }
    if v.partner_lost_ms.is_some() || !heard_long_enough {
        return wait("the partner is fenced and not back yet");
    }
    FailoverAction::Unfence
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majority_table() {
        for (voters, m) in [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3)] {
            assert_eq!(majority(voters), m);
        }
    }

    #[test]
    fn lease_validity() {
        let l = Lease {
            expires_at_ms: 1000,
        };
        assert!(l.valid(999));
        assert!(!l.valid(1000));
    }

    #[test]
    fn default_timing_meets_the_failover_budget() {
        let t = LeaseTiming::default();
        assert!(t.detection_ms() <= 2000, "partner noticed within 2 s");
        assert!(
            t.worst_case_takeover_ms() <= 5000,
            "lease expiry within 5 s"
        );
    }

    /// Named scenarios for the failover state machine.
    #[test]
    fn failover_table() {
        let t = LeaseTiming::default();
        let base = FailoverView {
            holds_lease: true,
            ..Default::default()
        };
        let fenced = |ms, holds, promotable| FailoverView {
            partner_fenced_ms: Some(ms),
            partner_lost_ms: Some(10_000),
            partner_vms: holds,
            partner_holds: holds,
            partner_promotable: promotable,
            ..base
        };
        let cases: Vec<(&str, FailoverView, &str)> = vec![
            ("partner heard: nothing to do", base, "wait"),
            (
                "this PM fenced: never acts",
                FailoverView {
                    me_fenced: true,
                    partner_lost_ms: Some(9000),
                    ..base
                },
                "wait",
            ),
            (
                "partner lost, lease held: fence and count",
                FailoverView {
                    partner_lost_ms: Some(2000),
                    ..base
                },
                "fence+count",
            ),
            (
                "partner lost in maintenance: fence, no failure counted",
                FailoverView {
                    partner_lost_ms: Some(2000),
                    planned: true,
                    ..base
                },
                "fence",
            ),
            (
                "partner lost, no lease: cannot fence",
                FailoverView {
                    partner_lost_ms: Some(2000),
                    holds_lease: false,
                    ..base
                },
                "wait",
            ),
            (
                "partner runs VMs, this PM none: it gets a head start",
                FailoverView {
                    partner_lost_ms: Some(1000),
                    partner_vms: 1,
                    ..base
                },
                "wait",
            ),
            (
                "head start over",
                FailoverView {
                    partner_lost_ms: Some(2500),
                    partner_vms: 1,
                    ..base
                },
                "fence+count",
            ),
            ("fenced, lease may still run", fenced(1000, 2, 2), "wait"),
            (
                "fenced, lease over: take over",
                fenced(5000, 2, 2),
                "takeover",
            ),
            (
                "fenced, some promotable: take those over",
                fenced(5000, 2, 1),
                "takeover",
            ),
            (
                "fenced, lease over, but this PM lost its own lease",
                FailoverView {
                    holds_lease: false,
                    ..fenced(5000, 2, 2)
                },
                "wait",
            ),
            (
                "double fault: the replicas here are outdated",
                fenced(5000, 2, 0),
                "refuse",
            ),
            (
                "double fault, the partner is back: it gets its VMs again",
                FailoverView {
                    partner_lost_ms: None,
                    partner_heard_ms: Some(2500),
                    ..fenced(5000, 2, 0)
                },
                "unfence",
            ),
            (
                "double fault, partner heard only briefly",
                FailoverView {
                    partner_lost_ms: None,
                    partner_heard_ms: Some(500),
                    ..fenced(5000, 2, 0)
                },
                "refuse",
            ),
            (
                "took over, partner back and hosting nothing: unfence",
                FailoverView {
                    partner_lost_ms: None,
                    partner_heard_ms: Some(2500),
                    ..fenced(9000, 0, 0)
                },
                "unfence",
            ),
            (
                "took over, partner still silent",
                fenced(9000, 0, 0),
                "wait",
            ),
            (
                "planned shutdown: nothing taken over, unfenced when back",
                FailoverView {
                    planned: true,
                    partner_lost_ms: None,
                    partner_heard_ms: Some(3000),
                    ..fenced(9000, 2, 2)
                },
                "unfence",
            ),
        ];
        for (name, view, want) in cases {
            let got = match failover(view, t) {
                FailoverAction::Wait { .. } => "wait",
                FailoverAction::Fence {
                    count_failure: true,
                } => "fence+count",
                FailoverAction::Fence {
                    count_failure: false,
                } => "fence",
                FailoverAction::TakeOver => "takeover",
                FailoverAction::Unfence => "unfence",
                FailoverAction::Refuse { .. } => "refuse",
            };
            assert_eq!(got, want, "{name}: {view:?}");
        }
    }
}

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

/// What a PM that cannot reach its partner does with the partner's VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum TakeoverDecision {
    /// The partner still answers or its lease may still be valid: wait.
    Wait {
        /// Why.
        reason: String,
    },
    /// Promote replicas and start the partner's VMs here.
    TakeOver,
    /// Without a majority, never start the partner's VMs (U6); the admin may
    /// force quorum.
    NeedsForceQuorum {
        /// What the admin must do.
        reason: String,
    },
}

/// What the survivor knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SurvivorView {
    /// Milliseconds since the partner was last heard on any link.
    pub partner_silent_ms: u64,
    /// This PM is part of a majority (with the witness).
    pub has_majority: bool,
    /// Milliseconds since the partner's lease was last renewed by the
    /// majority (as seen by this PM), if known.
    pub since_partner_lease_renewal_ms: Option<u64>,
    /// The administrator forced quorum on this PM.
    pub forced_quorum: bool,
}

/// Decides whether the survivor may take over its partner's VMs (U6).
pub fn takeover(view: SurvivorView, t: LeaseTiming) -> TakeoverDecision {
    if view.partner_silent_ms < t.detection_ms() {
        return TakeoverDecision::Wait {
            reason: format!(
                "partner last heard {} ms ago; it counts as lost after {} ms",
                view.partner_silent_ms,
                t.detection_ms()
            ),
        };
    }
    if !view.has_majority && !view.forced_quorum {
        return TakeoverDecision::NeedsForceQuorum {
            reason: "this PM has no majority (no witness reachable): it will not start its \
                     partner's VMs by itself. If the partner is really down, force quorum on \
                     this PM after checking which PM holds the newer data"
                .into(),
        };
    }
    // The partner's lease must certainly have ended. With forced quorum the
    // admin asserted the partner is down; the lease wait still applies.
    let since = view
        .since_partner_lease_renewal_ms
        .unwrap_or(view.partner_silent_ms);
    if since < t.worst_case_takeover_ms() {
        return TakeoverDecision::Wait {
            reason: format!(
                "partner's lease may still be valid for {} ms",
                t.worst_case_takeover_ms() - since
            ),
        };
    }
    TakeoverDecision::TakeOver
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

    #[test]
    fn takeover_table() {
        let t = LeaseTiming::default();
        let v = |silent, majority, since, forced| SurvivorView {
            partner_silent_ms: silent,
            has_majority: majority,
            since_partner_lease_renewal_ms: since,
            forced_quorum: forced,
        };
        let cases: &[(SurvivorView, &str)] = &[
            (v(500, true, Some(500), false), "wait"),
            (v(3000, true, Some(3000), false), "wait"), // lease may be valid
            (v(5000, true, Some(4600), false), "takeover"),
            (v(60_000, false, None, false), "force"),
            (v(60_000, false, None, true), "takeover"),
            (v(3000, false, Some(3000), true), "wait"),
        ];
        for (view, want) in cases {
            let d = takeover(*view, t);
            let got = match d {
                TakeoverDecision::Wait { .. } => "wait",
                TakeoverDecision::TakeOver => "takeover",
                TakeoverDecision::NeedsForceQuorum { .. } => "force",
            };
            assert_eq!(got, *want, "{view:?}: {d:?}");
        }
    }
}

//! Failure-rate counters (SPEC V6 for VMs, U4 for PMs). Time is passed in as
//! seconds since the Unix epoch so that the rule is testable.

use serde::{Deserialize, Serialize};

/// How many failures within which window are tolerated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MtbfThreshold {
    /// Failures tolerated within the window; one more is too many.
    pub max_failures: u32,
    /// The sliding window, in seconds.
    pub window_secs: u64,
}

impl MtbfThreshold {
    /// SPEC V6's example: more than 3 crashes in an hour makes a VM critical.
    pub const VM_DEFAULT: MtbfThreshold = MtbfThreshold {
        max_failures: 3,
        window_secs: 3600,
    };
    /// SPEC U4: a PM failing 3 or more times within an hour is taken out of
    /// service, i.e. 2 failures are tolerated.
    pub const PM_DEFAULT: MtbfThreshold = MtbfThreshold {
        max_failures: 2,
        window_secs: 3600,
    };
}

impl Default for MtbfThreshold {
    fn default() -> Self {
        Self::VM_DEFAULT
    }
}

/// The failure history of one VM or PM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MtbfCounter {
    /// Times of the failures still inside the window (seconds since epoch).
    pub failures: Vec<u64>,
}

impl MtbfCounter {
    /// Records a failure at `now` and tells whether the threshold is now
    /// exceeded (the VM must go `critical`, the PM out of service).
    pub fn record(&mut self, now: u64, threshold: MtbfThreshold) -> bool {
        self.failures
            .retain(|t| now.saturating_sub(*t) < threshold.window_secs);
        self.failures.push(now);
        self.failures.len() > threshold.max_failures as usize
    }

    /// Failures within the window ending at `now`.
    pub fn count(&self, now: u64, threshold: MtbfThreshold) -> usize {
        self.failures
            .iter()
            .filter(|t| now.saturating_sub(**t) < threshold.window_secs)
            .count()
    }

    /// Clears the history (*Reset Device*).
    pub fn reset(&mut self) {
        self.failures.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_fourth_crash_in_an_hour_is_critical() {
        let t = MtbfThreshold::VM_DEFAULT;
        let mut c = MtbfCounter::default();
        let steps: &[(u64, bool)] = &[(0, false), (600, false), (1200, false), (1800, true)];
        for (now, critical) in steps {
            assert_eq!(c.record(*now, t), *critical, "at {now}");
        }
    }

    #[test]
    fn old_crashes_fall_out_of_the_window() {
        let t = MtbfThreshold::VM_DEFAULT;
        let mut c = MtbfCounter::default();
        for now in [0, 1000, 2000] {
            assert!(!c.record(now, t));
        }
        // the crash at 0 is more than an hour old at 3600
        assert!(!c.record(3600, t));
        assert_eq!(c.count(3600, t), 3);
        assert!(c.record(3700, t));
    }

    #[test]
    fn pm_third_failure_in_an_hour_is_out_of_service() {
        let t = MtbfThreshold::PM_DEFAULT;
        let mut c = MtbfCounter::default();
        assert!(!c.record(10, t));
        assert!(!c.record(20, t));
        assert!(c.record(30, t));
        c.reset();
        assert!(!c.record(40, t));
    }
}

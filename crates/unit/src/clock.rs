//! The clock that leases and heartbeats are timed on: `CLOCK_BOOTTIME`.
//!
//! Why not [`std::time::Instant`]: on Linux it reads `CLOCK_MONOTONIC`,
//! which stops while the system is suspended. A PM that is suspended and
//! resumed would see its lease deadline as still in the future although the
//! voters (whose clocks kept running) have long considered it expired and
//! the partner may have taken over. `CLOCK_BOOTTIME` is the same monotonic
//! clock but keeps counting during suspend, so after a resume every check
//! against a [`BootInstant`] is right at once, even before any timer fires.
//!
//! Tokio timers still run on the monotonic clock; code may sleep on them,
//! but must decide by comparing [`BootInstant`]s.

use std::ops::{Add, Sub};
use std::time::Duration;

/// A point on `CLOCK_BOOTTIME` (time since boot, including suspend).
/// Ordered; only meaningful within one boot of one machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootInstant(Duration);

impl BootInstant {
    /// Now.
    pub fn now() -> BootInstant {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec owned by this frame;
        // clock_gettime only writes into it.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        // CLOCK_BOOTTIME exists since Linux 2.6.39; clock_gettime cannot fail
        // with a valid clock id and pointer.
        assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
        BootInstant(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    /// Time since boot.
    pub fn since_boot(self) -> Duration {
        self.0
    }

    /// The instant `d` after boot (the inverse of [`BootInstant::since_boot`]).
    pub fn from_since_boot(d: Duration) -> BootInstant {
        BootInstant(d)
    }

    /// `self − earlier`, or zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: BootInstant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// Time since `self` (zero if `self` is in the future).
    pub fn elapsed(self) -> Duration {
        BootInstant::now().saturating_duration_since(self)
    }

    /// `self − d`, or `None` before boot.
    pub fn checked_sub(self, d: Duration) -> Option<BootInstant> {
        self.0.checked_sub(d).map(BootInstant)
    }

    /// The Tokio instant at which this boot instant will be reached if the
    /// system is not suspended meanwhile (for sleeping until it; a suspend
    /// only makes such a timer late, never early).
    pub fn to_tokio(self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.saturating_duration_since(BootInstant::now())
    }
}

impl Add<Duration> for BootInstant {
    type Output = BootInstant;
    fn add(self, d: Duration) -> BootInstant {
        BootInstant(self.0 + d)
    }
}

impl Sub<Duration> for BootInstant {
    type Output = BootInstant;
    /// Panics before boot, like [`std::time::Instant`]'s `-`.
    fn sub(self, d: Duration) -> BootInstant {
        BootInstant(self.0 - d)
    }
}

impl Sub<BootInstant> for BootInstant {
    type Output = Duration;
    /// Saturates at zero (like [`std::time::Instant`]'s `-` since 1.60).
    fn sub(self, earlier: BootInstant) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn boottime_is_monotonic_and_not_behind_the_monotonic_clock() {
        let b0 = BootInstant::now();
        let m0 = Instant::now();
        let mut prev = b0;
        for _ in 0..1000 {
            let b = BootInstant::now();
            assert!(b >= prev, "{b:?} < {prev:?}");
            prev = b;
        }
        std::thread::sleep(Duration::from_millis(20));
        // Read the monotonic clock first: the boot clock, read after, has
        // run at least as long (more if the system was suspended).
        let m = m0.elapsed();
        let b = b0.elapsed();
        assert!(b >= m, "boot clock {b:?} behind the monotonic clock {m:?}");
        assert!(b >= Duration::from_millis(20));
        // And BOOTTIME is at least CLOCK_MONOTONIC's absolute reading.
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: as in BootInstant::now.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        assert_eq!(rc, 0);
        let mono = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        assert!(BootInstant::now().since_boot() >= mono);
    }

    #[test]
    fn arithmetic_and_ordering() {
        let a = BootInstant::now();
        let b = a + Duration::from_millis(5);
        assert!(b > a);
        assert_eq!(b - a, Duration::from_millis(5));
        assert_eq!(a - b, Duration::ZERO);
        assert_eq!(a.saturating_duration_since(b), Duration::ZERO);
        assert_eq!(b - Duration::from_millis(5), a);
        assert_eq!(BootInstant::from_since_boot(a.since_boot()), a);
        assert!(b.to_tokio() > tokio::time::Instant::now() - Duration::from_millis(1));
    }
}

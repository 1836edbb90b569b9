//! Rate limiting and ETA arithmetic for background resync. Pure: time is
//! passed in as a [`Duration`] since an arbitrary origin.

use std::time::Duration;

/// A token bucket: `rate` bytes per second with a burst of `burst` bytes.
/// A rate of 0 means unlimited.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    tokens: f64,
    last: Duration,
}

impl TokenBucket {
    /// A full bucket at time `now`.
    pub fn new(rate: u64, burst: u64, now: Duration) -> Self {
        TokenBucket {
            rate,
            burst: burst.max(1),
            tokens: burst.max(1) as f64,
            last: now,
        }
    }

    /// The configured rate in bytes per second (0 = unlimited).
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Changes the rate; tokens already earned are kept (up to the burst).
    pub fn set_rate(&mut self, rate: u64, now: Duration) {
        self.refill(now);
        self.rate = rate;
    }

    fn refill(&mut self, now: Duration) {
        let elapsed = now.saturating_sub(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.burst as f64);
    }

    /// Takes `bytes` from the bucket and returns how long the caller must
    /// wait before sending them. The debt is recorded, so consecutive calls
    /// pace out at `rate`.
    pub fn take(&mut self, bytes: u64, now: Duration) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        self.refill(now);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }
}

/// Estimated time to copy `remaining` bytes at `bytes_per_sec`; `None` when
/// no rate has been observed yet.
pub fn eta(remaining: u64, bytes_per_sec: f64) -> Option<Duration> {
    if remaining == 0 {
        return Some(Duration::ZERO);
    }
    if bytes_per_sec.is_nan() || bytes_per_sec <= 0.0 || !bytes_per_sec.is_finite() {
        return None;
    }
    Some(Duration::from_secs_f64(remaining as f64 / bytes_per_sec))
}

/// Exponentially weighted moving average of a rate; `alpha` in (0, 1].
pub fn ewma(previous: f64, sample: f64, alpha: f64) -> f64 {
    if previous == 0.0 {
        sample
    } else {
        previous + alpha * (sample - previous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn unlimited_never_waits() {
        let mut b = TokenBucket::new(0, 1, ms(0));
        assert_eq!(b.take(u64::MAX / 2, ms(0)), Duration::ZERO);
    }

    #[test]
    fn paces_at_rate() {
        // 1 MB/s, burst 100 kB.
        let mut b = TokenBucket::new(1_000_000, 100_000, ms(0));
        let table = [
            // (now ms, bytes, expected wait ms)
            (0, 100_000, 0),   // burst
            (0, 100_000, 100), // 100 kB in debt -> 100 ms
            (100, 100_000, 100),
            (1000, 50_000, 0), // refilled to the burst
        ];
        for (now, bytes, wait) in table {
            let got = b.take(bytes, ms(now));
            assert_eq!(got.as_millis() as u64, wait, "at {now} ms take {bytes}");
        }
    }

    #[test]
    fn clock_going_backwards_is_harmless() {
        let mut b = TokenBucket::new(1000, 1000, ms(5000));
        assert_eq!(b.take(1000, ms(1000)), Duration::ZERO);
        assert_eq!(b.take(1000, ms(1000)).as_secs(), 1);
    }

    #[test]
    fn eta_table() {
        assert_eq!(eta(0, 0.0), Some(Duration::ZERO));
        assert_eq!(eta(100, 0.0), None);
        assert_eq!(eta(100, f64::NAN), None);
        assert_eq!(eta(1000, 100.0), Some(Duration::from_secs(10)));
    }

    #[test]
    fn ewma_table() {
        assert_eq!(ewma(0.0, 10.0, 0.5), 10.0);
        assert_eq!(ewma(10.0, 20.0, 0.5), 15.0);
        assert_eq!(ewma(10.0, 20.0, 1.0), 20.0);
    }
}

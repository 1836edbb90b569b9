//! Login throttling (issue 13): a stranger guessing passwords must neither
//! find one by brute force nor keep the PM's CPU busy hashing (each try
//! costs an Argon2id verification). Failed logins are counted per client
//! address and per user name in fixed windows; over a limit, further tries
//! are refused without hashing until the window ends. Successful logins do
//! not count (they need the password). The tables are bounded: a flood from
//! many addresses evicts the oldest windows, never grows memory.
//!
//! Written here rather than taken from a rate-limiting crate: what is
//! counted is *failures*, keyed two ways, with a hard bound on memory —
//! about 80 lines of pure logic, tested with a fake clock.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;

/// The limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleLimits {
    /// Failed logins allowed per client address per window.
    pub per_addr: u32,
    /// Failed logins allowed per user name per window.
    pub per_user: u32,
    /// The window, ms.
    pub window_ms: u64,
    /// Entries kept per table.
    pub max_entries: usize,
}

impl Default for ThrottleLimits {
    fn default() -> Self {
        ThrottleLimits {
            per_addr: 20,
            per_user: 10,
            window_ms: 60_000,
            max_entries: 4096,
        }
    }
}

/// Why a login is refused before its password is checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("too many failed logins {who}: wait {retry_after_secs} s and try again")]
pub struct Throttled {
    /// "from ADDR" or "for user NAME".
    pub who: String,
    /// Seconds until the window ends.
    pub retry_after_secs: u64,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start_ms: u64,
    failures: u32,
}

#[derive(Debug)]
struct Table<K> {
    map: HashMap<K, Window>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new() -> Self {
        Table {
            map: HashMap::new(),
        }
    }

    /// Seconds to wait if `key` is over `limit` now.
    fn over(&self, key: &K, limit: u32, now: u64, window: u64) -> Option<u64> {
        let w = self.map.get(key)?;
        let end = w.start_ms.saturating_add(window);
        (now < end && w.failures >= limit).then(|| (end - now).div_ceil(1000))
    }

    fn fail(&mut self, key: &K, now: u64, l: &ThrottleLimits) {
        if !self.map.contains_key(key) && self.map.len() >= l.max_entries {
            self.map
                .retain(|_, w| now < w.start_ms.saturating_add(l.window_ms));
            if self.map.len() >= l.max_entries {
                // Still full: the oldest window goes.
                if let Some(k) = self
                    .map
                    .iter()
                    .min_by_key(|(_, w)| w.start_ms)
                    .map(|(k, _)| k.clone())
                {
                    self.map.remove(&k);
                }
            }
        }
        let w = self.map.entry(key.clone()).or_insert(Window {
            start_ms: now,
            failures: 0,
        });
        if now >= w.start_ms.saturating_add(l.window_ms) {
            *w = Window {
                start_ms: now,
                failures: 0,
            };
        }
        w.failures = w.failures.saturating_add(1);
    }
}

/// Bounded key: a name longer than any valid user name is cut.
fn user_key(user: &str) -> String {
    user.chars().take(64).collect()
}

/// The failed-login counters of one API server.
#[derive(Debug)]
pub struct LoginThrottle {
    limits: ThrottleLimits,
    addrs: Table<IpAddr>,
    users: Table<String>,
}

impl LoginThrottle {
    /// Empty counters with these limits.
    pub fn new(limits: ThrottleLimits) -> Self {
        LoginThrottle {
            limits,
            addrs: Table::new(),
            users: Table::new(),
        }
    }

    /// Whether a login from `addr` as `user` may be tried now.
    pub fn check(&self, now_ms: u64, addr: Option<IpAddr>, user: &str) -> Result<(), Throttled> {
        let l = &self.limits;
        if let Some(a) = addr {
            if let Some(s) = self.addrs.over(&a, l.per_addr, now_ms, l.window_ms) {
                return Err(Throttled {
                    who: format!("from {a}"),
                    retry_after_secs: s,
                });
            }
        }
        if let Some(s) = self
            .users
            .over(&user_key(user), l.per_user, now_ms, l.window_ms)
        {
            return Err(Throttled {
                who: format!("for user '{user}'"),
                retry_after_secs: s,
            });
        }
        Ok(())
    }

    /// Counts a failed login.
    pub fn failed(&mut self, now_ms: u64, addr: Option<IpAddr>, user: &str) {
        let l = self.limits;
        if let Some(a) = addr {
            self.addrs.fail(&a, now_ms, &l);
        }
        self.users.fail(&user_key(user), now_ms, &l);
    }

    /// [`LoginThrottle::check`], and the try counted as a failure at once:
    /// concurrent tries cannot all pass the check before the first fails.
    /// Call [`LoginThrottle::not_failed`] when it turns out otherwise.
    pub fn begin(
        &mut self,
        now_ms: u64,
        addr: Option<IpAddr>,
        user: &str,
    ) -> Result<(), Throttled> {
        self.check(now_ms, addr, user)?;
        self.failed(now_ms, addr, user);
        Ok(())
    }

    /// Takes back the failure [`LoginThrottle::begin`] counted: the login
    /// succeeded (or was not tried).
    pub fn not_failed(&mut self, addr: Option<IpAddr>, user: &str) {
        if let Some(w) = addr.and_then(|a| self.addrs.map.get_mut(&a)) {
            w.failures = w.failures.saturating_sub(1);
        }
        if let Some(w) = self.users.map.get_mut(&user_key(user)) {
            w.failures = w.failures.saturating_sub(1);
        }
    }

    /// Entries held per table (addresses, users).
    pub fn entries(&self) -> (usize, usize) {
        (self.addrs.map.len(), self.users.map.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> Option<IpAddr> {
        Some(IpAddr::from(n.to_be_bytes()))
    }

    #[test]
    fn failures_are_limited_per_address_and_per_user_and_the_window_ends() {
        let mut t = LoginThrottle::new(ThrottleLimits {
            per_addr: 3,
            per_user: 2,
            window_ms: 10_000,
            max_entries: 100,
        });
        let a = ip(0x7f00_0001);
        assert!(t.check(0, a, "eve").is_ok());
        t.failed(0, a, "eve");
        t.failed(1, a, "eve");
        // The user is over its limit, from any address.
        let e = t.check(2, ip(9), "eve").unwrap_err();
        assert_eq!(e.who, "for user 'eve'");
        assert_eq!(e.retry_after_secs, 10);
        assert!(e.to_string().contains("wait 10 s"), "{e}");
        // The address is not yet (2 of 3); a third failure for another user
        // puts it over.
        assert!(t.check(2, a, "bob").is_ok());
        t.failed(2, a, "bob");
        assert_eq!(t.check(3, a, "bob").unwrap_err().who, "from 127.0.0.1");
        // Another address is not affected; the window ends.
        assert!(t.check(3, ip(2), "bob").is_ok());
        assert!(t.check(10_000, a, "eve").is_ok());
        t.failed(10_000, a, "eve");
        assert!(
            t.check(10_001, a, "eve").is_ok(),
            "a new window counts from 0"
        );
        // begin counts at once; not_failed takes it back.
        let b = ip(7);
        t.begin(20_000, b, "ann").unwrap();
        t.begin(20_000, b, "ann").unwrap();
        assert!(t.begin(20_000, b, "ann").is_err(), "two tries in flight");
        t.not_failed(b, "ann");
        assert!(t.begin(20_000, b, "ann").is_ok());
    }

    #[test]
    fn the_tables_stay_bounded_under_a_flood_from_many_addresses() {
        let mut t = LoginThrottle::new(ThrottleLimits {
            max_entries: 50,
            ..Default::default()
        });
        for n in 0..10_000u32 {
            t.failed(u64::from(n), ip(n), &format!("user{n}"));
        }
        let (a, u) = t.entries();
        assert!(a <= 50 && u <= 50, "{a} {u}");
        // A name of any length is kept cut.
        t.failed(0, None, &"x".repeat(100_000));
        assert!(t.check(0, None, &"x".repeat(64)).is_ok());
    }
}

//! Region locks: ordinary writes share a region; resync and verify take a
//! region exclusively so that no write changes it while it is copied or
//! hashed. Overlapping writes are serialised, so that both replicas apply
//! them in the same order. Also remembers when each region was last written
//! (for the activity-log cleaner).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::Notify;

#[derive(Default)]
struct Slot {
    shared: u32,
    exclusive: bool,
    waiting_exclusive: u32,
}

#[derive(Default)]
struct State {
    slots: HashMap<u64, Slot>,
    /// Byte ranges of writes in flight.
    writes: Vec<(u64, u64, u64)>,
    next_write: u64,
    last_write: HashMap<u64, Instant>,
}

/// The lock table of one volume.
#[derive(Default)]
pub struct RegionLocks {
    state: Mutex<State>,
    notify: Notify,
}

/// Held by a write: its regions shared, its byte range reserved.
pub struct SharedGuard {
    locks: Arc<RegionLocks>,
    regions: Range<u64>,
    write_id: u64,
}

/// Held by resync/verify: one region exclusively.
pub struct ExclusiveGuard {
    locks: Arc<RegionLocks>,
    region: u64,
}

impl RegionLocks {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the regions can be shared and no in-flight write overlaps
    /// the byte range `[start, end)`.
    pub async fn shared(
        self: &Arc<Self>,
        regions: Range<u64>,
        start: u64,
        end: u64,
    ) -> SharedGuard {
        loop {
            let n = self.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            {
                let mut st = self.lock();
                let free = regions.clone().all(|r| {
                    st.slots
                        .get(&r)
                        .is_none_or(|s| !s.exclusive && s.waiting_exclusive == 0)
                }) && !st.writes.iter().any(|&(s, e, _)| s < end && start < e);
                if free {
                    for r in regions.clone() {
                        st.slots.entry(r).or_default().shared += 1;
                    }
                    st.next_write += 1;
                    let id = st.next_write;
                    st.writes.push((start, end, id));
                    return SharedGuard {
                        locks: self.clone(),
                        regions,
                        write_id: id,
                    };
                }
            }
            n.await;
        }
    }

    fn try_take_exclusive(st: &mut State, region: u64) -> bool {
        let slot = st.slots.entry(region).or_default();
        if slot.shared == 0 && !slot.exclusive {
            slot.exclusive = true;
            true
        } else {
            false
        }
    }

    /// Waits for the region exclusively (new writes wait behind it).
    /// Cancel-safe: a waiter dropped before it gets the region stops
    /// holding new writes back.
    pub async fn exclusive(self: &Arc<Self>, region: u64) -> ExclusiveGuard {
        let mut waiting: Option<Waiting<'_>> = None;
        loop {
            let n = self.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            {
                let mut st = self.lock();
                if Self::try_take_exclusive(&mut st, region) {
                    if let Some(w) = waiting.take() {
                        w.done(&mut st);
                    }
                    return ExclusiveGuard {
                        locks: self.clone(),
                        region,
                    };
                }
                if waiting.is_none() {
                    st.slots.entry(region).or_default().waiting_exclusive += 1;
                    waiting = Some(Waiting {
                        locks: self,
                        region,
                    });
                }
            }
            n.await;
        }
    }

    /// Takes the region exclusively if nobody uses it.
    pub fn try_exclusive(self: &Arc<Self>, region: u64) -> Option<ExclusiveGuard> {
        let mut st = self.lock();
        let ok = st
            .slots
            .get(&region)
            .is_none_or(|s| s.waiting_exclusive == 0)
            && Self::try_take_exclusive(&mut st, region);
        if !ok {
            Self::gc(&mut st, region);
        }
        ok.then(|| ExclusiveGuard {
            locks: self.clone(),
            region,
        })
    }

    /// Records a write to the regions now.
    pub fn touch(&self, regions: Range<u64>) {
        let now = Instant::now();
        let mut st = self.lock();
        for r in regions {
            st.last_write.insert(r, now);
        }
    }

    /// Regions last written before `before`, forgotten by this call.
    pub fn take_idle(&self, before: Instant) -> Vec<u64> {
        let mut st = self.lock();
        let idle: Vec<u64> = st
            .last_write
            .iter()
            .filter(|(_, t)| **t < before)
            .map(|(r, _)| *r)
            .collect();
        for r in &idle {
            st.last_write.remove(r);
        }
        idle
    }

    /// Puts a region back into the activity list (it could not be cleaned).
    pub fn retouch(&self, region: u64) {
        self.lock()
            .last_write
            .entry(region)
            .or_insert_with(Instant::now);
    }

    fn gc(st: &mut State, r: u64) {
        if let Some(s) = st.slots.get(&r) {
            if s.shared == 0 && !s.exclusive && s.waiting_exclusive == 0 {
                st.slots.remove(&r);
            }
        }
    }
}

impl Drop for SharedGuard {
    fn drop(&mut self) {
        {
            let mut st = self.locks.lock();
            for r in self.regions.clone() {
                if let Some(s) = st.slots.get_mut(&r) {
                    s.shared = s.shared.saturating_sub(1);
                }
                RegionLocks::gc(&mut st, r);
            }
            let id = self.write_id;
            st.writes.retain(|w| w.2 != id);
        }
        self.locks.notify.notify_waiters();
    }
}

/// An exclusive waiter's registration (which holds new writes back); taken
/// back when the waiter gets the region or is dropped.
struct Waiting<'a> {
    locks: &'a RegionLocks,
    region: u64,
}

impl Waiting<'_> {
    /// The waiter got the region: unregister under the caller's lock.
    fn done(self, st: &mut State) {
        if let Some(s) = st.slots.get_mut(&self.region) {
            s.waiting_exclusive = s.waiting_exclusive.saturating_sub(1);
        }
        std::mem::forget(self);
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        {
            let mut st = self.locks.lock();
            if let Some(s) = st.slots.get_mut(&self.region) {
                s.waiting_exclusive = s.waiting_exclusive.saturating_sub(1);
            }
            RegionLocks::gc(&mut st, self.region);
        }
        // Writes waiting for the region may go now.
        self.locks.notify.notify_waiters();
    }
}

impl Drop for ExclusiveGuard {
    fn drop(&mut self) {
        {
            let mut st = self.locks.lock();
            if let Some(s) = st.slots.get_mut(&self.region) {
                s.exclusive = false;
            }
            RegionLocks::gc(&mut st, self.region);
        }
        self.locks.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn exclusive_waits_for_shared_and_blocks_new_shared() {
        let l = Arc::new(RegionLocks::default());
        let g = l.shared(0..2, 0, 10).await;
        assert!(l.try_exclusive(1).is_none());
        let l2 = l.clone();
        let ex = tokio::spawn(async move {
            let _x = l2.exclusive(1).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        // Let the exclusive waiter register.
        for _ in 0..100 {
            if l.lock()
                .slots
                .get(&1)
                .is_some_and(|s| s.waiting_exclusive > 0)
            {
                break;
            }
            tokio::task::yield_now().await;
        }
        drop(g);
        let _g2 = l.shared(1..2, 100, 110).await; // waits for the exclusive holder
        assert!(ex.is_finished());
        ex.await.unwrap();
    }

    #[tokio::test]
    async fn a_cancelled_exclusive_waiter_stops_holding_writes_back() {
        let l = Arc::new(RegionLocks::default());
        let g = l.shared(0..1, 0, 10).await;
        // The waiter registers, then is dropped (a resync task aborted
        // while it waited).
        let waited = tokio::time::timeout(Duration::from_millis(20), l.exclusive(0)).await;
        assert!(waited.is_err());
        drop(g);
        let w = tokio::time::timeout(Duration::from_secs(5), l.shared(0..1, 20, 30)).await;
        assert!(
            w.is_ok(),
            "a new write must not wait for a waiter that is gone"
        );
        drop(w);
        assert!(l.lock().slots.is_empty(), "nothing left registered");
        // A waiter that does get the region unregisters too.
        let x = l.exclusive(0).await;
        drop(x);
        assert!(l.lock().slots.is_empty());
    }

    #[tokio::test]
    async fn overlapping_writes_are_serialised() {
        let l = Arc::new(RegionLocks::default());
        let g = l.shared(0..1, 0, 100).await;
        let _other = l.shared(0..1, 100, 200).await; // adjacent: no overlap
        let l2 = l.clone();
        let t = tokio::spawn(async move {
            let _g = l2.shared(0..1, 50, 60).await;
        });
        tokio::task::yield_now().await;
        assert!(!t.is_finished());
        drop(g);
        t.await.unwrap();
    }

    #[test]
    fn idle_tracking() {
        let l = RegionLocks::default();
        l.touch(3..5);
        assert!(l
            .take_idle(Instant::now() - Duration::from_secs(60))
            .is_empty());
        let mut idle = l.take_idle(Instant::now() + Duration::from_secs(1));
        idle.sort();
        assert_eq!(idle, vec![3, 4]);
        assert!(l
            .take_idle(Instant::now() + Duration::from_secs(1))
            .is_empty());
    }
}

//! The lease keeper (docs/fencing.md "Leases"): keeps this PM's lease from
//! a majority of the unit's voters, and the survivor's side of a takeover
//! ([`fence_partner`], [`takeover_at`]).
//!
//! Every `heartbeat_ms` the keeper sends a round of lease requests to every
//! voter of the current membership, concurrently, each bounded by a timeout
//! shorter than the interval. When a majority grants a round sent at local
//! time `t_sent`, the lease runs until `t_sent + lease_ms`; it never moves
//! backwards. Counting from the send time keeps the holder
//! conservative whatever the network delays: every grant of that round was
//! given after `t_sent`.
//!
//! [`LeaseKeeper::holds`] compares an atomic deadline with the clock, so it
//! is cheap enough for a synchronous predicate on the I/O path; it does not
//! depend on the keeper's task running. The watch channel
//! ([`LeaseKeeper::watch`]) flips to `false` at expiry from a timer, whether
//! or not any answer arrives.
//!
//! Every instant here is a [`BootInstant`] (`CLOCK_BOOTTIME`), not
//! [`std::time::Instant`] (`CLOCK_MONOTONIC`): the monotonic clock stops
//! while the system is suspended, so a PM suspended with a lease and resumed
//! would still believe it held that lease, while the voters' clocks (and the
//! survivor's `takeover_at`) ran on. The boot clock counts the suspended
//! time, so `holds()` is false the moment the PM resumes. Timers (Tokio,
//! monotonic) are only used to wake up; a late timer after a resume cannot
//! make a check wrong, and the watch is also corrected on the next renewal
//! tick.

use crate::clock::BootInstant;
use pairvisor_model::fencing::{majority, LeaseTiming};
use pairvisor_unitdb::{LeaseAnswer, LeaseRefusal, NodeId, UnitDb, WriteError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::MissedTickBehavior;

/// The last answer of one voter, as shown by [`LeaseKeeper::status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum VoterAnswer {
    /// Not asked yet.
    NotAsked,
    /// Granted the last request it answered.
    Granted,
    /// Refused it.
    Refused {
        /// Why.
        refusal: LeaseRefusal,
    },
    /// No answer: the request failed or timed out.
    Error {
        /// What happened.
        error: String,
    },
}

/// One voter in [`LeaseStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoterStatus {
    /// The voter.
    pub node: NodeId,
    /// Its last answer (or error).
    pub last: VoterAnswer,
    /// Milliseconds since that answer, if any.
    pub ms_ago: Option<u64>,
}

/// This PM's lease, for the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseStatus {
    /// Whether the lease is valid now.
    pub holds: bool,
    /// Milliseconds until it ends, when valid.
    pub expires_in_ms: Option<u64>,
    /// The lease duration granted by a majority.
    pub lease_ms: u64,
    /// Grants needed per round (majority of the voters last asked).
    pub needed: usize,
    /// Per voter of the last round: its last answer.
    pub voters: Vec<VoterStatus>,
}

#[derive(Debug, Clone)]
struct VoterEntry {
    last: VoterAnswer,
    at: Option<BootInstant>,
}

/// State shared by the keeper's task and its readers.
struct Shared {
    /// End of the lease in microseconds since boot ([`BootInstant`]; 0:
    /// none). Only grows.
    deadline_us: AtomicU64,
    timing: LeaseTiming,
    tx: watch::Sender<bool>,
    voters: Mutex<BTreeMap<NodeId, VoterEntry>>,
    needed: AtomicU64,
    /// How many times the lease was (re)acquired after not being held:
    /// whoever acted on the unit's records under an earlier term must
    /// catch up again.
    terms: AtomicU64,
    /// Where the deadline is published for the watchdog (a process outside
    /// the daemon), when set.
    publisher: Mutex<Option<crate::watchdog::Publisher>>,
}

impl Shared {
    fn now_us(&self) -> u64 {
        BootInstant::now().since_boot().as_micros() as u64
    }

    fn at(us: u64) -> BootInstant {
        BootInstant::from_since_boot(Duration::from_micros(us))
    }

    fn holds(&self) -> bool {
        self.now_us() < self.deadline_us.load(Ordering::Acquire)
    }

    fn expires_at(&self) -> Option<BootInstant> {
        let d = self.deadline_us.load(Ordering::Acquire);
        (self.now_us() < d).then(|| Self::at(d))
    }

    fn deadline(&self) -> Option<BootInstant> {
        let d = self.deadline_us.load(Ordering::Acquire);
        (d > 0).then(|| Self::at(d))
    }

    fn expires_in(&self) -> Option<Duration> {
        self.expires_at()
            .map(|at| at.saturating_duration_since(BootInstant::now()))
    }

    /// Extends the lease to `sent + lease_ms` (never shortens it).
    fn extend_from(&self, sent: BootInstant) {
        let end = sent + Duration::from_millis(self.timing.lease_ms);
        let end_us = end.since_boot().as_micros() as u64;
        // The watchdog learns of the new deadline before anything here can
        // act on it (start a VM under it): it never kills under a lease
        // this PM believes valid.
        if end_us > self.deadline_us.load(Ordering::Acquire) {
            if let Some(p) = self
                .publisher
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                if let Err(e) = p.write(end_us) {
                    tracing::warn!("cannot publish the lease deadline to the watchdog: {e}");
                }
            }
        }
        let now = self.now_us();
        let prev = self.deadline_us.fetch_max(end_us, Ordering::AcqRel);
        if prev <= now && end_us > now {
            self.terms.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Makes the watch channel agree with [`Shared::holds`].
    fn publish(&self) {
        let now = self.holds();
        self.tx.send_if_modified(|v| {
            let changed = *v != now;
            *v = now;
            changed
        });
    }

    fn drop_lease(&self) {
        self.deadline_us.store(0, Ordering::Release);
        self.publish();
    }
}

/// A cheap, cloneable view of the lease for synchronous callers (e.g. the
/// mirror's "may run degraded" predicate).
#[derive(Clone)]
pub struct LeaseCheck {
    shared: Arc<Shared>,
}

impl LeaseCheck {
    /// Whether the lease is valid now (an atomic load and a
    /// `CLOCK_BOOTTIME` read).
    pub fn holds(&self) -> bool {
        self.shared.holds()
    }

    /// Time left, when the lease is valid.
    pub fn expires_in(&self) -> Option<Duration> {
        self.shared.expires_in()
    }
}

/// Keeps this PM's lease from a majority of the unit's voters.
pub struct LeaseKeeper {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        if let Ok(mut t) = self.task.lock() {
            if let Some(h) = t.take() {
                h.abort();
            }
        }
    }
}

struct Round {
    sent: BootInstant,
    need: usize,
    granted: usize,
    pending: usize,
}

impl LeaseKeeper {
    /// Starts renewing this node's lease (call inside a Tokio runtime).
    /// `timing.lease_ms` should be several `heartbeat_ms` so that a lost
    /// round or two do not end the lease.
    pub fn start(db: UnitDb, timing: LeaseTiming) -> LeaseKeeper {
        let (tx, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            deadline_us: AtomicU64::new(0),
            timing,
            tx,
            voters: Mutex::new(BTreeMap::new()),
            needed: AtomicU64::new(0),
            terms: AtomicU64::new(0),
            publisher: Mutex::new(None),
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(db, shared.clone(), stop_rx));
        LeaseKeeper {
            shared,
            stop,
            task: Mutex::new(Some(task)),
        }
    }

    /// Whether this PM holds a valid lease now. Cheap (an atomic load and a
    /// `CLOCK_BOOTTIME` read), safe to call from synchronous code.
    pub fn holds(&self) -> bool {
        self.shared.holds()
    }

    /// The lease's term: how many times it was acquired after not being
    /// held (0 before the first). A PM that caught up with the unit
    /// database under one term must catch up again under the next.
    pub fn term(&self) -> u64 {
        self.shared.terms.load(Ordering::Acquire)
    }

    /// Time left on the lease, when valid.
    pub fn expires_in(&self) -> Option<Duration> {
        self.shared.expires_in()
    }

    /// The instant the lease ends (this machine's boot clock), when valid.
    pub fn expires_at(&self) -> Option<BootInstant> {
        self.shared.expires_at()
    }

    /// The end of the last lease this keeper obtained, past or future
    /// (`None` before the first one and after [`LeaseKeeper::shutdown`]).
    pub fn deadline(&self) -> Option<BootInstant> {
        self.shared.deadline()
    }

    /// Publishes every new deadline to `p` (for the watchdog), starting
    /// with the current one.
    pub fn publish_to(&self, p: crate::watchdog::Publisher) {
        let d = self.shared.deadline_us.load(Ordering::Acquire);
        if d > 0 {
            let _ = p.write(d);
        }
        *self
            .shared
            .publisher
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(p);
    }

    /// A cloneable view for synchronous predicates.
    pub fn check(&self) -> LeaseCheck {
        LeaseCheck {
            shared: self.shared.clone(),
        }
    }

    /// `true` while the lease is held; changes when it is gained or lost
    /// (set to `false` by a timer at expiry, even if no answer arrives).
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.shared.tx.subscribe()
    }

    /// The lease and each voter's last answer, for the API.
    pub fn status(&self) -> LeaseStatus {
        let voters = self
            .shared
            .voters
            .lock()
            .map(|v| {
                v.iter()
                    .map(|(node, e)| VoterStatus {
                        node: *node,
                        last: e.last.clone(),
                        ms_ago: e.at.map(|t| t.elapsed().as_millis() as u64),
                    })
                    .collect()
            })
            .unwrap_or_default();
        LeaseStatus {
            holds: self.holds(),
            expires_in_ms: self.expires_in().map(|d| d.as_millis() as u64),
            lease_ms: self.shared.timing.lease_ms,
            needed: self.shared.needed.load(Ordering::Relaxed) as usize,
            voters,
        }
    }

    /// Stops renewing and gives the lease up at once (`holds` is false and
    /// the watch says `false` when this returns).
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = task {
            let _ = h.await;
        }
        self.shared.drop_lease();
    }
}

async fn run(db: UnitDb, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let interval = Duration::from_millis(shared.timing.heartbeat_ms.max(1));
    // Each request ends before the next round starts.
    let per_request = (interval * 4 / 5).max(Duration::from_millis(1));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut inflight: JoinSet<(u64, NodeId, Result<LeaseAnswer, String>)> = JoinSet::new();
    let mut rounds: BTreeMap<u64, Round> = BTreeMap::new();
    let mut next_round = 0u64;
    loop {
        // While the watch says "held", wake at the lease's end (at once if
        // it already ended).
        let published = *shared.tx.borrow();
        let expiry = published.then(|| shared.expires_at().unwrap_or_else(BootInstant::now));
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            // The lease ends on time even if no answer ever comes back.
            _ = sleep_until(expiry), if expiry.is_some() => {
                shared.publish();
            }
            Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                let Ok((round, voter, answer)) = done else { continue };
                record(&shared, voter, &answer);
                let Some(r) = rounds.get_mut(&round) else { continue };
                r.pending = r.pending.saturating_sub(1);
                if matches!(answer, Ok(LeaseAnswer::Granted)) {
                    r.granted += 1;
                    if r.granted == r.need {
                        shared.extend_from(r.sent);
                        shared.publish();
                    }
                }
                if r.pending == 0 {
                    rounds.remove(&round);
                }
            }
            _ = tick.tick() => {
                // The expiry timer runs on the monotonic clock, which stops
                // during a suspend: correct the watch here too.
                shared.publish();
                // A round whose answers never all came back (a panicked
                // task) can no longer give a lease: forget it.
                let lease = Duration::from_millis(shared.timing.lease_ms);
                rounds.retain(|_, r| r.sent.elapsed() < lease);
                let voters = db.metrics().voters();
                if let Ok(mut v) = shared.voters.lock() {
                    v.retain(|id, _| voters.contains(id));
                    for id in &voters {
                        v.entry(*id).or_insert(VoterEntry { last: VoterAnswer::NotAsked, at: None });
                    }
                }
                if voters.is_empty() {
                    continue;
                }
                let need = majority(voters.len());
                shared.needed.store(need as u64, Ordering::Relaxed);
                let id = next_round;
                next_round += 1;
                rounds.insert(id, Round { sent: BootInstant::now(), need, granted: 0, pending: voters.len() });
                for voter in voters {
                    let db = db.clone();
                    inflight.spawn(async move {
                        let r = tokio::time::timeout(per_request, db.request_lease_within(voter, per_request)).await;
                        let r = match r {
                            Ok(Ok(a)) => Ok(a),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err(format!("no answer within {} ms", per_request.as_millis())),
                        };
                        (id, voter, r)
                    });
                }
            }
        }
    }
    inflight.abort_all();
}

/// Sleeps until `at`, or forever for `None` (with no lease there is nothing
/// to expire). After a suspend the wake-up is late; the caller re-checks the
/// boot clock ([`Shared::publish`]) whenever it wakes.
async fn sleep_until(at: Option<BootInstant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.to_tokio()).await,
        None => std::future::pending().await,
    }
}

fn record(shared: &Shared, voter: NodeId, answer: &Result<LeaseAnswer, String>) {
    let last = match answer {
        Ok(LeaseAnswer::Granted) => VoterAnswer::Granted,
        Ok(LeaseAnswer::Refused(r)) => VoterAnswer::Refused { refusal: r.clone() },
        Err(e) => VoterAnswer::Error { error: e.clone() },
    };
    if let Ok(mut v) = shared.voters.lock() {
        // Only voters of the current round are shown.
        if let Some(e) = v.get_mut(&voter) {
            e.last = last;
            e.at = Some(BootInstant::now());
        }
    }
}

/// The earliest instant at which the survivor may take over the work of a
/// partner whose fence was committed at `fence_committed_at`: the partner's
/// last lease was granted before that commit and so ends before
/// `fence_committed_at + lease_ms`; `drift_margin_ms` covers the difference
/// of clock rates between the two PMs. Both on the boot clock: if the
/// survivor is suspended meanwhile, the wait is not extended by the suspend
/// (the partner's lease, on its own boot clock, did not stop either).
pub fn takeover_at(fence_committed_at: BootInstant, timing: LeaseTiming) -> BootInstant {
    fence_committed_at + Duration::from_millis(timing.worst_case_takeover_ms())
}

/// A committed fence of the partner, as seen by the survivor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartnerFenced {
    /// The partner.
    pub partner: NodeId,
    /// The fence's log index.
    pub index: u64,
    /// When [`UnitDb::fence`] returned here (not before the commit), on the
    /// boot clock.
    pub committed_at: BootInstant,
    /// [`takeover_at`] of `committed_at`.
    pub may_take_over_at: BootInstant,
}

impl PartnerFenced {
    /// Milliseconds since the fence committed: the partner's lease cannot
    /// have been renewed since, so this is the
    /// `since_partner_lease_renewal_ms` of `model::fencing::SurvivorView`.
    pub fn since_ms(&self) -> u64 {
        self.committed_at.elapsed().as_millis() as u64
    }

    /// Whether the survivor may take over now.
    pub fn may_take_over(&self) -> bool {
        BootInstant::now() >= self.may_take_over_at
    }
}

/// Fences `partner` through the unit database (needs a majority: with the
/// witness, or after force quorum) and says when its lease has certainly
/// ended.
pub async fn fence_partner(
    db: &UnitDb,
    partner: NodeId,
    reason: &str,
    timing: LeaseTiming,
) -> Result<PartnerFenced, WriteError> {
    let index = db.fence(partner, reason).await?;
    // Taken after the write returned, so not before the commit: waiting from
    // here is conservative.
    let committed_at = BootInstant::now();
    Ok(PartnerFenced {
        partner,
        index,
        committed_at,
        may_take_over_at: takeover_at(committed_at, timing),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(lease_ms: u64) -> Shared {
        Shared {
            deadline_us: AtomicU64::new(0),
            timing: LeaseTiming {
                heartbeat_ms: 100,
                missed_heartbeats: 4,
                lease_ms,
                drift_margin_ms: 100,
            },
            tx: watch::channel(false).0,
            voters: Mutex::new(BTreeMap::new()),
            needed: AtomicU64::new(0),
            terms: AtomicU64::new(0),
            publisher: Mutex::new(None),
        }
    }

    #[test]
    fn the_deadline_never_moves_backwards() {
        let s = shared(60_000);
        assert!(!s.holds());
        assert_eq!(s.expires_at(), None);
        let now = BootInstant::now();
        s.extend_from(now);
        let first = s.expires_at().unwrap();
        // An older round's late majority does not shorten the lease.
        s.extend_from(now - Duration::from_millis(500));
        assert_eq!(s.expires_at().unwrap(), first);
        s.extend_from(now + Duration::from_millis(500));
        assert!(s.expires_at().unwrap() > first);
        assert!(s.holds());
        s.drop_lease();
        assert!(!s.holds());
    }

    #[test]
    fn a_round_older_than_the_lease_gives_nothing() {
        let s = shared(1);
        let sent = BootInstant::now();
        std::thread::sleep(Duration::from_millis(5));
        // A majority for a round sent at `sent`, arriving 5 ms later.
        s.extend_from(sent);
        assert!(!s.holds());
        assert_eq!(s.expires_in(), None);
    }

    #[test]
    fn takeover_waits_lease_and_margin() {
        let t = LeaseTiming::default();
        let c = BootInstant::now();
        assert_eq!(
            takeover_at(c, t) - c,
            Duration::from_millis(t.lease_ms + t.drift_margin_ms)
        );
    }
}

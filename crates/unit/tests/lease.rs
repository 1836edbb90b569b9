//! The lease keeper on real unit-database nodes on loopback (mutual TLS,
//! redb): leases granted by a majority of two PMs and a witness, an isolated
//! PM losing its lease while the majority side keeps it, a fenced PM losing
//! its lease before the survivor may take over, and a unit without a witness
//! where the survivor regains a lease only by forcing quorum. Links are cut
//! with `UnitDb::set_blocked_peers`; every wait is a poll with a deadline.

use pairvisor_model::fencing::LeaseTiming;
use pairvisor_unit::{fence_partner, BootInstant, LeaseKeeper, VoterAnswer};
use pairvisor_unitdb::{Config, Error, LeaseRefusal, NodeRole, Timing, UnitCa, UnitDb};
use std::time::{Duration, Instant};
use tempfile::TempDir;

const DEADLINE: Duration = Duration::from_secs(20);

fn lease_timing() -> LeaseTiming {
    LeaseTiming {
        heartbeat_ms: 150,
        missed_heartbeats: 4,
        lease_ms: 1500,
        drift_margin_ms: 200,
    }
}

fn lease_ms() -> Duration {
    Duration::from_millis(lease_timing().lease_ms)
}

fn db_timing() -> Timing {
    Timing {
        heartbeat: Duration::from_millis(100),
        election_min: Duration::from_millis(500),
        election_max: Duration::from_millis(1000),
        connect: Duration::from_millis(500),
        request: Duration::from_secs(3),
    }
}

/// Polls `f` every 10 ms until it returns `Some`, or panics after `timeout`.
async fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Unit {
    _tmp: TempDir,
    dbs: Vec<UnitDb>,
}

impl Unit {
    /// Nodes 1..=n with `roles`, formed by node 1.
    async fn form(roles: &[NodeRole]) -> Unit {
        let tmp = tempfile::tempdir().unwrap();
        let ca = UnitCa::create("lease-test").unwrap();
        let mut dbs = Vec::new();
        for (i, role) in roles.iter().enumerate() {
            let id = i as u64 + 1;
            let mut c = Config::new(
                id,
                tmp.path().join(format!("node{id}")),
                "127.0.0.1:0".parse().unwrap(),
            );
            c.role = *role;
            c.identity = Some(ca.issue_identity(id, *role == NodeRole::Pm).unwrap());
            c.timing = db_timing();
            dbs.push(UnitDb::open(c).await.unwrap());
        }
        dbs[0].initialize_alone().await.unwrap();
        dbs[0]
            .wait_until("node 1 to lead", DEADLINE, |m| m.leader == Some(1))
            .await
            .unwrap();
        for db in &dbs[1..] {
            dbs[0]
                .add_voter(db.node_id(), db.node_info())
                .await
                .unwrap();
        }
        for db in &dbs {
            db.wait_until("every voter", DEADLINE, |m| {
                m.voters().len() == roles.len() && m.leader.is_some()
            })
            .await
            .unwrap();
        }
        Unit { _tmp: tmp, dbs }
    }

    fn db(&self, id: u64) -> &UnitDb {
        &self.dbs[(id - 1) as usize]
    }

    /// Cuts node `id` off from every other node (both directions).
    fn isolate(&self, id: u64) {
        for db in &self.dbs {
            if db.node_id() == id {
                db.set_blocked_peers(self.dbs.iter().map(|d| d.node_id()).filter(|x| *x != id));
            } else {
                db.set_blocked_peers([id]);
            }
        }
    }

    fn heal(&self) {
        for db in &self.dbs {
            db.set_blocked_peers([]);
        }
    }

    async fn stop(self) {
        for db in self.dbs {
            db.shutdown().await;
        }
    }
}

async fn until_held(k: &LeaseKeeper, what: &str) {
    let mut rx = k.watch();
    tokio::time::timeout(DEADLINE, rx.wait_for(|held| *held))
        .await
        .unwrap_or_else(|_| panic!("{what}: {:?}", k.status()))
        .unwrap();
    assert!(k.holds(), "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_pm_loses_its_lease_while_the_majority_side_keeps_it() {
    let u = Unit::form(&[NodeRole::Pm, NodeRole::Pm, NodeRole::Witness]).await;
    let k1 = LeaseKeeper::start(u.db(1).clone(), lease_timing());
    let k2 = LeaseKeeper::start(u.db(2).clone(), lease_timing());
    until_held(&k1, "PM 1's lease").await;
    until_held(&k2, "PM 2's lease").await;
    let left = k1.expires_in().unwrap();
    assert!(left <= lease_ms(), "{left:?}");
    eventually("every voter to grant PM 1", DEADLINE, || {
        let s = k1.status();
        (s.needed == 2
            && s.voters.len() == 3
            && s.voters.iter().all(|v| v.last == VoterAnswer::Granted))
        .then_some(())
    })
    .await;
    let status = serde_json::to_value(k1.status()).unwrap();
    assert_eq!(status["holds"], true, "{status}");

    // Cut PM 1 off. No round sent after the cut can be granted by a
    // majority, so its lease ends by `cut + lease_ms`.
    let mut rx1 = k1.watch();
    u.isolate(1);
    let cut = BootInstant::now();
    let mut k2_always = true;
    eventually("PM 1 to lose its lease", DEADLINE, || {
        k2_always &= k2.holds();
        (!k1.holds()).then_some(())
    })
    .await;
    let lost = BootInstant::now();
    let end = k1.deadline().unwrap();
    assert!(end <= cut + lease_ms(), "lease ran past cut + lease_ms");
    assert!(end <= lost);
    // The watch follows without any answer arriving.
    tokio::time::timeout(lease_ms(), rx1.wait_for(|held| !*held))
        .await
        .expect("watch flipped to false at expiry")
        .unwrap();
    assert_eq!(k1.expires_in(), None);
    // Its own grant is not enough: 1 of 3.
    let s = k1.status();
    assert!(!s.holds);
    assert!(
        s.voters
            .iter()
            .filter(|v| v.node != 1)
            .all(|v| matches!(v.last, VoterAnswer::Error { .. })),
        "{s:?}"
    );
    // The majority side kept its lease the whole time, and still does a
    // full lease later.
    let later = Instant::now() + lease_ms();
    eventually("a full lease length to pass", DEADLINE, || {
        k2_always &= k2.holds();
        (Instant::now() >= later).then_some(())
    })
    .await;
    assert!(k2_always, "PM 2 lost its lease: {:?}", k2.status());
    assert!(!k1.holds());

    // Healing the links gives PM 1 its lease back (it is not fenced).
    u.heal();
    until_held(&k1, "PM 1's lease after healing").await;
    k1.shutdown().await;
    assert!(!k1.holds());
    assert!(!*k1.watch().borrow());
    k2.shutdown().await;
    u.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_pm_loses_its_lease_before_the_survivor_may_take_over() {
    let u = Unit::form(&[NodeRole::Pm, NodeRole::Pm, NodeRole::Witness]).await;
    let t = lease_timing();
    let k1 = LeaseKeeper::start(u.db(1).clone(), t);
    let k2 = LeaseKeeper::start(u.db(2).clone(), t);
    until_held(&k1, "PM 1's lease").await;
    until_held(&k2, "PM 2's lease").await;

    // PM 2 is alive and connected, but fenced: every voter refuses it.
    let fenced = fence_partner(u.db(1), 2, "test: take over PM 2", t)
        .await
        .unwrap();
    let mut k1_always = true;
    eventually("PM 2 to lose its lease", DEADLINE, || {
        k1_always &= k1.holds();
        (!k2.holds()).then_some(())
    })
    .await;
    // The two instants: the fenced PM's last lease ends before the survivor
    // may take over, even before `commit + lease_ms` (no margin needed on
    // one clock).
    let last_end = k2.deadline().expect("PM 2 had a lease");
    assert!(last_end <= fenced.committed_at + lease_ms());
    assert!(last_end < fenced.may_take_over_at);
    eventually("every voter to refuse PM 2", DEADLINE, || {
        let s = k2.status();
        s.voters
            .iter()
            .all(|v| {
                matches!(
                    &v.last,
                    VoterAnswer::Refused {
                        refusal: LeaseRefusal::Fenced { .. } | LeaseRefusal::FencePending { .. }
                    }
                )
            })
            .then_some(())
    })
    .await;
    // At the takeover instant PM 2 still has no lease, and never got one
    // after the fence.
    eventually("the takeover instant", DEADLINE, || {
        k1_always &= k1.holds();
        fenced.may_take_over().then_some(())
    })
    .await;
    assert!(!k2.holds());
    assert_eq!(k2.deadline(), Some(last_end));
    assert!(k1_always, "the survivor lost its lease: {:?}", k1.status());

    // Unfencing restores PM 2's lease.
    u.db(1).unfence(2).await.unwrap();
    until_held(&k2, "PM 2's lease after unfence").await;
    k1.shutdown().await;
    k2.shutdown().await;
    u.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_witness_the_survivor_holds_a_lease_again_only_after_forcing_quorum() {
    let mut u = Unit::form(&[NodeRole::Pm, NodeRole::Pm]).await;
    let t = lease_timing();
    let k1 = LeaseKeeper::start(u.db(1).clone(), t);
    until_held(&k1, "PM 1's lease (2 of 2)").await;

    // PM 2 dies: 1 of 2 is no majority.
    let pm2 = u.dbs.pop().unwrap();
    pm2.shutdown().await;
    let died = BootInstant::now();
    eventually("PM 1 to lose its lease", DEADLINE, || {
        (!k1.holds()).then_some(())
    })
    .await;
    assert!(k1.deadline().unwrap() <= died + lease_ms());

    // Fencing is impossible without a majority...
    assert!(u.db(1).fence(2, "partner lost").await.is_err());
    // ...until the administrator forces quorum on the survivor.
    let deadline = Instant::now() + DEADLINE;
    let forced = loop {
        match u.db(1).force_quorum().await {
            Ok(f) => break f,
            Err(Error::PartnerAlive { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("force quorum: {e:?}"),
        }
    };
    assert_eq!(forced.removed, vec![2]);
    until_held(&k1, "PM 1's lease after force quorum (1 of 1)").await;
    assert_eq!(k1.status().needed, 1);
    let fenced = fence_partner(u.db(1), 2, "partner lost, quorum forced", t)
        .await
        .unwrap();
    assert!(fenced.may_take_over_at > fenced.committed_at);
    assert!(u.db(1).fenced(2));
    k1.shutdown().await;
    u.stop().await;
}

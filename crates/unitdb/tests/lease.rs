//! Lease grants, fences and force quorum on real nodes on loopback (mutual
//! TLS, redb). Faults are injected by cutting links
//! (`UnitDb::set_blocked_peers`) or stopping nodes; every wait is a poll with
//! a deadline.

mod common;

use common::*;
use pairvisor_unitdb::{
    Batch, Error, LeaseAnswer, LeaseRefusal, NodeState, WriteError, FENCES_TABLE,
    FORCED_QUORUM_TABLE,
};
use serde_json::json;
use std::time::Duration;

/// Asks every voter in `voters` for `from`'s lease; the answers in order
/// (errors as `None`).
async fn ask_all(c: &Cluster, from: u64, voters: &[u64]) -> Vec<Option<LeaseAnswer>> {
    let mut out = Vec::new();
    for v in voters {
        out.push(c.node(from).db().request_lease(*v).await.ok());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voters_grant_leases_and_refuse_a_fenced_node_until_unfenced() {
    let mut c = Cluster::three().await;
    // Every member is granted by every voter, the witness included, and a
    // node's own answer needs no network.
    for from in [1, 2, 3] {
        let answers = ask_all(&c, from, &[1, 2, 3]).await;
        assert!(
            answers.iter().all(|a| a == &Some(LeaseAnswer::Granted)),
            "node {from}: {answers:?}"
        );
    }

    // PM 1 fences PM 2 (committed by a majority).
    let index = c.node(1).db().fence(2, "test: partner lost").await.unwrap();
    assert!(c.node(1).db().fenced(2));
    assert!(!c.node(1).db().fenced(1));
    for id in [1, 2, 3] {
        c.node(id).db().wait_applied(index, DEADLINE).await.unwrap();
        let f = c.node(id).db().fence_of(2).unwrap().expect("fence applied");
        assert_eq!((f.node, f.fenced_at, f.by), (2, index, 1));
        assert_eq!(f.reason, "test: partner lost");
    }
    assert_eq!(c.node(3).db().fences().unwrap().len(), 1);
    // Refused by every voter, itself included; node 1 still granted.
    let answers = ask_all(&c, 2, &[1, 2, 3]).await;
    for a in &answers {
        match a {
            Some(LeaseAnswer::Refused(LeaseRefusal::Fenced { fence })) => {
                assert_eq!(fence.fenced_at, index)
            }
            other => panic!("expected a fenced refusal, got {other:?} (all: {answers:?})"),
        }
    }
    assert!(ask_all(&c, 1, &[1, 2, 3])
        .await
        .iter()
        .all(|a| a == &Some(LeaseAnswer::Granted)));

    // Unfencing (from the fenced node itself: any member may write) restores
    // it on every voter.
    let index = c.node(2).db().unfence(2).await.unwrap();
    for id in [1, 2, 3] {
        c.node(id).db().wait_applied(index, DEADLINE).await.unwrap();
        assert!(!c.node(id).db().fenced(2));
    }
    assert!(ask_all(&c, 2, &[1, 2, 3])
        .await
        .iter()
        .all(|a| a == &Some(LeaseAnswer::Granted)));
    // Fences are ordinary records: readable by everyone.
    assert!(c.node(1).db().list(FENCES_TABLE).unwrap().is_empty());
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_pm_gets_only_its_own_grant_and_cannot_fence() {
    let mut c = Cluster::three().await;
    c.isolate(1);
    // Its own answer is local; the others cannot be reached.
    let answers = ask_all(&c, 1, &[1, 2, 3]).await;
    assert_eq!(answers, vec![Some(LeaseAnswer::Granted), None, None]);
    let err = c.node(1).db().request_lease(2).await.unwrap_err();
    assert!(err.to_string().contains("cut"), "{err}");
    // The majority side is granted by its two voters.
    let answers = ask_all(&c, 2, &[1, 2, 3]).await;
    assert_eq!(
        answers,
        vec![None, Some(LeaseAnswer::Granted), Some(LeaseAnswer::Granted)]
    );
    // A fence needs a majority: the isolated PM cannot fence its partner...
    let err = c.node(1).db().fence(2, "split").await.unwrap_err();
    assert!(
        matches!(
            err,
            WriteError::NoQuorum { .. } | WriteError::NotCommitted { .. }
        ),
        "{err:?}"
    );
    // ...the majority side can fence it, and then refuses it even once the
    // link is back.
    c.agree_on_leader(&[2, 3]).await;
    c.node(2).db().fence(1, "isolated").await.unwrap();
    c.heal();
    for v in [2, 3] {
        let a = c.node(1).db().request_lease(v).await;
        assert!(
            matches!(
                a,
                Ok(LeaseAnswer::Refused(LeaseRefusal::Fenced { .. }))
                    | Ok(LeaseAnswer::Refused(LeaseRefusal::FencePending { .. }))
            ),
            "voter {v}: {a:?}"
        );
    }
    // Node 1 catches up and refuses itself too.
    eventually("node 1 to apply its fence", DEADLINE, || {
        c.node(1).db().fenced(1).then_some(())
    })
    .await;
    assert!(matches!(
        c.node(1).db().request_lease(1).await,
        Ok(LeaseAnswer::Refused(LeaseRefusal::Fenced { .. }))
    ));
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_quorum_is_refused_while_it_is_not_needed() {
    let mut c = Cluster::three().await;
    // With a witness: refused (the others could continue without it).
    let err = c.node(1).db().force_quorum().await.unwrap_err();
    assert!(matches!(err, Error::Membership(_)), "{err:?}");
    assert!(err.to_string().contains("3 voters"), "{err}");
    c.stop_all().await;

    // Two voters, both alive: refused because the partner answers.
    let mut c = Cluster::two(1).await;
    let err = c.node(1).db().force_quorum().await.unwrap_err();
    assert!(
        matches!(err, Error::PartnerAlive { node: 2, .. }),
        "{err:?}"
    );
    assert_eq!(c.node(1).db().metrics().voters().len(), 2);
    c.node(2)
        .db()
        .write(Batch::new().put("vms", "still", json!(1)))
        .await
        .unwrap();
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_quorum_lets_the_survivor_write_and_the_returning_partner_cannot_overwrite() {
    // Node 2 founds the unit, so it leads: the node that will be cut off is
    // the leader, and keeps an uncommitted entry of its own.
    let mut c = Cluster::two(2).await;
    let (a, b) = (1u64, 2u64);
    c.node(b)
        .db()
        .write(Batch::new().put("vms", "web", json!("committed")))
        .await
        .unwrap();
    c.visible_on(&[a, b], "vms", "web", &json!("committed"))
        .await;

    c.isolate(b);
    // Neither side can commit alone (2 voters need 2).
    let err = c
        .node(b)
        .db()
        .write(Batch::new().put("vms", "web", json!("from-b")))
        .await
        .unwrap_err();
    eprintln!("cut-off leader: {err}");
    let b_log = c.node(b).db().metrics().last_log_index;
    let err = c
        .node(a)
        .db()
        .write(Batch::new().put("vms", "web", json!("from-a-too-early")))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            WriteError::NoQuorum { .. } | WriteError::NotCommitted { .. }
        ),
        "{err:?}"
    );
    assert!(matches!(
        c.node(a).db().request_lease(b).await,
        Err(Error::Call(_))
    ));

    // The survivor forces quorum once its partner has been silent long
    // enough.
    let forced = loop_until_forced(&c, a).await;
    assert_eq!(forced.removed, vec![b]);
    let m = c.node(a).db().metrics();
    assert_eq!(m.voters().into_iter().collect::<Vec<_>>(), vec![a]);
    assert_eq!((m.state, m.leader), (NodeState::Leader, Some(a)));
    assert!(m.members.iter().all(|x| x.id != b));
    assert!(c
        .node(a)
        .db()
        .get(FORCED_QUORUM_TABLE, &forced.membership_index.to_string())
        .unwrap()
        .is_some());
    // Writes commit again, alone; and it holds its own lease (1 of 1).
    let i1 = c
        .node(a)
        .db()
        .write(Batch::new().put("vms", "web", json!("from-a")))
        .await
        .unwrap();
    assert!(i1 > forced.membership_index);
    assert_eq!(
        c.node(a).db().request_lease(a).await.unwrap(),
        LeaseAnswer::Granted
    );
    // Forcing again changes nothing.
    let again = c.node(a).db().force_quorum().await.unwrap();
    assert!(again.removed.is_empty());

    // The partner comes back with its stale files and its old membership.
    c.node_mut(b).stop().await;
    c.heal();
    c.node_mut(b).start().await;
    let db_b = c.node(b).db().clone();
    // (Right after opening, the metrics may not show the loaded state yet.)
    db_b.wait_until("the stale partner's old membership", DEADLINE, |m| {
        m.voters().contains(&a) && m.last_log_index >= b_log
    })
    .await
    .unwrap();
    // It is refused a lease by the survivor (not a member any more); its
    // own grant is 1 of the 2 it believes it needs.
    assert_eq!(
        db_b.request_lease(a).await.unwrap(),
        LeaseAnswer::Refused(LeaseRefusal::NotMember { node: b })
    );
    // It campaigns with ever higher terms but never wins: the survivor keeps
    // leading and committing.
    let term_a = c.node(a).db().metrics().term;
    eventually(
        "the stale partner to campaign past the survivor's term",
        DEADLINE,
        || (db_b.metrics().term > term_a).then_some(()),
    )
    .await;
    for i in 0..3 {
        c.node(a)
            .db()
            .write(Batch::new().put("vms", &format!("after-{i}"), json!(i)))
            .await
            .unwrap();
    }
    let ma = c.node(a).db().metrics();
    assert_eq!((ma.state, ma.leader), (NodeState::Leader, Some(a)));
    assert_ne!(db_b.metrics().state, NodeState::Leader);
    assert_eq!(
        c.node(a).db().get("vms", "web").unwrap().map(|r| r.value),
        Some(json!("from-a"))
    );
    // It cannot commit anything by itself: a write from it either fails or
    // was forwarded to, and committed by, the survivor.
    let r = db_b
        .write(Batch::new().put("vms", "stale", json!(true)))
        .await;
    eprintln!("stale partner's write: {r:?}");
    match r {
        Ok(i) => {
            c.node(a).db().wait_applied(i, DEADLINE).await.unwrap();
            let rec = c.node(a).db().get("vms", "stale").unwrap().unwrap();
            assert_eq!(rec.version, i);
        }
        Err(_) => assert!(c.node(a).db().get("vms", "stale").unwrap().is_none()),
    }

    // The survivor re-admits it: it receives the survivor's log, which
    // replaces its uncommitted entries, and becomes a voter again.
    c.node(a).db().add_voter(b, db_b.node_info()).await.unwrap();
    c.visible_on(&[b], "vms", "web", &json!("from-a")).await;
    c.visible_on(&[b], "vms", "after-2", &json!(2)).await;
    for id in [a, b] {
        c.node(id)
            .db()
            .wait_until("two voters again", DEADLINE, |m| m.voters().len() == 2)
            .await
            .unwrap();
    }
    let i = db_b
        .write(Batch::new().put("vms", "together", json!(true)))
        .await
        .unwrap();
    c.node(a).db().wait_applied(i, DEADLINE).await.unwrap();
    assert_eq!(
        c.node(a)
            .db()
            .get("vms", "together")
            .unwrap()
            .map(|r| r.value),
        Some(json!(true))
    );
    assert_eq!(db_b.request_lease(a).await.unwrap(), LeaseAnswer::Granted);
    c.stop_all().await;
}

/// Calls `force_quorum` on `id` until the partner counts as silent.
async fn loop_until_forced(c: &Cluster, id: u64) -> pairvisor_unitdb::ForcedQuorum {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        match c.node(id).db().force_quorum().await {
            Ok(f) => return f,
            Err(Error::PartnerAlive { .. }) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("force quorum failed: {e:?}"),
        }
    }
}

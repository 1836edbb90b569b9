//! Real clusters on loopback: three nodes (two PMs and a witness) talking
//! HTTP/2 over mutual TLS, with redb files in temporary directories.
//! Every wait is a poll with a deadline.

mod common;

use common::*;
use pairvisor_unitdb::{
    Batch, Config, Error, Event, NodeInfo, NodeRole, NodeState, OpenError, UnitCa, UnitDb,
    WriteError,
};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_a_leader_and_a_write_through_a_follower_reaches_all() {
    let c = Cluster::three().await;
    let leader = c.agree_on_leader(&[1, 2, 3]).await;
    let follower = if leader == 1 { 2 } else { 1 };
    let m = c.node(leader).db().metrics();
    assert_eq!(m.state, NodeState::Leader);
    assert_eq!(m.voters().into_iter().collect::<Vec<_>>(), vec![1, 2, 3]);
    let witness = m.members.iter().find(|x| x.id == 3).unwrap();
    assert_eq!(witness.info.role, NodeRole::Witness);
    assert!(witness.voter, "the witness must vote");

    let mut events = c.node(3).db().subscribe();
    let value = json!({"name": "web", "vcpus": 2});
    let index = c
        .node(follower)
        .db()
        .write(Batch::new().put("vms", "web", value.clone()))
        .await
        .unwrap();
    // Linearizable read on the follower right after the write.
    let read_index = c.node(follower).db().linearizable().await.unwrap();
    assert!(read_index >= index);
    let r = c.node(follower).db().get("vms", "web").unwrap().unwrap();
    assert_eq!((r.value.clone(), r.version), (value.clone(), index));
    c.visible_on(&[1, 2, 3], "vms", "web", &value).await;

    // The witness's subscribers saw the change, in order.
    let ev = tokio::time::timeout(DEADLINE, events.recv())
        .await
        .unwrap()
        .unwrap();
    match ev {
        Event::Applied { index: i, changes } => {
            assert_eq!(i, index);
            assert_eq!(changes.len(), 1);
            assert_eq!(changes[0].key, "web");
            assert_eq!(changes[0].value.as_ref(), Some(&value));
        }
        other => panic!("unexpected event {other:?}"),
    }

    // Replication lag as seen by the leader drops to zero.
    c.node(leader)
        .db()
        .wait_until("followers to catch up", DEADLINE, |m| {
            m.replication.len() == 2 && m.replication.values().all(|r| r.lag == 0)
        })
        .await
        .unwrap();
    for n in &c.nodes {
        let list = n.db().list("vms").unwrap();
        assert_eq!(list.len(), 1);
        n.db().shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_leader_elects_another_and_keeps_every_committed_write() {
    let mut c = Cluster::three().await;
    let leader = c.agree_on_leader(&[1, 2, 3]).await;
    for i in 0..5 {
        c.node(leader)
            .db()
            .write(Batch::new().put("vms", &format!("vm{i}"), json!(i)))
            .await
            .unwrap();
    }
    let before = c.node(leader).db().metrics().term;
    c.node_mut(leader).stop().await;
    let alive: Vec<u64> = [1, 2, 3].into_iter().filter(|x| *x != leader).collect();
    let started = Instant::now();
    let new_leader = c.agree_on_leader(&alive).await;
    eprintln!("new leader {new_leader} after {:?}", started.elapsed());
    assert_ne!(new_leader, leader);
    assert!(c.node(new_leader).db().metrics().term > before);
    for id in &alive {
        // A survivor may hold the last entries without knowing yet that they
        // were committed; the barrier makes it catch up with the new leader.
        c.node(*id).db().linearizable().await.unwrap();
        for i in 0..5 {
            let r = c.node(*id).db().get("vms", &format!("vm{i}")).unwrap();
            assert_eq!(r.map(|r| r.value), Some(json!(i)), "vm{i} on node {id}");
        }
    }
    // Writes continue with 2 of 3, from the surviving PM (the witness's own
    // are refused unless it leads: it votes, it does not write).
    let pms: Vec<u64> = alive.iter().copied().filter(|id| *id != 3).collect();
    for id in &pms {
        c.node(*id)
            .db()
            .write(Batch::new().put("vms", &format!("after-{id}"), json!(id)))
            .await
            .unwrap();
    }
    if new_leader != 3 && alive.contains(&3) {
        let err = c
            .node(3)
            .db()
            .write(Batch::new().put("vms", "after-3", json!(3)))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("only a PM"), "{err}");
    }
    for id in &pms {
        c.visible_on(&alive, "vms", &format!("after-{id}"), &json!(id))
            .await;
    }
    for id in alive {
        c.node_mut(id).stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_node_cannot_commit_and_says_why() {
    let mut c = Cluster::three().await;
    let leader = c.agree_on_leader(&[1, 2, 3]).await;
    // Keep one follower alone: stop the leader and the other follower.
    let lonely = [1, 2, 3].into_iter().find(|x| *x != leader).unwrap();
    for id in [1, 2, 3] {
        if id != lonely {
            c.node_mut(id).stop().await;
        }
    }
    let started = Instant::now();
    let err = c
        .node(lonely)
        .db()
        .write(Batch::new().put("vms", "split", json!(1)))
        .await
        .unwrap_err();
    let took = started.elapsed();
    let msg = err.to_string();
    eprintln!("isolated follower: {msg} (after {took:?})");
    assert!(
        matches!(err, WriteError::NoQuorum { .. }),
        "unexpected error {err:?}"
    );
    assert!(msg.contains("of 3 voters, 2 needed"), "{msg}");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert!(c.node(lonely).db().get("vms", "split").unwrap().is_none());
    // A read barrier fails the same way, in bounded time.
    let started = Instant::now();
    let err = c.node(lonely).db().linearizable().await.unwrap_err();
    assert!(matches!(err, Error::NoQuorum { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(8));
    c.node_mut(lonely).stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_does_not_commit() {
    let mut c = Cluster::three().await;
    let leader = c.agree_on_leader(&[1, 2, 3]).await;
    for id in [1, 2, 3] {
        if id != leader {
            c.node_mut(id).stop().await;
        }
    }
    let started = Instant::now();
    let err = c
        .node(leader)
        .db()
        .write(Batch::new().put("vms", "split", json!(1)))
        .await
        .unwrap_err();
    let took = started.elapsed();
    let msg = err.to_string();
    eprintln!("isolated leader: {msg} (after {took:?})");
    assert!(
        matches!(
            err,
            WriteError::NotCommitted { .. } | WriteError::NoQuorum { .. }
        ),
        "unexpected error {err:?}"
    );
    assert!(msg.contains("reaches 1 of 3 voters, 2 needed"), "{msg}");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert!(c.node(leader).db().get("vms", "split").unwrap().is_none());
    c.node_mut(leader).stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_catches_up_from_its_files_and_from_a_snapshot() {
    let mut c = Cluster::three().await;
    let leader = c.agree_on_leader(&[1, 2, 3]).await;
    // The node to restart is a follower (3, the witness, unless it leads).
    let victim = if leader == 3 { 2 } else { 3 };
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|x| *x != victim).collect();
    let writer = others[0];
    c.node(writer)
        .db()
        .write(Batch::new().put("vms", "a", json!("A")))
        .await
        .unwrap();
    c.visible_on(&[victim], "vms", "a", &json!("A")).await;
    c.node_mut(victim).stop().await;

    // Missed while down, replayed from the log.
    c.node(writer)
        .db()
        .write(Batch::new().put("vms", "b", json!("B")))
        .await
        .unwrap();
    c.node_mut(victim).start().await;
    // Its own files already hold what it had before.
    assert_eq!(
        c.node(victim)
            .db()
            .get("vms", "a")
            .unwrap()
            .map(|r| r.value),
        Some(json!("A"))
    );
    c.visible_on(&[victim], "vms", "b", &json!("B")).await;
    c.agree_on_leader(&[1, 2, 3]).await;

    // Down again; the leader snapshots and purges its log, so the victim can
    // only catch up by installing the snapshot.
    c.node_mut(victim).stop().await;
    let leader = c.agree_on_leader(&others).await;
    for i in 0..20 {
        c.node(writer)
            .db()
            .write(Batch::new().put("vms", &format!("c{i}"), json!(i)))
            .await
            .unwrap();
    }
    c.node(writer)
        .db()
        .write(Batch::new().delete("vms", "a"))
        .await
        .unwrap();
    let snap = c.node(leader).db().compact().await.unwrap();
    let m = c.node(leader).db().metrics();
    assert!(m.purged.unwrap_or(0) >= snap, "{m:?}");
    c.node_mut(victim).start().await;
    let mut events = c.node(victim).db().subscribe();
    c.visible_on(&[victim], "vms", "c19", &json!(19)).await;
    let db = c.node(victim).db();
    assert!(
        db.get("vms", "a").unwrap().is_none(),
        "delete carried by the snapshot"
    );
    assert_eq!(db.list("vms").unwrap().len(), 21);
    // Metrics follow the state machine shortly after the data.
    db.wait_until("the snapshot to show in the metrics", DEADLINE, |m| {
        m.snapshot.unwrap_or(0) >= snap && m.last_applied.unwrap_or(0) >= snap
    })
    .await
    .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(1), events.recv()).await;
    eprintln!("first event after restart: {ev:?}");
    for n in c.nodes.iter_mut() {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preconditions_reject_a_stale_write() {
    let mut c = Cluster::three().await;
    let leader = c.agree_on_leader(&[1, 2, 3]).await;
    let follower = if leader == 1 { 2 } else { 1 };
    let db = c.node(follower).db().clone();
    let v1 = db
        .write(
            Batch::new()
                .require_absent("vms", "web")
                .put("vms", "web", json!({"vcpus": 1})),
        )
        .await
        .unwrap();
    // Creating it again is refused.
    let err = db
        .write(
            Batch::new()
                .require_absent("vms", "web")
                .put("vms", "web", json!({"vcpus": 9})),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, WriteError::Rejected(_)), "{err:?}");
    // Two editors read version v1; the first wins, the second is stale.
    let v2 = db
        .write(Batch::new().require_version("vms", "web", v1).put(
            "vms",
            "web",
            json!({"vcpus": 2}),
        ))
        .await
        .unwrap();
    assert!(v2 > v1);
    let err = c
        .node(leader)
        .db()
        .write(
            Batch::new()
                .require_version("vms", "web", v1)
                .put("vms", "web", json!({"vcpus": 4}))
                .put("audit", "stale", json!(true)),
        )
        .await
        .unwrap_err();
    match &err {
        WriteError::Rejected(conflict) => {
            assert_eq!(conflict.required, format!("version {v1}"));
            assert_eq!(conflict.found, format!("version {v2}"));
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(err.to_string().contains("re-read"), "{err}");
    db.linearizable().await.unwrap();
    let r = db.get("vms", "web").unwrap().unwrap();
    assert_eq!((r.value, r.version), (json!({"vcpus": 2}), v2));
    assert!(
        db.get("audit", "stale").unwrap().is_none(),
        "nothing of a rejected batch"
    );
    // Reserved and malformed tables are refused before reaching Raft.
    assert!(matches!(
        db.write(Batch::new().put("_join_tokens", "x", json!(1)))
            .await,
        Err(WriteError::Invalid(_))
    ));
    assert!(matches!(
        db.write(Batch::new()).await,
        Err(WriteError::Invalid(_))
    ));
    for n in c.nodes.iter_mut() {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_foreign_ca_certificate_is_refused() {
    let mut c = Cluster::three().await;
    let tmp = tempfile::tempdir().unwrap();
    let rogue_ca = UnitCa::create("test-unit").unwrap();
    let mut rogue = Node {
        id: 4,
        dir: tmp.path().join("rogue"),
        addr: "127.0.0.1:0".parse().unwrap(),
        role: NodeRole::Pm,
        identity: rogue_ca.issue_identity(4, true).unwrap(),
        db: None,
    };
    rogue.start().await;
    let target = c.node(1);
    let err = rogue
        .db()
        .check_peer(1, &target.addr.to_string())
        .await
        .unwrap_err();
    eprintln!("rogue -> member: {err}");
    // The member's certificate is not trusted by the rogue either.
    let err2 = target
        .db()
        .check_peer(4, &rogue.addr.to_string())
        .await
        .unwrap_err();
    eprintln!("member -> rogue: {err2}");
    assert!(
        err2.to_string().to_lowercase().contains("certificate"),
        "{err2}"
    );
    // Members accept each other.
    target
        .db()
        .check_peer(2, &c.node(2).addr.to_string())
        .await
        .unwrap();
    // Asking the unit to add the rogue fails: the leader cannot replicate to
    // it, so it never becomes a voter, and the unit keeps working.
    let before = c.node(1).db().metrics().voters();
    let add = tokio::time::timeout(
        Duration::from_secs(30),
        c.node(1).db().add_voter(4, rogue.db().node_info()),
    )
    .await
    .expect("bounded");
    let err = add.expect_err("the rogue was added");
    eprintln!("add_voter(rogue): {err}");
    assert!(
        err.to_string()
            .contains("certificate comes from this unit's CA"),
        "{err}"
    );
    assert_eq!(c.node(1).db().metrics().voters(), before);
    c.node(1)
        .db()
        .wait_until("the rogue learner to be removed", DEADLINE, |m| {
            m.members.iter().all(|x| x.id != 4)
        })
        .await
        .unwrap();
    rogue.stop().await;
    c.node(2)
        .db()
        .write(Batch::new().put("vms", "still-ok", json!(1)))
        .await
        .unwrap();
    for n in c.nodes.iter_mut() {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_with_one_time_tokens() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = |id: u64| {
        let mut c = Config::new(
            id,
            tmp.path().join(format!("n{id}")),
            "127.0.0.1:0".parse().unwrap(),
        );
        c.timing = timing();
        c
    };
    // unit init on the first PM.
    let pm1 = UnitDb::init(cfg(1), "lab").await.unwrap();
    pm1.wait_until("node 1 to lead", DEADLINE, |m| m.leader == Some(1))
        .await
        .unwrap();
    assert!(matches!(
        UnitDb::init(cfg(1), "lab").await,
        Err(OpenError::Join(Error::AlreadyInitialized))
    ));

    // The second PM joins with a token; it receives the CA key.
    let token = pm1
        .create_join_token(2, NodeRole::Pm, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(!format!("{token:?}").contains(&token.secret));
    let text = token.to_string();
    let token2: pairvisor_unitdb::JoinToken = text.parse().unwrap();
    let pm2 = UnitDb::join(&token2, cfg(2)).await.unwrap();
    assert_eq!(pm2.node_id(), 2);

    // The witness joins with a token made by the second PM.
    let wtoken = pm2
        .create_join_token(3, NodeRole::Witness, Duration::from_secs(60))
        .await
        .unwrap();
    let witness = UnitDb::join(&wtoken, cfg(3)).await.unwrap();
    for db in [&pm1, &pm2, &witness] {
        db.wait_until("three voters", DEADLINE, |m| m.voters().len() == 3)
            .await
            .unwrap();
    }
    // The witness got no CA key: it cannot admit nodes.
    let err = witness
        .create_join_token(4, NodeRole::Pm, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("CA key"), "{err}");

    // A token works once.
    let again = UnitDb::join(&wtoken, cfg(5)).await;
    let err = match again {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a used token was accepted"),
    };
    assert!(err.contains("already used"), "{err}");

    // A token naming another CA is refused before the secret is sent.
    let other = pm1
        .create_join_token(6, NodeRole::Pm, Duration::from_secs(60))
        .await
        .unwrap();
    let mut forged = other.clone();
    forged.ca_fingerprint = "00".repeat(32);
    let err = match UnitDb::join(&forged, cfg(6)).await {
        Err(e) => format!("{e} / {:?}", e),
        Ok(_) => panic!("joined with a wrong CA fingerprint"),
    };
    assert!(err.contains("unit CA named in the join token"), "{err}");
    // The genuine token was not consumed by that attempt.
    let n6 = UnitDb::join(&other, cfg(6)).await.unwrap();

    // An expired token is refused.
    let short = pm1
        .create_join_token(7, NodeRole::Pm, Duration::ZERO)
        .await
        .unwrap();
    let err = match UnitDb::join(&short, cfg(7)).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("an expired token was accepted"),
    };
    assert!(err.contains("expired"), "{err}");

    // The witness votes and grants leases, nothing more (issue 13): with a
    // PM leading, a write it forwards is refused, and so is a node removal;
    // a PM's write is forwarded as before.
    pm1.wait_until("a PM to lead", DEADLINE, |m| {
        matches!(m.leader, Some(1) | Some(2))
    })
    .await
    .unwrap();
    for table in ["prefs", "users", pairvisor_unitdb::FENCES_TABLE] {
        let err = witness
            .write(Batch::new().put(table, "x", json!(false)))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("only a PM may write records"),
            "{table}: {err}"
        );
    }
    let err = witness.remove_node(2).await.unwrap_err();
    assert!(
        err.to_string().contains("only a PM may remove nodes"),
        "{err}"
    );
    assert_eq!(pm1.get("prefs", "x").unwrap(), None);
    let leader = pm1.metrics().leader.unwrap();
    let follower = if leader == 1 { &pm2 } else { &pm1 };
    let i = follower
        .write(Batch::new().put("prefs", "balancing", json!(false)))
        .await
        .unwrap();
    pm1.wait_applied(i, DEADLINE).await.unwrap();
    assert_eq!(
        pm1.get("prefs", "balancing").unwrap().map(|r| r.value),
        Some(json!(false))
    );
    let nodes = pm1.list(pairvisor_unitdb::NODES_TABLE).unwrap();
    assert_eq!(
        nodes.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        vec!["2", "3", "6"]
    );
    // Node 6 is removed again (through a follower PM or the leader).
    pm2.remove_node(6).await.unwrap();
    pm1.wait_until("node 6 to be gone", DEADLINE, |m| {
        m.members.iter().all(|x| x.id != 6) && m.voters().len() == 3
    })
    .await
    .unwrap();
    for db in [pm1, pm2, witness, n6] {
        db.shutdown().await;
    }
    let _ = NodeInfo::default();
}

/// A TLS connection to `addr` without a client certificate (a stranger who
/// knows the unit CA), speaking HTTP/1.1.
async fn stranger(
    addr: std::net::SocketAddr,
    ca_fingerprint: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut cfg = (*pairvisor_unitdb::tls::join_client_config(ca_fingerprint).unwrap()).clone();
    cfg.alpn_protocols.clear();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("node-1.pairvisor.unit").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// Sends a request head (and `body` bytes of a declared `declared`) and
/// returns the status line of the answer.
async fn post_head(
    s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    path: &str,
    declared: usize,
    body: usize,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!("POST {path} HTTP/1.1\r\nhost: unit\r\ncontent-length: {declared}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    // The server may answer (and stop reading) before the body is sent.
    let _ = tokio::time::timeout(Duration::from_secs(2), s.write_all(&vec![b'x'; body])).await;
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer within 5 s")
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Issue 13: on the unit port, a client without a certificate is refused
/// everything but the join call before its body is read, the join call's
/// body is capped at a few KiB, and strangers' connections are capped
/// without crowding out the members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_on_the_unit_port_are_refused_before_their_bodies_are_read() {
    let c = Cluster::three().await;
    c.agree_on_leader(&[1, 2, 3]).await;
    let addr = c.node(1).addr;
    let fp = c.node(1).identity.ca_fingerprint().unwrap();
    // A 64 MiB write announced: refused at once, the body never read.
    let mut s = stranger(addr, &fp).await;
    let t = Instant::now();
    let status = post_head(&mut s, "/unit/write", 64 << 20, 4096).await;
    assert!(status.contains(" 401 "), "{status}");
    assert!(t.elapsed() < Duration::from_secs(5));
    // A join call with a large body: cut at the cap.
    let mut s = stranger(addr, &fp).await;
    let status = post_head(&mut s, "/unit/join", 1 << 20, 1 << 20).await;
    assert!(status.contains(" 413 "), "{status}");
    // Many strangers at once: the extra ones are dropped, the members go on.
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(stranger(addr, &fp).await);
    }
    let i = c
        .node(2)
        .db()
        .write(Batch::new().put("vms", "still", json!(1)))
        .await
        .unwrap();
    c.node(1).db().wait_applied(i, DEADLINE).await.unwrap();
    let mut answered = 0;
    for s in held.iter_mut().take(20) {
        if !post_head(s, "/unit/ping", 0, 0).await.is_empty() {
            answered += 1;
        }
    }
    assert!(
        answered <= 8,
        "{answered} stranger connections served at once"
    );
}

//! Unit formation with three real nodes on loopback (TLS, Raft): PM A
//! founds the unit, PM B and the witness join with one-time tokens, the PMs
//! are recorded, heartbeats start between them on both links, a token cannot
//! be used twice, and a restarted PM rejoins by itself.

use pairvisor_model::fencing::LeaseTiming;
use pairvisor_unit::{PmAddresses, UnitConfig, UnitService, UnitView};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn tcp_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}
fn udp_port() -> String {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

fn timing() -> LeaseTiming {
    LeaseTiming {
        heartbeat_ms: 100,
        missed_heartbeats: 4,
        lease_ms: 800,
        drift_margin_ms: 100,
    }
}

fn config(dir: &Path, name: &str, pm: bool) -> UnitConfig {
    UnitConfig {
        data_dir: dir.join(name),
        listen: tcp_port(),
        advertise: None,
        pm: pm.then(|| PmAddresses {
            name: name.into(),
            private_hb: udp_port(),
            business_hb: udp_port(),
            api_url: format!("https://{name}.invalid"),
            api_trust_pem: None,
        }),
        timing: timing(),
    }
}

async fn until(svc: &Arc<UnitService>, what: &str, pred: impl Fn(&UnitView) -> bool) -> UnitView {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = svc.view().await;
        if pred(&v) {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {v:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_join_witness_heartbeats_and_rejoin() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_a = config(dir.path(), "pm-a", true);
    let a = UnitService::open(cfg_a.clone()).await.unwrap();
    let b = UnitService::open(config(dir.path(), "pm-b", true))
        .await
        .unwrap();
    let w = UnitService::open(config(dir.path(), "witness", false))
        .await
        .unwrap();
    assert!(a.view().await.name.is_none());
    assert!(
        a.join_token(false, Duration::from_secs(60)).await.is_err(),
        "not a member yet"
    );

    let v = a.init("lab-unit").await.unwrap();
    assert_eq!(v.name.as_deref(), Some("lab-unit"));
    assert!(a
        .init("again")
        .await
        .unwrap_err()
        .to_string()
        .contains("already a member"));

    let token_b = a.join_token(false, Duration::from_secs(60)).await.unwrap();
    assert!(w
        .join(&token_b)
        .await
        .unwrap_err()
        .to_string()
        .contains("token is for a"));
    b.join(&token_b).await.unwrap();
    let token_w = a.join_token(true, Duration::from_secs(60)).await.unwrap();
    w.join(&token_w).await.unwrap();

    let v = until(&a, "three voters and a leader", |v| {
        v.metrics
            .as_ref()
            .is_some_and(|m| m.voters().len() == 3 && m.leader.is_some())
    })
    .await;
    assert_eq!(v.pms.len(), 2, "both PMs recorded, not the witness");
    // Heartbeats between the PMs on both links.
    // Up as soon as a ping is heard; the RTT needs the echo of our own.
    until(&b, "heartbeats up with RTT", |v| {
        v.health.as_ref().is_some_and(|h| {
            h.links.len() == 2 && h.links.iter().all(|l| l.up && l.rtt_ms.is_some())
        })
    })
    .await;
    // One-time tokens.
    let again = UnitService::open(config(dir.path(), "pm-c", true))
        .await
        .unwrap();
    assert!(
        again.join(&token_b).await.is_err(),
        "a used token is refused"
    );
    assert!(again
        .join("garbage")
        .await
        .unwrap_err()
        .to_string()
        .contains("not valid"));
    assert!(a
        .join_token(false, Duration::from_secs(60))
        .await
        .unwrap_err()
        .to_string()
        .contains("already has"));

    // PM A restarts: it rejoins from its files, as the same node.
    a.shutdown().await;
    drop(a);
    // In-process, the previous instance's files are released asynchronously
    // after shutdown (a real restart is a new process): retry briefly.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let a = loop {
        match UnitService::open(cfg_a.clone()).await {
            Ok(a) => break a,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("not reopened yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot reopen PM A: {e}"),
        }
    };
    let v = until(&a, "A back with a leader", |v| {
        v.metrics
            .as_ref()
            .is_some_and(|m| m.leader.is_some() && m.voters().len() == 3)
    })
    .await;
    assert_eq!(v.node_id, Some(1));
    assert_eq!(v.name.as_deref(), Some("lab-unit"));
    for s in [a, b, w, again] {
        s.shutdown().await;
    }
}

//! Heartbeats between two real services on loopback UDP: links up with RTT,
//! one link cut (the other keeps the partner), both cut (partner lost),
//! heal, injected delay (U7 warning), and a stranger with the wrong secret.

use pairvisor_model::fencing::LeaseTiming;
use pairvisor_unit::health::{Faults, Health, HealthConfig, HealthStatus, LinkConfig};
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

const SECRET: &[u8] = b"unit-secret-for-tests-0123456789";

fn free_port() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn timing() -> LeaseTiming {
    LeaseTiming {
        heartbeat_ms: 50,
        missed_heartbeats: 4,
        lease_ms: 400,
        drift_margin_ms: 50,
    }
}

async fn pair(secret_b: &[u8]) -> (Health, Health) {
    let (a1, a2, b1, b2) = (free_port(), free_port(), free_port(), free_port());
    let link = |name: &str, bind, peer| LinkConfig {
        name: name.into(),
        bind,
        peer,
    };
    let a = Health::start(HealthConfig {
        node_id: 1,
        secret: SECRET.to_vec(),
        links: vec![link("private", a1, b1), link("business", a2, b2)],
        timing: timing(),
    })
    .await
    .unwrap();
    let b = Health::start(HealthConfig {
        node_id: 2,
        secret: secret_b.to_vec(),
        links: vec![link("private", b1, a1), link("business", b2, a2)],
        timing: timing(),
    })
    .await
    .unwrap();
    (a, b)
}

async fn until(h: &Health, what: &str, pred: impl Fn(&HealthStatus) -> bool) -> HealthStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = h.status();
        if pred(&s) {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {s:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn up(s: &HealthStatus, link: &str) -> bool {
    s.links.iter().any(|l| l.name == link && l.up)
}

#[tokio::test]
async fn links_cut_heal_and_rtt() {
    let (a, b) = pair(SECRET).await;
    let s = until(&a, "both links up with RTT", |s| {
        up(s, "private") && up(s, "business") && s.links.iter().all(|l| l.rtt_ms.is_some())
    })
    .await;
    assert!(!s.partner_lost);
    assert!(
        s.links
            .iter()
            .all(|l| l.rtt_ms.unwrap() < 10.0 && l.warning.is_none()),
        "{s:#?}"
    );

    // Cut the private link on A: it goes down on both sides, the business
    // link keeps the partner.
    a.set_faults(
        "private",
        Faults {
            cut: true,
            delay_ms: 0,
        },
    )
    .unwrap();
    let s = until(&b, "private down at B", |s| !up(s, "private")).await;
    assert!(up(&s, "business") && !s.partner_lost);
    // Both cut: partner lost on both sides.
    a.set_faults(
        "business",
        Faults {
            cut: true,
            delay_ms: 0,
        },
    )
    .unwrap();
    let s = until(&a, "partner lost at A", |s| s.partner_lost).await;
    assert!(s.partner_silent_ms.unwrap() >= timing().detection_ms());
    until(&b, "partner lost at B", |s| s.partner_lost).await;
    // Heal.
    a.set_faults("private", Faults::default()).unwrap();
    a.set_faults("business", Faults::default()).unwrap();
    until(&b, "healed at B", |s| up(s, "private") && up(s, "business")).await;

    // U7: a slow link (15 ms each way) is measured and warned about.
    a.set_faults(
        "business",
        Faults {
            cut: false,
            delay_ms: 15,
        },
    )
    .unwrap();
    let s = until(&a, "RTT above 10 ms", |s| {
        s.links
            .iter()
            .any(|l| l.name == "business" && l.rtt_ms.unwrap_or(0.0) > 12.0)
    })
    .await;
    let w = s
        .links
        .iter()
        .find(|l| l.name == "business")
        .unwrap()
        .warning
        .clone();
    assert!(w.unwrap().contains("above the 10 ms"), "{s:#?}");
    assert!(a.set_faults("nope", Faults::default()).is_err());
}

#[tokio::test]
async fn a_stranger_with_another_secret_is_never_heard() {
    let (a, _b) = pair(b"some-other-unit-secret-987654321").await;
    tokio::time::sleep(Duration::from_millis(600)).await; // several heartbeat periods
    let s = a.status();
    assert!(s.partner_lost && s.partner_silent_ms.is_none(), "{s:#?}");
}

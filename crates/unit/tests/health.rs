//! Heartbeats between two real services on loopback UDP: links up with RTT,
//! one link cut (the other keeps the partner), both cut (partner lost),
//! heal, injected delay (U7 warning), a stranger with the wrong secret, a
//! node other than the partner, echoes too old to count, and datagrams
//! captured on the wire and replayed after the partner died.

use pairvisor_model::fencing::LeaseTiming;
use pairvisor_unit::health::{
    decode, encode, Datagram, Faults, Health, HealthConfig, HealthStatus, LinkConfig, KIND_ECHO,
    KIND_PING,
};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
        partner_node_id: Some(2),
        secret: SECRET.to_vec(),
        links: vec![link("private", a1, b1), link("business", a2, b2)],
        timing: timing(),
    })
    .await
    .unwrap();
    let b = Health::start(HealthConfig {
        node_id: 2,
        partner_node_id: Some(1),
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

/// One service with one link ("private") from `bind` to `peer`.
async fn single(node_id: u64, partner: u64, bind: SocketAddr, peer: SocketAddr) -> Health {
    Health::start(HealthConfig {
        node_id,
        partner_node_id: Some(partner),
        secret: SECRET.to_vec(),
        links: vec![LinkConfig {
            name: "private".into(),
            bind,
            peer,
        }],
        timing: timing(),
    })
    .await
    .unwrap()
}

fn detection() -> Duration {
    Duration::from_millis(timing().detection_ms())
}

/// Generous for a loaded CI machine, still well below the replay windows.
const MARGIN: Duration = Duration::from_millis(500);

/// Polls `h` every 20 ms until `until`, asserting `pred` at every sample.
async fn always_until(
    h: &Health,
    until: Instant,
    what: &str,
    pred: impl Fn(&HealthStatus) -> bool,
) {
    loop {
        let s = h.status();
        assert!(pred(&s), "{what}: {s:#?}");
        if Instant::now() >= until {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Datagrams seen on the wire, with when.
type Recording = Vec<(Instant, Vec<u8>)>;

/// A UDP relay on the wire between A and B: A's peer is `to_b` (forwarded to
/// B), B's peer is `to_a` (forwarded to A, whose address can change), and
/// every datagram B sends is recorded with its time.
struct Relay {
    to_b: Arc<tokio::net::UdpSocket>,
    to_a: Arc<tokio::net::UdpSocket>,
    a: Arc<Mutex<SocketAddr>>,
    recorded: Arc<Mutex<Recording>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Relay {
    async fn start(a: SocketAddr, b: SocketAddr) -> Relay {
        let to_b = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let to_a = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let a = Arc::new(Mutex::new(a));
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // A → B: A's datagrams arrive on `to_b` and leave from `to_a`
        // (B's peer), so that B's answers come back through the relay.
        let (rx, tx) = (to_b.clone(), to_a.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                if let Ok((n, _)) = rx.recv_from(&mut buf).await {
                    let _ = tx.send_to(&buf[..n], b).await;
                }
            }
        }));
        // B → A, recorded.
        let (rx, tx, to, rec) = (to_a.clone(), to_b.clone(), a.clone(), recorded.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                if let Ok((n, from)) = rx.recv_from(&mut buf).await {
                    if from != b {
                        continue;
                    }
                    rec.lock()
                        .unwrap()
                        .push((Instant::now(), buf[..n].to_vec()));
                    let to = *to.lock().unwrap();
                    let _ = tx.send_to(&buf[..n], to).await;
                }
            }
        }));
        Relay {
            to_b,
            to_a,
            a,
            recorded,
            tasks,
        }
    }

    /// Sends B's recorded datagrams to A again, from B's side of the relay
    /// (where A expects them), at their original pace, over and over.
    fn replay(&self) -> tokio::task::JoinHandle<()> {
        let rec = self.recorded.lock().unwrap().clone();
        let (tx, to) = (self.to_b.clone(), self.a.clone());
        tokio::spawn(async move {
            loop {
                let start = Instant::now();
                let first = rec[0].0;
                for (at, bytes) in &rec {
                    let due = start + (*at - first);
                    tokio::time::sleep(due.saturating_duration_since(Instant::now())).await;
                    let to = *to.lock().unwrap();
                    let _ = tx.send_to(bytes, to).await;
                }
            }
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[tokio::test]
async fn a_replayed_heartbeat_does_not_keep_a_dead_partner_alive() {
    let (a_addr, b_addr) = (free_port(), free_port());
    let relay = Relay::start(a_addr, b_addr).await;
    let a = single(1, 2, a_addr, relay.to_b.local_addr().unwrap()).await;
    let b = single(2, 1, b_addr, relay.to_a.local_addr().unwrap()).await;
    // Through the relay both see each other; record at least a second of
    // B's pings and echoes.
    until(&a, "A hears B through the relay", |s| !s.partner_lost).await;
    until(&b, "B hears A through the relay", |s| !s.partner_lost).await;
    let count = |kind: u8| {
        relay
            .recorded
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, b)| decode(SECRET, b).is_some_and(|d| d.kind == kind))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(KIND_PING) < 20 || count(KIND_ECHO) < 20 {
        assert!(Instant::now() < deadline, "too little recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    until(&a, "A hears B after recording", |s| !s.partner_lost).await;

    // B dies; the captured datagrams are replayed to A, which must still
    // lose B within the detection time, and keep it lost while the replay
    // goes on.
    drop(b);
    let died = Instant::now();
    let replay = relay.replay();
    let deadline = died + detection() + MARGIN;
    loop {
        let s = a.status();
        if s.partner_lost {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B still alive at A after its death: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    always_until(
        &a,
        Instant::now() + Duration::from_millis(1500),
        "B lost at A during the replay",
        |s| s.partner_lost,
    )
    .await;
    replay.abort();

    // A restarts (its records of B's sequence numbers are gone) and the
    // replay starts again from the beginning: never heard.
    drop(a);
    let a2_addr = free_port();
    *relay.a.lock().unwrap() = a2_addr;
    let a2 = single(1, 2, a2_addr, relay.to_b.local_addr().unwrap()).await;
    let replay = relay.replay();
    always_until(
        &a2,
        Instant::now() + Duration::from_millis(1500),
        "B never heard by the restarted A",
        |s| s.partner_lost && s.partner_silent_ms.is_none(),
    )
    .await;
    replay.abort();
}

#[tokio::test]
async fn a_heartbeat_from_an_unexpected_node_is_ignored() {
    // A expects node 2; node 3 (same unit secret) pings it and answers its
    // pings.
    let (a_addr, c_addr) = (free_port(), free_port());
    let a = single(1, 2, a_addr, c_addr).await;
    let c = single(3, 1, c_addr, a_addr).await;
    always_until(
        &a,
        Instant::now() + detection() * 4,
        "node 3 never heard at A",
        |s| s.partner_lost && s.partner_silent_ms.is_none(),
    )
    .await;
    // The same node 3 is heard by a service that expects it (so the above is
    // not for want of datagrams).
    drop(a);
    let a3 = single(1, 3, free_port(), c_addr).await;
    until(&a3, "node 3 heard when expected", |s| !s.partner_lost).await;
    drop(c);
}

#[tokio::test]
async fn an_echo_older_than_the_detection_time_is_ignored() {
    // A fake partner (node 2) that echoes A's pings after `delay_ms`.
    let fake = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let a = single(1, 2, free_port(), fake.local_addr().unwrap()).await;
    let delay_ms = Arc::new(AtomicU64::new(0));
    let echoed = Arc::new(AtomicU64::new(0));
    let (sock, delay, count) = (fake.clone(), delay_ms.clone(), echoed.clone());
    let echoer = tokio::spawn(async move {
        let mut buf = [0u8; 512];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                continue;
            };
            let Some(d) = decode(SECRET, &buf[..n]) else {
                continue;
            };
            let echo = encode(
                SECRET,
                &Datagram {
                    kind: KIND_ECHO,
                    node: 2,
                    ..d
                },
            );
            let (sock, count) = (sock.clone(), count.clone());
            let wait = Duration::from_millis(delay.load(Ordering::SeqCst));
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let _ = sock.send_to(&echo, from).await;
                count.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    // Prompt echoes: heard.
    until(&a, "prompt echoes heard", |s| !s.partner_lost).await;
    // Echoes sent back a detection time and a bit after the ping: lost
    // within the detection time, and never heard again.
    delay_ms.store(timing().detection_ms() + 100, Ordering::SeqCst);
    let changed = Instant::now();
    let deadline = changed + detection() + MARGIN;
    loop {
        let s = a.status();
        if s.partner_lost {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stale echoes kept the partner: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = echoed.load(Ordering::SeqCst);
    always_until(
        &a,
        Instant::now() + Duration::from_millis(1000),
        "lost while stale echoes arrive",
        |s| s.partner_lost,
    )
    .await;
    assert!(
        echoed.load(Ordering::SeqCst) >= before + 10,
        "the fake kept echoing"
    );
    echoer.abort();
}

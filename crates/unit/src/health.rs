//! PM-to-PM heartbeats on every link (SPEC U6: the private link and the first
//! business network), with round-trip measurement (U7).
//!
//! Each side sends an authenticated UDP ping on each link every
//! `heartbeat_ms`; the partner answers with an echo carrying the sender's own
//! send time, so the round trip is measured on one clock. A link is up while
//! the partner echoed, on that link, one of our pings sent within the
//! detection time (`missed_heartbeats × heartbeat_ms`); the partner is lost
//! when every link is down.
//!
//! UDP and an HMAC over a shared unit secret (like corosync's authkey) keep
//! heartbeats cheap and independent of TCP back-off. Only datagrams from the
//! expected partner node are considered ([`HealthConfig::partner_node_id`]).
//!
//! Liveness comes only from echoes of our own pings, never from the
//! partner's pings: an echo carries our session (random per start) and our
//! own send time, so its age is measured exactly on our clock, whatever the
//! partner's clock says; it must also carry a sequence number above the
//! highest echoed so far. A replayed echo is therefore either from an older
//! session of ours (after our restart), or repeats a sequence number, or is
//! older than the detection time. The partner's pings prove nothing about
//! when they were sent (their time is on the partner's clock, and our record
//! of its sequence numbers is empty after our restart), so a datagram
//! captured earlier and replayed could keep a dead partner "alive"; they are
//! only answered, so that the partner can measure us.
//!
//! Times are on the boot clock ([`BootInstant`]), which keeps counting while
//! the system is suspended. Faults (drop, delay) can be injected per link in
//! our own code, for tests and `pairvisor lab cut` where no network
//! namespace is available.

use crate::clock::BootInstant;
use hmac::{Hmac, Mac};
use pairvisor_model::fencing::LeaseTiming;
use pairvisor_model::power::rtt_warning;
use serde::Serialize;
use sha2::Sha256;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const MAGIC: &[u8; 4] = b"PVHB";
const VERSION: u8 = 1;
/// [`Datagram::kind`] of a ping.
pub const KIND_PING: u8 = 1;
/// [`Datagram::kind`] of an echo (a ping sent back by the partner).
pub const KIND_ECHO: u8 = 2;
/// magic, version, kind, node, session, seq, sent_ns, link.
const BODY_LEN: usize = 4 + 1 + 1 + 8 + 8 + 8 + 8 + 1;
const MAC_LEN: usize = 32;
/// Length of a heartbeat datagram.
pub const DATAGRAM_LEN: usize = BODY_LEN + MAC_LEN;

/// One link between the two PMs.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Name ("private", "business").
    pub name: String,
    /// Local address to bind.
    pub bind: SocketAddr,
    /// The partner's address on this link.
    pub peer: SocketAddr,
}

/// Configuration of the heartbeat service.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// This PM's node id.
    pub node_id: u64,
    /// The partner PM's node id: only datagrams carrying it are answered or
    /// counted. `None` (partner not known yet, or equal to `node_id`):
    /// nothing is accepted and the partner stays lost.
    pub partner_node_id: Option<u64>,
    /// The unit secret (authenticates heartbeats).
    pub secret: Vec<u8>,
    /// The links.
    pub links: Vec<LinkConfig>,
    /// Heartbeat interval and detection.
    pub timing: LeaseTiming,
}

/// Faults injected on one link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Faults {
    /// Drop everything this side sends and receives on the link (a cut).
    pub cut: bool,
    /// Delay every outgoing datagram by this much.
    pub delay_ms: u64,
}

/// The state of one link.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkStatus {
    /// Link name.
    pub name: String,
    /// The partner echoed a ping of ours sent within the detection time.
    pub up: bool,
    /// Milliseconds since the partner was last heard on this link: since
    /// the newest of our pings it echoed was sent.
    pub last_heard_ms: Option<u64>,
    /// Smoothed round-trip time, ms.
    pub rtt_ms: Option<f64>,
    /// U7 warning when the round trip exceeds 10 ms.
    pub warning: Option<String>,
    /// Injected faults.
    pub faults: Faults,
}

/// The partner's health as this PM sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthStatus {
    /// Per link.
    pub links: Vec<LinkStatus>,
    /// Milliseconds since the partner was heard on any link (None: never).
    pub partner_silent_ms: Option<u64>,
    /// Every link is down.
    pub partner_lost: bool,
}

/// Errors starting the service.
#[derive(Debug, Error)]
pub enum HealthError {
    /// A link's socket could not be bound.
    #[error("cannot bind heartbeat link '{link}' on {addr}: {source}")]
    Bind {
        /// Link name.
        link: String,
        /// Address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No such link.
    #[error("no heartbeat link named '{0}'")]
    UnknownLink(String),
    /// The secret is too short to authenticate anything.
    #[error("the unit secret must be at least 16 bytes")]
    WeakSecret,
}

struct LinkState {
    faults: Faults,
    /// When the newest of our pings that the partner echoed was sent.
    last_heard: Option<BootInstant>,
    rtt_ms: Option<f64>,
    /// Highest ping sequence answered per partner session (so that a replay
    /// is not answered again; liveness does not depend on it).
    seen: HashMap<u64, u64>,
    /// Highest sequence number of our own pings echoed in our session.
    echoed: u64,
}

impl LinkState {
    /// Accepts an echo of one of our pings if it is fresh: our `session`,
    /// a sequence number above every one echoed before, and sent (on our
    /// clock) less than `detection_ns` before `now_ns`. Returns its round
    /// trip in ns.
    fn accept_echo(
        &mut self,
        d: &Datagram,
        session: u64,
        now_ns: u64,
        detection_ns: u64,
    ) -> Option<u64> {
        if d.kind != KIND_ECHO || d.session != session || d.seq <= self.echoed {
            return None;
        }
        // Not from the future, and not too old to prove anything.
        let age = now_ns.checked_sub(d.sent_ns)?;
        if age >= detection_ns {
            return None;
        }
        self.echoed = d.seq;
        Some(age)
    }

    /// Answers a ping only once per sequence number of a partner session.
    fn fresh_ping(&mut self, d: &Datagram) -> bool {
        if self.seen.len() > 64 && !self.seen.contains_key(&d.session) {
            // Sessions of the partner's earlier starts: forget them.
            self.seen.clear();
        }
        let last = self.seen.entry(d.session).or_insert(0);
        let fresh = d.seq > *last;
        if fresh {
            *last = d.seq;
        }
        fresh
    }
}

struct Shared {
    cfg: HealthConfig,
    /// The zero of `sent_ns` in our pings.
    epoch: BootInstant,
    session: u64,
    links: Mutex<Vec<LinkState>>,
    status: watch::Sender<HealthStatus>,
}

/// The running heartbeat service; stops when dropped.
pub struct Health {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    /// Actual bound addresses (useful with port 0).
    pub local_addrs: Vec<SocketAddr>,
}

impl Drop for Health {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn mac(secret: &[u8], body: &[u8]) -> [u8; MAC_LEN] {
    // HMAC accepts keys of any length; the constructor cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(body);
    m.finalize().into_bytes().into()
}

/// A decoded, authenticated heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    /// Ping or echo.
    pub kind: u8,
    /// Link index.
    pub link: u8,
    /// Sender's node id.
    pub node: u64,
    /// Sender's session (random per start).
    pub session: u64,
    /// Sequence number.
    pub seq: u64,
    /// The pinger's send time (its own clock, ns since its start).
    pub sent_ns: u64,
}

/// Encodes and authenticates a heartbeat.
pub fn encode(secret: &[u8], d: &Datagram) -> [u8; DATAGRAM_LEN] {
    let mut b = [0u8; DATAGRAM_LEN];
    b[..4].copy_from_slice(MAGIC);
    b[4] = VERSION;
    b[5] = d.kind;
    b[6..14].copy_from_slice(&d.node.to_be_bytes());
    b[14..22].copy_from_slice(&d.session.to_be_bytes());
    b[22..30].copy_from_slice(&d.seq.to_be_bytes());
    b[30..38].copy_from_slice(&d.sent_ns.to_be_bytes());
    // byte 38: link index, inside the authenticated body
    b[38] = d.link;
    let m = mac(secret, &b[..BODY_LEN]);
    b[BODY_LEN..].copy_from_slice(&m);
    b
}

/// Decodes a datagram; `None` for anything malformed or not authenticated
/// with `secret`.
pub fn decode(secret: &[u8], b: &[u8]) -> Option<Datagram> {
    if b.len() != DATAGRAM_LEN || &b[..4] != MAGIC || b[4] != VERSION {
        return None;
    }
    let expected = mac(secret, &b[..BODY_LEN]);
    // Constant-time comparison.
    let diff = expected
        .iter()
        .zip(&b[BODY_LEN..])
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    if diff != 0 {
        return None;
    }
    let u = |r: std::ops::Range<usize>| u64::from_be_bytes(b[r].try_into().unwrap_or([0; 8]));
    let kind = b[5];
    if kind != KIND_PING && kind != KIND_ECHO {
        return None;
    }
    Some(Datagram {
        kind,
        node: u(6..14),
        session: u(14..22),
        seq: u(22..30),
        sent_ns: u(30..38),
        link: b[38],
    })
}

impl Health {
    /// Binds every link and starts pinging.
    pub async fn start(cfg: HealthConfig) -> Result<Health, HealthError> {
        if cfg.secret.len() < 16 {
            return Err(HealthError::WeakSecret);
        }
        let mut sockets = Vec::new();
        let mut local_addrs = Vec::new();
        for l in &cfg.links {
            let s = UdpSocket::bind(l.bind)
                .await
                .map_err(|source| HealthError::Bind {
                    link: l.name.clone(),
                    addr: l.bind,
                    source,
                })?;
            local_addrs.push(s.local_addr().unwrap_or(l.bind));
            sockets.push(Arc::new(s));
        }
        let links = cfg
            .links
            .iter()
            .map(|_| LinkState {
                faults: Faults::default(),
                last_heard: None,
                rtt_ms: None,
                seen: HashMap::new(),
                echoed: 0,
            })
            .collect();
        let (status, _) = watch::channel(HealthStatus {
            links: vec![],
            partner_silent_ms: None,
            partner_lost: true,
        });
        let shared = Arc::new(Shared {
            cfg,
            epoch: BootInstant::now(),
            session: rand::random(),
            links: Mutex::new(links),
            status,
        });
        let mut tasks = Vec::new();
        for (i, sock) in sockets.into_iter().enumerate() {
            let sh = shared.clone();
            let s2 = sock.clone();
            tasks.push(tokio::spawn(async move { sh.send_loop(i, s2).await }));
            let sh = shared.clone();
            tasks.push(tokio::spawn(async move { sh.recv_loop(i, sock).await }));
        }
        let sh = shared.clone();
        tasks.push(tokio::spawn(async move {
            let mut t =
                tokio::time::interval(Duration::from_millis(sh.cfg.timing.heartbeat_ms / 2 + 1));
            loop {
                t.tick().await;
                let st = sh.compute_status();
                sh.status.send_replace(st);
            }
        }));
        Ok(Health {
            shared,
            tasks,
            local_addrs,
        })
    }

    /// The current view of the partner.
    pub fn status(&self) -> HealthStatus {
        self.shared.compute_status()
    }

    /// A channel updated twice per heartbeat interval.
    pub fn subscribe(&self) -> watch::Receiver<HealthStatus> {
        self.shared.status.subscribe()
    }

    /// Injects faults on a link.
    pub fn set_faults(&self, link: &str, faults: Faults) -> Result<(), HealthError> {
        let idx = self
            .shared
            .cfg
            .links
            .iter()
            .position(|l| l.name == link)
            .ok_or_else(|| HealthError::UnknownLink(link.to_string()))?;
        if let Ok(mut links) = self.shared.links.lock() {
            links[idx].faults = faults;
        }
        Ok(())
    }
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn faults(&self, i: usize) -> Faults {
        self.links.lock().map(|l| l[i].faults).unwrap_or_default()
    }

    async fn send(&self, i: usize, sock: &Arc<UdpSocket>, d: Datagram, to: SocketAddr) {
        let f = self.faults(i);
        if f.cut {
            return;
        }
        let bytes = encode(&self.cfg.secret, &d);
        if f.delay_ms > 0 {
            let sock = sock.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(f.delay_ms)).await;
                let _ = sock.send_to(&bytes, to).await;
            });
        } else {
            let _ = sock.send_to(&bytes, to).await;
        }
    }

    async fn send_loop(self: Arc<Self>, i: usize, sock: Arc<UdpSocket>) {
        let peer = self.cfg.links[i].peer;
        let mut seq = 0u64;
        let mut t = tokio::time::interval(Duration::from_millis(self.cfg.timing.heartbeat_ms));
        loop {
            t.tick().await;
            seq += 1;
            let d = Datagram {
                kind: KIND_PING,
                link: i as u8,
                node: self.cfg.node_id,
                session: self.session,
                seq,
                sent_ns: self.now_ns(),
            };
            self.send(i, &sock, d, peer).await;
        }
    }

    async fn recv_loop(self: Arc<Self>, i: usize, sock: Arc<UdpSocket>) {
        let mut buf = [0u8; 512];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            if self.faults(i).cut {
                continue;
            }
            let Some(d) = decode(&self.cfg.secret, &buf[..n]) else {
                continue;
            };
            // Only the expected partner (this also drops our own datagrams
            // reflected back), and not from cross-wired links.
            let partner = self.cfg.partner_node_id.filter(|p| *p != self.cfg.node_id);
            if Some(d.node) != partner || d.link as usize != i {
                continue;
            }
            match d.kind {
                KIND_PING => {
                    // Answered so the partner can measure us, but not
                    // counted as hearing it (see the module documentation).
                    let fresh = self
                        .links
                        .lock()
                        .map(|mut l| l[i].fresh_ping(&d))
                        .unwrap_or(false);
                    if fresh {
                        let echo = Datagram {
                            kind: KIND_ECHO,
                            node: self.cfg.node_id,
                            ..d
                        };
                        self.send(i, &sock, echo, from).await;
                    }
                }
                _ => {
                    // Echo of our own ping: the only proof of life.
                    let now_ns = self.now_ns();
                    let detection_ns = self.cfg.timing.detection_ms().saturating_mul(1_000_000);
                    if let Ok(mut l) = self.links.lock() {
                        let Some(rtt_ns) = l[i].accept_echo(&d, self.session, now_ns, detection_ns)
                        else {
                            continue;
                        };
                        let rtt = rtt_ns as f64 / 1e6;
                        // Heard as of when that ping left: the partner
                        // answered after that.
                        let sent = self.epoch + Duration::from_nanos(d.sent_ns);
                        l[i].last_heard = l[i].last_heard.max(Some(sent));
                        l[i].rtt_ms = Some(match l[i].rtt_ms {
                            Some(prev) => prev * 0.7 + rtt * 0.3,
                            None => rtt,
                        });
                    }
                }
            }
        }
    }

    fn compute_status(&self) -> HealthStatus {
        let detection = Duration::from_millis(self.cfg.timing.detection_ms());
        let now = BootInstant::now();
        let links = self.links.lock().map(|l| {
            l.iter()
                .zip(&self.cfg.links)
                .map(|(s, c)| {
                    let last = s.last_heard.map(|t| now.saturating_duration_since(t));
                    let up = last.is_some_and(|d| d < detection);
                    LinkStatus {
                        name: c.name.clone(),
                        up,
                        last_heard_ms: last.map(|d| d.as_millis() as u64),
                        rtt_ms: s.rtt_ms.filter(|_| up),
                        warning: s
                            .rtt_ms
                            .filter(|_| up)
                            .and_then(|r| rtt_warning(&c.name, r)),
                        faults: s.faults,
                    }
                })
                .collect::<Vec<_>>()
        });
        let links = links.unwrap_or_default();
        let partner_silent_ms = links.iter().filter_map(|l| l.last_heard_ms).min();
        HealthStatus {
            partner_lost: !links.iter().any(|l| l.up),
            partner_silent_ms,
            links,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Issue 13: any bytes from the network decode without a panic,
        /// and nothing is believed without the unit secret's MAC, even a
        /// genuine datagram with one bit flipped.
        #[test]
        fn arbitrary_datagrams_are_refused_without_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128),
            node: u64, session: u64, seq: u64, sent_ns: u64, link: u8,
            ping: bool, flip in 0usize..(DATAGRAM_LEN * 8),
        ) {
            let key = b"0123456789abcdef-unit-secret";
            proptest::prop_assert!(decode(key, &bytes).is_none());
            let d = Datagram {
                kind: if ping { KIND_PING } else { KIND_ECHO },
                link, node, session, seq, sent_ns,
            };
            let mut b = encode(key, &d);
            proptest::prop_assert_eq!(decode(key, &b), Some(d));
            proptest::prop_assert!(decode(b"another secret of the right size", &b).is_none());
            b[flip / 8] ^= 1 << (flip % 8);
            proptest::prop_assert!(decode(key, &b).is_none());
        }
    }

    #[test]
    fn datagram_round_trip_and_rejections() {
        let key = b"0123456789abcdef-unit-secret";
        let d = Datagram {
            kind: KIND_PING,
            link: 1,
            node: 7,
            session: 99,
            seq: 3,
            sent_ns: 123,
        };
        let b = encode(key, &d);
        assert_eq!(decode(key, &b), Some(d));
        assert_eq!(
            decode(b"another-secret-0123456789", &b),
            None,
            "wrong secret"
        );
        for i in [0, 5, 10, 40, DATAGRAM_LEN - 1] {
            let mut t = b;
            t[i] ^= 1;
            assert_eq!(decode(key, &t), None, "tampered byte {i}");
        }
        assert_eq!(decode(key, &b[..DATAGRAM_LEN - 1]), None, "short");
        assert_eq!(decode(key, &[]), None);
    }

    #[test]
    fn only_fresh_echoes_of_our_session_count() {
        let mut l = LinkState {
            faults: Faults::default(),
            last_heard: None,
            rtt_ms: None,
            seen: HashMap::new(),
            echoed: 0,
        };
        let detection = 200_000_000;
        let echo = |seq, sent_ns| Datagram {
            kind: KIND_ECHO,
            link: 0,
            node: 2,
            session: 42,
            seq,
            sent_ns,
        };
        let now = 1_000_000_000;
        assert_eq!(
            l.accept_echo(&echo(1, now - 3_000_000), 42, now, detection),
            Some(3_000_000)
        );
        // The same echo again, or an earlier one: a replay.
        assert_eq!(
            l.accept_echo(&echo(1, now - 3_000_000), 42, now, detection),
            None
        );
        // Another session (ours before a restart).
        assert_eq!(l.accept_echo(&echo(5, now - 1), 41, now, detection), None);
        // Sent longer ago than the detection time.
        assert_eq!(
            l.accept_echo(&echo(6, now - detection), 42, now, detection),
            None
        );
        // From the future.
        assert_eq!(l.accept_echo(&echo(7, now + 1), 42, now, detection), None);
        // A ping is not an echo.
        let ping = Datagram {
            kind: KIND_PING,
            ..echo(8, now - 1)
        };
        assert_eq!(l.accept_echo(&ping, 42, now, detection), None);
        assert_eq!(
            l.accept_echo(&echo(9, now - 1), 42, now, detection),
            Some(1)
        );
        assert_eq!(l.accept_echo(&echo(8, now - 1), 42, now, detection), None);
    }

    #[test]
    fn a_ping_is_answered_once_per_sequence_number() {
        let mut l = LinkState {
            faults: Faults::default(),
            last_heard: None,
            rtt_ms: None,
            seen: HashMap::new(),
            echoed: 0,
        };
        let ping = |session, seq| Datagram {
            kind: KIND_PING,
            link: 0,
            node: 2,
            session,
            seq,
            sent_ns: 0,
        };
        assert!(l.fresh_ping(&ping(1, 1)));
        assert!(!l.fresh_ping(&ping(1, 1)));
        assert!(l.fresh_ping(&ping(1, 2)));
        assert!(l.fresh_ping(&ping(2, 1)));
        assert!(!l.fresh_ping(&ping(1, 2)));
    }
}

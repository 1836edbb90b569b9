//! Crash-safety harness (SPEC S3).
//!
//! Writers put a known pattern through NBD (FUA and plain writes, several in
//! flight; 4 KiB writes, and writes of up to 1 MiB that take the streamed,
//! cut-through path) and record every acknowledged write. The harness SIGKILLs the
//! primary process, or the secondary, or cuts the replication link, at
//! random moments, many times. After promotion/reconnection and resync,
//! every acknowledged write must be on every replica declared in sync, and
//! verify must find both replicas identical.
//!
//! Reproducible: the seeds come from `PV_CRASH_SEEDS` (comma-separated,
//! default `1,2`); iterations per scenario from `PV_CRASH_ITERS` (default
//! 4). For a long run: `PV_CRASH_SEEDS=1,2,3,4,5,6,7,8 PV_CRASH_ITERS=25`.

mod common;
use common::*;
use pairvisor_mirror::nbd::client::NbdClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BLOCK: usize = 4096;
const BLOCKS: u64 = 2048; // 8 MiB of a 16 MiB volume
const SIZE: u64 = 16 << 20;
const WORKERS: u64 = 8;
/// Workers that write single blocks, interleaved over the first
/// `SMALL_BLOCKS` blocks; the others write runs of blocks (streamed writes)
/// in a range of `LARGE_SPAN` blocks each, after those.
const SMALL_WORKERS: u64 = 6;
const SMALL_BLOCKS: u64 = 1024;
const LARGE_SPAN: u64 = (BLOCKS - SMALL_BLOCKS) / (WORKERS - SMALL_WORKERS);
/// Runs of 64 to 256 blocks: 256 KiB to 1 MiB (streamed from 512 KiB).
const LARGE_MIN: u64 = 64;
const LARGE_MAX: u64 = 256;
const T: Duration = Duration::from_secs(60);

fn seeds() -> Vec<u64> {
    std::env::var("PV_CRASH_SEEDS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn iters() -> usize {
    std::env::var("PV_CRASH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4)
}

fn content(seed: u64, block: u64, version: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BLOCK);
    v.extend_from_slice(b"PVCR");
    v.extend_from_slice(&(block as u32).to_be_bytes());
    v.extend_from_slice(&version.to_be_bytes());
    let mut x = seed ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version.rotate_left(17) | 1;
    while v.len() < BLOCK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(BLOCK);
    v
}

/// What the writers know: per block, the last acknowledged version and the
/// version in flight (one write per block at a time).
#[derive(Default)]
struct Model {
    acked: Vec<u64>,
    inflight: Vec<u64>,
    acks: u64,
    /// Acknowledged writes of several blocks (streamed).
    large_acks: u64,
}

impl Model {
    fn new() -> Self {
        Model {
            acked: vec![0; BLOCKS as usize],
            inflight: vec![0; BLOCKS as usize],
            acks: 0,
            large_acks: 0,
        }
    }

    /// After a failover: the promoted replica's image is now the truth for
    /// blocks whose write was in flight when the primary died (it holds
    /// either that write or the previous one, and from now on both
    /// replicas keep what it holds until the block is written again).
    fn settle(&mut self, image: &[u8]) {
        for b in 0..BLOCKS as usize {
            let inflight = self.inflight[b];
            if inflight == 0 {
                continue;
            }
            let blk = &image[b * BLOCK..(b + 1) * BLOCK];
            if !blk.iter().all(|&x| x == 0)
                && u64::from_be_bytes(blk[8..16].try_into().unwrap()) == inflight
            {
                self.acked[b] = inflight;
            }
            self.inflight[b] = 0;
        }
    }

    /// Checks a replica image against the acknowledged writes.
    fn check(&self, seed: u64, image: &[u8], who: &str) {
        for b in 0..BLOCKS {
            let blk = &image[(b as usize) * BLOCK..(b as usize + 1) * BLOCK];
            let acked = self.acked[b as usize];
            let inflight = self.inflight[b as usize];
            if blk.iter().all(|&x| x == 0) {
                assert_eq!(
                    acked, 0,
                    "{who}: block {b} lost acknowledged version {acked} (seed {seed})"
                );
                continue;
            }
            let version = u64::from_be_bytes(blk[8..16].try_into().unwrap());
            assert_eq!(
                blk,
                &content(seed, b, version)[..],
                "{who}: block {b} holds garbage (seed {seed})"
            );
            assert!(
                version == acked || (inflight != 0 && version == inflight),
                "{who}: block {b} has version {version}, acknowledged {acked}, in flight {inflight} (seed {seed})"
            );
        }
    }
}

/// Runs writers against `addr` until `stop` is set or the primary fails.
fn spawn_writers(
    rt: &tokio::runtime::Runtime,
    addr: String,
    seed: u64,
    model: Arc<Mutex<Model>>,
    stop: Arc<AtomicBool>,
    version_base: u64,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..WORKERS)
        .map(|w| {
            let addr = addr.clone();
            let model = model.clone();
            let stop = stop.clone();
            rt.spawn(async move {
                let Ok(c) = NbdClient::connect_tcp(&addr, "vol").await else {
                    return;
                };
                let mut rng = StdRng::seed_from_u64(seed ^ (w << 32) ^ version_base);
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    // Blocks [first, first + count), owned by this worker.
                    let (first, count) = if w < SMALL_WORKERS {
                        let b =
                            rng.random_range(0..SMALL_BLOCKS / SMALL_WORKERS) * SMALL_WORKERS + w;
                        (b, 1)
                    } else {
                        let base = SMALL_BLOCKS + (w - SMALL_WORKERS) * LARGE_SPAN;
                        let count = rng.random_range(LARGE_MIN..=LARGE_MAX);
                        (base + rng.random_range(0..=LARGE_SPAN - count), count)
                    };
                    n += 1;
                    let version = version_base + n * WORKERS + w;
                    {
                        let mut m = model.lock().unwrap();
                        for b in first..first + count {
                            m.inflight[b as usize] = version;
                        }
                    }
                    let fua = rng.random_bool(0.5);
                    let mut data = Vec::with_capacity(count as usize * BLOCK);
                    for b in first..first + count {
                        data.extend_from_slice(&content(seed, b, version));
                    }
                    let ok = c.write(first * BLOCK as u64, &data, fua).await.is_ok()
                        && (fua || c.flush().await.is_ok());
                    if !ok {
                        return; // the in-flight versions stay recorded
                    }
                    let mut m = model.lock().unwrap();
                    for b in first..first + count {
                        m.acked[b as usize] = version;
                        m.inflight[b as usize] = 0;
                    }
                    m.acks += 1;
                    if count > 1 {
                        m.large_acks += 1;
                    }
                }
            })
        })
        .collect()
}

fn stop_writers(
    rt: &tokio::runtime::Runtime,
    stop: &AtomicBool,
    ws: Vec<tokio::task::JoinHandle<()>>,
) {
    stop.store(true, Ordering::SeqCst);
    for w in ws {
        // Each writer finishes its write in flight and stops; one that does
        // not is a write that never completed (hung I/O), a bug in itself.
        let done = rt.block_on(async { tokio::time::timeout(T, w).await });
        assert!(done.is_ok(), "a write never completed within {T:?}");
    }
}

fn verify_clean(p: &Proc) {
    let v = p.ctl(json!({"cmd":"verify"}));
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["result"]["differing_count"], 0, "replicas differ: {v}");
}

fn nodes(root: &std::path::Path) -> (Node, Node) {
    let mut a = Node::new(root, "a", SIZE);
    let mut b = Node::new(root, "b", SIZE);
    a.region_size = 65536;
    b.region_size = 65536;
    a.partner = Some(b.repl_addr());
    b.partner = Some(a.repl_addr());
    (a, b)
}

/// SIGKILL the primary mid-write, promote the secondary, check, restart the
/// old primary as secondary, resync, verify; roles alternate.
fn kill_primary(seed: u64) {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = nodes(d.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let model = Arc::new(Mutex::new(Model::new()));
    let mut sec = b.start("secondary", 0);
    let mut pri = a.start("primary", 1);
    pri.wait_link("in_sync", T);
    let mut epoch = 1;
    let mut streamed = 0;
    for it in 0..iters() {
        let stop = Arc::new(AtomicBool::new(false));
        let ws = spawn_writers(
            &rt,
            pri.node.nbd_addr(),
            seed,
            model.clone(),
            stop.clone(),
            (it as u64 + 1) << 40,
        );
        std::thread::sleep(Duration::from_millis(rng.random_range(30..300)));
        streamed += pri.status()["stats"]["streamed_writes"].as_u64().unwrap();
        pri.kill();
        stop_writers(&rt, &stop, ws);
        // Failover.
        epoch += 1;
        let r = sec.ctl(json!({"cmd":"promote","epoch":epoch}));
        assert_eq!(r["ok"], true, "promote: {r}");
        {
            let image = sec.data();
            let mut m = model.lock().unwrap();
            m.check(
                seed,
                &image,
                &format!("promoted {} (iteration {it})", sec.node.name),
            );
            m.settle(&image);
        }
        let old = pri.node.clone();
        let new_sec = old.start("secondary", 0);
        sec.wait_link("in_sync", T);
        verify_clean(&sec);
        model.lock().unwrap().check(
            seed,
            &new_sec.data(),
            &format!("resynced {} (iteration {it})", old.name),
        );
        pri = sec;
        sec = new_sec;
    }
    let (acks, large) = {
        let m = model.lock().unwrap();
        (m.acks, m.large_acks)
    };
    eprintln!(
        "  seed {seed}: {acks} acknowledged writes ({large} large, {streamed} streamed) checked over {} failovers",
        iters()
    );
    assert!(acks > 0, "no write was ever acknowledged");
    assert!(large > 0, "no large write was ever acknowledged");
    assert!(streamed > 0, "no write was streamed");
    drop(pri);
    drop(sec);
}

/// SIGKILL the secondary at random moments (also mid-resync) while writes go on.
fn kill_secondary(seed: u64) {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = nodes(d.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5ec);
    let model = Arc::new(Mutex::new(Model::new()));
    let mut sec = b.start("secondary", 0);
    let pri = a.start("primary", 1);
    pri.wait_link("in_sync", T);
    let stop = Arc::new(AtomicBool::new(false));
    let ws = spawn_writers(
        &rt,
        a.nbd_addr(),
        seed,
        model.clone(),
        stop.clone(),
        1 << 40,
    );
    for _ in 0..iters() {
        std::thread::sleep(Duration::from_millis(rng.random_range(20..300)));
        sec.kill();
        std::thread::sleep(Duration::from_millis(rng.random_range(0..200)));
        sec = b.start("secondary", 0);
    }
    std::thread::sleep(Duration::from_millis(100));
    stop_writers(&rt, &stop, ws);
    pri.wait_link("in_sync", T);
    verify_clean(&pri);
    let m = model.lock().unwrap();
    let streamed = pri.status()["stats"]["streamed_writes"].as_u64().unwrap();
    eprintln!(
        "  seed {seed}: {} acknowledged writes ({} large, {streamed} streamed) checked",
        m.acks, m.large_acks
    );
    assert!(m.acks > 0);
    assert!(m.large_acks > 0, "no large write was ever acknowledged");
    // Not asserted: with the partner down most of the run, few writes
    // find a link to stream to (crash_primary asserts that some do).
    m.check(seed, &pri.data(), "primary");
    m.check(seed, &sec.data(), "secondary");
}

/// A TCP proxy whose connections can be cut.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    fn start(rt: &tokio::runtime::Runtime, target: String) -> Proxy {
        let port = free_port();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (c2, k2) = (cut.clone(), conns.clone());
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .unwrap();
        rt.spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if c2.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused-ish
                }
                let target = target.clone();
                let h = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                k2.lock().unwrap().push(h.abort_handle());
            }
        });
        Proxy { port, cut, conns }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Cut the replication link at random moments while writes go on.
fn cut_link(seed: u64) {
    let d = tempfile::tempdir().unwrap();
    let (mut a, b) = nodes(d.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let proxy = Proxy::start(&rt, b.repl_addr());
    a.partner = Some(format!("127.0.0.1:{}", proxy.port));
    let mut rng = StdRng::seed_from_u64(seed ^ 0x11c);
    let model = Arc::new(Mutex::new(Model::new()));
    let sec = b.start("secondary", 0);
    let pri = a.start("primary", 1);
    pri.wait_link("in_sync", T);
    let stop = Arc::new(AtomicBool::new(false));
    let ws = spawn_writers(
        &rt,
        a.nbd_addr(),
        seed,
        model.clone(),
        stop.clone(),
        1 << 40,
    );
    for _ in 0..iters() {
        std::thread::sleep(Duration::from_millis(rng.random_range(20..300)));
        proxy.cut();
        std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        proxy.heal();
    }
    std::thread::sleep(Duration::from_millis(100));
    stop_writers(&rt, &stop, ws);
    pri.wait_link("in_sync", T);
    verify_clean(&pri);
    let m = model.lock().unwrap();
    let streamed = pri.status()["stats"]["streamed_writes"].as_u64().unwrap();
    eprintln!(
        "  seed {seed}: {} acknowledged writes ({} large, {streamed} streamed) checked",
        m.acks, m.large_acks
    );
    assert!(m.acks > 0);
    assert!(m.large_acks > 0, "no large write was ever acknowledged");
    // Not asserted: with the partner down most of the run, few writes
    // find a link to stream to (crash_primary asserts that some do).
    m.check(seed, &pri.data(), "primary");
    m.check(seed, &sec.data(), "secondary");
}

#[test]
fn crash_primary() {
    for s in seeds() {
        eprintln!("crash_primary seed {s}");
        kill_primary(s);
    }
}

#[test]
fn crash_secondary() {
    for s in seeds() {
        eprintln!("crash_secondary seed {s}");
        kill_secondary(s);
    }
}

#[test]
fn crash_link() {
    for s in seeds() {
        eprintln!("crash_link seed {s}");
        cut_link(s);
    }
}

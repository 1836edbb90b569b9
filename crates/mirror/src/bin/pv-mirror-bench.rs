//! `pv-mirror-bench`: compares, on this machine and in one run,
//!
//! * (a) our NBD export replicating to a partner over loopback,
//! * (b) our export without a partner (simplex),
//! * (c) `qemu-nbd` serving the same kind of raw file,
//! * with `--qemu-mirror`, (d) QEMU's own synchronous replication: a
//!   `qemu-storage-daemon` export with a `write-blocking` mirror job to a
//!   partner `qemu-nbd` over loopback, the standard tools' counterpart of (a),
//!
//! for sequential 1 MiB writes, 4 KiB random writes at queue depth 1 and
//! 32, and 4 KiB random reads, and prints JSON with throughput, p50/p99
//! latency, CPU time per MiB and the ratios (a)/(b) and (b)/(c) (and, with
//! (d), (d)/(c) and (a)/(d)). Durability is compared like for like: our
//! default (every write durable before its reply) against `qemu-nbd
//! --cache=writethrough`, and our `on-flush` mode against `qemu-nbd
//! --cache=writeback`, (d) likewise. The targets run side by side and are
//! measured in turns, round after round (see [`compare`]). With
//! `--pin-secondary` each round of a sequential workload also measures what
//! a bare stream costs CPU 0, over TCP and over a Unix socket
//! ([`bare_wire`]), and from it how high (a)/(b) could go on this machine
//! at all ([`wire_ceiling`]). It also times resyncs of N dirty MiB on
//! volumes of different sizes. Run it in release mode:
//!
//! ```text
//! cargo run --release -p pairvisor-mirror --bin pv-mirror-bench -- --pin-secondary
//! ```

use anyhow::{bail, Context};
use clap::Parser;
use pairvisor_mirror::nbd::client::NbdClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Benchmark the mirror against qemu-nbd.
#[derive(Parser, Debug)]
struct Args {
    /// Seconds per workload and target, split over the rounds.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Rounds per workload: each runs the workload once on each target.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Volume size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Size of the area the workloads touch, in MiB.
    #[arg(long, default_value_t = 256)]
    area_mib: u64,
    /// Working directory (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Skip the resync timing.
    #[arg(long)]
    no_resync: bool,
    /// Times each resync case this many times (median reported).
    #[arg(long, default_value_t = 3)]
    resync_repeats: usize,
    /// Emulate two hosts on a 2-CPU machine: the benchmark client, the
    /// primary, the simplex replica and qemu-nbd run on CPU 0, the secondary
    /// alone on CPU 1 (as if it were the partner PM). Without it all share
    /// every CPU, so the secondary's receive-and-write work competes with the
    /// primary's.
    #[arg(long)]
    pin_secondary: bool,
    /// Run only these workloads (comma-separated names; default: all).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Skip the on-flush comparison (for quick tuning runs).
    #[arg(long)]
    every_write_only: bool,
    /// Put the secondary's replica in this directory, e.g. on a device of
    /// its own, as the partner PM's disk would be. By default it shares the
    /// working directory (and so the disk) with the primary, which then
    /// competes with it for every flush.
    #[arg(long)]
    partner_dir: Option<PathBuf>,
    /// How the benchmark client reaches the three exports: a Unix socket,
    /// as QEMU reaches a volume's export on its PM, or TCP over loopback.
    #[arg(long, value_enum, default_value = "unix")]
    client: ClientLink,
    /// Also measure (d), QEMU's own synchronous mirror: qemu-storage-daemon
    /// with a `write-blocking` `blockdev-mirror` job to a partner qemu-nbd
    /// over loopback, against (c) as (a) is against (b).
    #[arg(long)]
    qemu_mirror: bool,
}

/// The benchmark client's transport to the exports.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ClientLink {
    /// The export's Unix socket (how the product's QEMU connects).
    Unix,
    /// TCP over loopback.
    Tcp,
}

/// Set from `--client`.
static CLIENT: std::sync::OnceLock<ClientLink> = std::sync::OnceLock::new();

/// The transport chosen with `--client`.
fn client_link() -> ClientLink {
    CLIENT.get().copied().unwrap_or(ClientLink::Unix)
}

/// Where a target's export listens.
#[derive(Clone)]
enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

impl Endpoint {
    /// The Unix socket `sock` or TCP port `port` on loopback, as `link` says.
    fn on(link: ClientLink, sock: &Path, port: u16) -> Endpoint {
        match link {
            ClientLink::Unix => Endpoint::Unix(sock.to_path_buf()),
            ClientLink::Tcp => Endpoint::Tcp(format!("127.0.0.1:{port}")),
        }
    }

    async fn connect(&self) -> anyhow::Result<NbdClient> {
        Ok(match self {
            Endpoint::Tcp(a) => NbdClient::connect_tcp(a, "vol").await?,
            Endpoint::Unix(p) => NbdClient::connect_unix(p, "vol").await?,
        })
    }
}

/// Set from `--pin-secondary`.
static PIN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// A command, started under `taskset -c CPU` when pinning.
fn pinned(program: impl AsRef<std::ffi::OsStr>, cpu: u32) -> Command {
    if PIN.get().copied().unwrap_or(false) {
        let mut c = Command::new("taskset");
        c.arg("-c").arg(cpu.to_string()).arg(program);
        c
    } else {
        Command::new(program)
    }
}

const MIB: u64 = 1 << 20;

struct Killer(Vec<Child>);

impl Drop for Killer {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ctl(path: &Path, req: Value) -> anyhow::Result<Value> {
    let mut s = UnixStream::connect(path)?;
    let mut line = serde_json::to_vec(&req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut out = String::new();
    BufReader::new(s).read_line(&mut out)?;
    Ok(serde_json::from_str(&out)?)
}

fn pv_mirror_bin() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let p = me.with_file_name("pv-mirror");
    if !p.exists() {
        bail!(
            "{} not found: build the pv-mirror binary first",
            p.display()
        );
    }
    Ok(p)
}

struct MirrorNode {
    dir: PathBuf,
    control: PathBuf,
    nbd_port: u16,
    nbd_sock: PathBuf,
    repl_port: u16,
}

impl MirrorNode {
    /// The export the benchmark client uses (`--client`).
    fn endpoint(&self) -> Endpoint {
        Endpoint::on(client_link(), &self.nbd_sock, self.nbd_port)
    }
}

fn start_mirror(
    root: &Path,
    name: &str,
    size: u64,
    role: &str,
    partner: Option<u16>,
    extra: &[&str],
) -> anyhow::Result<(MirrorNode, Child)> {
    start_mirror_at(root, name, size, role, partner, extra, None)
}

fn start_mirror_at(
    root: &Path,
    name: &str,
    size: u64,
    role: &str,
    partner: Option<u16>,
    extra: &[&str],
    ports: Option<(u16, u16)>,
) -> anyhow::Result<(MirrorNode, Child)> {
    let secret = root.join("secret");
    std::fs::write(&secret, b"bench-secret")?;
    let n = MirrorNode {
        dir: root.join(name),
        control: root.join(format!("{name}.ctl")),
        nbd_sock: root.join(format!("{name}.nbd")),
        nbd_port: match ports {
            Some(p) => p.0,
            None => free_port()?,
        },
        repl_port: match ports {
            Some(p) => p.1,
            None => free_port()?,
        },
    };
    let _ = std::fs::remove_file(&n.control);
    let _ = std::fs::remove_file(&n.nbd_sock);
    let mut c = pinned(pv_mirror_bin()?, if role == "secondary" { 1 } else { 0 });
    c.arg("--dir")
        .arg(&n.dir)
        .args(["--size", &size.to_string(), "--volume-id", "vol"])
        .args(["--nbd-tcp", &format!("127.0.0.1:{}", n.nbd_port)])
        .arg("--nbd-unix")
        .arg(&n.nbd_sock)
        .args(["--repl-listen", &format!("127.0.0.1:{}", n.repl_port)])
        .arg("--secret-file")
        .arg(&secret)
        .arg("--control")
        .arg(&n.control)
        .args(["--role", role])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(p) = partner {
        c.args(["--partner", &format!("127.0.0.1:{p}")]);
    }
    let child = c.spawn().context("spawning pv-mirror")?;
    wait_for("control socket", Duration::from_secs(20), || {
        UnixStream::connect(&n.control).ok()
    })?;
    Ok((n, child))
}

fn wait_in_sync(control: &Path, timeout: Duration) -> anyhow::Result<Value> {
    wait_for("in_sync", timeout, || {
        let s = ctl(control, json!({"cmd":"status"})).ok()?;
        (s["result"]["link"]["state"] == "in_sync").then(|| s["result"].clone())
    })
}

#[derive(Clone, Copy)]
enum Kind {
    SeqWrite,
    RandWrite,
    RandRead,
}

struct Workload {
    name: &'static str,
    kind: Kind,
    bs: usize,
    qd: usize,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "seq_write_1m_qd1",
        kind: Kind::SeqWrite,
        bs: 1 << 20,
        qd: 1,
    },
    Workload {
        name: "seq_write_1m_qd4",
        kind: Kind::SeqWrite,
        bs: 1 << 20,
        qd: 4,
    },
    Workload {
        name: "rand_write_4k_qd1",
        kind: Kind::RandWrite,
        bs: 4096,
        qd: 1,
    },
    Workload {
        name: "rand_write_4k_qd32",
        kind: Kind::RandWrite,
        bs: 4096,
        qd: 32,
    },
    Workload {
        name: "rand_read_4k_qd1",
        kind: Kind::RandRead,
        bs: 4096,
        qd: 1,
    },
    Workload {
        name: "rand_read_4k_qd32",
        kind: Kind::RandRead,
        bs: 4096,
        qd: 32,
    },
];

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// One timed run of a workload against one target.
struct Sample {
    /// Latency of every request, in nanoseconds.
    lat: Vec<u64>,
    elapsed: f64,
}

impl Sample {
    fn mb_per_sec(&self, bs: usize) -> f64 {
        self.lat.len() as f64 * bs as f64 / self.elapsed / 1e6
    }
}

async fn run_workload(
    at: &Endpoint,
    w: &Workload,
    seconds: f64,
    area: u64,
) -> anyhow::Result<Sample> {
    let c = at.connect().await?;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let next_seq = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for q in 0..w.qd {
        let c = c.clone();
        let next_seq = next_seq.clone();
        let (kind, bs) = (w.kind, w.bs);
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(q as u64 + 1);
            let buf: Vec<u8> = (0..bs).map(|i| (i * 7 + q) as u8 | 1).collect();
            let mut lat = Vec::new();
            let blocks = area / bs as u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                match kind {
                    Kind::SeqWrite => {
                        let i =
                            next_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % blocks;
                        c.write(i * bs as u64, &buf, false).await?;
                    }
                    Kind::RandWrite => {
                        let i = rng.random_range(0..blocks);
                        c.write(i * bs as u64, &buf, false).await?;
                    }
                    Kind::RandRead => {
                        let i = rng.random_range(0..blocks);
                        c.read(i * bs as u64, bs as u32).await?;
                    }
                }
                lat.push(t.elapsed().as_nanos() as u64);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    if matches!(w.kind, Kind::SeqWrite | Kind::RandWrite) {
        c.flush().await?;
    }
    c.disconnect().await?;
    Ok(Sample {
        lat,
        elapsed: started.elapsed().as_secs_f64(),
    })
}

async fn prefill(at: &Endpoint, area: u64) -> anyhow::Result<()> {
    let c = at.connect().await?;
    let buf = vec![0x5au8; 4 << 20];
    let mut off = 0;
    while off < area {
        c.write(off, &buf, false).await?;
        off += buf.len() as u64;
    }
    c.flush().await?;
    c.disconnect().await?;
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// `{median, range}` of per-round values, to two decimals.
fn median_range(mut v: Vec<f64>) -> Value {
    let mid = round2(median(&mut v)); // sorts v
    let range = [v.first(), v.last()].map(|x| round2(x.copied().unwrap_or(0.0)));
    json!({ "median": mid, "range": range })
}

/// Busy and total time of CPU 0 and CPU 1 so far, in clock ticks, from
/// `/proc/stat`: what each target costs the CPU it runs on, as opposed to
/// how fast it goes, is what tells a protocol's cost from the machine's.
#[derive(Clone, Copy, Default)]
struct CpuTicks {
    busy: [u64; 2],
    total: [u64; 2],
}

impl CpuTicks {
    fn now() -> CpuTicks {
        let mut t = CpuTicks::default();
        let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
            return t;
        };
        for line in stat.lines() {
            let mut f = line.split_whitespace();
            let cpu = match f.next() {
                Some("cpu0") => 0,
                Some("cpu1") => 1,
                _ => continue,
            };
            // user nice system idle iowait irq softirq steal
            let v: Vec<u64> = f.take(8).filter_map(|x| x.parse().ok()).collect();
            if v.len() == 8 {
                // Steal is the host's, not this machine's work.
                t.total[cpu] = v.iter().sum::<u64>() - v[7];
                t.busy[cpu] = v[0] + v[1] + v[2] + v[5] + v[6];
            }
        }
        t
    }

    /// What was spent between `self` and `later`.
    fn since(self, later: CpuTicks) -> CpuTicks {
        CpuTicks {
            busy: [0, 1].map(|i| later.busy[i].saturating_sub(self.busy[i])),
            total: [0, 1].map(|i| later.total[i].saturating_sub(self.total[i])),
        }
    }

    fn add(&mut self, o: CpuTicks) {
        for i in 0..2 {
            self.busy[i] += o.busy[i];
            self.total[i] += o.total[i];
        }
    }

    /// Busy share of each CPU, in percent.
    fn busy_pct(&self) -> [f64; 2] {
        [0, 1].map(|i| (100.0 * self.busy[i] as f64 / self.total[i].max(1) as f64).round())
    }

    /// Busy CPU time per MiB moved, in microseconds.
    fn us_per_mib(&self, mib: f64) -> [f64; 2] {
        let tick = 1e6 / clock_ticks_per_sec();
        [0, 1].map(|i| (self.busy[i] as f64 * tick / mib.max(1e-9)).round())
    }
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// Pins the calling thread to one CPU.
fn pin_this_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: the set is a plain bitmask initialised by CPU_ZERO, and
    // sched_setaffinity(0, …) only affects the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The stream [`bare_wire`] measures.
#[derive(Clone, Copy, Debug)]
enum Wire {
    /// TCP over loopback, as the replication link.
    Tcp,
    /// A Unix socket pair: the sender's cost is little more than copying
    /// the bytes into the socket, roughly what a link costs a host whose
    /// NIC does the TCP work.
    Unix,
}

/// What a bare stream costs each CPU: a thread on CPU 0 writes 1 MiB
/// buffers for `seconds` to a thread on CPU 1 that reads and drops them,
/// with no protocol, no disk and no replies. Replicating a write costs the
/// primary's CPU at least about this much on top of what the simplex
/// export spends, whatever the protocol. Over TCP on loopback that includes
/// the receiver's TCP processing, which a NIC would move to the partner's
/// host; over a Unix socket it is hardly more than the copy.
fn bare_wire(seconds: f64, wire: Wire) -> anyhow::Result<Value> {
    type Ends = (Box<dyn Write + Send>, Box<dyn std::io::Read + Send>);
    let (mut tx, mut rx): Ends = match wire {
        Wire::Tcp => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let tx = std::net::TcpStream::connect(listener.local_addr()?)?;
            let (rx, _) = listener.accept()?;
            tx.set_nodelay(true)?;
            (Box::new(tx), Box::new(rx))
        }
        Wire::Unix => {
            let (tx, rx) = UnixStream::pair()?;
            (Box::new(tx), Box::new(rx))
        }
    };
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        pin_this_thread(1)?;
        let mut buf = vec![0u8; MIB as usize];
        let mut n = 0u64;
        loop {
            match rx.read(&mut buf)? {
                0 => return Ok(n),
                k => n += k as u64,
            }
        }
    });
    let sender = std::thread::spawn(move || -> anyhow::Result<(u64, f64, CpuTicks)> {
        pin_this_thread(0)?;
        let buf = vec![0x5au8; MIB as usize];
        // Warm up the connection's window before measuring.
        for _ in 0..64 {
            tx.write_all(&buf)?;
        }
        let (t, before) = (Instant::now(), CpuTicks::now());
        let mut sent = 0u64;
        while t.elapsed().as_secs_f64() < seconds {
            tx.write_all(&buf)?;
            sent += MIB;
        }
        let spent = before.since(CpuTicks::now());
        // Returning drops `tx`, which ends the reader.
        Ok((sent, t.elapsed().as_secs_f64(), spent))
    });
    let (sent, secs, spent) = sender
        .join()
        .map_err(|_| anyhow::anyhow!("the bare-wire sender panicked"))??;
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("the bare-wire reader panicked"))??;
    let mib = sent as f64 / MIB as f64;
    let [us0, us1] = spent.us_per_mib(mib);
    let [pct0, pct1] = spent.busy_pct();
    Ok(json!({
        "mib_per_sec": (mib / secs).round(),
        "cpu0_us_per_mib": us0,
        "cpu1_us_per_mib": us1,
        "cpu0_busy_pct": pct0,
        "cpu1_busy_pct": pct1,
    }))
}

/// A running export under test.
struct Target {
    at: Endpoint,
    _procs: Killer,
}

/// What [`compare`] found: per target, then the ratios.
struct Comparison {
    /// (a), (b), (c) and, with `--qemu-mirror`, (d).
    targets: Vec<serde_json::Map<String, Value>>,
    ab: serde_json::Map<String, Value>,
    bc: serde_json::Map<String, Value>,
    /// (d)/(c): what QEMU's own synchronous mirror costs qemu-nbd's speed.
    dc: serde_json::Map<String, Value>,
    /// (a)/(d): our replication against QEMU's, head to head.
    ad: serde_json::Map<String, Value>,
}

/// Runs every workload on the targets (a), (b), (c) and, if given, (d) in
/// turns: each round runs it once on each target, in an order that rotates
/// from round to round, so that they all see the same machine. This machine's speed
/// drifts and jumps between runs (by up to a quarter, for minutes at a
/// time); targets measured one after the other would compare different
/// machines. Throughput is the median over the rounds, latency percentiles
/// are over all requests, and each ratio is the median of the rounds' own
/// ratios, with their range.
async fn compare(targets: &[&Target], args: &Args) -> anyhow::Result<Comparison> {
    let n = targets.len();
    let area = args.area_mib * MIB;
    for t in targets {
        prefill(&t.at, area).await?;
    }
    let rounds = args.rounds.max(1);
    let per_run = args.seconds / rounds as f64;
    let mut out = Comparison {
        targets: vec![Default::default(); n],
        ab: Default::default(),
        bc: Default::default(),
        dc: Default::default(),
        ad: Default::default(),
    };
    for w in WORKLOADS {
        if !args.workloads.is_empty() && !args.workloads.iter().any(|n| n == w.name) {
            continue;
        }
        let mut mbs: Vec<Vec<f64>> = vec![Vec::new(); n];
        let mut lat: Vec<Vec<u64>> = vec![Vec::new(); n];
        // CPU 0's busy microseconds per MiB, per target and round.
        let mut cpu0: Vec<Vec<f64>> = vec![Vec::new(); n];
        let mut ticks = vec![CpuTicks::default(); n];
        let mut mib_moved = vec![0f64; n];
        let (mut wire, mut unix_wire): (Vec<Value>, Vec<Value>) = Default::default();
        let with_wire = matches!(w.kind, Kind::SeqWrite) && PIN.get().copied().unwrap_or(false);
        for r in 0..rounds {
            for k in 0..n {
                let i = (r + k) % n;
                let before = CpuTicks::now();
                let s = run_workload(&targets[i].at, w, per_run, area).await?;
                let spent = before.since(CpuTicks::now());
                let mib = (s.lat.len() * w.bs) as f64 / MIB as f64;
                cpu0[i].push(spent.us_per_mib(mib)[0]);
                ticks[i].add(spent);
                mib_moved[i] += mib;
                mbs[i].push(s.mb_per_sec(w.bs));
                lat[i].extend(s.lat);
            }
            if with_wire {
                for (kind, into) in [(Wire::Tcp, &mut wire), (Wire::Unix, &mut unix_wire)] {
                    into.push(
                        tokio::task::spawn_blocking(move || bare_wire(per_run, kind)).await??,
                    );
                }
            }
        }
        let ratio =
            |x: usize, y: usize| median_range((0..rounds).map(|r| mbs[x][r] / mbs[y][r]).collect());
        for i in 0..n {
            lat[i].sort_unstable();
            let mb = median(&mut mbs[i].clone());
            let v = json!({
                "ops": lat[i].len(),
                "mb_per_sec": (mb * 10.0).round() / 10.0,
                "iops": (mb * 1e6 / w.bs as f64).round(),
                "mb_per_sec_rounds": mbs[i].iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>(),
                "p50_us": percentile(&lat[i], 0.50),
                "p99_us": percentile(&lat[i], 0.99),
                "cpu_busy_pct": ticks[i].busy_pct(),
                "cpu_us_per_mib": ticks[i].us_per_mib(mib_moved[i]),
            });
            eprintln!("  {} {}: {v}", ["a", "b", "c", "d"][i], w.name);
            out.targets[i].insert(w.name.into(), v);
        }
        let (mut ab, bc) = (ratio(0, 1), ratio(1, 2));
        eprintln!("  {}: a/b {ab}, b/c {bc}", w.name);
        if !wire.is_empty() {
            let b_cpu0 = |r: usize| cpu0[1][r];
            let t_b = |r: usize| MIB as f64 / mbs[1][r];
            let a_extra =
                ticks[0].us_per_mib(mib_moved[0])[0] - ticks[1].us_per_mib(mib_moved[1])[0];
            ab["bare_wire"] = wire_ceiling(w, &wire, &unix_wire, b_cpu0, t_b, a_extra);
        }
        out.ab.insert(w.name.into(), ab);
        out.bc.insert(w.name.into(), bc);
        if n > 3 {
            let (dc, ad) = (ratio(3, 2), ratio(0, 3));
            eprintln!("  {}: d/c {dc}, a/d {ad}", w.name);
            out.dc.insert(w.name.into(), dc);
            out.ad.insert(w.name.into(), ad);
        }
    }
    Ok(out)
}

/// The bare-wire measurements of one workload's rounds ([`bare_wire`]),
/// over TCP and over a Unix socket, and what they say of (a)/(b):
/// `b_cpu0(r)` and `t_b(r)` are (b)'s CPU 0 time and its time per MiB in
/// round r, `a_extra` what (a) spent on CPU 0 per MiB beyond (b).
///
/// A ceiling is an estimate of the most (a) could reach if replicating
/// cost CPU 0 nothing but the bare stream of the same bytes, W µs per MiB.
/// With writes in flight together CPU 0 is the limit — it is busy all the
/// time in (a) and (b) — so (a) needs at least B + W µs of it per MiB
/// where (b) takes t: t / (B + W), at most 1. At depth 1 CPU 0 is idle
/// part of the time and a write's bytes cross the wire while more arrive,
/// so no such bound holds; only the wire's cost is reported.
fn wire_ceiling(
    w: &Workload,
    tcp: &[Value],
    unix: &[Value],
    b_cpu0: impl Fn(usize) -> f64,
    t_b: impl Fn(usize) -> f64,
    a_extra: f64,
) -> Value {
    let one = |wire: &[Value], name: &str| {
        let w0: Vec<f64> = wire
            .iter()
            .filter_map(|x| x["cpu0_us_per_mib"].as_f64())
            .collect();
        let speed: Vec<f64> = wire
            .iter()
            .filter_map(|x| x["mib_per_sec"].as_f64())
            .collect();
        eprintln!("  {}: bare {name} wire, CPU 0 µs/MiB {w0:?}", w.name);
        let mut v = json!({
            "cpu0_us_per_mib_rounds": w0,
            "mib_per_sec_rounds": speed,
        });
        if w.qd > 1 && !w0.is_empty() {
            let ceiling = median_range(
                (0..w0.len())
                    .map(|r| (t_b(r) / (b_cpu0(r) + w0[r])).min(1.0))
                    .collect(),
            );
            eprintln!(
                "  {}: ceiling for a/b over a bare {name} wire {ceiling}",
                w.name
            );
            v["ceiling_a_over_b"] = ceiling;
        }
        v
    };
    eprintln!("  {}: (a) beyond (b), CPU 0 µs/MiB {a_extra}", w.name);
    json!({
        "a_minus_b_cpu0_us_per_mib": a_extra,
        "tcp": one(tcp, "TCP"),
        "unix": one(unix, "Unix-socket"),
    })
}

/// A replicated pair: the primary under `root`, the secondary under
/// `partner_root` (another device) or, without one, under `root` too.
async fn mirror_pair(
    root: &Path,
    partner_root: Option<&Path>,
    size: u64,
    extra: &[&str],
) -> anyhow::Result<Target> {
    std::fs::create_dir_all(root)?;
    let partner_root = partner_root.unwrap_or(root);
    std::fs::create_dir_all(partner_root)?;
    let (b, cb) = start_mirror(partner_root, "b", size, "secondary", None, extra)?;
    let (a, ca) = start_mirror(root, "a", size, "primary", Some(b.repl_port), extra)?;
    let procs = Killer(vec![ca, cb]);
    wait_in_sync(&a.control, Duration::from_secs(120))?;
    Ok(Target {
        at: a.endpoint(),
        _procs: procs,
    })
}

fn mirror_simplex(root: &Path, size: u64, extra: &[&str]) -> anyhow::Result<Target> {
    std::fs::create_dir_all(root)?;
    let (a, ca) = start_mirror(root, "a", size, "primary", None, extra)?;
    Ok(Target {
        at: a.endpoint(),
        _procs: Killer(vec![ca]),
    })
}

fn qemu_nbd(root: &Path, size: u64, cache: &str) -> anyhow::Result<Target> {
    let (at, child) = spawn_qemu_nbd(root, size, cache, 0, client_link())?;
    Ok(Target {
        at,
        _procs: Killer(vec![child]),
    })
}

/// `qemu-nbd` serving a new raw file under `root` on `cpu`, once it accepts.
fn spawn_qemu_nbd(
    root: &Path,
    size: u64,
    cache: &str,
    cpu: u32,
    link: ClientLink,
) -> anyhow::Result<(Endpoint, Child)> {
    std::fs::create_dir_all(root)?;
    let file = root.join("disk.raw");
    std::fs::File::create(&file)?.set_len(size)?;
    let port = free_port()?;
    let sock = root.join("qemu-nbd.sock");
    let mut cmd = pinned("qemu-nbd", cpu);
    cmd.args(["-f", "raw", "-x", "vol"]);
    let at = Endpoint::on(link, &sock, port);
    match &at {
        Endpoint::Unix(p) => cmd.arg("-k").arg(p),
        Endpoint::Tcp(_) => cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()]),
    };
    let child = cmd
        .arg(format!("--cache={cache}"))
        .args(["--shared=16", "--persistent"])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning qemu-nbd")?;
    let mut procs = Killer(vec![child]);
    wait_for("qemu-nbd", Duration::from_secs(10), || match &at {
        Endpoint::Unix(p) => UnixStream::connect(p).ok().map(drop),
        Endpoint::Tcp(_) => std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(drop),
    })?;
    let child = procs.0.pop().context("qemu-nbd's process")?;
    Ok((at, child))
}

/// A QMP session, just enough to set up a mirror job: commands in, their
/// replies out, events skipped.
struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(path: &Path) -> anyhow::Result<Qmp> {
        let w = wait_for("QMP socket", Duration::from_secs(10), || {
            UnixStream::connect(path).ok()
        })?;
        let mut q = Qmp {
            r: BufReader::new(w.try_clone()?),
            w,
        };
        q.reply()?; // the greeting
        q.run("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn reply(&mut self) -> anyhow::Result<Value> {
        loop {
            let mut line = String::new();
            anyhow::ensure!(self.r.read_line(&mut line)? > 0, "QMP closed");
            let v: Value = serde_json::from_str(&line)?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    fn run(&mut self, cmd: &str, args: Value) -> anyhow::Result<Value> {
        writeln!(self.w, "{}", json!({ "execute": cmd, "arguments": args }))?;
        let v = self.reply()?;
        if let Some(e) = v.get("error") {
            bail!("QMP {cmd}: {e}");
        }
        Ok(v["return"].clone())
    }
}

/// (d): QEMU's own synchronous replication, the standard tool's answer to
/// what (a) does. `qemu-storage-daemon` on CPU 0 exports a raw file the way
/// qemu-nbd does, with a `blockdev-mirror` job in `write-blocking` mode to a
/// partner `qemu-nbd` on CPU 1 over loopback TCP: a write completes only
/// once the partner has it. `cache` is qemu-nbd's word for the durability
/// of both sides (`writethrough`: every write flushed before its reply).
fn qemu_mirror(root: &Path, partner_root: &Path, size: u64, cache: &str) -> anyhow::Result<Target> {
    let (partner, partner_child) = spawn_qemu_nbd(partner_root, size, cache, 1, ClientLink::Tcp)?;
    let Endpoint::Tcp(partner_addr) = partner else {
        bail!("the partner qemu-nbd listens on TCP");
    };
    let (host, port) = partner_addr
        .rsplit_once(':')
        .context("the partner's address")?;
    let file = root.join("src.raw");
    std::fs::File::create(&file)?.set_len(size)?;
    let qmp_path = root.join("qsd-qmp.sock");
    let sock = root.join("qsd-nbd.sock");
    let nbd_port = free_port()?;
    let at = Endpoint::on(client_link(), &sock, nbd_port);
    let addr = match &at {
        Endpoint::Unix(p) => format!("addr.type=unix,addr.path={}", p.display()),
        Endpoint::Tcp(_) => format!("addr.type=inet,addr.host=127.0.0.1,addr.port={nbd_port}"),
    };
    let writethrough = if cache == "writethrough" { "on" } else { "off" };
    let child = pinned("qemu-storage-daemon", 0)
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={}",
            file.display()
        ))
        .args(["--blockdev", "driver=raw,node-name=disk0,file=file0"])
        .arg("--blockdev")
        .arg(format!(
            "driver=nbd,node-name=partner,server.type=inet,server.host={host},server.port={port},export=vol"
        ))
        .arg("--nbd-server")
        .arg(addr)
        .arg("--export")
        .arg(format!(
            "type=nbd,id=e0,node-name=disk0,writable=on,name=vol,writethrough={writethrough}"
        ))
        .arg("--chardev")
        .arg(format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            qmp_path.display()
        ))
        .args(["--monitor", "chardev=qmp0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning qemu-storage-daemon")?;
    let procs = Killer(vec![child, partner_child]);
    let mut qmp = Qmp::connect(&qmp_path)?;
    // Started after the export exists, the job's filter goes between the
    // export and the disk, so that every write through the export is
    // mirrored.
    qmp.run(
        "blockdev-mirror",
        json!({
            "job-id": "m0", "device": "disk0", "target": "partner",
            "sync": "full", "copy-mode": "write-blocking",
        }),
    )?;
    wait_for(
        "the mirror job to be ready",
        Duration::from_secs(120),
        || {
            let jobs = qmp.run("query-block-jobs", json!({})).ok()?;
            jobs.as_array()?
                .iter()
                .any(|j| j["ready"] == json!(true))
                .then_some(())
        },
    )?;
    Ok(Target { at, _procs: procs })
}

/// Time to resync `dirty_mib` MiB written while the secondary was down.
async fn resync_time(root: &Path, size_mib: u64, dirty_mib: u64) -> anyhow::Result<Value> {
    std::fs::create_dir_all(root)?;
    let size = size_mib * MIB;
    let (b, mut cb) = start_mirror(root, "b", size, "secondary", None, &[])?;
    let (a, ca) = start_mirror(root, "a", size, "primary", Some(b.repl_port), &[])?;
    let mut kill = Killer(vec![ca]);
    wait_in_sync(&a.control, Duration::from_secs(300))?;
    let _ = cb.kill();
    let _ = cb.wait();
    {
        let c = a.endpoint().connect().await?;
        let buf = vec![0xc3u8; MIB as usize];
        // Scattered over the whole volume, one MiB per region.
        let stride = size_mib / dirty_mib;
        for i in 0..dirty_mib {
            c.write(i * stride * MIB, &buf, false).await?;
        }
        c.flush().await?;
        c.disconnect().await?;
    }
    // Earlier workloads leave writeback in flight; a resync's durable
    // writes would queue behind it.
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let t = Instant::now();
    let (_b2, cb2) = start_mirror_at(
        root,
        "b",
        size,
        "secondary",
        None,
        &[],
        Some((b.nbd_port, b.repl_port)),
    )?;
    kill.0.push(cb2);
    let st = wait_in_sync(&a.control, Duration::from_secs(300))?;
    let secs = t.elapsed().as_secs_f64();
    Ok(json!({
        "volume_mib": size_mib,
        "dirty_mib": dirty_mib,
        "regions_copied": st["last_resync"]["total_regions"],
        "resync_secs": (st["last_resync"]["elapsed_secs"].as_f64().unwrap_or(0.0) * 1000.0).round() / 1000.0,
        "reconnect_to_in_sync_secs": (secs * 1000.0).round() / 1000.0,
    }))
}

fn durability_json(cmp: Option<Comparison>, c_name: &str) -> Value {
    let Some(Comparison {
        targets,
        ab,
        bc,
        dc,
        ad,
    }) = cmp
    else {
        return json!({});
    };
    let mut t = targets.into_iter();
    let mut v = json!({
        "a_replicated": t.next(),
        "b_simplex": t.next(),
        c_name: t.next(),
        "ratio_a_over_b": ab,
        "ratio_b_over_c": bc,
    });
    if let Some(d) = t.next() {
        v["d_qemu_sync_mirror"] = Value::Object(d);
        v["ratio_d_over_c"] = Value::Object(dc);
        v["ratio_a_over_d"] = Value::Object(ad);
    }
    v
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = PIN.set(args.pin_secondary);
    let _ = CLIENT.set(args.client);
    if args.pin_secondary {
        // The client (this process and its threads) stays on CPU 0.
        let ok = Command::new("taskset")
            .args(["-a", "-c", "-p", "0", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        anyhow::ensure!(ok, "--pin-secondary needs taskset (util-linux) and 2 CPUs");
    }
    let tmp = tempfile::tempdir()?;
    let root = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    // A directory of our own on the partner's device, removed at the end.
    let partner_tmp = match &args.partner_dir {
        Some(d) => Some(
            tempfile::tempdir_in(d).with_context(|| format!("--partner-dir {}", d.display()))?,
        ),
        None => None,
    };
    let partner = |name: &str| partner_tmp.as_ref().map(|t| t.path().join(name));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let size = args.size_mib * MIB;
    let with_qemu_mirror = |name: &str, cache: &str| -> anyhow::Result<Option<Target>> {
        if !args.qemu_mirror {
            return Ok(None);
        }
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        let partner_dir = partner(name).unwrap_or_else(|| dir.join("partner"));
        qemu_mirror(&dir, &partner_dir, size, cache).map(Some)
    };
    rt.block_on(async {
        eprintln!("every write durable: (a) replicated, (b) simplex, (c) qemu-nbd writethrough");
        let every = {
            let a = mirror_pair(&root.join("a"), partner("a").as_deref(), size, &[]).await?;
            let b = mirror_simplex(&root.join("b"), size, &[])?;
            let c = qemu_nbd(&root.join("c"), size, "writethrough")?;
            let d = with_qemu_mirror("d", "writethrough")?;
            let mut t = vec![&a, &b, &c];
            t.extend(d.as_ref());
            Some(compare(&t, &args).await?)
        };
        let on_flush = if args.every_write_only {
            None
        } else {
            eprintln!("durable on flush: (a) replicated, (b) simplex, (c) qemu-nbd writeback");
            let of = ["--durability", "on-flush"];
            let a = mirror_pair(&root.join("a2"), partner("a2").as_deref(), size, &of).await?;
            let b = mirror_simplex(&root.join("b2"), size, &of)?;
            let c = qemu_nbd(&root.join("c2"), size, "writeback")?;
            let d = with_qemu_mirror("d2", "writeback")?;
            let mut t = vec![&a, &b, &c];
            t.extend(d.as_ref());
            Some(compare(&t, &args).await?)
        };
        let mut resync = Vec::new();
        if !args.no_resync {
            for (vol, dirty) in [(1024, 16), (1024, 64), (4096, 16)] {
                eprintln!("resync {dirty} MiB dirty of {vol} MiB");
                let mut runs = Vec::new();
                for i in 0..args.resync_repeats.max(1) {
                    let dir = root.join(format!("r{vol}-{dirty}-{i}"));
                    runs.push(resync_time(&dir, vol, dirty).await?);
                    let _ = std::fs::remove_dir_all(&dir);
                }
                let mut v = runs[0].clone();
                for key in ["resync_secs", "reconnect_to_in_sync_secs"] {
                    let mut secs: Vec<f64> = runs.iter().filter_map(|r| r[key].as_f64()).collect();
                    let runs_key = format!("{key}_runs");
                    v[&runs_key] = json!(secs.clone());
                    v[key] = json!(median(&mut secs));
                }
                eprintln!("  {}", v);
                resync.push(v);
            }
        }
        let out = json!({
            "machine": { "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0) },
            "seconds_per_workload": args.seconds,
            "volume_mib": args.size_mib,
            "area_mib": args.area_mib,
            "rounds": args.rounds.max(1),
            "pin_secondary": args.pin_secondary,
            "client": format!("{:?}", args.client).to_lowercase(),
            "partner_dir": args.partner_dir,
            "durable_every_write": durability_json(every, "c_qemu_nbd_writethrough"),
            "durable_on_flush": durability_json(on_flush, "c_qemu_nbd_writeback"),
            "resync": resync,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        Ok(())
    })
}

//! `pv-mirror-bench`: compares, on this machine and in one run,
//!
//! * (a) our NBD export replicating to a partner over loopback,
//! * (b) our export without a partner (simplex),
//! * (c) `qemu-nbd` serving the same kind of raw file,
//!
//! for sequential 1 MiB writes, 4 KiB random writes at queue depth 1 and
//! 32, and 4 KiB random reads, and prints JSON with throughput, p50/p99
//! latency and the ratios (a)/(b) and (b)/(c). Durability is compared like
//! for like: our default (every write durable before its reply) against
//! `qemu-nbd --cache=writethrough`, and our `on-flush` mode against
//! `qemu-nbd --cache=writeback`. The three targets run side by side and
//! are measured in turns, round after round (see [`compare`]). It also
//! times resyncs of N dirty MiB on volumes of different sizes. Run it in
//! release mode:
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
        match client_link() {
            ClientLink::Unix => Endpoint::Unix(self.nbd_sock.clone()),
            ClientLink::Tcp => Endpoint::Tcp(format!("127.0.0.1:{}", self.nbd_port)),
        }
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

/// A running export under test.
struct Target {
    at: Endpoint,
    _procs: Killer,
}

/// Runs every workload on the three targets (a), (b), (c) in turns: each
/// round runs it once on each target, in an order that rotates from round
/// to round, so that the three see the same machine. This machine's speed
/// drifts and jumps between runs (by up to a quarter, for minutes at a
/// time); targets measured one after the other would compare different
/// machines. Throughput is the median over the rounds, latency percentiles
/// are over all requests, and each ratio is the median of the rounds' own
/// ratios, with their range.
async fn compare(targets: [&Target; 3], args: &Args) -> anyhow::Result<[Value; 5]> {
    let area = args.area_mib * MIB;
    for t in targets {
        prefill(&t.at, area).await?;
    }
    let rounds = args.rounds.max(1);
    let per_run = args.seconds / rounds as f64;
    let mut out: [serde_json::Map<String, Value>; 5] = Default::default();
    for w in WORKLOADS {
        if !args.workloads.is_empty() && !args.workloads.iter().any(|n| n == w.name) {
            continue;
        }
        let mut mbs: [Vec<f64>; 3] = Default::default();
        let mut lat: [Vec<u64>; 3] = Default::default();
        for r in 0..rounds {
            for k in 0..3 {
                let i = (r + k) % 3;
                let s = run_workload(&targets[i].at, w, per_run, area).await?;
                mbs[i].push(s.mb_per_sec(w.bs));
                lat[i].extend(s.lat);
            }
        }
        let ratios = |x: usize, y: usize| {
            let mut v: Vec<f64> = (0..rounds).map(|r| mbs[x][r] / mbs[y][r]).collect();
            let mid = median(&mut v); // sorts v
            (round2(mid), [round2(v[0]), round2(v[rounds - 1])])
        };
        for i in 0..3 {
            lat[i].sort_unstable();
            let mb = median(&mut mbs[i].clone());
            let v = json!({
                "ops": lat[i].len(),
                "mb_per_sec": (mb * 10.0).round() / 10.0,
                "iops": (mb * 1e6 / w.bs as f64).round(),
                "mb_per_sec_rounds": mbs[i].iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>(),
                "p50_us": percentile(&lat[i], 0.50),
                "p99_us": percentile(&lat[i], 0.99),
            });
            eprintln!("  {} {}: {v}", ["a", "b", "c"][i], w.name);
            out[i].insert(w.name.into(), v);
        }
        let (ab, ab_range) = ratios(0, 1);
        let (bc, bc_range) = ratios(1, 2);
        eprintln!("  {}: a/b {ab} {ab_range:?}, b/c {bc} {bc_range:?}", w.name);
        out[3].insert(w.name.into(), json!({ "median": ab, "range": ab_range }));
        out[4].insert(w.name.into(), json!({ "median": bc, "range": bc_range }));
    }
    Ok(out.map(Value::Object))
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
    std::fs::create_dir_all(root)?;
    let file = root.join("disk.raw");
    std::fs::File::create(&file)?.set_len(size)?;
    let port = free_port()?;
    let sock = root.join("qemu-nbd.sock");
    let mut cmd = pinned("qemu-nbd", 0);
    cmd.args(["-f", "raw", "-x", "vol"]);
    let at = match client_link() {
        ClientLink::Unix => {
            cmd.arg("-k").arg(&sock);
            Endpoint::Unix(sock.clone())
        }
        ClientLink::Tcp => {
            cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()]);
            Endpoint::Tcp(format!("127.0.0.1:{port}"))
        }
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
    let procs = Killer(vec![child]);
    wait_for("qemu-nbd", Duration::from_secs(10), || match &at {
        Endpoint::Unix(p) => UnixStream::connect(p).ok().map(drop),
        Endpoint::Tcp(_) => std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(drop),
    })?;
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
        let c = NbdClient::connect_tcp(&format!("127.0.0.1:{}", a.nbd_port), "vol").await?;
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

fn durability_json([a, b, c, ab, bc]: [Value; 5], c_name: &str) -> Value {
    json!({
        "a_replicated": a,
        "b_simplex": b,
        c_name: c,
        "ratio_a_over_b": ab,
        "ratio_b_over_c": bc,
    })
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
    rt.block_on(async {
        eprintln!("every write durable: (a) replicated, (b) simplex, (c) qemu-nbd writethrough");
        let every = {
            let a = mirror_pair(&root.join("a"), partner("a").as_deref(), size, &[]).await?;
            let b = mirror_simplex(&root.join("b"), size, &[])?;
            let c = qemu_nbd(&root.join("c"), size, "writethrough")?;
            compare([&a, &b, &c], &args).await?
        };
        let on_flush = if args.every_write_only {
            Default::default()
        } else {
            eprintln!("durable on flush: (a) replicated, (b) simplex, (c) qemu-nbd writeback");
            let of = ["--durability", "on-flush"];
            let a = mirror_pair(&root.join("a2"), partner("a2").as_deref(), size, &of).await?;
            let b = mirror_simplex(&root.join("b2"), size, &of)?;
            let c = qemu_nbd(&root.join("c2"), size, "writeback")?;
            compare([&a, &b, &c], &args).await?
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

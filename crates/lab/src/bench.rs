//! `pairvisor lab bench`: failover time and live-migration downtime,
//! measured in a lab of its own, printed as JSON (issue 4).
//!
//! The bench brings up a lab (two PMs, the witness, the demo VM running the
//! test guest) in a temporary directory, waits until the demo VM runs with
//! its boot volume in sync, and then:
//!
//! 1. per run, one live migration of an idle guest and one of a busy guest
//!    (`pv writer` on the disk plus `pv dirty 16`), each from the PM hosting
//!    the VM to the other; the order alternates per run so that both kinds
//!    are measured in both directions. After each, the volume must be in
//!    sync again before the next one. A migration that fails is retried
//!    (up to four attempts) and its failures are reported with it.
//! 2. one failover: the guest writes durable blocks (`pv write`), the host PM
//!    is killed with everything it runs, and the time from the kill to QEMU
//!    running on the survivor is measured; every block the guest had
//!    acknowledged is then verified on the survivor's replica.
//!
//! Progress goes to stderr; the result is a JSON value (per-run figures,
//! min/median/max, the targets and whether they were met, the machine). The
//! lab is always taken down, also on error or Ctrl-C.

use crate::lab::{self, LabError, LabState, UpOptions};
use pairvisor_cli::{CliError, Client, Method};
use serde_json::{json, Value};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// Target: kill of the host PM → VM started on the survivor, seconds (with
/// the default lease and heartbeat timeouts).
pub const FAILOVER_TARGET_SECS: f64 = 15.0;

/// Acknowledged writes the guest must have made before its PM is killed.
const MIN_ACKS_BEFORE_KILL: u64 = 30;

/// Disk blocks the busy guest's writer loops over.
const WRITER_BLOCKS: u64 = 16;

/// MiB of memory the busy guest keeps dirtying.
const DIRTY_MIB: u64 = 16;

/// Attempts per measured migration (a failed one is reported and retried).
const MIGRATION_ATTEMPTS: usize = 4;

/// How often polls look again.
const POLL: Duration = Duration::from_millis(100);

/// Bound on every API request (a hung PM must not hang the bench).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Options of `lab bench`.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The `pairvisor` binary the lab runs.
    pub bin: PathBuf,
    /// Test guest directory (`vmlinuz`, `initrd.img`) for the demo VM.
    pub guest_dir: PathBuf,
    /// Migration runs; each migrates an idle and a busy guest once.
    pub runs: u32,
    /// Namespace prefix of the bench's lab (root only).
    pub prefix: String,
    /// Second octet of the bench lab's network (root only).
    pub net: u8,
}

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

/// One PM's API, logged in on first use (and again if the token expires).
struct Pm {
    name: String,
    api: String,
    data: PathBuf,
    password: String,
    client: Mutex<Option<Arc<Client>>>,
}

impl Pm {
    fn new(st: &LabState, name: &str, password: &str) -> Result<Pm, LabError> {
        let m = st
            .members
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| LabError::Io(format!("the lab has no member {name}")))?;
        Ok(Pm {
            name: name.to_string(),
            api: m
                .api
                .clone()
                .ok_or_else(|| LabError::Io(format!("lab member {name} has no API")))?,
            data: m.data.clone(),
            password: password.to_string(),
            client: Mutex::new(None),
        })
    }

    fn cached(&self) -> Option<Arc<Client>> {
        self.client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_cached(&self, c: Option<Arc<Client>>) {
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = c;
    }

    async fn client(&self) -> Result<Arc<Client>, LabError> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let anon = crate::lab::member_client(&self.api, &self.data, None)?;
        let v = bounded(anon.call(
            Method::POST,
            "/auth/login",
            Some(json!({"user": "admin", "password": self.password})),
        ))
        .await
        .map_err(|e| LabError::Api(format!("login to {} ({}): {e}", self.name, self.api)))?;
        let token = v["token"].as_str().unwrap_or_default().to_string();
        let c = Arc::new(crate::lab::member_client(
            &self.api,
            &self.data,
            Some(token),
        )?);
        self.set_cached(Some(c.clone()));
        Ok(c)
    }

    /// A request; logs in again once if the token was refused.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, LabError> {
        for attempt in 0..2 {
            let c = self.client().await?;
            match bounded(c.call(method.clone(), path, body.clone())).await {
                Err(CliError::Api { status: 401, .. }) if attempt == 0 => self.set_cached(None),
                r => {
                    return r.map_err(|e| {
                        LabError::Api(format!("{} {path} on {}: {e}", method, self.name))
                    })
                }
            }
        }
        Err(LabError::Api(format!(
            "{} refused the admin login for {path}",
            self.name
        )))
    }

    /// GET, `None` on any error (for polls).
    async fn get(&self, path: &str) -> Option<Value> {
        self.call(Method::GET, path, None).await.ok()
    }

    /// GET answered by this PM itself, `None` on any error (for polls).
    ///
    /// Requests about a VM are normally forwarded to the PM hosting it. The
    /// figures of a migration live in the memory of its source PM, but
    /// from the hand-over on the destination hosts the VM, and what it
    /// answers is its own last migration's view (if it drove one), not this
    /// one. So the source is asked directly: the request carries the mark
    /// of an already forwarded request.
    async fn get_here(&self, path: &str) -> Option<Value> {
        let c = self.client().await.ok()?;
        let r = tokio::time::timeout(
            REQUEST_TIMEOUT,
            c.call_with_header(Method::GET, path, ("x-pairvisor-forwarded", "bench")),
        )
        .await
        .ok()?;
        match r {
            Ok(v) => Some(v),
            Err(CliError::Api { status: 401, .. }) => {
                self.set_cached(None);
                None
            }
            Err(_) => None,
        }
    }

    fn run_dir(&self, vm_id: &str) -> PathBuf {
        self.data.join("run").join(vm_id)
    }

    fn console_log(&self, vm_id: &str) -> PathBuf {
        self.run_dir(vm_id).join("console.log")
    }

    /// The demo VM, if it runs here with a QEMU process.
    async fn demo_here(&self) -> Option<Value> {
        self.get("/vms/demo")
            .await
            .filter(|v| v["host"] == self.name.as_str() && v["pid"].is_number())
    }

    /// `Some` once the volume's replicas are in sync (for polls).
    async fn in_sync(&self, volume: &str) -> Option<()> {
        self.get(&format!("/volumes/{volume}"))
            .await
            .filter(|v| v["sync"] == "in_sync")
            .map(|_| ())
    }
}

/// A request bounded by [`REQUEST_TIMEOUT`].
async fn bounded<T>(f: impl Future<Output = Result<T, CliError>>) -> Result<T, CliError> {
    tokio::time::timeout(REQUEST_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| {
            Err(CliError::Local(format!(
                "no answer within {} s",
                REQUEST_TIMEOUT.as_secs()
            )))
        })
}

/// Polls `f` until it yields a value, or fails after `timeout`.
async fn until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T, LabError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(LabError::Api(format!(
                "timed out after {} s waiting for {what}",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// The console log from byte `mark` on (all of it if it is shorter: a new
/// file).
fn console_since(log: &Path, mark: u64) -> String {
    let b = std::fs::read(log).unwrap_or_default();
    let from = if (b.len() as u64) < mark {
        0
    } else {
        mark as usize
    };
    String::from_utf8_lossy(&b[from..]).into_owned()
}

fn find_line(text: &str, needle: &str) -> Option<String> {
    text.lines()
        .find(|l| l.contains(needle))
        .map(|l| l.trim().to_string())
}

/// Highest block `pv write SEED` acknowledged in a console log.
fn last_acked(console: &str, seed: u64) -> Option<u64> {
    let prefix = format!("pv-guest: acked {seed} ");
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix(&prefix))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .max()
}

/// Waits until `needle` appears in the console log after `mark`; returns
/// the line.
async fn wait_console(
    pm: &Pm,
    vm_id: &str,
    mark: u64,
    needle: &str,
    timeout: Duration,
) -> Result<String, LabError> {
    let log = pm.console_log(vm_id);
    until(
        &format!("'{needle}' on {}'s console", pm.name),
        timeout,
        || {
            let line = find_line(&console_since(&log, mark), needle);
            async move { line }
        },
    )
    .await
}

/// Types `line` into the guest's serial console and waits for the guest's
/// reply containing `expect`. The connection stays open (and its output is
/// drained) until the reply is in the console log, so QEMU has read the line
/// before it is closed.
async fn command(
    pm: &Pm,
    vm_id: &str,
    line: &str,
    expect: &str,
    timeout: Duration,
) -> Result<String, LabError> {
    let log = pm.console_log(vm_id);
    let sock = pm.run_dir(vm_id).join("console.sock");
    let mark = file_len(&log);
    let mut s = tokio::net::UnixStream::connect(&sock)
        .await
        .map_err(|e| LabError::Io(format!("console of the VM on {}: {e}", pm.name)))?;
    s.write_all(format!("{line}\n").as_bytes())
        .await
        .map_err(|e| LabError::Io(format!("typing on {}'s console: {e}", pm.name)))?;
    let mut buf = vec![0u8; 16 << 10];
    let what = format!("'{expect}' on {}'s console after '{line}'", pm.name);
    until(&what, timeout, || {
        // Keep reading: a connected client that does not read stalls the
        // guest's serial output.
        while matches!(s.try_read(&mut buf), Ok(n) if n > 0) {}
        let found = find_line(&console_since(&log, mark), expect);
        async move { found }
    })
    .await
}

fn median(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => None,
        n if n % 2 == 1 => Some(s[n / 2]),
        n => Some((s[n / 2 - 1] + s[n / 2]) / 2.0),
    }
}

/// min / median / max of one figure over the migrations of one kind.
fn stats(migrations: &[Value], kind: &str, field: &str) -> Value {
    let v: Vec<f64> = migrations
        .iter()
        .filter(|m| m["kind"] == kind)
        .filter_map(|m| m[field].as_f64())
        .collect();
    json!({
        "n": v.len(),
        "min": v.iter().copied().reduce(f64::min),
        "median": median(&v),
        "max": v.iter().copied().reduce(f64::max),
    })
}

fn machine(network: &str) -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string());
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        });
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "accel": "tcg",
        "cpu": cpu,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|s| s.trim().to_string()),
        "qemu": qemu,
        "loadavg_at_start": std::fs::read_to_string("/proc/loadavg")
            .ok()
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")),
        "network": network,
    })
}

/// Prints the end of each member's log to stderr (on failure).
fn log_tails(dir: &Path) {
    for m in ["pm-a", "pm-b", "witness"] {
        let log = std::fs::read_to_string(dir.join(format!("{m}.log"))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(25).collect();
        eprintln!("---- {m} log (newest last) ----");
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
    }
}

/// `lab bench`: brings up a lab in a temporary directory, measures, takes
/// the lab down (also on error or Ctrl-C) and returns the figures as JSON.
/// Acknowledged writes lost in the failover are an error.
pub async fn bench(opts: BenchOptions) -> Result<Value, LabError> {
    if !opts.guest_dir.join("vmlinuz").is_file() || !opts.guest_dir.join("initrd.img").is_file() {
        return Err(LabError::Io(format!(
            "no test guest (vmlinuz, initrd.img) in {}: build it with guest/build.sh",
            opts.guest_dir.display()
        )));
    }
    if opts.runs == 0 {
        return Err(LabError::Unsupported("--runs must be at least 1".into()));
    }
    let dir = std::env::temp_dir().join(format!("pairvisor-bench-{}", std::process::id()));
    let network = if crate::netns::is_root() {
        "own namespaces"
    } else {
        "loopback"
    };
    let machine = machine(network);
    progress(&format!(
        "bringing up a lab in {} ({network})",
        dir.display()
    ));
    let started = Instant::now();
    let st = lab::up(UpOptions {
        dir: dir.clone(),
        bin: opts.bin.clone(),
        prefix: opts.prefix.clone(),
        net: opts.net,
        guest_dir: Some(opts.guest_dir.clone()),
    })
    .await?;
    let result = tokio::select! {
        r = measure(&dir, &st, &opts) => r,
        _ = tokio::signal::ctrl_c() => Err(LabError::Api("interrupted".into())),
    };
    if let Err(e) = &result {
        progress(&format!("failed: {e}"));
        log_tails(&dir);
    }
    progress("taking the lab down");
    let down = lab::down(&dir);
    let mut v = result?;
    down?;
    v["machine"] = machine;
    v["bench_secs"] = json!(round3(started.elapsed().as_secs_f64()));
    Ok(v)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Which guest a migration moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    Idle,
    Busy,
}

async fn measure(dir: &Path, st: &LabState, opts: &BenchOptions) -> Result<Value, LabError> {
    let password = std::fs::read_to_string(&st.password_file)
        .map_err(|e| LabError::Io(format!("{}: {e}", st.password_file.display())))?;
    let pms = [
        Pm::new(st, "pm-a", password.trim())?,
        Pm::new(st, "pm-b", password.trim())?,
    ];
    progress("waiting for the demo VM to run with demo-boot in sync");
    let vm = until(
        "the demo VM running on pm-a",
        Duration::from_secs(180),
        || pms[0].demo_here(),
    )
    .await?;
    let id = vm["id"]
        .as_str()
        .ok_or_else(|| LabError::Api(format!("the demo VM has no id: {vm}")))?
        .to_string();
    let mut host = 0usize;
    wait_running(&pms[host]).await?;
    until("demo-boot in sync", Duration::from_secs(120), || {
        pms[host].in_sync("demo-boot")
    })
    .await?;
    wait_console(
        &pms[host],
        &id,
        0,
        "pv-guest: ready",
        Duration::from_secs(120),
    )
    .await?;

    let mut migrations = Vec::new();
    for run in 0..opts.runs {
        // Alternate the order so that each kind is measured both ways.
        let order = if run % 2 == 0 {
            [Load::Idle, Load::Busy]
        } else {
            [Load::Busy, Load::Idle]
        };
        for load in order {
            let m = migrate(&pms, &mut host, &id, run, load).await?;
            progress(&format!(
                "run {}/{}: {} guest {} -> {}: downtime {} ms (QEMU {} ms), total {} ms",
                run + 1,
                opts.runs,
                m["kind"].as_str().unwrap_or_default(),
                m["from"].as_str().unwrap_or_default(),
                m["to"].as_str().unwrap_or_default(),
                m["downtime_ms"],
                m["qemu_downtime_ms"],
                m["total_ms"]
            ));
            migrations.push(m);
        }
    }
    let failover = failover(dir, &pms, host, &id).await?;

    let max_downtime = migrations
        .iter()
        .filter_map(|m| m["max_downtime_ms"].as_u64())
        .max()
        .unwrap_or(300);
    let idle_worst = migrations
        .iter()
        .filter(|m| m["kind"] == "idle")
        .filter_map(|m| m["downtime_ms"].as_u64())
        .max();
    let failover_secs = failover["failover_secs"].as_f64().unwrap_or(f64::INFINITY);
    let lost = failover["acked_writes_lost"].as_u64().unwrap_or(u64::MAX);
    let targets = json!({
        "failover_secs": {
            "target": format!("<= {FAILOVER_TARGET_SECS}"),
            "value": failover_secs,
            "met": failover_secs <= FAILOVER_TARGET_SECS,
        },
        "idle_downtime_ms": {
            "target": format!("< {max_downtime} (configured maximum)"),
            "value": idle_worst,
            "met": idle_worst.is_some_and(|d| d < max_downtime),
        },
        "acked_writes_lost": {
            "target": "0",
            "value": lost,
            "met": lost == 0,
        },
    });
    let all_met = ["failover_secs", "idle_downtime_ms", "acked_writes_lost"]
        .iter()
        .all(|t| targets[t]["met"] == true);
    let failed_attempts: usize = migrations
        .iter()
        .map(|m| m["failed_attempts"].as_array().map_or(0, Vec::len))
        .sum();
    let summary = |kind: &str| {
        json!({
            "downtime_ms": stats(&migrations, kind, "downtime_ms"),
            "qemu_downtime_ms": stats(&migrations, kind, "qemu_downtime_ms"),
            "total_ms": stats(&migrations, kind, "total_ms"),
        })
    };
    Ok(json!({
        "runs": opts.runs,
        "guest": {
            "vcpus": vm["vcpus"],
            "memory_mib": vm["memory_mib"],
            "idle": "test guest, heartbeat only",
            "busy": format!(
                "pv writer over {WRITER_BLOCKS} disk blocks + pv dirty {DIRTY_MIB} (MiB of memory)"
            ),
        },
        "migration": {
            "idle": summary("idle"),
            "busy": summary("busy"),
            "runs": migrations,
        },
        "failover": failover,
        "targets": targets,
        "all_targets_met": all_met,
        "migration_failed_attempts": failed_attempts,
        "definitions": {
            "failover_secs": "kill of the PM hosting the VM (with its QEMU) -> the VM's QEMU runs on the survivor (API: host = survivor, with a pid)",
            "to_running_secs": "kill -> the VM's state is running on the survivor",
            "to_guest_ready_secs": "kill -> the test guest printed ready on the survivor",
            "downtime_ms": "guest paused on the source -> resumed on the destination, disk hand-over included (the API's downtime_ms)",
            "qemu_downtime_ms": "QEMU's own downtime figure",
            "total_ms": "migration start -> done, as the source PM measured it",
            "request_to_done_ms": "POST migrate -> the bench saw phase done",
        },
    }))
}

/// Waits until the demo VM is `running` with a QEMU process on `pm`.
async fn wait_running(pm: &Pm) -> Result<Value, LabError> {
    until(
        &format!("the demo VM running on {}", pm.name),
        Duration::from_secs(120),
        || async move { pm.demo_here().await.filter(|v| v["state"] == "running") },
    )
    .await
}

/// One live migration of the demo VM from `pms[*host]` to the other PM;
/// `*host` follows the VM.
async fn migrate(
    pms: &[Pm; 2],
    host: &mut usize,
    id: &str,
    run: u32,
    load: Load,
) -> Result<Value, LabError> {
    let (src, dst) = (&pms[*host], &pms[1 - *host]);
    let kind = match load {
        Load::Idle => "idle",
        Load::Busy => "busy",
    };
    progress(&format!(
        "run {}: migrating the {kind} guest {} -> {}",
        run + 1,
        src.name,
        dst.name
    ));
    // A fresh seed per writer run (a restarted writer starts at generation 1).
    let seed = 100 + u64::from(run);
    let first = 10_000 + u64::from(run) * 100;
    let t = Duration::from_secs(60);
    if load == Load::Busy {
        let mark = file_len(&src.console_log(id));
        command(
            src,
            id,
            &format!("pv writer {seed} {WRITER_BLOCKS} {first}"),
            &format!("pv-guest: writer started {seed} "),
            t,
        )
        .await?;
        // Writes are acknowledged before the migration starts.
        wait_console(src, id, mark, &format!("pv-guest: acked {seed} "), t).await?;
        command(
            src,
            id,
            &format!("pv dirty {DIRTY_MIB}"),
            "pv-guest: dirty started",
            t,
        )
        .await?;
    }
    let dst_mark = file_len(&dst.console_log(id));
    // Leader or follower in the unit database: the source's own reads of
    // what it just wrote lag on a follower.
    let src_db = src
        .get("/unit")
        .await
        .map(|u| u["metrics"]["state"].clone())
        .unwrap_or(Value::Null);
    let mut failures = Vec::new();
    let (m, wall_ms) = loop {
        match migrate_attempt(src, dst).await {
            Ok(done) => break done,
            Err(e) if failures.len() + 1 < MIGRATION_ATTEMPTS => {
                progress(&format!(
                    "run {}: the {kind} guest's migration {} -> {} (unit database {src_db} \
                     there) failed ({e}); retrying",
                    run + 1,
                    src.name,
                    dst.name
                ));
                failures.push(e.to_string());
                recover_after_failed_migration(src, dst, id).await?;
            }
            Err(e) => {
                return Err(LabError::Api(format!(
                    "the {kind} guest's migration {} -> {} (unit database {src_db} there) \
                     failed {MIGRATION_ATTEMPTS} times; last: {e}; before: {failures:?}",
                    src.name, dst.name
                )))
            }
        }
    };
    wait_running(dst).await?;
    *host = 1 - *host;
    if load == Load::Busy {
        // The writer goes on writing on the destination.
        wait_console(dst, id, dst_mark, &format!("pv-guest: acked {seed} "), t).await?;
        command(dst, id, "pv stop", "pv-guest: stopped", t).await?;
    }
    let synced = Instant::now();
    until(
        &format!("demo-boot in sync after the migration to {}", dst.name),
        Duration::from_secs(180),
        || dst.in_sync("demo-boot"),
    )
    .await?;
    Ok(json!({
        "run": run + 1,
        "kind": kind,
        "from": src.name,
        "to": dst.name,
        "downtime_ms": m["downtime_ms"],
        "qemu_downtime_ms": m["qemu_downtime_ms"],
        "total_ms": m["total_ms"],
        "max_downtime_ms": m["max_downtime_ms"],
        "request_to_done_ms": wall_ms,
        "ram_transferred_bytes": m["ram_transferred_bytes"],
        "passes": m["passes"],
        "preflight_dirty_rate_bps": m["preflight_dirty_rate_bps"],
        "resync_secs": round3(synced.elapsed().as_secs_f64()),
        "failed_attempts": failures,
        "source_unit_db_state": src_db,
    }))
}

/// Starts a migration `src` -> `dst` and follows it to its end; returns the
/// source's view of it when done, and the time from the request to done.
async fn migrate_attempt(src: &Pm, dst: &Pm) -> Result<(Value, u64), LabError> {
    let t0 = Instant::now();
    src.call(Method::POST, "/vms/demo/migrate", Some(json!({})))
        .await?;
    let m = until(
        &format!("the migration {} -> {} to end", src.name, dst.name),
        Duration::from_secs(300),
        || async move {
            src.get_here("/vms/demo/migration").await.filter(|m| {
                m["source"] == src.name.as_str()
                    && m["dest"] == dst.name.as_str()
                    && (m["phase"] == "done" || m["phase"] == "failed")
            })
        },
    )
    .await?;
    let wall_ms = t0.elapsed().as_millis() as u64;
    if m["phase"] != "done" {
        return Err(LabError::Api(format!(
            "phase {}: {}",
            m["phase"],
            m["error"].as_str().unwrap_or("no error given")
        )));
    }
    Ok((m, wall_ms))
}

/// Whether a QEMU process of the VM runs on `pm` (its run directory's
/// `qemu.pid`).
fn qemu_alive(pm: &Pm, vm_id: &str) -> bool {
    std::fs::read_to_string(pm.run_dir(vm_id).join("qemu.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .is_some_and(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
        })
}

/// After a failed migration: the VM runs on the source again, its
/// migration record is no longer active (cancelled if it still is: a
/// source PM that reads a lagging copy of the unit database can fail a
/// migration without marking its record failed), the destination has
/// stopped its incoming QEMU (a destination still holding one ignores a new
/// migration), and the volume is in sync.
async fn recover_after_failed_migration(src: &Pm, dst: &Pm, id: &str) -> Result<(), LabError> {
    wait_running(src).await?;
    let d = Duration::from_secs(120);
    until("the failed migration to be over", d, || async move {
        let c = src.client().await.ok()?;
        match bounded(c.call(Method::DELETE, "/vms/demo/migration", None)).await {
            Err(CliError::Api {
                status: 409,
                message,
                ..
            }) if message.contains("not being migrated") => Some(()),
            Ok(_) => {
                progress("cancelled the failed migration, whose record was still active");
                None
            }
            Err(_) => None,
        }
    })
    .await?;
    until(&format!("{}'s incoming QEMU to stop", dst.name), d, || {
        let gone = (!qemu_alive(dst, id)).then_some(());
        async move { gone }
    })
    .await?;
    until("demo-boot in sync", d, || src.in_sync("demo-boot")).await?;
    Ok(())
}

/// Kills the PM hosting the demo VM while the guest writes, measures the
/// takeover, and verifies every acknowledged block on the survivor.
async fn failover(dir: &Path, pms: &[Pm; 2], host: usize, id: &str) -> Result<Value, LabError> {
    let (victim, survivor) = (&pms[host], &pms[1 - host]);
    let seed = 900 + u64::from(std::process::id() % 100);
    let t = Duration::from_secs(60);
    progress(&format!(
        "failover: the guest writes, then {} is killed",
        victim.name
    ));
    let mark = file_len(&victim.console_log(id));
    command(
        victim,
        id,
        &format!("pv write {seed} 100000"),
        &format!("pv-guest: acked {seed} "),
        t,
    )
    .await?;
    let log = victim.console_log(id);
    until(
        &format!("{MIN_ACKS_BEFORE_KILL} acknowledged writes"),
        t,
        || {
            let acked = last_acked(&console_since(&log, mark), seed)
                .filter(|b| *b + 1 >= MIN_ACKS_BEFORE_KILL);
            async move { acked }
        },
    )
    .await?;
    let survivor_mark = file_len(&survivor.console_log(id));
    lab::kill(dir, &victim.name)?;
    let killed = Instant::now();
    // The victim's QEMU is dead: its console log is final.
    let acked = last_acked(&console_since(&log, mark), seed)
        .ok_or_else(|| LabError::Api("no acknowledged write in the console log".into()))?
        + 1;
    // One poll for the three moments: QEMU started on the survivor (the
    // failover time), the VM `running` there, the guest booted.
    let slog = survivor.console_log(id);
    let deadline = killed + Duration::from_secs(180);
    let (mut failover, mut running, mut ready) = (None, None, None);
    let mut started = Value::Null;
    while failover.is_none() || running.is_none() || ready.is_none() {
        if let Some(v) = survivor.demo_here().await {
            let t = killed.elapsed();
            if failover.is_none() {
                failover = Some(t);
                progress(&format!(
                    "failover: VM started on {} {:.1} s after the kill ({acked} acknowledged blocks)",
                    survivor.name,
                    t.as_secs_f64()
                ));
                started = v.clone();
            }
            if running.is_none() && v["state"] == "running" {
                running = Some(t);
            }
        }
        if ready.is_none()
            && find_line(&console_since(&slog, survivor_mark), "pv-guest: ready").is_some()
        {
            ready = Some(killed.elapsed());
        }
        if Instant::now() > deadline {
            return Err(LabError::Api(format!(
                "the demo VM did not come back on {} within 180 s of the kill (started: {}, \
                 running: {}, guest ready: {})",
                survivor.name,
                failover.is_some(),
                running.is_some(),
                ready.is_some()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
    let secs = |d: Option<Duration>| round3(d.unwrap_or_default().as_secs_f64());
    let verdict = command(
        survivor,
        id,
        &format!("pv verify {seed} {acked}"),
        "pv-guest: verify ",
        Duration::from_secs(120),
    )
    .await?;
    if !verdict.contains(&format!("verify ok {seed} {acked}")) {
        let lost = verdict
            .rsplit_once("block ")
            .and_then(|(_, b)| b.trim().parse::<u64>().ok())
            .map(|b| format!("at least one; the first bad block is {b} of {acked}"))
            .unwrap_or_else(|| "unknown".into());
        return Err(LabError::Api(format!(
            "ACKNOWLEDGED WRITES LOST in the failover from {} to {}: the guest acknowledged \
             blocks 0..{acked} of seed {seed}, the survivor's disk says '{verdict}' (lost: {lost})",
            victim.name, survivor.name
        )));
    }
    progress(&format!("failover: {verdict}"));
    Ok(json!({
        "killed": victim.name,
        "survivor": survivor.name,
        "failover_secs": secs(failover),
        "to_running_secs": secs(running),
        "to_guest_ready_secs": secs(ready),
        "vm_id_kept": started["id"] == id,
        "acked_blocks": acked,
        "acked_writes_lost": 0,
        "verify": verdict,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_acked_takes_the_highest_block_of_the_seed() {
        let log = "pv-guest: acked 7 0\r\npv-guest: acked 8 5\r\n[ 1.0] noise\r\n\
                   pv-guest: acked 7 1\r\npv-guest: acked 7 12 3\r\n";
        assert_eq!(last_acked(log, 7), Some(12));
        assert_eq!(last_acked(log, 9), None);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn stats_per_kind() {
        let m = vec![
            json!({"kind": "idle", "downtime_ms": 40}),
            json!({"kind": "busy", "downtime_ms": 90}),
            json!({"kind": "idle", "downtime_ms": 60}),
        ];
        let s = stats(&m, "idle", "downtime_ms");
        assert_eq!(s["n"], 2);
        assert_eq!(s["min"], 40.0);
        assert_eq!(s["median"], 50.0);
        assert_eq!(s["max"], 60.0);
    }

    #[test]
    fn console_since_restarts_on_a_new_file() {
        let d = std::env::temp_dir().join(format!("pv-bench-test-{}", std::process::id()));
        std::fs::write(&d, "abcdef").unwrap();
        assert_eq!(console_since(&d, 4), "ef");
        assert_eq!(console_since(&d, 10), "abcdef");
        let _ = std::fs::remove_file(&d);
    }
}

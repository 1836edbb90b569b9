//! The lease watchdog (issue 13, docs/fencing.md "A hung daemon"): a PM
//! must stop its VMs when its lease ends even if the daemon that should
//! stop them is hung (SIGSTOP, a stuck kernel call, a long pause) or dead
//! while its QEMU processes run on. Otherwise the partner, which takes over
//! once that lease has certainly expired, would run the same VMs.
//!
//! The daemon publishes its lease deadline (`CLOCK_BOOTTIME`, the clock the
//! lease is timed on, shared by every process of the machine) in a small
//! file *before* it relies on it; a separate process, `pairvisor watchdog`,
//! reads the file every [`POLL`] and, once the deadline has passed, kills
//! every QEMU process of the PM. With a healthy daemon it finds none: the
//! daemon stops its VMs shortly before the deadline. The survivor waits for
//! the same deadline plus a drift margin, so the kill always comes first.
//!
//! One watchdog per data directory (an exclusive `flock`); it outlives a
//! daemon restart (the new daemon goes on writing the same file) and exits
//! when the daemon is gone and nothing is left to enforce.

use crate::clock::BootInstant;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often the watchdog reads the deadline.
pub const POLL: Duration = Duration::from_millis(50);

const MAGIC: &[u8; 4] = b"PVLD";
const LEN: usize = 32;

/// The deadline file of a data directory's run directory.
pub fn deadline_file(run_dir: &Path) -> PathBuf {
    run_dir.join("lease.deadline")
}

/// The watchdog's lock file.
pub fn lock_file(run_dir: &Path) -> PathBuf {
    run_dir.join("watchdog.lock")
}

/// What the daemon published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Lease end, µs on `CLOCK_BOOTTIME`; 0: no lease was ever held (the
    /// watchdog is disarmed).
    pub deadline_us: u64,
    /// The publishing daemon's pid.
    pub pid: u32,
}

fn encode(p: Published) -> [u8; LEN] {
    let mut b = [0u8; LEN];
    b[0..4].copy_from_slice(MAGIC);
    b[4..8].copy_from_slice(&p.pid.to_le_bytes());
    b[8..16].copy_from_slice(&p.deadline_us.to_le_bytes());
    // A torn read (old and new halves) fails this check and is read again.
    let check = p.deadline_us ^ u64::from(p.pid) ^ 0x5056_4c44_5056_4c44;
    b[16..24].copy_from_slice(&check.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Option<Published> {
    if b.len() < LEN || &b[0..4] != MAGIC {
        return None;
    }
    let u = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().unwrap_or([0; 8]));
    let pid = u32::from_le_bytes(b[4..8].try_into().ok()?);
    let deadline_us = u(8..16);
    (u(16..24) == deadline_us ^ u64::from(pid) ^ 0x5056_4c44_5056_4c44)
        .then_some(Published { deadline_us, pid })
}

/// The daemon's side: keeps the deadline file up to date.
#[derive(Debug)]
pub struct Publisher {
    file: std::fs::File,
    pid: u32,
}

impl Publisher {
    /// Opens (creating, 0600) the deadline file in `run_dir`. An existing
    /// deadline (a daemon that ran before this one) is kept: the VMs it
    /// left running stay bound by it until this daemon renews the lease.
    pub fn open(run_dir: &Path) -> std::io::Result<Publisher> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(run_dir)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(deadline_file(run_dir))?;
        let pid = std::process::id();
        let mut old = Vec::new();
        file.seek(SeekFrom::Start(0))?;
        file.read_to_end(&mut old)?;
        let keep = decode(&old).map_or(0, |p| p.deadline_us);
        let p = Publisher { file, pid };
        // Written whole once, so that later writes never need new blocks.
        p.write(keep)?;
        Ok(p)
    }

    /// Publishes `deadline_us` (µs on `CLOCK_BOOTTIME`).
    pub fn write(&self, deadline_us: u64) -> std::io::Result<()> {
        self.file.write_all_at(
            &encode(Published {
                deadline_us,
                pid: self.pid,
            }),
            0,
        )
    }
}

/// Reads the deadline file (`None`: missing, or torn/garbled — read again).
pub fn read(run_dir: &Path) -> Option<Published> {
    let mut b = [0u8; LEN];
    let f = std::fs::File::open(deadline_file(run_dir)).ok()?;
    f.read_exact_at(&mut b, 0).ok()?;
    decode(&b)
}

/// What one look decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The lease is valid (or none was ever held): nothing to do.
    Valid,
    /// The lease has ended: every VM process must die.
    Expired,
}

/// Pure decision: the lease published `p` at boot time `now_us`.
pub fn verdict(p: Option<Published>, now_us: u64) -> Verdict {
    match p {
        Some(p) if p.deadline_us > 0 && now_us >= p.deadline_us => Verdict::Expired,
        _ => Verdict::Valid,
    }
}

/// Whether process `pid` exists (and is not a zombie).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|st| st != 'Z' && st != 'X'),
        Err(_) => false,
    }
}

/// Runs the watchdog for `run_dir` until the daemon is gone and nothing is
/// left to enforce. `kill_vms` kills every VM process of the PM and says
/// what it killed. Returns at once (Ok(false)) when another watchdog holds
/// the lock.
pub fn run(
    run_dir: &Path,
    mut kill_vms: impl FnMut() -> Vec<String>,
    mut log: impl FnMut(&str),
) -> std::io::Result<bool> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_file(run_dir))?;
    if !try_lock(&lock) {
        return Ok(false);
    }
    // Who holds it (for an administrator, and for tests that freeze it).
    let _ = lock.set_len(0);
    let _ = writeln!(&lock, "{}", std::process::id());
    log(&format!("watchdog for {} running", run_dir.display()));
    let mut last: Option<Published> = None;
    loop {
        if !run_dir.is_dir() {
            log("run directory gone: exiting");
            return Ok(true);
        }
        if let Some(p) = read(run_dir) {
            last = Some(p);
        }
        let now = BootInstant::now().since_boot().as_micros() as u64;
        let expired = verdict(last, now) == Verdict::Expired;
        if expired {
            for what in kill_vms() {
                log(&format!(
                    "lease ended {} ms ago and the daemon (pid {}) did not stop its VMs: killed {what}",
                    (now - last.map_or(now, |p| p.deadline_us)) / 1000,
                    last.map_or(0, |p| p.pid)
                ));
            }
        }
        let daemon_alive = last.is_some_and(|p| alive(p.pid));
        if !daemon_alive && (expired || last.is_none_or(|p| p.deadline_us == 0)) {
            log("the daemon is gone and no lease is left to enforce: exiting");
            return Ok(true);
        }
        std::thread::sleep(POLL);
    }
}

/// Takes an exclusive, non-blocking `flock` (held until the file closes).
pub fn try_lock(f: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock takes a file descriptor we own (it stays open for the
    // call) and plain integer flags; it touches no memory.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Whether a watchdog holds the lock of `run_dir` now.
pub fn running(run_dir: &Path) -> bool {
    let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_file(run_dir))
    else {
        return false;
    };
    // Our probe takes the lock only when nobody holds it; closing the file
    // releases it again.
    !try_lock(&f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_file_round_trips_and_a_torn_one_is_refused() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(read(t.path()), None);
        let p = Publisher::open(t.path()).unwrap();
        assert_eq!(read(t.path()).unwrap().deadline_us, 0);
        p.write(123_456).unwrap();
        let got = read(t.path()).unwrap();
        assert_eq!(got.deadline_us, 123_456);
        assert_eq!(got.pid, std::process::id());
        // A daemon restarting keeps the deadline its predecessor published.
        drop(p);
        let _p2 = Publisher::open(t.path()).unwrap();
        assert_eq!(read(t.path()).unwrap().deadline_us, 123_456);
        let mut b = encode(Published {
            deadline_us: 5,
            pid: 1,
        });
        b[9] ^= 1;
        assert_eq!(decode(&b), None, "a torn value is not believed");
    }

    #[test]
    fn the_verdict() {
        let p = |d| {
            Some(Published {
                deadline_us: d,
                pid: 1,
            })
        };
        assert_eq!(verdict(None, 10), Verdict::Valid);
        assert_eq!(verdict(p(0), 10), Verdict::Valid, "never held: disarmed");
        assert_eq!(verdict(p(11), 10), Verdict::Valid);
        assert_eq!(verdict(p(10), 10), Verdict::Expired);
    }

    #[test]
    fn the_watchdog_kills_at_the_deadline_and_exits_when_the_daemon_is_gone() {
        let t = tempfile::tempdir().unwrap();
        let run_dir = t.path().to_path_buf();
        // A "daemon" that is already gone: a child that exited.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(deadline_file(&run_dir))
            .unwrap();
        let now = BootInstant::now().since_boot().as_micros() as u64;
        f.write_all_at(
            &encode(Published {
                deadline_us: now + 300_000,
                pid,
            }),
            0,
        )
        .unwrap();
        let start = std::time::Instant::now();
        let mut kills = Vec::new();
        let mut killed_at = None;
        let ran = run(
            &run_dir,
            || {
                killed_at.get_or_insert(start.elapsed());
                vec!["qemu 1".to_string()]
            },
            |l| kills.push(l.to_string()),
        )
        .unwrap();
        assert!(ran);
        let at = killed_at.expect("killed");
        assert!(
            at >= Duration::from_millis(300),
            "{at:?}: before the deadline"
        );
        assert!(
            kills.iter().any(|l| l.contains("killed qemu 1")),
            "{kills:?}"
        );
        assert!(kills.last().unwrap().contains("exiting"), "{kills:?}");
    }

    #[test]
    fn one_watchdog_per_run_directory() {
        let t = tempfile::tempdir().unwrap();
        assert!(!running(t.path()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(lock_file(t.path()))
            .unwrap();
        assert!(try_lock(&f));
        assert!(running(t.path()));
        let r = run(t.path(), Vec::new, |_| {}).unwrap();
        assert!(!r, "a second watchdog returns at once");
    }
}

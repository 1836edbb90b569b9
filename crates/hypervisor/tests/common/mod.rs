//! Helpers shared by the integration tests: the QEMU binary, the test guest,
//! a guard that kills a test's QEMU whatever happens, deadlines.

#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pairvisor_hypervisor::{Accel, Disk, DiskSource, KernelBoot, VmSpec};

/// The QEMU binary under test (`PAIRVISOR_QEMU`, default `qemu-system-x86_64`).
pub fn qemu_binary() -> PathBuf {
    std::env::var_os("PAIRVISOR_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

/// Kills the QEMU named by a run directory's pid file when dropped, so that
/// a failing or timed-out test leaves no QEMU behind. Create it before
/// launching.
pub struct QemuGuard {
    run_dir: PathBuf,
}

impl QemuGuard {
    pub fn new(run_dir: &Path) -> Self {
        QemuGuard {
            run_dir: run_dir.to_owned(),
        }
    }
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        let pid_file = self.run_dir.join("qemu.pid");
        let Ok(text) = std::fs::read_to_string(&pid_file) else {
            return;
        };
        let Ok(pid) = text.trim().parse::<i32>() else {
            return;
        };
        if pid <= 0 {
            return;
        }
        // Only kill it if it still is this test's QEMU (pid reuse).
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return;
        };
        let want = pid_file.to_string_lossy().into_owned();
        let ours = cmdline.split(|b| *b == 0).any(|a| a == want.as_bytes());
        if ours {
            // SAFETY: kill(2) with a positive pid signals exactly that process
            // and touches no memory of ours.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// A temporary directory with a short path (sockets have a 107-byte limit)
/// on a file system that supports O_DIRECT.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("pvh")
        .tempdir_in("/tmp")
        .expect("create temp dir")
}

/// A small TCG VM with no guest code (SeaBIOS finds nothing to boot).
pub fn empty_spec(name: &str) -> VmSpec {
    let mut spec = VmSpec::new(name, "6f1a2b3c-4d5e-4f60-8a7b-9c0d1e2f3a4b", 1, 64);
    spec.accel = Accel::Tcg;
    spec
}

/// Runs `fut`, failing the test if it takes longer than `secs` seconds.
/// Dropping the future on timeout drops its guards, which kill QEMU.
pub async fn bounded<F: Future>(secs: u64, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what} did not finish within {secs} s"),
    }
}

/// Waits until `path` contains `needle`, polling; panics with the file's
/// tail after `timeout`.
pub async fn wait_for_text(path: &Path, needle: &str, timeout: Duration) -> String {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let text = std::fs::read(path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        if tokio::time::Instant::now() >= deadline {
            let tail: String = text
                .chars()
                .rev()
                .take(2000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            panic!(
                "{needle:?} did not appear in {} within {timeout:?}; it ends with:\n{tail}",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for the first event that `pick` accepts.
pub async fn wait_event<T>(
    events: &mut tokio::sync::broadcast::Receiver<pairvisor_hypervisor::QmpEvent>,
    timeout: Duration,
    what: &str,
    mut pick: impl FnMut(&pairvisor_hypervisor::QmpEvent) -> Option<T>,
) -> T {
    let found = tokio::time::timeout(timeout, async {
        loop {
            match events.recv().await {
                Ok(event) => {
                    if let Some(t) = pick(&event) {
                        return t;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(e) => panic!("event channel closed while waiting for {what}: {e}"),
            }
        }
    })
    .await;
    match found {
        Ok(t) => t,
        Err(_) => panic!("no {what} event within {timeout:?}"),
    }
}

/// Where the test guest is (`PAIRVISOR_GUEST_DIR`, default
/// `<workspace>/target/guest`); panics with instructions when it is missing.
pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("PAIRVISOR_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"));
    for file in ["vmlinuz", "initrd.img"] {
        if !dir.join(file).is_file() {
            panic!(
                "test guest missing: {} not found; run guest/build.sh (or set PAIRVISOR_GUEST_DIR)",
                dir.join(file).display()
            );
        }
    }
    dir
}

/// A spec that boots the test guest with a 64 MiB disk in `dir`.
pub fn guest_spec(name: &str, dir: &Path) -> VmSpec {
    let guest = guest_dir();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut spec = VmSpec::new(name, "3e0f5a1c-7b2d-4c8e-9f10-2a3b4c5d6e7f", 1, 256);
    spec.accel = Accel::Tcg;
    spec.pvpanic = true;
    spec.guest_agent = true;
    spec.disks = vec![Disk {
        id: "root".into(),
        source: DiskSource::RawFile { path: disk },
        read_only: false,
    }];
    spec.kernel_boot = Some(KernelBoot {
        kernel: guest.join("vmlinuz"),
        initrd: Some(guest.join("initrd.img")),
        cmdline: "console=ttyS0 panic=0 quiet".into(),
    });
    spec
}

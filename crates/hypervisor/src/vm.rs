//! [`QemuVm`]: one daemonized QEMU process and its run directory.
//!
//! QEMU runs with `-daemonize`, so it outlives the Pairvisor daemon (even a
//! SIGKILLed one) and is not our child: a restarted daemon finds it again
//! with [`QemuVm::attach`]. Dropping a [`QemuVm`] leaves QEMU running.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::process::{self, ProcState};
use crate::qga::{self, QgaError};
use crate::qmp::{DumpProgress, DumpStatus, QmpClient, QmpError, QmpEvent, RunState};
use crate::spec::{
    command_line, files, validate_run_dir, SpecError, VmSpec, CDROM_DEVICE_ID, CDROM_DRIVE_ID,
};

/// How long the daemonizing QEMU parent may take to report success.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to keep trying to connect to QMP after launch.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often to look at `/proc` while waiting for an exit.
const POLL: Duration = Duration::from_millis(20);

/// What went wrong managing a QEMU process.
#[derive(Debug, Error)]
pub enum VmError {
    /// The spec or run directory is not acceptable.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The run directory (or a file in it) cannot be prepared or read.
    #[error("cannot prepare run directory {path}")]
    RunDir {
        /// The path that failed.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A QEMU for this run directory is already running.
    #[error("QEMU (pid {pid}) is already running in {run_dir}; attach to it or stop it first")]
    AlreadyRunning {
        /// Its pid.
        pid: i32,
        /// The run directory.
        run_dir: PathBuf,
    },
    /// The QEMU binary cannot be executed.
    #[error("cannot run {binary}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The exec error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited with an error during startup.
    #[error("QEMU failed to start ({status}); end of its log:\n{log_tail}")]
    LaunchFailed {
        /// Exit status of the daemonizing parent.
        status: String,
        /// The last lines of `qemu.log`.
        log_tail: String,
    },
    /// The pid file is missing or does not hold a pid.
    #[error("pid file {path}: {reason}")]
    PidFile {
        /// The pid file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// No QEMU runs for this run directory (any more).
    #[error("no QEMU is running for {run_dir}: {reason}")]
    NotRunning {
        /// The run directory.
        run_dir: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// The QMP socket of a running QEMU cannot be connected.
    #[error("cannot connect to QMP socket {path}")]
    QmpConnect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: QmpError,
    },
    /// A QMP command failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// Something did not happen in time.
    #[error("{what} did not happen within {after:?}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The time allowed.
        after: Duration,
    },
    /// The QEMU process cannot be signalled.
    #[error("cannot signal QEMU pid {pid}")]
    Signal {
        /// The pid.
        pid: i32,
        /// The kill(2) error.
        #[source]
        source: std::io::Error,
    },
    /// A memory dump failed.
    #[error("memory dump to {path} failed: {reason}")]
    Dump {
        /// The dump file.
        path: PathBuf,
        /// QEMU's or our reason.
        reason: String,
    },
    /// A path argument is not acceptable.
    #[error("path {path:?} {reason}")]
    InvalidPath {
        /// The path.
        path: PathBuf,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// The guest agent did not answer.
    #[error(transparent)]
    GuestAgent(#[from] QgaError),
}

/// Whether the guest's driver has set up one virtio device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioDriverStatus {
    /// The device's QEMU id (e.g. `virtio-disk-root`, `nic0`), when it has one.
    pub device_id: Option<String>,
    /// QOM path of the virtio backend.
    pub path: String,
    /// Device type (e.g. `virtio-blk`, `virtio-net`, `virtio-serial`).
    pub name: String,
    /// The guest driver finished setting up the device (`DRIVER_OK`).
    pub driver_ok: bool,
    /// All status bits the driver set, as QEMU describes them.
    pub statuses: Vec<String>,
}

/// A running QEMU process with its QMP connection.
#[derive(Debug)]
pub struct QemuVm {
    run_dir: PathBuf,
    pid: i32,
    qmp: QmpClient,
}

fn run_dir_err(path: &Path) -> impl FnOnce(std::io::Error) -> VmError + '_ {
    move |source| VmError::RunDir {
        path: path.to_owned(),
        source,
    }
}

/// Reads the pid from `path`.
fn read_pid_file(path: &Path) -> Result<i32, VmError> {
    let text = std::fs::read_to_string(path).map_err(|e| VmError::PidFile {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    match text.trim().parse::<i32>() {
        Ok(pid) if pid > 0 => Ok(pid),
        _ => Err(VmError::PidFile {
            path: path.to_owned(),
            reason: format!("holds {:?}, not a pid", text.trim()),
        }),
    }
}

/// The last `lines` lines of the file at `path` (at most 8 KiB are read).
fn log_tail(path: &Path, lines: usize) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(8192)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let tail = all[all.len().saturating_sub(lines)..].join("\n");
            if tail.trim().is_empty() {
                "(qemu.log is empty)".to_owned()
            } else {
                tail
            }
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn check_path(path: &Path) -> Result<&str, VmError> {
    let bad = |reason: &str| VmError::InvalidPath {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let s = path
        .to_str()
        .ok_or_else(|| bad("is not valid UTF-8; it must be"))?;
    if !path.is_absolute() {
        return Err(bad("is relative; it must be absolute"));
    }
    if s.chars().any(char::is_control) {
        return Err(bad("contains a control character; none are allowed"));
    }
    Ok(s)
}

/// Connects to QMP, retrying while the socket does not exist or refuses.
async fn connect_qmp(run_dir: &Path, timeout: Duration) -> Result<QmpClient, VmError> {
    let path = run_dir.join(files::QMP_SOCKET);
    let deadline = Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match QmpClient::connect(&path, remaining.max(Duration::from_millis(100))).await {
            Ok(client) => return Ok(client),
            Err(QmpError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(source) => return Err(VmError::QmpConnect { path, source }),
        }
    }
}

impl QemuVm {
    /// Starts QEMU (`qemu_binary`, e.g. `qemu-system-x86_64`) for `spec`
    /// with its sockets, logs and pid file in `run_dir`, and connects QMP.
    ///
    /// Creates `run_dir` (mode 0700), refuses if a QEMU already runs there,
    /// removes stale sockets, keeps the previous `qemu.log` as `qemu.log.1`,
    /// waits for the daemonizing parent to report success (on failure the
    /// error carries the end of `qemu.log`) and reads the pid file.
    pub async fn launch(
        qemu_binary: &Path,
        spec: &VmSpec,
        run_dir: &Path,
    ) -> Result<QemuVm, VmError> {
        let args = command_line(spec, run_dir)?;
        prepare_run_dir(run_dir)?;
        let log_path = run_dir.join(files::QEMU_LOG);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(run_dir_err(&log_path))?;
        let log2 = log.try_clone().map_err(run_dir_err(&log_path))?;

        tracing::info!(vm = %spec.name, run_dir = %run_dir.display(), "launching QEMU");
        tracing::debug!(?args, "QEMU command line");
        let mut child = tokio::process::Command::new(qemu_binary)
            .args(&args)
            .current_dir(run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| VmError::Spawn {
                binary: qemu_binary.to_owned(),
                source,
            })?;
        let status = match tokio::time::timeout(LAUNCH_TIMEOUT, child.wait()).await {
            Ok(status) => status.map_err(|source| VmError::Spawn {
                binary: qemu_binary.to_owned(),
                source,
            })?,
            Err(_) => {
                let _ = child.start_kill();
                kill_by_pid_file(run_dir);
                return Err(VmError::Timeout {
                    what: "QEMU startup",
                    after: LAUNCH_TIMEOUT,
                });
            }
        };
        if !status.success() {
            return Err(VmError::LaunchFailed {
                status: status.to_string(),
                log_tail: log_tail(&log_path, 20),
            });
        }
        let pid = read_pid_file(&run_dir.join(files::PID_FILE))?;
        match connect_qmp(run_dir, QMP_CONNECT_TIMEOUT).await {
            Ok(qmp) => {
                tracing::info!(vm = %spec.name, pid, "QEMU running");
                Ok(QemuVm {
                    run_dir: run_dir.to_owned(),
                    pid,
                    qmp,
                })
            }
            Err(e) => {
                // Do not leave a QEMU behind that nobody can manage.
                let _ = process::signal(pid, libc::SIGKILL);
                Err(e)
            }
        }
    }

    /// Finds the QEMU running for `run_dir` (after a daemon restart): reads
    /// the pid file, checks that the process is alive and is this run
    /// directory's QEMU, and connects QMP.
    pub async fn attach(run_dir: &Path) -> Result<QemuVm, VmError> {
        validate_run_dir(run_dir)?;
        let pid_file = run_dir.join(files::PID_FILE);
        let not_running = |reason: String| VmError::NotRunning {
            run_dir: run_dir.to_owned(),
            reason,
        };
        if !pid_file.exists() {
            return Err(not_running(format!(
                "{} does not exist (QEMU exited cleanly or never ran)",
                pid_file.display()
            )));
        }
        let pid = read_pid_file(&pid_file)?;
        if !process::is_qemu_of(pid, &pid_file) {
            // A process that is exiting still reads as alive for a moment
            // after its memory (and so its command line) is gone.
            let exiting = process::cmdline(pid).is_none();
            return Err(not_running(match process::state(pid) {
                ProcState::Gone => format!("pid {pid} from {} has exited", pid_file.display()),
                ProcState::Alive if exiting => {
                    format!("pid {pid} from {} has exited", pid_file.display())
                }
                ProcState::Alive => {
                    format!("pid {pid} from {} is another program", pid_file.display())
                }
            }));
        }
        let qmp = connect_qmp(run_dir, Duration::from_secs(5)).await?;
        tracing::info!(run_dir = %run_dir.display(), pid, "attached to QEMU");
        Ok(QemuVm {
            run_dir: run_dir.to_owned(),
            pid,
            qmp,
        })
    }

    /// QEMU's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The run directory (sockets, logs, pid file).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The QMP client, for commands without a helper here.
    pub fn qmp(&self) -> &QmpClient {
        &self.qmp
    }

    /// Events from now on; [`QmpEvent::Disconnected`] when QEMU goes away.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.qmp.subscribe()
    }

    /// The run state (`query-status`).
    pub async fn status(&self) -> Result<RunState, VmError> {
        Ok(self.qmp.query_status().await?)
    }

    /// Starts or resumes the vCPUs.
    pub async fn cont(&self) -> Result<(), VmError> {
        Ok(self.qmp.cont().await?)
    }

    /// Pauses the vCPUs.
    pub async fn stop(&self) -> Result<(), VmError> {
        Ok(self.qmp.stop().await?)
    }

    /// Presses the ACPI power button; a cooperating guest shuts down and
    /// QEMU exits (event `Shutdown { guest: true, .. }`).
    pub async fn system_powerdown(&self) -> Result<(), VmError> {
        Ok(self.qmp.system_powerdown().await?)
    }

    /// Hard reset.
    pub async fn system_reset(&self) -> Result<(), VmError> {
        Ok(self.qmp.system_reset().await?)
    }

    /// Asks QEMU to exit at once (power off without the guest's help).
    pub async fn quit(&self) -> Result<(), VmError> {
        Ok(self.qmp.quit().await?)
    }

    /// SIGKILLs QEMU (if it is still this run directory's QEMU).
    pub fn kill(&self) -> Result<(), VmError> {
        if process::is_qemu_of(self.pid, &self.run_dir.join(files::PID_FILE)) {
            tracing::warn!(pid = self.pid, "killing QEMU");
            process::signal(self.pid, libc::SIGKILL).map_err(|source| VmError::Signal {
                pid: self.pid,
                source,
            })?;
        }
        Ok(())
    }

    /// Whether the QEMU process is gone (exited, possibly unreaped).
    pub fn has_exited(&self) -> bool {
        !process::is_qemu_of(self.pid, &self.run_dir.join(files::PID_FILE))
    }

    /// Resolves when QEMU is gone: the QMP connection closed and the pid no
    /// longer is this QEMU. Works without being QEMU's parent.
    pub async fn wait_exit(&self, timeout: Duration) -> Result<(), VmError> {
        let gone = async {
            self.qmp.closed().await;
            while !self.has_exited() {
                tokio::time::sleep(POLL).await;
            }
        };
        tokio::time::timeout(timeout, gone)
            .await
            .map_err(|_| VmError::Timeout {
                what: "QEMU exit",
                after: timeout,
            })
    }

    /// Writes the guest's memory as an ELF core to `path` (absolute; the
    /// file is created or truncated by QEMU). The guest is paused while the
    /// dump is written and resumes afterwards if it was running. Progress
    /// is reported to `on_progress` a few times a second.
    pub async fn dump_guest_memory(
        &self,
        path: &Path,
        timeout: Duration,
        mut on_progress: impl FnMut(DumpProgress) + Send,
    ) -> Result<DumpProgress, VmError> {
        let path_str = check_path(path)?;
        let fail = |reason: String| VmError::Dump {
            path: path.to_owned(),
            reason,
        };
        let mut events = self.qmp.subscribe();
        self.qmp.dump_guest_memory(path_str).await?;
        let wait = async {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    event = events.recv() => match event {
                        Ok(QmpEvent::DumpCompleted { error: Some(e) }) => return Err(fail(e)),
                        Ok(QmpEvent::DumpCompleted { error: None }) => return Ok(()),
                        Ok(QmpEvent::Disconnected) | Err(broadcast::error::RecvError::Closed) => {
                            return Err(VmError::Qmp(QmpError::ConnectionClosed))
                        }
                        // Missed events: query-dump below still tells.
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    },
                    _ = tick.tick() => {
                        let progress = self.qmp.query_dump().await?;
                        on_progress(progress);
                        match progress.status {
                            DumpStatus::Completed => return Ok(()),
                            DumpStatus::Failed => return Err(fail("QEMU reports the dump failed".into())),
                            DumpStatus::Active | DumpStatus::None => {}
                        }
                    }
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| VmError::Timeout {
                what: "memory dump completion",
                after: timeout,
            })??;
        let last = self.qmp.query_dump().await?;
        on_progress(last);
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if size == 0 {
            return Err(fail("the dump file is empty or missing".into()));
        }
        Ok(last)
    }

    /// Inserts the raw image (ISO) at `path` into the CD drive, replacing
    /// any medium, even if the guest locked the tray.
    pub async fn insert_cdrom(&self, path: &Path) -> Result<(), VmError> {
        let path = check_path(path)?;
        Ok(self
            .qmp
            .blockdev_change_medium(CDROM_DEVICE_ID, path)
            .await?)
    }

    /// Removes the medium from the CD drive (forcing the tray open) and
    /// closes the empty tray.
    pub async fn eject_cdrom(&self) -> Result<(), VmError> {
        self.qmp.blockdev_open_tray(CDROM_DEVICE_ID, true).await?;
        self.qmp.blockdev_remove_medium(CDROM_DEVICE_ID).await?;
        self.qmp.blockdev_close_tray(CDROM_DEVICE_ID).await?;
        Ok(())
    }

    /// The file in the CD drive, as `query-block` reports it.
    pub async fn cdrom_medium(&self) -> Result<Option<PathBuf>, VmError> {
        for dev in self.qmp.query_block().await? {
            let is_cd = dev.get("device").and_then(|v| v.as_str()) == Some(CDROM_DRIVE_ID)
                || dev.get("qdev").and_then(|v| v.as_str()).is_some_and(|q| {
                    q == CDROM_DEVICE_ID
                        || q.starts_with(&format!("/machine/peripheral/{CDROM_DEVICE_ID}/"))
                });
            if is_cd {
                return Ok(dev
                    .get("inserted")
                    .and_then(|i| i.get("file"))
                    .and_then(|f| f.as_str())
                    .map(PathBuf::from));
            }
        }
        Err(VmError::Qmp(QmpError::Protocol(format!(
            "query-block does not list the CD drive {CDROM_DRIVE_ID}"
        ))))
    }

    /// Pings qemu-guest-agent in the guest (needs `guest_agent` in the spec).
    pub async fn guest_ping(&self, timeout: Duration) -> Result<(), VmError> {
        Ok(qga::guest_ping(&self.run_dir.join(files::QGA_SOCKET), timeout).await?)
    }

    /// For every virtio device, whether the guest's driver has set it up
    /// (`DRIVER_OK`), from QEMU 7.2's `x-query-virtio-status`. Best effort:
    /// the `x-` commands are unstable and may change in later QEMU versions.
    pub async fn query_virtio_drivers(&self) -> Result<Vec<VirtioDriverStatus>, VmError> {
        let mut out = Vec::new();
        for dev in self.qmp.query_virtio().await? {
            let statuses = self.qmp.query_virtio_status(&dev.path).await?;
            let driver_ok = statuses.iter().any(|s| s.contains("DRIVER_OK"));
            let device_id = dev
                .path
                .strip_prefix("/machine/peripheral/")
                .and_then(|rest| rest.split('/').next())
                .map(str::to_owned);
            out.push(VirtioDriverStatus {
                device_id,
                path: dev.path,
                name: dev.name,
                driver_ok,
                statuses,
            });
        }
        Ok(out)
    }
}

/// Creates `run_dir` (0700), refuses a live QEMU there, removes stale
/// sockets and the pid file, rotates `qemu.log`.
fn prepare_run_dir(run_dir: &Path) -> Result<(), VmError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(run_dir)
        .map_err(run_dir_err(run_dir))?;
    std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(run_dir_err(run_dir))?;
    let pid_file = run_dir.join(files::PID_FILE);
    if let Ok(pid) = read_pid_file(&pid_file) {
        if process::is_qemu_of(pid, &pid_file) {
            return Err(VmError::AlreadyRunning {
                pid,
                run_dir: run_dir.to_owned(),
            });
        }
    }
    for stale in [
        files::QMP_SOCKET,
        files::CONSOLE_SOCKET,
        files::QGA_SOCKET,
        files::VNC_SOCKET,
        files::PID_FILE,
    ] {
        let path = run_dir.join(stale);
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::debug!(path = %path.display(), "removed stale file"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(run_dir_err(&path)(e)),
        }
    }
    let log = run_dir.join(files::QEMU_LOG);
    if log.exists() {
        // QEMU's -D truncates the log; keep the previous run's.
        let previous = run_dir.join(files::QEMU_LOG_PREVIOUS);
        std::fs::rename(&log, &previous).map_err(run_dir_err(&log))?;
    }
    Ok(())
}

/// Best-effort kill of whatever QEMU the pid file names.
fn kill_by_pid_file(run_dir: &Path) {
    let pid_file = run_dir.join(files::PID_FILE);
    if let Ok(pid) = read_pid_file(&pid_file) {
        if process::is_qemu_of(pid, &pid_file) {
            let _ = process::signal(pid, libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_takes_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qemu.log");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        assert_eq!(log_tail(&path, 2), "line 98\nline 99");
        std::fs::write(&path, "").unwrap();
        assert_eq!(log_tail(&path, 2), "(qemu.log is empty)");
        assert!(log_tail(&dir.path().join("none"), 2).starts_with("(cannot read"));
    }

    #[test]
    fn pid_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qemu.pid");
        std::fs::write(&path, "1234\n").unwrap();
        assert_eq!(read_pid_file(&path).unwrap(), 1234);
        for bad in ["", "abc", "-5", "0"] {
            std::fs::write(&path, bad).unwrap();
            assert!(
                matches!(read_pid_file(&path), Err(VmError::PidFile { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn prepare_creates_private_dir_and_clears_stale_files() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("a/b");
        prepare_run_dir(&run).unwrap();
        let mode = std::fs::metadata(&run).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::write(run.join(files::QMP_SOCKET), "").unwrap();
        std::fs::write(run.join(files::PID_FILE), "999999\n").unwrap();
        std::fs::write(run.join(files::QEMU_LOG), "old\n").unwrap();
        std::fs::write(run.join(files::CONSOLE_LOG), "console\n").unwrap();
        prepare_run_dir(&run).unwrap();
        assert!(!run.join(files::QMP_SOCKET).exists());
        assert!(!run.join(files::PID_FILE).exists());
        assert_eq!(
            std::fs::read_to_string(run.join(files::QEMU_LOG_PREVIOUS)).unwrap(),
            "old\n"
        );
        assert!(run.join(files::CONSOLE_LOG).exists());
    }
}

//! Looking at and signalling processes we did not necessarily start (a
//! daemonized QEMU is re-parented away from us), through `/proc` and kill(2).

use std::io;
use std::path::Path;

/// What `/proc` says about a pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProcState {
    /// The process exists and has not exited.
    Alive,
    /// The process has exited (possibly a zombie nobody reaped yet).
    Gone,
}

/// Whether `pid` is a live process. A zombie counts as gone: a daemonized
/// QEMU is re-parented to init (or a subreaper), which may reap it late.
pub(crate) fn state(pid: i32) -> ProcState {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state letter follows the last ')' (the command may contain ')').
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            match state {
                Some('Z') | Some('X') | Some('x') | None => ProcState::Gone,
                Some(_) => ProcState::Alive,
            }
        }
        Err(_) => ProcState::Gone,
    }
}

/// The arguments of `pid`, or `None` when it is gone or unreadable.
pub(crate) fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Whether `pid` is the QEMU whose pid file is `pid_file` (its arguments
/// contain `-pidfile PID_FILE`). Guards against pid reuse.
pub(crate) fn is_qemu_of(pid: i32, pid_file: &Path) -> bool {
    if state(pid) != ProcState::Alive {
        return false;
    }
    let Some(args) = cmdline(pid) else {
        return false;
    };
    let want = pid_file.to_string_lossy();
    let Some(theirs) = args
        .windows(2)
        .find(|w| w[0] == "-pidfile")
        .map(|w| w[1].as_str())
    else {
        return false;
    };
    if theirs == want {
        return true;
    }
    // The same directory spelled differently (`/run/pv/./a`, symlinks).
    let same_name = Path::new(theirs).file_name() == pid_file.file_name();
    let dir = |p: &Path| p.parent().and_then(|d| std::fs::canonicalize(d).ok());
    same_name && dir(Path::new(theirs)).is_some_and(|d| Some(d) == dir(pid_file))
}

/// SIGKILLs every QEMU whose run directory is under `run_root` (each
/// `run_root/*/qemu.pid` naming a live QEMU started with that pid file) and
/// says which. For the lease watchdog: a PM whose lease has ended must not
/// run any guest.
pub fn kill_all_qemus(run_root: &Path) -> Vec<String> {
    let mut killed = Vec::new();
    let Ok(entries) = std::fs::read_dir(run_root) else {
        return killed;
    };
    for e in entries.flatten() {
        let pid_file = e.path().join(crate::spec::files::PID_FILE);
        let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            continue;
        };
        if is_qemu_of(pid, &pid_file) && signal(pid, libc::SIGKILL).is_ok() {
            killed.push(format!("QEMU pid {pid} ({})", e.path().display()));
        }
    }
    killed
}

/// Sends `signal` to `pid`. A process that is already gone is not an error.
pub(crate) fn signal(pid: i32, signal: i32) -> io::Result<()> {
    if pid <= 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to signal pid {pid}"),
        ));
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours;
    // pid > 0 so it targets exactly one process, never a process group.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive() {
        let me = std::process::id() as i32;
        assert_eq!(state(me), ProcState::Alive);
        assert!(cmdline(me).is_some_and(|a| !a.is_empty()));
        assert!(!is_qemu_of(me, Path::new("/nonexistent/qemu.pid")));
    }

    #[test]
    fn missing_pid_is_gone() {
        // Above the kernel's pid_max ceiling (2^22).
        assert_eq!(state(5_000_000), ProcState::Gone);
        assert!(cmdline(5_000_000).is_none());
        signal(5_000_000, 0).unwrap();
        assert!(signal(0, libc::SIGKILL).is_err());
        assert!(signal(-1, libc::SIGKILL).is_err());
    }
}

//! Pairvisor's hypervisor layer: QEMU processes and their control channels.
//!
//! - [`spec`]: what a VM is to QEMU ([`VmSpec`]) and the pure translation
//!   into a command line ([`spec::command_line`]).
//! - [`qmp`]: an async QMP client with typed events ([`QmpEvent`]).
//! - [`qga`]: a minimal qemu-guest-agent client (ping).
//! - [`QemuVm`]: launch a daemonized QEMU, re-attach to it after a daemon
//!   restart, control it, dump it, change CDs, watch it exit.
//!
//! QEMU 7.2 (Debian bookworm) is the version this is written against.

#![warn(missing_docs)]

pub mod migration;
mod process;
pub mod qga;
pub mod qmp;
pub mod spec;
mod vm;

use std::path::{Path, PathBuf};

use thiserror::Error;

pub use migration::{
    DirtyRate, MigrationCaps, MigrationParams, MigrationProgress, MigrationStatus, TlsEndpoint,
};
pub use process::kill_all_qemus;
pub use qga::QgaError;
pub use qmp::{DumpProgress, DumpStatus, QmpClient, QmpError, QmpEvent, RunState};
pub use spec::{Accel, Disk, DiskSource, KernelBoot, Nic, NicBackend, SpecError, VmSpec};
pub use vm::{QemuVm, VirtioDriverStatus, VmError};

/// A QEMU version, from `qemu-system-… --version`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// Why the QEMU version could not be determined.
#[derive(Debug, Error)]
pub enum VersionError {
    /// The binary cannot be run.
    #[error("cannot run {binary} --version")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The exec error.
        #[source]
        source: std::io::Error,
    },
    /// The output does not contain a version.
    #[error("{binary} --version printed no QEMU version: {output:?}")]
    Unrecognized {
        /// The binary.
        binary: PathBuf,
        /// Its first output line.
        output: String,
    },
}

/// Parses the first line of `qemu-system-… --version`
/// (`QEMU emulator version 7.2.22 (Debian …)`).
pub fn parse_qemu_version(output: &str) -> Option<QemuVersion> {
    let line = output.lines().next()?;
    let rest = line.split("version ").nth(1)?;
    let word = rest.split_whitespace().next()?;
    let mut parts = word.split('.').map(|p| p.parse::<u32>());
    let major = parts.next()?.ok()?;
    let minor = parts.next()?.ok()?;
    let micro = match parts.next() {
        Some(p) => p.ok()?,
        None => 0,
    };
    Some(QemuVersion {
        major,
        minor,
        micro,
    })
}

/// Runs `binary --version` and parses the version.
pub async fn qemu_version(binary: &Path) -> Result<QemuVersion, VersionError> {
    let out = tokio::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| VersionError::Spawn {
            binary: binary.to_owned(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_qemu_version(&text).ok_or_else(|| VersionError::Unrecognized {
        binary: binary.to_owned(),
        output: text.lines().next().unwrap_or("").to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        let v = parse_qemu_version(
            "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright (c) 2003-2022",
        )
        .unwrap();
        assert_eq!(
            v,
            QemuVersion {
                major: 7,
                minor: 2,
                micro: 22
            }
        );
        assert_eq!(v.to_string(), "7.2.22");
        assert_eq!(
            parse_qemu_version("QEMU emulator version 9.1.0").unwrap(),
            QemuVersion {
                major: 9,
                minor: 1,
                micro: 0
            }
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 8.2")
                .unwrap()
                .micro,
            0
        );
        assert!(parse_qemu_version("").is_none());
        assert!(parse_qemu_version("bash: qemu: not found").is_none());
    }
}

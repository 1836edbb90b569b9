//! What a VM looks like to QEMU: [`VmSpec`], its validation, and the pure
//! translation into a QEMU command line ([`command_line`]).
//!
//! Every value that ends up inside a QEMU option string (`-chardev a=b,c=d`)
//! is either checked against a small alphabet or escaped (QEMU writes a `,`
//! inside a value as `,,`). Values that QEMU takes verbatim (`-kernel`,
//! `-initrd`, `-append`, `-pidfile`, `-D`) are never escaped; where QEMU
//! would still split them (`-initrd` on multiboot kernels splits on `,`) a
//! comma is refused instead.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// File names inside a VM's run directory. The run directory belongs to one
/// VM; QEMU creates the sockets and logs listed here.
pub mod files {
    /// QMP control socket.
    pub const QMP_SOCKET: &str = "qmp.sock";
    /// Serial console socket (one client at a time).
    pub const CONSOLE_SOCKET: &str = "console.sock";
    /// Everything the guest wrote to its serial console (appended).
    pub const CONSOLE_LOG: &str = "console.log";
    /// qemu-guest-agent socket (virtio-serial port `org.qemu.guest_agent.0`).
    pub const QGA_SOCKET: &str = "qga.sock";
    /// VNC server socket, when the VM has a display.
    pub const VNC_SOCKET: &str = "vnc.sock";
    /// Pid of the daemonized QEMU.
    pub const PID_FILE: &str = "qemu.pid";
    /// QEMU's own messages (startup errors and, after daemonizing, its stderr).
    pub const QEMU_LOG: &str = "qemu.log";
    /// The previous launch's `qemu.log`, kept when a VM is launched again.
    pub const QEMU_LOG_PREVIOUS: &str = "qemu.log.1";
}

/// QEMU device id of the CD drive every VM has.
pub const CDROM_DEVICE_ID: &str = "cdrom0";
/// QEMU drive (block backend) id behind [`CDROM_DEVICE_ID`].
pub const CDROM_DRIVE_ID: &str = "cdrom0-drive";
/// Name of the virtio-serial port qemu-guest-agent listens on.
pub const GUEST_AGENT_PORT: &str = "org.qemu.guest_agent.0";

/// Longest path of a Unix socket QEMU can bind (`sun_path` is 108 bytes with
/// its terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// Longest VM name accepted, in bytes.
pub const MAX_VM_NAME: usize = 64;
/// Longest disk id accepted. Disk ids become QEMU node names
/// (`disk-ID`, at most 31 bytes) and virtio-blk serial numbers (20 bytes).
pub const MAX_DISK_ID: usize = 20;
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 255;
/// Least memory a VM may have, in MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Most memory a VM may have, in MiB (16 TiB).
pub const MAX_MEMORY_MIB: u64 = 16 * 1024 * 1024;

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm` (`-cpu host`). The product default.
    #[default]
    Kvm,
    /// Software emulation (TCG, `-cpu max`). Slow; used by tests.
    Tcg,
}

impl Accel {
    /// The name QEMU's `-accel` option uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// How long QEMU waits for an NBD export to come back before failing I/O.
pub const NBD_RECONNECT_SECS: u64 = 30;

/// Where a disk's blocks come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum DiskSource {
    /// A raw image file, opened with O_DIRECT (`cache=none`) and `aio=threads`.
    /// The file system must support O_DIRECT (tmpfs does not).
    RawFile {
        /// Absolute path of the image.
        path: PathBuf,
    },
    /// An NBD export served on a Unix socket (the mirror's export).
    NbdUnix {
        /// Absolute path of the NBD server's socket.
        socket: PathBuf,
        /// Export name.
        export: String,
    },
}

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Identifier, unique in the VM: 1 to [`MAX_DISK_ID`] characters from
    /// `A-Z a-z 0-9 _ -`, starting with a letter. Used in QEMU ids and as the
    /// disk's serial number seen by the guest.
    pub id: String,
    /// Where the blocks are.
    pub source: DiskSource,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// How a NIC reaches a network.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "ifname")]
pub enum NicBackend {
    /// Not connected (the guest sees a NIC without link partner).
    #[default]
    None,
    /// QEMU user-mode networking (slirp); for tests and demos.
    User,
    /// An existing tap interface (`script=no`): Pairvisor creates and bridges it.
    Tap(String),
}

/// A virtio-net NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// Unicast MAC address, `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
    /// What the NIC is connected to.
    #[serde(default)]
    pub backend: NicBackend,
}

/// Direct kernel boot (no firmware boot loader).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelBoot {
    /// Absolute path of the kernel image.
    pub kernel: PathBuf,
    /// Absolute path of the initial ramdisk.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
}

/// Everything QEMU needs to know to run one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// VM name (shown by QEMU in `-name`); no control characters, at most
    /// [`MAX_VM_NAME`] bytes.
    pub name: String,
    /// SMBIOS UUID, canonical form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    pub uuid: String,
    /// Number of vCPUs (1 to [`MAX_VCPUS`]).
    pub vcpus: u32,
    /// Guest memory in MiB ([`MIN_MEMORY_MIB`] to [`MAX_MEMORY_MIB`]).
    pub memory_mib: u64,
    /// Accelerator; KVM unless told otherwise.
    #[serde(default)]
    pub accel: Accel,
    /// QEMU machine type, e.g. `pc` (the default) or `q35`.
    #[serde(default = "default_machine")]
    pub machine: String,
    /// virtio-blk disks, in guest order.
    #[serde(default)]
    pub disks: Vec<Disk>,
    /// ISO image in the CD drive at start. The drive itself is always there.
    #[serde(default)]
    pub cdrom: Option<PathBuf>,
    /// Boot from the CD once (`-boot once=d`), then from disk after a reset.
    #[serde(default)]
    pub boot_once_cdrom: bool,
    /// Direct kernel boot instead of firmware boot.
    #[serde(default)]
    pub kernel_boot: Option<KernelBoot>,
    /// virtio-net NICs.
    #[serde(default)]
    pub nics: Vec<Nic>,
    /// Add a pvpanic device, so that a guest panic is reported (GUEST_PANICKED).
    #[serde(default)]
    pub pvpanic: bool,
    /// Add the virtio-serial port for qemu-guest-agent.
    #[serde(default)]
    pub guest_agent: bool,
    /// Serve a VNC display on the run directory's `vnc.sock`.
    #[serde(default)]
    pub vnc: bool,
    /// Start with the vCPUs stopped (`-S`); `cont` starts them.
    #[serde(default)]
    pub start_paused: bool,
    /// Wait for an incoming migration (`-incoming defer`); the listening
    /// address is given later with `migrate-incoming`, after migration
    /// capabilities have been set.
    #[serde(default)]
    pub incoming_defer: bool,
}

fn default_machine() -> String {
    "pc".to_owned()
}

impl VmSpec {
    /// A spec with the given identity and size and every option at its
    /// default: KVM, machine `pc`, no disks, NICs or extra devices.
    pub fn new(
        name: impl Into<String>,
        uuid: impl Into<String>,
        vcpus: u32,
        memory_mib: u64,
    ) -> Self {
        VmSpec {
            name: name.into(),
            uuid: uuid.into(),
            vcpus,
            memory_mib,
            accel: Accel::default(),
            machine: default_machine(),
            disks: Vec::new(),
            cdrom: None,
            boot_once_cdrom: false,
            kernel_boot: None,
            nics: Vec::new(),
            pvpanic: false,
            guest_agent: false,
            vnc: false,
            start_paused: false,
            incoming_defer: false,
        }
    }

    /// Checks every field; the error says which one is wrong and what is allowed.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_text("VM name", &self.name, MAX_VM_NAME)?;
        if self.name.is_empty() {
            return Err(SpecError::Invalid {
                field: "name".into(),
                reason: "is empty; give the VM a name".into(),
            });
        }
        validate_uuid(&self.uuid)?;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(SpecError::Invalid {
                field: "vcpus".into(),
                reason: format!("is {}; allowed are 1 to {MAX_VCPUS}", self.vcpus),
            });
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(SpecError::Invalid {
                field: "memory_mib".into(),
                reason: format!(
                    "is {}; allowed are {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} MiB",
                    self.memory_mib
                ),
            });
        }
        if self.machine.is_empty()
            || self.machine.len() > 64
            || !self
                .machine
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(SpecError::Invalid {
                field: "machine".into(),
                reason: format!(
                    "{:?} is not a machine type; use 1 to 64 characters from A-Z a-z 0-9 . _ - (e.g. pc, q35)",
                    self.machine
                ),
            });
        }
        let mut ids = HashSet::new();
        for (i, disk) in self.disks.iter().enumerate() {
            validate_disk_id(i, &disk.id)?;
            if !ids.insert(disk.id.as_str()) {
                return Err(SpecError::Invalid {
                    field: format!("disks[{i}].id"),
                    reason: format!(
                        "{:?} is used by two disks; disk ids must be unique",
                        disk.id
                    ),
                });
            }
            match &disk.source {
                DiskSource::RawFile { path } => validate_path(&format!("disks[{i}].path"), path)?,
                DiskSource::NbdUnix { socket, export } => {
                    validate_path(&format!("disks[{i}].socket"), socket)?;
                    if path_str(socket)?.len() > MAX_SOCKET_PATH {
                        return Err(SpecError::Invalid {
                            field: format!("disks[{i}].socket"),
                            reason: format!("is longer than {MAX_SOCKET_PATH} bytes, the limit for a Unix socket"),
                        });
                    }
                    validate_text(&format!("disks[{i}].export"), export, 4096)?;
                }
            }
        }
        if let Some(iso) = &self.cdrom {
            validate_path("cdrom", iso)?;
        }
        if let Some(boot) = &self.kernel_boot {
            validate_path("kernel_boot.kernel", &boot.kernel)?;
            refuse_comma("kernel_boot.kernel", &boot.kernel)?;
            if let Some(initrd) = &boot.initrd {
                validate_path("kernel_boot.initrd", initrd)?;
                refuse_comma("kernel_boot.initrd", initrd)?;
            }
            validate_text("kernel_boot.cmdline", &boot.cmdline, 4096)?;
        }
        for (i, nic) in self.nics.iter().enumerate() {
            validate_mac(i, &nic.mac)?;
            if let NicBackend::Tap(ifname) = &nic.backend {
                if ifname.is_empty()
                    || ifname.len() > 15
                    || !ifname
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                {
                    return Err(SpecError::Invalid {
                        field: format!("nics[{i}].backend"),
                        reason: format!(
                            "tap interface {ifname:?} is not valid; use 1 to 15 characters from A-Z a-z 0-9 . _ -"
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Why a [`VmSpec`] or run directory cannot be turned into a command line.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SpecError {
    /// A field has a value that is not allowed.
    #[error("VM spec field {field} {reason}")]
    Invalid {
        /// The field, e.g. `disks[0].path`.
        field: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// The run directory cannot be used.
    #[error("run directory {path:?} {reason}")]
    RunDir {
        /// The run directory as given.
        path: PathBuf,
        /// What is wrong and what is allowed.
        reason: String,
    },
}

fn validate_text(field: &str, value: &str, max: usize) -> Result<(), SpecError> {
    if value.len() > max {
        return Err(SpecError::Invalid {
            field: field.into(),
            reason: format!("is {} bytes long; at most {max} are allowed", value.len()),
        });
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(SpecError::Invalid {
            field: field.into(),
            reason: format!("contains the control character {c:?}; control characters (incl. NUL) are not allowed"),
        });
    }
    Ok(())
}

fn path_str(path: &Path) -> Result<&str, SpecError> {
    path.to_str().ok_or_else(|| SpecError::Invalid {
        field: format!("{path:?}"),
        reason: "is not valid UTF-8; paths must be UTF-8".into(),
    })
}

fn validate_path(field: &str, path: &Path) -> Result<(), SpecError> {
    let s = path.to_str().ok_or_else(|| SpecError::Invalid {
        field: field.into(),
        reason: format!("{path:?} is not valid UTF-8; paths must be UTF-8"),
    })?;
    if !path.is_absolute() {
        return Err(SpecError::Invalid {
            field: field.into(),
            reason: format!("{s:?} is relative; paths must be absolute"),
        });
    }
    validate_text(field, s, 4096)
}

fn refuse_comma(field: &str, path: &Path) -> Result<(), SpecError> {
    if path.to_string_lossy().contains(',') {
        return Err(SpecError::Invalid {
            field: field.into(),
            reason: format!("{path:?} contains ','; QEMU takes this path verbatim and may split it, so commas are not allowed"),
        });
    }
    Ok(())
}

fn validate_uuid(uuid: &str) -> Result<(), SpecError> {
    let ok = uuid.len() == 36
        && uuid.char_indices().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    if ok {
        Ok(())
    } else {
        Err(SpecError::Invalid {
            field: "uuid".into(),
            reason: format!("{uuid:?} is not a UUID; use the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (hex digits)"),
        })
    }
}

fn validate_disk_id(i: usize, id: &str) -> Result<(), SpecError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_DISK_ID
        && id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(SpecError::Invalid {
            field: format!("disks[{i}].id"),
            reason: format!(
                "{id:?} is not a disk id; use 1 to {MAX_DISK_ID} characters from A-Z a-z 0-9 _ -, starting with a letter"
            ),
        })
    }
}

fn validate_mac(i: usize, mac: &str) -> Result<(), SpecError> {
    let octets: Vec<&str> = mac.split(':').collect();
    let well_formed = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()));
    let unicast = well_formed && u8::from_str_radix(octets[0], 16).is_ok_and(|b| b & 1 == 0);
    if unicast {
        Ok(())
    } else {
        Err(SpecError::Invalid {
            field: format!("nics[{i}].mac"),
            reason: format!("{mac:?} is not a unicast MAC address; use xx:xx:xx:xx:xx:xx with an even first octet"),
        })
    }
}

/// Checks that `run_dir` can hold the VM's sockets: absolute, UTF-8, no
/// control characters or commas, and short enough for Unix socket paths.
pub fn validate_run_dir(run_dir: &Path) -> Result<(), SpecError> {
    let err = |reason: String| SpecError::RunDir {
        path: run_dir.to_owned(),
        reason,
    };
    let s = run_dir
        .to_str()
        .ok_or_else(|| err("is not valid UTF-8; it must be".into()))?;
    if !run_dir.is_absolute() {
        return Err(err("is relative; it must be absolute".into()));
    }
    if s.chars().any(|c| c.is_control() || c == ',') {
        return Err(err(
            "contains a control character or ','; neither is allowed".into(),
        ));
    }
    let longest = [
        files::QMP_SOCKET,
        files::CONSOLE_SOCKET,
        files::QGA_SOCKET,
        files::VNC_SOCKET,
    ]
    .iter()
    .map(|f| run_dir.join(f).as_os_str().len())
    .max()
    .unwrap_or(0);
    if longest > MAX_SOCKET_PATH {
        return Err(err(format!(
            "is too long: its socket paths would be {longest} bytes, more than the {MAX_SOCKET_PATH} a Unix socket allows"
        )));
    }
    Ok(())
}

/// Escapes a value for a QEMU option string (`key=value,key=value`).
fn esc(value: &str) -> String {
    value.replace(',', ",,")
}

/// `path` as a string; callers have validated that it is UTF-8.
fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// The QEMU arguments (without the binary) that run `spec` with its sockets,
/// logs and pid file in `run_dir`.
///
/// Pure: no file system access. The spec and the run directory are validated
/// first; nothing is produced for an invalid spec.
pub fn command_line(spec: &VmSpec, run_dir: &Path) -> Result<Vec<String>, SpecError> {
    spec.validate()?;
    validate_run_dir(run_dir)?;
    let run = |f: &str| p(&run_dir.join(f));
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));

    push(&[
        "-name",
        &format!("guest={},debug-threads=on", esc(&spec.name)),
    ]);
    push(&["-uuid", &spec.uuid]);
    push(&["-machine", &spec.machine]);
    push(&["-accel", spec.accel.as_str()]);
    match spec.accel {
        Accel::Kvm => push(&["-cpu", "host"]),
        Accel::Tcg => push(&["-cpu", "max"]),
    }
    push(&["-smp", &spec.vcpus.to_string()]);
    push(&["-m", &spec.memory_mib.to_string()]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    // QEMU runs as root and parses what a guest sends: seccomp forbids the
    // system calls it never needs (obsolete ones, scheduler and resource
    // changes). Not `spawn=deny` nor `elevateprivileges=deny`: -daemonize
    // forks and calls setsid, which they forbid.
    push(&["-sandbox", "on,obsolete=deny,resourcecontrol=deny"]);
    push(&["-msg", "timestamp=on"]);
    if spec.start_paused {
        push(&["-S"]);
    }
    if spec.incoming_defer {
        push(&["-incoming", "defer"]);
    }

    // Serial console: a socket for interactive use, everything logged.
    push(&[
        "-chardev",
        &format!(
            "socket,id=console,path={},server=on,wait=off,logfile={},logappend=on",
            esc(&run(files::CONSOLE_SOCKET)),
            esc(&run(files::CONSOLE_LOG))
        ),
        "-serial",
        "chardev:console",
    ]);

    // QMP. `-chardev` + `-mon` is `-qmp unix:…,server=on,wait=off` spelled
    // with an explicit, escapable path.
    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp,path={},server=on,wait=off",
            esc(&run(files::QMP_SOCKET))
        ),
        "-mon",
        "chardev=qmp,mode=control",
    ]);

    if spec.guest_agent {
        push(&[
            "-device",
            "virtio-serial-pci,id=virtio-serial0",
            "-chardev",
            &format!(
                "socket,id=qga0,path={},server=on,wait=off",
                esc(&run(files::QGA_SOCKET))
            ),
            "-device",
            &format!("virtserialport,bus=virtio-serial0.0,chardev=qga0,name={GUEST_AGENT_PORT}"),
        ]);
    }
    if spec.pvpanic {
        push(&["-device", "pvpanic"]);
    }
    if spec.vnc {
        // `-nodefaults` drops the default VGA: without a display device the
        // VNC server only shows "This VM has no graphic display device".
        push(&["-device", "VGA"]);
        push(&["-vnc", &format!("unix:{}", esc(&run(files::VNC_SOCKET)))]);
    }

    for disk in &spec.disks {
        let node = format!("disk-{}", disk.id);
        let ro = if disk.read_only { "on" } else { "off" };
        match &disk.source {
            DiskSource::RawFile { path } => {
                push(&[
                    "-blockdev",
                    &format!(
                        "driver=file,node-name={node}-file,filename={},aio=threads,cache.direct=on,cache.no-flush=off,read-only={ro}",
                        esc(&p(path))
                    ),
                    "-blockdev",
                    &format!("driver=raw,node-name={node},file={node}-file,cache.direct=on,cache.no-flush=off,read-only={ro}"),
                ]);
            }
            DiskSource::NbdUnix { socket, export } => {
                // reconnect-delay: while the daemon serving the export
                // restarts, guest I/O waits instead of failing.
                push(&[
                    "-blockdev",
                    &format!(
                        "driver=nbd,node-name={node},server.type=unix,server.path={},export={},reconnect-delay={NBD_RECONNECT_SECS},read-only={ro}",
                        esc(&p(socket)),
                        esc(export)
                    ),
                ]);
            }
        }
        push(&[
            "-device",
            &format!(
                "virtio-blk-pci,drive={node},id=virtio-{node},serial={}",
                disk.id
            ),
        ]);
    }

    // The CD drive is always present so that media can be inserted later.
    let mut cd = format!("if=none,id={CDROM_DRIVE_ID},media=cdrom,readonly=on");
    if let Some(iso) = &spec.cdrom {
        cd.push_str(&format!(",format=raw,file={}", esc(&p(iso))));
    }
    push(&["-drive", &cd]);
    push(&[
        "-device",
        &format!("ide-cd,drive={CDROM_DRIVE_ID},id={CDROM_DEVICE_ID}"),
    ]);
    if spec.boot_once_cdrom {
        push(&["-boot", "once=d"]);
    }

    for (i, nic) in spec.nics.iter().enumerate() {
        let netdev = match &nic.backend {
            NicBackend::None => None,
            NicBackend::User => Some(format!("user,id=net{i}")),
            NicBackend::Tap(ifname) => Some(format!(
                "tap,id=net{i},ifname={ifname},script=no,downscript=no"
            )),
        };
        let mut device = format!(
            "virtio-net-pci,id=nic{i},mac={}",
            nic.mac.to_ascii_lowercase()
        );
        if let Some(netdev) = netdev {
            push(&["-netdev", &netdev]);
            device.push_str(&format!(",netdev=net{i}"));
        }
        push(&["-device", &device]);
    }

    if let Some(boot) = &spec.kernel_boot {
        push(&["-kernel", &p(&boot.kernel)]);
        if let Some(initrd) = &boot.initrd {
            push(&["-initrd", &p(initrd)]);
        }
        if !boot.cmdline.is_empty() {
            push(&["-append", &boot.cmdline]);
        }
    }

    // A panicked guest stays (paused) for a dump; we get GUEST_PANICKED.
    push(&["-action", "panic=pause"]);
    // Survive the daemon; after daemonizing, QEMU's stderr goes to the -D log.
    push(&[
        "-daemonize",
        "-pidfile",
        &run(files::PID_FILE),
        "-D",
        &run(files::QEMU_LOG),
    ]);
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "0b7c3c36-5d1e-4c1a-9a51-3f2b8f0e6d11";

    fn spec() -> VmSpec {
        VmSpec::new("web1", UUID, 2, 512)
    }

    fn run() -> PathBuf {
        PathBuf::from("/run/pv/web1")
    }

    /// Finds `flag value` pairs.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    fn has_pair(args: &[String], flag: &str, value: &str) -> bool {
        values(args, flag).contains(&value)
    }

    #[test]
    fn minimal_spec_has_the_fixed_options() {
        let args = command_line(&spec(), &run()).unwrap();
        assert!(has_pair(&args, "-name", "guest=web1,debug-threads=on"));
        assert!(has_pair(&args, "-uuid", UUID));
        assert!(has_pair(&args, "-accel", "kvm"));
        assert!(has_pair(&args, "-cpu", "host"));
        assert!(has_pair(&args, "-machine", "pc"));
        assert!(has_pair(&args, "-smp", "2"));
        assert!(has_pair(&args, "-m", "512"));
        assert!(has_pair(
            &args,
            "-sandbox",
            "on,obsolete=deny,resourcecontrol=deny"
        ));
        for flag in ["-nodefaults", "-no-user-config", "-daemonize"] {
            assert!(args.iter().any(|a| a == flag), "{flag} missing");
        }
        assert!(has_pair(&args, "-display", "none"));
        assert!(has_pair(
            &args,
            "-chardev",
            "socket,id=console,path=/run/pv/web1/console.sock,server=on,wait=off,logfile=/run/pv/web1/console.log,logappend=on"
        ));
        assert!(has_pair(&args, "-serial", "chardev:console"));
        assert!(has_pair(
            &args,
            "-chardev",
            "socket,id=qmp,path=/run/pv/web1/qmp.sock,server=on,wait=off"
        ));
        assert!(has_pair(&args, "-mon", "chardev=qmp,mode=control"));
        assert!(has_pair(&args, "-action", "panic=pause"));
        assert!(has_pair(&args, "-pidfile", "/run/pv/web1/qemu.pid"));
        assert!(has_pair(&args, "-D", "/run/pv/web1/qemu.log"));
        // The CD drive is always there, empty.
        assert!(has_pair(
            &args,
            "-drive",
            "if=none,id=cdrom0-drive,media=cdrom,readonly=on"
        ));
        assert!(has_pair(
            &args,
            "-device",
            "ide-cd,drive=cdrom0-drive,id=cdrom0"
        ));
        // Nothing optional.
        for absent in ["-S", "-vnc", "-kernel", "-boot", "-netdev", "-blockdev"] {
            assert!(!args.iter().any(|a| a == absent), "{absent} present");
        }
        assert!(!args
            .iter()
            .any(|a| a.contains("pvpanic") || a.contains("qga")));
    }

    #[test]
    fn tcg_uses_cpu_max() {
        let mut s = spec();
        s.accel = Accel::Tcg;
        let args = command_line(&s, &run()).unwrap();
        assert!(has_pair(&args, "-accel", "tcg"));
        assert!(has_pair(&args, "-cpu", "max"));
        assert!(!has_pair(&args, "-cpu", "host"));
    }

    #[test]
    fn optional_devices() {
        let mut s = spec();
        s.pvpanic = true;
        s.guest_agent = true;
        s.vnc = true;
        s.start_paused = true;
        s.boot_once_cdrom = true;
        s.cdrom = Some("/isos/debian.iso".into());
        let args = command_line(&s, &run()).unwrap();
        assert!(has_pair(&args, "-device", "pvpanic"));
        assert!(has_pair(
            &args,
            "-device",
            "virtio-serial-pci,id=virtio-serial0"
        ));
        assert!(has_pair(
            &args,
            "-chardev",
            "socket,id=qga0,path=/run/pv/web1/qga.sock,server=on,wait=off"
        ));
        assert!(has_pair(
            &args,
            "-device",
            "virtserialport,bus=virtio-serial0.0,chardev=qga0,name=org.qemu.guest_agent.0"
        ));
        assert!(has_pair(&args, "-vnc", "unix:/run/pv/web1/vnc.sock"));
        assert!(has_pair(&args, "-device", "VGA"));
        assert!(args.iter().any(|a| a == "-S"));
        assert!(has_pair(&args, "-boot", "once=d"));
        assert!(has_pair(
            &args,
            "-drive",
            "if=none,id=cdrom0-drive,media=cdrom,readonly=on,format=raw,file=/isos/debian.iso"
        ));
    }

    #[test]
    fn disks_are_virtio_blk() {
        let mut s = spec();
        s.disks = vec![
            Disk {
                id: "root".into(),
                source: DiskSource::RawFile {
                    path: "/var/lib/pv/root.img".into(),
                },
                read_only: false,
            },
            Disk {
                id: "data".into(),
                source: DiskSource::NbdUnix {
                    socket: "/run/pv/mirror/data.sock".into(),
                    export: "vol-7".into(),
                },
                read_only: true,
            },
        ];
        let args = command_line(&s, &run()).unwrap();
        assert_eq!(
            values(&args, "-blockdev"),
            vec![
                "driver=file,node-name=disk-root-file,filename=/var/lib/pv/root.img,aio=threads,cache.direct=on,cache.no-flush=off,read-only=off",
                "driver=raw,node-name=disk-root,file=disk-root-file,cache.direct=on,cache.no-flush=off,read-only=off",
                "driver=nbd,node-name=disk-data,server.type=unix,server.path=/run/pv/mirror/data.sock,export=vol-7,reconnect-delay=30,read-only=on",
            ]
        );
        assert!(has_pair(
            &args,
            "-device",
            "virtio-blk-pci,drive=disk-root,id=virtio-disk-root,serial=root"
        ));
        assert!(has_pair(
            &args,
            "-device",
            "virtio-blk-pci,drive=disk-data,id=virtio-disk-data,serial=data"
        ));
    }

    #[test]
    fn nics_are_virtio_net() {
        let mut s = spec();
        s.nics = vec![
            Nic {
                mac: "52:54:00:AA:bb:01".into(),
                backend: NicBackend::User,
            },
            Nic {
                mac: "52:54:00:aa:bb:02".into(),
                backend: NicBackend::Tap("pvtap3".into()),
            },
            Nic {
                mac: "52:54:00:aa:bb:03".into(),
                backend: NicBackend::None,
            },
        ];
        let args = command_line(&s, &run()).unwrap();
        assert_eq!(
            values(&args, "-netdev"),
            vec![
                "user,id=net0",
                "tap,id=net1,ifname=pvtap3,script=no,downscript=no"
            ]
        );
        assert!(has_pair(
            &args,
            "-device",
            "virtio-net-pci,id=nic0,mac=52:54:00:aa:bb:01,netdev=net0"
        ));
        assert!(has_pair(
            &args,
            "-device",
            "virtio-net-pci,id=nic1,mac=52:54:00:aa:bb:02,netdev=net1"
        ));
        assert!(has_pair(
            &args,
            "-device",
            "virtio-net-pci,id=nic2,mac=52:54:00:aa:bb:03"
        ));
    }

    #[test]
    fn kernel_boot_values_are_verbatim() {
        let mut s = spec();
        s.kernel_boot = Some(KernelBoot {
            kernel: "/boot/vmlinuz".into(),
            initrd: Some("/boot/initrd.img".into()),
            cmdline: "console=ttyS0 panic=0 quiet opt=a,b".into(),
        });
        let args = command_line(&s, &run()).unwrap();
        assert!(has_pair(&args, "-kernel", "/boot/vmlinuz"));
        assert!(has_pair(&args, "-initrd", "/boot/initrd.img"));
        assert!(has_pair(
            &args,
            "-append",
            "console=ttyS0 panic=0 quiet opt=a,b"
        ));
    }

    #[test]
    fn commas_in_option_values_are_escaped() {
        let mut s = spec();
        s.name = "evil,process=x".into();
        s.cdrom = Some("/isos/a,format=qcow2.iso".into());
        s.disks = vec![
            Disk {
                id: "d1".into(),
                source: DiskSource::RawFile {
                    path: "/img/x,file.driver=ssh".into(),
                },
                read_only: false,
            },
            Disk {
                id: "d2".into(),
                source: DiskSource::NbdUnix {
                    socket: "/s,o".into(),
                    export: "e,x".into(),
                },
                read_only: false,
            },
        ];
        let args = command_line(&s, &run()).unwrap();
        assert!(has_pair(
            &args,
            "-name",
            "guest=evil,,process=x,debug-threads=on"
        ));
        assert!(has_pair(
            &args,
            "-drive",
            "if=none,id=cdrom0-drive,media=cdrom,readonly=on,format=raw,file=/isos/a,,format=qcow2.iso"
        ));
        let blockdevs = values(&args, "-blockdev");
        assert!(blockdevs[0].contains("filename=/img/x,,file.driver=ssh,"));
        assert!(blockdevs[2].contains("server.path=/s,,o,export=e,,x,"));
    }

    fn invalid_field(s: &VmSpec) -> String {
        match command_line(s, &run()) {
            Err(SpecError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn validation_table() {
        type Mutation = fn(&mut VmSpec);
        let cases: Vec<(&str, Mutation, &str)> = vec![
            ("empty name", |s| s.name.clear(), "name"),
            ("NUL in name", |s| s.name = "a\0b".into(), "VM name"),
            ("newline in name", |s| s.name = "a\nb".into(), "VM name"),
            ("long name", |s| s.name = "x".repeat(65), "VM name"),
            ("bad uuid", |s| s.uuid = "not-a-uuid".into(), "uuid"),
            (
                "uuid with option",
                |s| s.uuid = "0b7c3c36-5d1e-4c1a-9a51-3f2b8f0e6d1,".into(),
                "uuid",
            ),
            ("no vcpus", |s| s.vcpus = 0, "vcpus"),
            ("too many vcpus", |s| s.vcpus = 256, "vcpus"),
            ("tiny memory", |s| s.memory_mib = 8, "memory_mib"),
            (
                "machine with option",
                |s| s.machine = "pc,accel=kvm".into(),
                "machine",
            ),
            ("empty machine", |s| s.machine.clear(), "machine"),
            (
                "relative disk path",
                |s| {
                    s.disks = vec![Disk {
                        id: "a".into(),
                        source: DiskSource::RawFile {
                            path: "disk.img".into(),
                        },
                        read_only: false,
                    }]
                },
                "disks[0].path",
            ),
            (
                "disk id with comma",
                |s| {
                    s.disks = vec![Disk {
                        id: "a,b".into(),
                        source: DiskSource::RawFile {
                            path: "/d.img".into(),
                        },
                        read_only: false,
                    }]
                },
                "disks[0].id",
            ),
            (
                "disk id starting with a digit",
                |s| {
                    s.disks = vec![Disk {
                        id: "0a".into(),
                        source: DiskSource::RawFile {
                            path: "/d.img".into(),
                        },
                        read_only: false,
                    }]
                },
                "disks[0].id",
            ),
            (
                "duplicate disk id",
                |s| {
                    let d = Disk {
                        id: "a".into(),
                        source: DiskSource::RawFile {
                            path: "/d.img".into(),
                        },
                        read_only: false,
                    };
                    s.disks = vec![d.clone(), d];
                },
                "disks[1].id",
            ),
            (
                "NUL in NBD export",
                |s| {
                    s.disks = vec![Disk {
                        id: "a".into(),
                        source: DiskSource::NbdUnix {
                            socket: "/s".into(),
                            export: "a\0".into(),
                        },
                        read_only: false,
                    }]
                },
                "disks[0].export",
            ),
            (
                "long NBD socket",
                |s| {
                    s.disks = vec![Disk {
                        id: "a".into(),
                        source: DiskSource::NbdUnix {
                            socket: format!("/{}", "s".repeat(120)).into(),
                            export: "e".into(),
                        },
                        read_only: false,
                    }]
                },
                "disks[0].socket",
            ),
            ("relative ISO", |s| s.cdrom = Some("x.iso".into()), "cdrom"),
            (
                "comma in kernel path",
                |s| {
                    s.kernel_boot = Some(KernelBoot {
                        kernel: "/k,x".into(),
                        initrd: None,
                        cmdline: String::new(),
                    })
                },
                "kernel_boot.kernel",
            ),
            (
                "comma in initrd path",
                |s| {
                    s.kernel_boot = Some(KernelBoot {
                        kernel: "/k".into(),
                        initrd: Some("/i,/j".into()),
                        cmdline: String::new(),
                    })
                },
                "kernel_boot.initrd",
            ),
            (
                "newline in kernel cmdline",
                |s| {
                    s.kernel_boot = Some(KernelBoot {
                        kernel: "/k".into(),
                        initrd: None,
                        cmdline: "a\nb".into(),
                    })
                },
                "kernel_boot.cmdline",
            ),
            (
                "bad MAC",
                |s| {
                    s.nics = vec![Nic {
                        mac: "52:54:00:aa:bb".into(),
                        backend: NicBackend::User,
                    }]
                },
                "nics[0].mac",
            ),
            (
                "multicast MAC",
                |s| {
                    s.nics = vec![Nic {
                        mac: "01:54:00:aa:bb:cc".into(),
                        backend: NicBackend::User,
                    }]
                },
                "nics[0].mac",
            ),
            (
                "tap name with option",
                |s| {
                    s.nics = vec![Nic {
                        mac: "52:54:00:aa:bb:cc".into(),
                        backend: NicBackend::Tap("t,script=/x".into()),
                    }]
                },
                "nics[0].backend",
            ),
            (
                "long tap name",
                |s| {
                    s.nics = vec![Nic {
                        mac: "52:54:00:aa:bb:cc".into(),
                        backend: NicBackend::Tap("t".repeat(16)),
                    }]
                },
                "nics[0].backend",
            ),
        ];
        for (what, mutate, field) in cases {
            let mut s = spec();
            mutate(&mut s);
            assert_eq!(invalid_field(&s), field, "{what}");
        }
    }

    #[test]
    fn run_dir_validation() {
        let s = spec();
        for (dir, why) in [
            ("relative/dir", "relative"),
            ("/run/a,b", "comma"),
            ("/run/a\nb", "control"),
        ] {
            assert!(
                matches!(
                    command_line(&s, Path::new(dir)),
                    Err(SpecError::RunDir { .. })
                ),
                "{why}"
            );
        }
        let long = format!("/{}", "r".repeat(95));
        let err = command_line(&s, Path::new(&long)).unwrap_err();
        assert!(err.to_string().contains("Unix socket"), "{err}");
        // Just short enough.
        let ok = format!(
            "/{}",
            "r".repeat(MAX_SOCKET_PATH - 1 - "/console.sock".len())
        );
        command_line(&s, Path::new(&ok)).unwrap();
    }

    #[test]
    fn errors_say_what_is_allowed() {
        let mut s = spec();
        s.vcpus = 0;
        let msg = command_line(&s, &run()).unwrap_err().to_string();
        assert_eq!(msg, "VM spec field vcpus is 0; allowed are 1 to 255");
    }

    #[test]
    fn spec_round_trips_through_json_with_defaults() {
        let json = serde_json::json!({
            "name": "a",
            "uuid": UUID,
            "vcpus": 1,
            "memory_mib": 64,
            "disks": [
                {"id": "root", "source": {"kind": "raw_file", "path": "/r.img"}},
                {"id": "d", "source": {"kind": "nbd_unix", "socket": "/s", "export": "e"}, "read_only": true}
            ],
            "nics": [{"mac": "52:54:00:00:00:01", "backend": {"kind": "tap", "ifname": "tap0"}}]
        });
        let s: VmSpec = serde_json::from_value(json).unwrap();
        assert_eq!(s.accel, Accel::Kvm);
        assert_eq!(s.machine, "pc");
        assert!(!s.disks[0].read_only);
        assert_eq!(s.nics[0].backend, NicBackend::Tap("tap0".into()));
        let back: VmSpec = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        s.validate().unwrap();
    }
}

//! The record types kept in the store. Field names are the JSON format on
//! disk; add fields with `#[serde(default)]` to stay readable across versions.

use crate::Record;
use pairvisor_model::admission::GuestType;
use pairvisor_model::mac::Mac;
use pairvisor_model::mtbf::{MtbfCounter, MtbfThreshold};
use pairvisor_model::roles::Role;
use pairvisor_model::vm::VmState;
use serde::{Deserialize, Serialize};

/// Which CPU accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// Hardware virtualisation; the default on real hardware.
    #[default]
    Kvm,
    /// Software emulation (tests, nested environments).
    Tcg,
}

/// How the agent decides that a booting guest is up (SPEC V7 instance check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InstanceCheck {
    /// The QEMU guest agent answers `guest-ping` (virtio-serial
    /// `org.qemu.guest_agent.0`). Booting → running on the first answer.
    #[default]
    Agent,
    /// No guest agent: booting → running once QEMU has run the guest for
    /// `boot_grace_secs`; the instance health is then reported as unknown.
    None,
}

/// Direct kernel boot (SPEC V1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectKernel {
    /// Absolute path of the kernel image on the PM.
    pub kernel: String,
    /// Absolute path of the initrd, if any.
    #[serde(default)]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
}

/// A virtual network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicRecord {
    /// Its MAC address (auto-assigned or overridden).
    pub mac: Mac,
    /// The network it is attached to: `user` (NAT through QEMU) until shared
    /// networks exist.
    pub network: String,
}

/// A virtual machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Unique name.
    pub name: String,
    /// Hardware id (UUID), given to QEMU.
    pub id: String,
    /// Guest OS family.
    pub guest_type: GuestType,
    /// vCPUs (1..=8).
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// The boot volume's name.
    pub boot_volume: String,
    /// Data volumes' names, in attachment order.
    #[serde(default)]
    pub data_volumes: Vec<String>,
    /// Network interfaces.
    #[serde(default)]
    pub nics: Vec<NicRecord>,
    /// The VCD in the CD drive, if any.
    #[serde(default)]
    pub cdrom: Option<String>,
    /// Direct kernel boot instead of booting from the boot volume.
    #[serde(default)]
    pub kernel: Option<DirectKernel>,
    /// How "the guest is up" is detected.
    #[serde(default)]
    pub instance_check: InstanceCheck,
    /// Current life-cycle state.
    pub state: VmState,
    /// Crash history.
    #[serde(default)]
    pub mtbf: MtbfCounter,
    /// Per-VM crash threshold; the unit default when absent.
    #[serde(default)]
    pub mtbf_threshold: Option<MtbfThreshold>,
    /// Why the VM last crashed.
    #[serde(default)]
    pub last_crash: Option<String>,
    /// Path of the last memory dump.
    #[serde(default)]
    pub last_dump: Option<String>,
    /// Creation time, seconds since the epoch.
    pub created_at: u64,
    /// In a unit: the PM (name) that runs the VM, or would start it. `None`
    /// on a PM that is not in a unit.
    #[serde(default)]
    pub host: Option<String>,
    /// Preferred PM (SPEC L2 manual mode); the VM moves back to it when it
    /// is running and the VM's volumes are in sync (L3).
    #[serde(default)]
    pub preferred_pm: Option<String>,
}

impl Record for VmRecord {
    const TABLE: &'static str = "vms";
    fn key(&self) -> &str {
        &self.name
    }
}

impl VmRecord {
    /// Boot volume first, then data volumes.
    pub fn volumes(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.boot_volume).chain(self.data_volumes.iter())
    }
}

/// A volume (a sparse raw file in a storage group).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Unique name.
    pub name: String,
    /// Storage group holding it.
    pub group: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// The VM it is attached to.
    #[serde(default)]
    pub vm: Option<String>,
    /// Creation time, seconds since the epoch.
    pub created_at: u64,
    /// In a unit: how the volume is mirrored between the PMs.
    #[serde(default)]
    pub mirror: Option<MirrorRecord>,
}

/// The unit's decision about a mirrored volume (SPEC S1, U6): which PM's
/// replica is primary, with which epoch, and where replication listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorRecord {
    /// The PM whose replica is primary.
    pub primary: String,
    /// The primary's epoch; every promotion commits a larger one.
    pub epoch: u64,
    /// TCP port on which each PM's replica accepts replication.
    pub port: u16,
    /// The other PM's replica is outdated: the primary acknowledged writes
    /// without it (ARCHITECTURE "Fencing": outdate the peer before
    /// degrading). Such a replica is never promoted without an
    /// administrator's explicit "accept data loss". Cleared in the
    /// transaction that records the pair in sync again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outdated: Option<Outdated>,
    /// The administrator accepted data loss for this volume (promote
    /// anyway): its replica on `primary` is promoted even if a resync into
    /// it was interrupted. Cleared at the next hand-over.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub accept_loss: bool,
    /// S4: the administrator resolved a split brain by keeping this PM's
    /// copy; the other replica is resynced from it, then both are verified
    /// and the field is cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<String>,
}

/// Why and since when a PM's replica of a volume may be behind (see
/// [`MirrorRecord::outdated`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outdated {
    /// The PM whose replica is behind.
    pub pm: String,
    /// The primary that wrote without it.
    pub by: String,
    /// The primary's epoch at the time.
    pub epoch: u64,
    /// When the primary last knew the pair in sync (seconds since the
    /// epoch): writes after it are missing on `pm`.
    pub since: u64,
}

impl Record for VolumeRecord {
    const TABLE: &'static str = "volumes";
    fn key(&self) -> &str {
        &self.name
    }
}

/// A virtual CD (an ISO image kept by the unit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcdRecord {
    /// Unique name.
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Where the image is stored.
    pub file: String,
    /// Where it came from ("upload" or the original path).
    pub source: String,
    /// Creation time, seconds since the epoch.
    pub created_at: u64,
}

impl Record for VcdRecord {
    const TABLE: &'static str = "vcds";
    fn key(&self) -> &str {
        &self.name
    }
}

/// A storage group: on a single PM, a directory with a capacity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageGroupRecord {
    /// Unique name.
    pub name: String,
    /// Absolute directory path.
    pub path: String,
    /// Capacity in bytes (volumes' sizes count against it).
    pub capacity_bytes: u64,
}

impl Record for StorageGroupRecord {
    const TABLE: &'static str = "storage_groups";
    fn key(&self) -> &str {
        &self.name
    }
}

/// A local account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Login name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Argon2id hash in PHC string format. Never logged, never returned.
    pub password_hash: String,
    /// Creation time, seconds since the epoch.
    pub created_at: u64,
}

impl Record for UserRecord {
    const TABLE: &'static str = "users";
    fn key(&self) -> &str {
        &self.name
    }
}

/// An API session token. Only a SHA-256 of the token is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Hex SHA-256 of the bearer token.
    pub hash: String,
    /// Its user.
    pub user: String,
    /// Expiry, seconds since the epoch.
    pub expires_at: u64,
}

impl Record for TokenRecord {
    const TABLE: &'static str = "tokens";
    fn key(&self) -> &str {
        &self.hash
    }
}

/// One audited request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Sequence number (assigned by the store).
    pub seq: u64,
    /// Seconds since the epoch.
    pub time: u64,
    /// Who ("-" when unauthenticated).
    pub user: String,
    /// What ("POST /api/v1/vms/web/start").
    pub action: String,
    /// The object acted on, when known.
    pub target: String,
    /// "ok" or the error code and message.
    pub result: String,
}

/// An active alert: something the administrator should act on (SPEC A1, V6,
/// V7). Keyed by `kind:subject`, so raising the same alert again updates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertRecord {
    /// `kind:subject`, e.g. `vm_critical:vm/web`.
    pub id: String,
    /// What happened (`vm_crashed`, `vm_critical`, `guest_unresponsive`, ...).
    pub kind: String,
    /// `critical` or `warning`.
    pub severity: String,
    /// The object concerned (`vm/web`).
    pub subject: String,
    /// What happened, for people.
    pub message: String,
    /// What the administrator should do.
    pub action: String,
    /// First raised, seconds since the epoch.
    pub raised_at: u64,
    /// Last raised again.
    pub updated_at: u64,
    /// How many times it was raised.
    pub count: u32,
}

impl Record for AlertRecord {
    const TABLE: &'static str = "alerts";
    fn key(&self) -> &str {
        &self.id
    }
}

/// PM- and unit-wide settings (SPEC U9, V6, A6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Memory kept for the system, MiB (U9; default 1 GiB).
    pub memory_reserve_mib: u64,
    /// Threads kept for the system (U9; 2).
    pub reserved_threads: u32,
    /// QEMU accelerator (KVM on real hardware).
    pub accel: Accel,
    /// QEMU binary.
    pub qemu_binary: String,
    /// VM crash threshold (V6).
    pub vm_mtbf: MtbfThreshold,
    /// Seconds to wait for an ACPI shutdown before powering off.
    pub shutdown_timeout_secs: u64,
    /// Seconds without a guest agent before a VM counts as running (only for
    /// VMs whose instance check is `none`).
    pub boot_grace_secs: u64,
    /// Seconds between instance checks of running VMs.
    pub instance_check_interval_secs: u64,
    /// Time zone shown in the console (IANA name).
    pub timezone: String,
    /// V7 policy: restart a running guest whose instance check has failed
    /// for this many seconds (0: never; the alert is raised either way).
    pub unresponsive_restart_secs: u64,
    /// Live migration: maximum downtime at switch-over, ms (M1; 300).
    pub migration_max_downtime_ms: u64,
    /// Live migration: bandwidth cap, MB/s (0: unlimited).
    pub migration_bandwidth_mbps: u64,
    /// Live migration: whether post-copy may be used as a remedy (M3).
    pub migration_post_copy_allowed: bool,
    /// HA load balancing (L1, off by default): VMs without a preferred PM
    /// are spread over the PMs by memory.
    pub load_balancing: bool,
    /// S2: resync rate cap, MB/s (0: unlimited), applied live to every
    /// running mirror, so that a resync does not starve the VMs' own I/O.
    #[serde(default)]
    pub resync_rate_mbps: u64,
    /// A VM's console log is rotated above this size, MiB (one older
    /// generation kept): a guest printing without pause cannot fill the
    /// disk.
    #[serde(default = "default_console_log_max_mib")]
    pub console_log_max_mib: u64,
    /// Audit records kept at most on each PM (oldest dropped first).
    #[serde(default = "default_audit_max_records")]
    pub audit_max_records: u64,
    /// Audit records older than this many days are dropped.
    #[serde(default = "default_audit_max_days")]
    pub audit_max_days: u64,
}

fn default_audit_max_records() -> u64 {
    100_000
}

fn default_audit_max_days() -> u64 {
    365
}

fn default_console_log_max_mib() -> u64 {
    8
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            memory_reserve_mib: 1024,
            reserved_threads: 2,
            accel: Accel::Kvm,
            qemu_binary: "qemu-system-x86_64".into(),
            vm_mtbf: MtbfThreshold::VM_DEFAULT,
            shutdown_timeout_secs: 120,
            boot_grace_secs: 30,
            instance_check_interval_secs: 5,
            timezone: "UTC".into(),
            unresponsive_restart_secs: 0,
            migration_max_downtime_ms: 300,
            migration_bandwidth_mbps: 0,
            migration_post_copy_allowed: true,
            load_balancing: false,
            resync_rate_mbps: 0,
            console_log_max_mib: default_console_log_max_mib(),
            audit_max_records: default_audit_max_records(),
            audit_max_days: default_audit_max_days(),
        }
    }
}

/// Where a live migration between the PMs is (a workflow record in the unit
/// database: each PM acts on the phases that concern it, so that the
/// hand-over survives the loss of either side's memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// The source asked the destination to start a paused QEMU.
    Prepare,
    /// The destination QEMU listens for the migration stream.
    Ready,
    /// Memory is being copied.
    Copying,
    /// The source guest is paused, the disks handed over (host and primary
    /// replicas are now the destination's).
    Switchover,
    /// The VM runs on the destination.
    Done,
    /// It failed or was cancelled; `error` says why. The VM runs where
    /// `host` says.
    Failed,
}

/// A live migration (SPEC M1–M4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    /// The VM (one migration per VM at a time).
    pub vm: String,
    /// Unique id of this migration.
    pub id: String,
    /// Source PM.
    pub source: String,
    /// Destination PM.
    pub dest: String,
    /// Address the destination QEMU listens on (`host:port`).
    pub listen: String,
    /// Phase.
    pub phase: MigrationPhase,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Maximum downtime asked, ms.
    pub max_downtime_ms: u64,
    /// Bandwidth cap, bytes/s (0: unlimited).
    pub bandwidth_bps: u64,
    /// Auto-converge enabled from the start.
    pub auto_converge: bool,
    /// Post-copy possible (enabled on both QEMUs).
    pub post_copy: bool,
    /// Wall-clock ms when it started.
    pub started_at_ms: u64,
    /// Wall-clock ms when the source guest was paused for the switch-over.
    #[serde(default)]
    pub paused_at_ms: Option<u64>,
    /// Wall-clock ms when the destination guest resumed.
    #[serde(default)]
    pub resumed_at_ms: Option<u64>,
    /// QEMU's own downtime figure (guest stopped on the source → state
    /// sent, including the hand-over pause), ms.
    #[serde(default)]
    pub qemu_downtime_ms: Option<u64>,
    /// Wall-clock ms when the source saw the migration completed.
    #[serde(default)]
    pub completed_at_ms: Option<u64>,
    /// Wall-clock ms when the administrator paused the guest to finish
    /// (M3 remedy): the guest is down from then on, not only at switch-over.
    #[serde(default)]
    pub guest_paused_at_ms: Option<u64>,
    /// Total time, ms, once done.
    #[serde(default)]
    pub total_ms: Option<u64>,
}

impl Record for MigrationRecord {
    const TABLE: &'static str = "migrations";
    fn key(&self) -> &str {
        &self.vm
    }
}

impl MigrationRecord {
    /// Whether the migration is still under way.
    pub fn active(&self) -> bool {
        !matches!(self.phase, MigrationPhase::Done | MigrationPhase::Failed)
    }

    /// Downtime seen by the guest, ms: QEMU's figure (stopped on the source
    /// until the last state was sent, which includes the disk hand-over)
    /// plus the time the destination took to resume after that.
    pub fn downtime_ms(&self) -> Option<u64> {
        if let Some(p) = self.guest_paused_at_ms {
            return Some(self.resumed_at_ms?.saturating_sub(p));
        }
        let tail = self
            .resumed_at_ms?
            .saturating_sub(self.completed_at_ms.unwrap_or(self.resumed_at_ms?));
        Some(self.qemu_downtime_ms? + tail)
    }
}

/// A PM's maintenance state in the unit (SPEC U2–U4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PmStateRecord {
    /// PM name.
    pub name: String,
    /// State.
    pub state: pairvisor_model::pm::PmState,
    /// What a long operation (Work On) is doing, for the console.
    #[serde(default)]
    pub progress: Option<String>,
    /// Failures of this PM (U4).
    #[serde(default)]
    pub failures: MtbfCounter,
    /// Last change, seconds since the epoch.
    pub updated_at: u64,
}

impl Record for PmStateRecord {
    const TABLE: &'static str = "pm_states";
    fn key(&self) -> &str {
        &self.name
    }
}

/// Unit-wide power state (SPEC U5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnitPower {
    /// Normal operation.
    #[default]
    Running,
    /// Unit shutdown: VMs are being stopped, then the PMs.
    ShuttingDown,
    /// Shut down; the VMs listed start again when a PM comes back.
    Off,
}

/// The unit's power state and what to restart (SPEC U5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct UnitStateRecord {
    /// Power state.
    pub power: UnitPower,
    /// VMs that were running at shutdown (started again at unit start).
    #[serde(default)]
    pub restart_vms: Vec<String>,
    /// Progress of the shutdown/start, for the console.
    #[serde(default)]
    pub progress: Option<String>,
}

impl Record for UnitStateRecord {
    const TABLE: &'static str = "unit_state";
    fn key(&self) -> &str {
        "unit"
    }
}

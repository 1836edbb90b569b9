//! Requests the agent accepts and the views it returns. They are the JSON
//! bodies of the REST API, so they carry OpenAPI schemas.

use pairvisor_model::admission::{GuestType, Warning};
use pairvisor_model::mtbf::MtbfThreshold;
use pairvisor_store::{DirectKernel, InstanceCheck, VcdRecord, VolumeRecord};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A volume to create for a VM, or an existing unattached one to attach.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeRequest {
    /// Name of the volume (default for a new boot volume: `<vm>-boot`).
    #[serde(default)]
    pub name: Option<String>,
    /// Size in bytes of a new volume (a positive multiple of 1 MiB). Absent:
    /// attach the existing volume `name`.
    #[serde(default)]
    pub size_bytes: Option<u64>,
    /// Storage group for a new volume (default: `default`).
    #[serde(default)]
    pub group: Option<String>,
}

/// A network interface of a new VM.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicRequest {
    /// Network to attach to: `user` (NAT) is the only one until shared
    /// networks exist.
    #[serde(default = "default_network")]
    pub network: String,
    /// MAC address override; auto-assigned (52:54:00:xx:xx:xx) when absent.
    #[serde(default)]
    pub mac: Option<String>,
}

fn default_network() -> String {
    "user".into()
}

/// Direct kernel boot parameters.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KernelRequest {
    /// Absolute path of the kernel image on the PM.
    pub kernel: String,
    /// Absolute path of the initrd.
    #[serde(default)]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
}

impl From<KernelRequest> for DirectKernel {
    fn from(k: KernelRequest) -> Self {
        DirectKernel {
            kernel: k.kernel,
            initrd: k.initrd,
            cmdline: k.cmdline,
        }
    }
}

/// Create a VM (SPEC V1).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// Unique name: 1–64 of A-Z a-z 0-9 . _ - (not starting with . or -).
    pub name: String,
    /// Guest OS family (`linux-64`, `linux-32`, `windows-64`, `windows-32`,
    /// `other`): decides the memory minimum.
    #[serde(default)]
    #[schema(value_type = String)]
    pub guest_type: GuestType,
    /// vCPUs, 1–8.
    pub vcpus: u32,
    /// Memory, MiB (≥ 256; ≥ 600 for 64-bit guest types).
    pub memory_mib: u64,
    /// The boot volume.
    pub boot_volume: VolumeRequest,
    /// Data volumes.
    #[serde(default)]
    pub data_volumes: Vec<VolumeRequest>,
    /// Network interfaces.
    #[serde(default)]
    pub nics: Vec<NicRequest>,
    /// A VCD to insert into the CD drive.
    #[serde(default)]
    pub cdrom: Option<String>,
    /// Direct kernel boot.
    #[serde(default)]
    pub kernel: Option<KernelRequest>,
    /// `agent` (default) or `none`.
    #[serde(default)]
    #[schema(value_type = String)]
    pub instance_check: InstanceCheck,
    /// Per-VM crash threshold.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub mtbf_threshold: Option<MtbfThreshold>,
}

/// Re-provision a stopped VM (SPEC V5 Config). Everything is validated first
/// and applied in one transaction.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigVm {
    /// New vCPU count.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// New memory, MiB.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// New guest type.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub guest_type: Option<GuestType>,
    /// Volumes to create and attach, or existing unattached ones to attach.
    #[serde(default)]
    pub add_volumes: Vec<VolumeRequest>,
    /// Data volumes to detach, keeping their data.
    #[serde(default)]
    pub detach_volumes: Vec<String>,
    /// Data volumes to detach and delete.
    #[serde(default)]
    pub delete_volumes: Vec<String>,
    /// MAC overrides: NIC index → MAC.
    #[serde(default)]
    pub macs: Vec<MacOverride>,
    /// Interfaces to add.
    #[serde(default)]
    pub add_nics: Vec<NicRequest>,
}

/// A MAC address override for one NIC.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MacOverride {
    /// Index of the NIC (0-based).
    pub nic: usize,
    /// The new MAC.
    pub mac: String,
}

/// Guest health, reported separately from the process state (SPEC V7).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct GuestHealth {
    /// System check: the VM's QEMU process runs and answers QMP.
    pub system_ok: bool,
    /// Instance check: the guest agent answered its last ping (None: never
    /// asked, or the VM has no instance check).
    pub instance_ok: Option<bool>,
    /// When the guest last answered, seconds since the epoch.
    pub last_answer: Option<u64>,
    /// QEMU's run state (running, paused, guest-panicked, ...).
    pub run_state: Option<String>,
    /// Per virtio device, whether the guest's paravirtual driver is active
    /// (SPEC V8). Empty until the first check after boot.
    pub paravirtual: Vec<ParavirtualDevice>,
}

/// One virtio device and whether the guest drives it (SPEC V8).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ParavirtualDevice {
    /// QEMU device id or path.
    pub device: String,
    /// Device type (virtio-blk, virtio-net, virtio-serial, ...).
    pub kind: String,
    /// The guest driver set DRIVER_OK.
    pub driver_ok: bool,
}

/// A VM as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmView {
    /// Name.
    pub name: String,
    /// In a unit: the PM that runs it (or would start it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// In a unit: its preferred PM (L2), if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preferred_pm: Option<String>,
    /// In a unit, for a VM with a process: why it is not fully redundant
    /// (the VM `alert` of SPEC V4); absent when every volume is in sync.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redundancy_alert: Option<String>,
    /// Hardware id.
    pub id: String,
    /// State (SPEC V4).
    pub state: String,
    /// Activity column (installing, restarting, crashed, ...).
    pub activity: String,
    /// Operations allowed now.
    pub allowed_operations: Vec<String>,
    /// Guest type.
    pub guest_type: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Boot volume.
    pub boot_volume: String,
    /// Data volumes.
    pub data_volumes: Vec<String>,
    /// NICs: (network, MAC).
    pub nics: Vec<NicView>,
    /// VCD in the CD drive.
    pub cdrom: Option<String>,
    /// Direct kernel boot, if used.
    pub kernel: Option<KernelRequest>,
    /// Health checks (V7).
    pub health: GuestHealth,
    /// Crashes inside the MTBF window.
    pub recent_crashes: usize,
    /// Crash threshold in force.
    pub mtbf_max_failures: u32,
    /// Crash window in seconds.
    pub mtbf_window_secs: u64,
    /// Why it last crashed.
    pub last_crash: Option<String>,
    /// Last memory dump file.
    pub last_dump: Option<String>,
    /// QEMU's pid when a process runs.
    pub pid: Option<u32>,
}

/// One NIC in a [`VmView`].
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NicView {
    /// Network.
    pub network: String,
    /// MAC address.
    pub mac: String,
}

/// The outcome of an operation that may carry warnings.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OpResult {
    /// The VM after the operation.
    pub vm: VmView,
    /// Allowed-but-noteworthy conditions (e.g. vCPU over-provisioning).
    pub warnings: Vec<String>,
}

/// A volume as the API shows it (SPEC S6).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VolumeView {
    /// Name.
    pub name: String,
    /// Storage group.
    pub group: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// The VM it belongs to, or "none".
    pub vm: String,
    /// Whether it is its VM's boot volume.
    pub boot: bool,
    /// Sync state: "simplex" on a single PM (no partner to mirror to yet).
    pub sync: String,
    /// Bytes actually allocated on disk (sparse files).
    pub allocated_bytes: u64,
    /// In a unit: the PM whose replica is primary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// In a unit: the primary's epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// In a unit: this PM's replica as the mirror reports it (role, link
    /// state, dirty regions, resync progress with ETA, generation ids).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub replica: Option<serde_json::Value>,
    /// In a unit: a replica that may be behind — the primary acknowledged
    /// writes without it; it is never promoted without an administrator's
    /// "promote anyway" (ARCHITECTURE "Fencing").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outdated: Option<OutdatedView>,
}

/// A replica recorded as outdated (see [`VolumeView::outdated`]).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OutdatedView {
    /// The PM whose replica is behind.
    pub pm: String,
    /// The primary that wrote without it.
    pub by: String,
    /// When the pair was last known in sync (RFC 3339): later writes are
    /// missing on `pm`.
    pub since: String,
}

impl VolumeView {
    pub(crate) fn new(v: &VolumeRecord, boot: bool, allocated_bytes: u64) -> Self {
        VolumeView {
            name: v.name.clone(),
            group: v.group.clone(),
            size_bytes: v.size_bytes,
            vm: v.vm.clone().unwrap_or_else(|| "none".into()),
            boot,
            sync: "simplex".into(),
            allocated_bytes,
            primary: v.mirror.as_ref().map(|m| m.primary.clone()),
            epoch: v.mirror.as_ref().map(|m| m.epoch),
            replica: None,
            outdated: v
                .mirror
                .as_ref()
                .and_then(|m| m.outdated.as_ref())
                .map(|o| OutdatedView {
                    pm: o.pm.clone(),
                    by: o.by.clone(),
                    since: iso_time(o.since),
                }),
        }
    }
}

/// Create a volume.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    /// Name.
    pub name: String,
    /// Size in bytes (positive multiple of 1 MiB).
    pub size_bytes: u64,
    /// Storage group (default `default`).
    #[serde(default)]
    pub group: Option<String>,
}

/// A storage group as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StorageGroupView {
    /// Name.
    pub name: String,
    /// Directory.
    pub path: String,
    /// Capacity, bytes.
    pub capacity_bytes: u64,
    /// Sum of its volumes' sizes.
    pub used_bytes: u64,
    /// Capacity minus used.
    pub free_bytes: u64,
    /// Volumes in it.
    pub volumes: usize,
    /// S5 warnings.
    pub warnings: Vec<String>,
}

/// Create a storage group.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateStorageGroup {
    /// Name.
    pub name: String,
    /// Absolute directory (created if missing).
    pub path: String,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
}

/// A VCD as the API shows it (SPEC I1).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VcdView {
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Where it came from.
    pub source: String,
    /// VMs whose CD drive holds it.
    pub inserted_in: Vec<String>,
    /// True when no VM holds it.
    pub can_remove: bool,
}

impl VcdView {
    pub(crate) fn new(v: &VcdRecord, inserted_in: Vec<String>) -> Self {
        VcdView {
            name: v.name.clone(),
            size_bytes: v.size_bytes,
            source: v.source.clone(),
            can_remove: inserted_in.is_empty(),
            inserted_in,
        }
    }
}

/// Add a VCD from a file on the PM.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddVcd {
    /// Name.
    pub name: String,
    /// Absolute path of an ISO image on the PM.
    pub path: String,
}

/// This PM's resources and what is left for VMs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PmView {
    /// Host name.
    pub hostname: String,
    /// Hardware threads.
    pub threads: u32,
    /// Physical memory, MiB.
    pub memory_mib: u64,
    /// Memory reserved for the system, MiB.
    pub reserve_mib: u64,
    /// Memory available to VMs, MiB.
    pub vm_memory_capacity_mib: u64,
    /// Memory held by VMs now, MiB.
    pub vm_memory_used_mib: u64,
    /// vCPUs offered to VMs.
    pub vcpu_capacity: u32,
    /// vCPUs of VMs that hold a process.
    pub vcpus_used: u32,
    /// Volumes + VCDs, against the limit of 62.
    pub volumes_and_vcds: usize,
    /// QEMU version.
    pub qemu_version: Option<String>,
    /// Accelerator in use.
    pub accel: String,
    /// Current warnings.
    pub warnings: Vec<String>,
}

/// Renders warnings for the API.
pub(crate) fn warning_texts(w: &[Warning]) -> Vec<String> {
    w.iter().map(|w| w.to_string()).collect()
}

/// `secs` (since the Unix epoch) as an RFC 3339 UTC time, for messages.
pub(crate) fn iso_time(secs: u64) -> String {
    // Clamped below the year 10000, which RFC 3339 cannot write (the value
    // may come from a file's time or the partner's handshake).
    let secs = secs.min(253_402_300_799);
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

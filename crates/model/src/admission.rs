//! Admission rules: what fits on a PM (SPEC V2, V3, U9, S5).

use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

/// At most this many vCPUs per VM (V2).
pub const MAX_VCPUS: u32 = 8;
/// At most this many volumes and VCDs together per unit (S5).
pub const MAX_VOLUMES_AND_VCDS: usize = 62;
/// Warn when a storage group has less free space than this (S5).
pub const LOW_FREE_SPACE_BYTES: u64 = 5 * GIB;
/// Memory granularity accepted for VMs.
pub const MIB: u64 = 1024 * 1024;
/// One GiB in bytes.
pub const GIB: u64 = 1024 * MIB;

/// The guest operating system family; decides the memory minimum (V3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum GuestType {
    /// 64-bit Linux.
    #[serde(rename = "linux-64")]
    Linux64,
    /// 32-bit Linux.
    #[serde(rename = "linux-32")]
    Linux32,
    /// 64-bit Windows.
    #[serde(rename = "windows-64")]
    Windows64,
    /// 32-bit Windows.
    #[serde(rename = "windows-32")]
    Windows32,
    /// Anything else (appliances, small test guests); treated as 32-bit.
    #[default]
    #[serde(rename = "other")]
    Other,
}

impl GuestType {
    /// Smallest memory the guest type may be given, in MiB (V3).
    pub fn min_memory_mib(self) -> u64 {
        match self {
            GuestType::Linux64 | GuestType::Windows64 => 600,
            _ => 256,
        }
    }

    /// Name used in the API and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            GuestType::Linux64 => "linux-64",
            GuestType::Linux32 => "linux-32",
            GuestType::Windows64 => "windows-64",
            GuestType::Windows32 => "windows-32",
            GuestType::Other => "other",
        }
    }
}

impl fmt::Display for GuestType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the system keeps for itself on each PM (U9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemReserve {
    /// Hardware threads reserved (SPEC: 2).
    pub threads: u32,
    /// Memory reserved, MiB (default 1 GiB, recommended 2 GiB).
    pub memory_mib: u64,
}

impl Default for SystemReserve {
    fn default() -> Self {
        SystemReserve {
            threads: 2,
            memory_mib: 1024,
        }
    }
}

/// A PM's hardware, as far as admission cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmResources {
    /// Hardware threads.
    pub threads: u32,
    /// Physical memory, MiB.
    pub memory_mib: u64,
}

/// Memory available to VMs: the smallest PM's memory minus the reserve (V3).
pub fn vm_memory_capacity_mib(pms: &[PmResources], reserve: SystemReserve) -> u64 {
    pms.iter()
        .map(|p| p.memory_mib)
        .min()
        .unwrap_or(0)
        .saturating_sub(reserve.memory_mib)
}

/// vCPUs a PM offers to VMs: one per thread minus the reserved ones (V2).
pub fn vcpu_capacity(pm: PmResources, reserve: SystemReserve) -> u32 {
    pm.threads.saturating_sub(reserve.threads)
}

/// A VM that holds resources (running, booting, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// VM name.
    pub name: String,
    /// Its vCPUs.
    pub vcpus: u32,
    /// Its memory, MiB.
    pub memory_mib: u64,
}

/// A request refused by an admission rule.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AdmissionError {
    /// vCPUs outside 1..=8.
    #[error("{vcpus} vCPUs requested; a VM has between 1 and {MAX_VCPUS} vCPUs")]
    VcpuCount {
        /// What was asked.
        vcpus: u32,
    },
    /// Memory below the guest type's minimum.
    #[error(
        "{memory_mib} MiB of memory is too little for guest type {guest_type}; \
         the minimum is {min_mib} MiB"
    )]
    MemoryTooSmall {
        /// What was asked.
        memory_mib: u64,
        /// The guest type.
        guest_type: GuestType,
        /// Its minimum.
        min_mib: u64,
    },
    /// Memory larger than the PM could ever offer.
    #[error(
        "{memory_mib} MiB of memory is more than this unit can give any VM \
         ({capacity_mib} MiB: the smaller PM's memory minus the {reserve_mib} MiB system reserve)"
    )]
    MemoryTooLarge {
        /// What was asked.
        memory_mib: u64,
        /// Memory available to all VMs together.
        capacity_mib: u64,
        /// The system reserve.
        reserve_mib: u64,
    },
    /// Not enough free memory to start now.
    #[error("{}", insufficient_text(.needed_mib, .free_mib, .holders))]
    InsufficientMemory {
        /// What the VM needs.
        needed_mib: u64,
        /// What is free.
        free_mib: u64,
        /// Which VMs hold memory now.
        holders: Vec<Holder>,
    },
    /// The unit would exceed 62 volumes and VCDs.
    #[error(
        "the unit already has {existing} volumes and VCDs; adding {adding} would exceed \
         the limit of {MAX_VOLUMES_AND_VCDS}. Remove unused volumes or VCDs first"
    )]
    TooManyVolumes {
        /// Volumes and VCDs now.
        existing: usize,
        /// How many would be added.
        adding: usize,
    },
    /// Not enough free space in the storage group.
    #[error(
        "storage group '{group}' has {free} bytes free; {needed} bytes are needed. \
         Choose a smaller size or another storage group"
    )]
    NoSpace {
        /// The group.
        group: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes free.
        free: u64,
    },
    /// Not enough free space on a PM's file system for a file (an upload,
    /// a copy, a memory dump), keeping [`FILE_RESERVE`] free.
    #[error(
        "not enough free space for {what} in {dir}: {needed} bytes are needed and {free} are \
         free, of which {reserve} are kept for the state database and logs. Free space (remove \
         old memory dumps or VCDs) and try again"
    )]
    NoFileSpace {
        /// What was to be written.
        what: String,
        /// Where.
        dir: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes free.
        free: u64,
        /// Bytes kept free.
        reserve: u64,
    },
    /// Zero-sized or misaligned volume.
    #[error("volume size {size} bytes is not allowed; give a positive multiple of 1 MiB")]
    VolumeSize {
        /// What was asked.
        size: u64,
    },
}

fn insufficient_text(needed: &u64, free: &u64, holders: &[Holder]) -> String {
    let missing = needed.saturating_sub(*free);
    let mut s = format!(
        "not enough memory: the VM needs {needed} MiB, {free} MiB is free, {missing} MiB is missing"
    );
    if holders.is_empty() {
        s.push_str("; no VM holds memory — lower the VM's memory or the system reserve");
    } else {
        let list: Vec<String> = holders
            .iter()
            .map(|h| format!("{} ({} MiB)", h.name, h.memory_mib))
            .collect();
        s.push_str(&format!(
            "; memory is held by {} — stop one of them or lower this VM's memory",
            list.join(", ")
        ));
    }
    s
}

/// A condition that is allowed but that the administrator should see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Warning {
    /// More vCPUs run than the PM offers; CPU is shared (V2).
    VcpuOverprovisioned {
        /// vCPUs of running VMs including the new one.
        total_vcpus: u32,
        /// vCPUs the PM offers.
        capacity: u32,
    },
    /// A storage group is low on free space (S5).
    LowFreeSpace {
        /// The group.
        group: String,
        /// Bytes free.
        free: u64,
    },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::VcpuOverprovisioned {
                total_vcpus,
                capacity,
            } => write!(
                f,
                "vCPUs over-provisioned: running VMs have {total_vcpus} vCPUs and the PM \
                 offers {capacity}; CPU is shared in proportion to vCPUs"
            ),
            Warning::LowFreeSpace { group, free } => write!(
                f,
                "storage group '{group}' has only {:.1} GiB free (less than 5 GiB); \
                 keep space for VCDs and new volumes",
                *free as f64 / GIB as f64
            ),
        }
    }
}

/// Checks a VM's vCPU count (V2).
pub fn check_vcpus(vcpus: u32) -> Result<(), AdmissionError> {
    if (1..=MAX_VCPUS).contains(&vcpus) {
        Ok(())
    } else {
        Err(AdmissionError::VcpuCount { vcpus })
    }
}

/// Checks a VM's memory size against its guest type and the unit (V3).
pub fn check_memory_size(
    memory_mib: u64,
    guest_type: GuestType,
    capacity_mib: u64,
    reserve: SystemReserve,
) -> Result<(), AdmissionError> {
    let min_mib = guest_type.min_memory_mib();
    if memory_mib < min_mib {
        return Err(AdmissionError::MemoryTooSmall {
            memory_mib,
            guest_type,
            min_mib,
        });
    }
    if memory_mib > capacity_mib {
        return Err(AdmissionError::MemoryTooLarge {
            memory_mib,
            capacity_mib,
            reserve_mib: reserve.memory_mib,
        });
    }
    Ok(())
}

/// Decides whether a VM with `vcpus` and `memory_mib` may start next to the
/// `running` VMs. Memory is never over-provisioned (V3); vCPUs may be, with a
/// warning (V2).
pub fn check_start(
    vcpus: u32,
    memory_mib: u64,
    capacity_mib: u64,
    vcpu_capacity: u32,
    running: &[Holder],
) -> Result<Vec<Warning>, AdmissionError> {
    let used: u64 = running.iter().map(|h| h.memory_mib).sum();
    let free_mib = capacity_mib.saturating_sub(used);
    if memory_mib > free_mib {
        return Err(AdmissionError::InsufficientMemory {
            needed_mib: memory_mib,
            free_mib,
            holders: running.to_vec(),
        });
    }
    let total_vcpus = running.iter().map(|h| h.vcpus).sum::<u32>() + vcpus;
    let mut warnings = Vec::new();
    if total_vcpus > vcpu_capacity {
        warnings.push(Warning::VcpuOverprovisioned {
            total_vcpus,
            capacity: vcpu_capacity,
        });
    }
    Ok(warnings)
}

/// Checks the unit-wide volume+VCD limit (S5).
pub fn check_volume_count(existing: usize, adding: usize) -> Result<(), AdmissionError> {
    if existing + adding > MAX_VOLUMES_AND_VCDS {
        Err(AdmissionError::TooManyVolumes { existing, adding })
    } else {
        Ok(())
    }
}

/// Space kept free on a PM's data file system when files are written there
/// (uploads, copies, memory dumps): the state database and the logs must
/// never be the ones that find the disk full.
pub const FILE_RESERVE: u64 = 128 * MIB;

/// Checks that `needed` more bytes fit in `dir`, whose file system has
/// `free` bytes available, keeping [`FILE_RESERVE`].
pub fn check_file_space(
    what: &str,
    dir: &str,
    needed: u64,
    free: u64,
) -> Result<(), AdmissionError> {
    if needed > free.saturating_sub(FILE_RESERVE) {
        return Err(AdmissionError::NoFileSpace {
            what: what.to_string(),
            dir: dir.to_string(),
            needed,
            free,
            reserve: FILE_RESERVE,
        });
    }
    Ok(())
}

/// Checks that a new volume of `size` bytes can be placed in `group`.
pub fn check_volume_size(group: &str, size: u64, free: u64) -> Result<(), AdmissionError> {
    if size == 0 || !size.is_multiple_of(MIB) {
        return Err(AdmissionError::VolumeSize { size });
    }
    if size > free {
        return Err(AdmissionError::NoSpace {
            group: group.to_string(),
            needed: size,
            free,
        });
    }
    Ok(())
}

/// The S5 low-space warning for a storage group, if it applies.
pub fn free_space_warning(group: &str, free: u64) -> Option<Warning> {
    (free < LOW_FREE_SPACE_BYTES).then(|| Warning::LowFreeSpace {
        group: group.to_string(),
        free,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(name: &str, vcpus: u32, memory_mib: u64) -> Holder {
        Holder {
            name: name.into(),
            vcpus,
            memory_mib,
        }
    }

    #[test]
    fn guest_type_json_names_match_as_str() {
        for gt in [
            GuestType::Linux64,
            GuestType::Linux32,
            GuestType::Windows64,
            GuestType::Windows32,
            GuestType::Other,
        ] {
            let json = format!("\"{}\"", gt.as_str());
            assert_eq!(serde_json_like(gt), json);
        }
    }

    fn serde_json_like(gt: GuestType) -> String {
        serde_json::to_string(&gt).unwrap()
    }

    #[test]
    fn vcpu_table() {
        for (n, ok) in [(0, false), (1, true), (8, true), (9, false), (64, false)] {
            assert_eq!(check_vcpus(n).is_ok(), ok, "{n}");
        }
    }

    #[test]
    fn capacity_is_smaller_pm_minus_reserve() {
        // SPEC V3's example: 16 GiB and 8 GiB PMs → 8 − 1 = 7 GiB.
        let pms = [
            PmResources {
                threads: 16,
                memory_mib: 16384,
            },
            PmResources {
                threads: 8,
                memory_mib: 8192,
            },
        ];
        assert_eq!(vm_memory_capacity_mib(&pms, SystemReserve::default()), 7168);
        assert_eq!(vcpu_capacity(pms[1], SystemReserve::default()), 6);
    }

    #[test]
    fn memory_size_table() {
        let r = SystemReserve::default();
        let cases: &[(u64, GuestType, Option<&str>)] = &[
            (256, GuestType::Other, None),
            (255, GuestType::Linux32, Some("minimum is 256 MiB")),
            (599, GuestType::Linux64, Some("minimum is 600 MiB")),
            (600, GuestType::Windows64, None),
            (7168, GuestType::Other, None),
            (7169, GuestType::Other, Some("more than this unit can give")),
        ];
        for (mem, gt, err) in cases {
            let res = check_memory_size(*mem, *gt, 7168, r);
            match (res, err) {
                (Ok(()), None) => {}
                (Err(e), Some(m)) => assert!(e.to_string().contains(m), "{mem} {gt}: {e}"),
                (res, _) => panic!("{mem} {gt}: {res:?}"),
            }
        }
    }

    #[test]
    fn start_refused_names_missing_memory_and_holders() {
        let running = [holder("db", 2, 4096), holder("web", 1, 2048)];
        let err = check_start(1, 2048, 7168, 6, &running).unwrap_err();
        assert_eq!(
            err.to_string(),
            "not enough memory: the VM needs 2048 MiB, 1024 MiB is free, 1024 MiB is missing; \
             memory is held by db (4096 MiB), web (2048 MiB) — stop one of them or lower this \
             VM's memory"
        );
        assert_eq!(check_start(1, 1024, 7168, 6, &running), Ok(vec![]));
    }

    #[test]
    fn vcpu_overprovisioning_is_a_warning() {
        let running = [holder("a", 4, 512)];
        let w = check_start(4, 512, 7168, 6, &running).unwrap();
        assert_eq!(
            w,
            vec![Warning::VcpuOverprovisioned {
                total_vcpus: 8,
                capacity: 6
            }]
        );
        assert!(w[0].to_string().contains("over-provisioned"));
        assert!(check_start(2, 512, 7168, 6, &running).unwrap().is_empty());
    }

    #[test]
    fn volume_rules() {
        assert!(check_volume_count(61, 1).is_ok());
        assert!(check_volume_count(62, 1)
            .unwrap_err()
            .to_string()
            .contains("limit of 62"));
        assert!(check_volume_size("sg", MIB, GIB).is_ok());
        assert!(check_volume_size("sg", 0, GIB).is_err());
        assert!(check_volume_size("sg", MIB + 1, GIB).is_err());
        let e = check_volume_size("sg", 2 * GIB, GIB).unwrap_err();
        assert!(e.to_string().contains("storage group 'sg'"), "{e}");
        assert!(free_space_warning("sg", 4 * GIB).is_some());
        assert!(free_space_warning("sg", 5 * GIB).is_none());
    }

    #[test]
    fn files_keep_the_reserve_free() {
        assert!(check_file_space("a dump", "/d", 100 * MIB, 228 * MIB).is_ok());
        let e = check_file_space("a dump", "/d", 100 * MIB + 1, 228 * MIB).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("a dump in /d") && m.contains("remove old memory dumps"),
            "{m}"
        );
        assert!(check_file_space("x", "/d", u64::MAX, u64::MAX).is_err());
    }
}

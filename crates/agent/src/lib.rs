//! The PM agent: owns this PM's VMs, volumes, storage groups and VCDs.
//!
//! Every administrator operation is checked against the model (names, SPEC V4
//! table, admission rules) *before* anything changes, then applied to the
//! store in one transaction and to QEMU. A monitor task per QEMU process turns
//! hypervisor events into life-cycle transitions (crash → restart or
//! critical, guest shutdown → stopped, instance check → running).
//!
//! State-changing work is serialised by one async lock (`ops`): operations
//! are short (long ones — ACPI shutdown, dumps — continue in background tasks
//! that take the lock again for each transition), and a single writer keeps
//! the store and the set of QEMU processes consistent.

mod alerts;
mod console;
mod error;
mod migrate;
mod paths;
mod safety;
mod splitbrain;
mod storage;
mod types;
mod unit;

pub use alerts::Severity;
pub use error::{AgentError, Result};
pub use migrate::{MigrateRequest, MigrationEstimate, MigrationView, RemedyRequest};
pub use paths::{private_tree, Paths, PrivacyReport};
pub use safety::{LossReport, PromoteAnywayReport, PromoteAnywayRequest, TakeoverPlan};
pub use splitbrain::{ResolveRequest, SplitBrainView, SplitSide};
pub use types::*;
pub use unit::{LocalReplica, PartnerLink, ReplicaReport, Takeover, UnitLink, UnitTls};

use pairvisor_hypervisor::{QemuVm, QmpEvent};
use pairvisor_model::admission::{self, Holder, PmResources, SystemReserve};
use pairvisor_model::mac::Mac;
use pairvisor_model::names::validate_name;
use pairvisor_model::vm::{self, Operation, VmEvent, VmState};
use pairvisor_store::{Settings, Store, VcdRecord, VmRecord, VolumeRecord};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, Mutex};
use tracing::{info, warn};

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A life-cycle change, broadcast for live updates and tests.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentEvent {
    /// The VM.
    pub vm: String,
    /// Its new state.
    pub state: VmState,
    /// What happened, for people.
    pub message: String,
}

/// Why we expect a QEMU process to go away; anything else is a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Intent {
    /// Nothing asked: an exit is a crash unless the guest powered off.
    None,
    /// ACPI shutdown sent.
    Shutdown,
    /// Power off asked.
    PowerOff,
    /// We are killing it to restart it (dump, crash restart).
    Restart,
    /// This PM lost its lease (SPEC U6): killed without a state change; it
    /// starts again here when the lease returns, or on the partner.
    Fenced,
    /// Live-migrated away: the VM runs on the partner now.
    Migrated,
}

/// A QEMU process we manage.
pub(crate) struct Running {
    qemu: QemuVm,
    intent: StdMutex<Intent>,
    /// The guest itself powered off (SHUTDOWN event with guest=true).
    guest_shutdown: StdMutex<bool>,
    health: StdMutex<GuestHealth>,
    /// Since when the instance check has been failing (V7).
    failing_since: StdMutex<Option<u64>>,
    /// Why we killed it, when we kill it as a crash (unresponsive guest).
    crash_reason: StdMutex<Option<String>>,
    /// Distinguishes this process from a later one of the same VM, so that a
    /// stale monitor does not act on its successor.
    generation: u64,
}

struct Inner {
    store: Store,
    paths: Paths,
    host: PmResources,
    ops: Mutex<()>,
    running: StdMutex<HashMap<String, Arc<Running>>>,
    events: broadcast::Sender<AgentEvent>,
    generation: std::sync::atomic::AtomicU64,
    /// The unit layer, once this PM is in a unit.
    unit: StdMutex<Option<Arc<dyn UnitLink>>>,
    /// Local mirror replicas (unit mode).
    mirrors: unit::Mirrors,
    /// Serialises mirror reconciliation.
    mirror_ops: Mutex<()>,
    /// Live migrations (unit mode).
    migrations: migrate::Migrations,
    /// Last redundancy verdict per VM (unit mode), to alert on changes.
    redundancy: StdMutex<HashMap<String, Option<String>>>,
    /// Unit mode: 1 + the lease term in which this PM last passed a read
    /// barrier (0: never), so that it promotes replicas and starts VMs only
    /// on records current for this term (a fenced PM's return must not act
    /// on old records).
    caught_up_term: std::sync::atomic::AtomicU64,
}

/// The agent of one PM. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

/// Reads the host's threads and memory.
pub fn host_resources() -> PmResources {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0);
    PmResources {
        threads,
        memory_mib,
    }
}

impl Agent {
    /// Opens the agent on `paths`, creating the default storage group on
    /// first use, and re-attaches to QEMU processes that outlived a previous
    /// daemon (see [`Agent::recover`]).
    pub async fn open(paths: Paths, store: Store) -> Result<Agent> {
        let agent = Self::open_deferred(paths, store).await?;
        agent.recover().await;
        Ok(agent)
    }

    /// Like [`Agent::open`] without re-attaching to VMs: for a PM in a unit,
    /// [`Agent::set_unit`] does that once it knows which VMs are its own.
    pub async fn open_deferred(paths: Paths, store: Store) -> Result<Agent> {
        paths.create_all().map_err(AgentError::io(format!(
            "creating {}",
            paths.root().display()
        )))?;
        let (events, _) = broadcast::channel(256);
        let agent = Agent {
            inner: Arc::new(Inner {
                store,
                paths,
                host: host_resources(),
                ops: Mutex::new(()),
                running: StdMutex::new(HashMap::new()),
                events,
                generation: Default::default(),
                unit: StdMutex::new(None),
                mirrors: Default::default(),
                mirror_ops: Mutex::new(()),
                migrations: Default::default(),
                redundancy: Default::default(),
                caught_up_term: std::sync::atomic::AtomicU64::new(0),
            }),
        };
        agent.ensure_default_group()?;
        Ok(agent)
    }

    /// The state database.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The data directory layout.
    pub fn paths(&self) -> &Paths {
        &self.inner.paths
    }

    /// Subscribes to life-cycle events.
    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.inner.events.subscribe()
    }

    fn settings(&self) -> Result<Settings> {
        Ok(self.inner.store.settings()?)
    }

    fn emit(&self, vm: &str, state: VmState, message: impl Into<String>) {
        let message = message.into();
        info!(vm, %state, "{message}");
        let _ = self.inner.events.send(AgentEvent {
            vm: vm.to_string(),
            state,
            message,
        });
    }

    fn running(&self, vm: &str) -> Option<Arc<Running>> {
        self.inner.running.lock().ok()?.get(vm).cloned()
    }

    /// Loads a record of any kind, or a not-found error naming its kind.
    pub(crate) fn load<T: pairvisor_store::Record>(
        &self,
        kind: &'static str,
        name: &str,
    ) -> Result<T> {
        self.inner
            .store
            .get::<T>(name)?
            .ok_or_else(|| AgentError::NotFound {
                kind,
                name: name.to_string(),
            })
    }

    /// Loads a VM for an operation that must run on its host PM.
    fn load_vm_here(&self, name: &str) -> Result<VmRecord> {
        let rec = self.load_vm(name)?;
        self.check_mine(&rec)?;
        Ok(rec)
    }

    fn load_vm(&self, name: &str) -> Result<VmRecord> {
        self.load("VM", name)
    }

    fn save_vm(&self, rec: &VmRecord) -> Result<()> {
        self.inner.store.write(|tx| tx.put(rec))?;
        Ok(())
    }

    fn set_state(&self, rec: &mut VmRecord, event: VmEvent, message: &str) -> Result<()> {
        let next =
            vm::next_state(rec.state, event).map_err(|e| AgentError::Conflict(e.to_string()))?;
        rec.state = next;
        self.save_vm(rec)?;
        self.emit(&rec.name, next, message);
        Ok(())
    }

    // ----------------------------------------------------------------- views

    /// Lists VMs.
    pub fn list_vms(&self) -> Result<Vec<VmView>> {
        let settings = self.settings()?;
        let vms: Vec<VmRecord> = self.inner.store.list()?;
        Ok(vms.iter().map(|v| self.view(v, &settings)).collect())
    }

    /// Shows one VM.
    pub fn get_vm(&self, name: &str) -> Result<VmView> {
        let settings = self.settings()?;
        Ok(self.view(&self.load_vm(name)?, &settings))
    }

    fn view(&self, v: &VmRecord, settings: &Settings) -> VmView {
        let threshold = v.mtbf_threshold.unwrap_or(settings.vm_mtbf);
        let run = self.running(&v.name);
        let health = run
            .as_ref()
            .and_then(|r| r.health.lock().ok().map(|h| h.clone()))
            .unwrap_or_default();
        VmView {
            name: v.name.clone(),
            host: v.host.clone(),
            preferred_pm: v.preferred_pm.clone(),
            redundancy_alert: if v.state.has_process() {
                self.redundancy_gap(v)
            } else {
                None
            },
            id: v.id.clone(),
            state: v.state.to_string(),
            activity: v.state.activity().to_string(),
            allowed_operations: vm::allowed_operations(v.state)
                .iter()
                .map(|o| o.as_str().to_string())
                .collect(),
            guest_type: v.guest_type.to_string(),
            vcpus: v.vcpus,
            memory_mib: v.memory_mib,
            boot_volume: v.boot_volume.clone(),
            data_volumes: v.data_volumes.clone(),
            nics: v
                .nics
                .iter()
                .map(|n| NicView {
                    network: n.network.clone(),
                    mac: n.mac.to_string(),
                })
                .collect(),
            cdrom: v.cdrom.clone(),
            kernel: v.kernel.as_ref().map(|k| KernelRequest {
                kernel: k.kernel.clone(),
                initrd: k.initrd.clone(),
                cmdline: k.cmdline.clone(),
            }),
            health,
            recent_crashes: v.mtbf.count(now(), threshold),
            mtbf_max_failures: threshold.max_failures,
            mtbf_window_secs: threshold.window_secs,
            last_crash: v.last_crash.clone(),
            last_dump: v.last_dump.clone(),
            pid: run.map(|r| r.qemu.pid() as u32),
        }
    }

    /// VMs that hold memory and vCPUs now (a QEMU process exists or is about
    /// to be restarted).
    fn holders(&self, except: &str) -> Result<Vec<Holder>> {
        let vms: Vec<VmRecord> = self.inner.store.list()?;
        Ok(vms
            .iter()
            .filter(|v| v.name != except && (v.state.has_process() || v.state == VmState::Crashed))
            .map(|v| Holder {
                name: v.name.clone(),
                vcpus: v.vcpus,
                memory_mib: v.memory_mib,
            })
            .collect())
    }

    fn reserve(settings: &Settings) -> SystemReserve {
        SystemReserve {
            threads: settings.reserved_threads,
            memory_mib: settings.memory_reserve_mib,
        }
    }

    /// V3: the VM's memory against its guest type and this unit.
    fn check_memory_size(
        &self,
        memory_mib: u64,
        guest_type: admission::GuestType,
        settings: &Settings,
    ) -> Result<()> {
        Ok(admission::check_memory_size(
            memory_mib,
            guest_type,
            self.memory_capacity(settings),
            Self::reserve(settings),
        )?)
    }

    /// V2/V3: may `rec` start next to the VMs that hold resources now?
    fn admit_start(&self, rec: &VmRecord, settings: &Settings) -> Result<Vec<admission::Warning>> {
        Ok(admission::check_start(
            rec.vcpus,
            rec.memory_mib,
            self.memory_capacity(settings),
            admission::vcpu_capacity(self.inner.host, Self::reserve(settings)),
            &self.holders(&rec.name)?,
        )?)
    }

    fn memory_capacity(&self, settings: &Settings) -> u64 {
        admission::vm_memory_capacity_mib(&[self.inner.host], Self::reserve(settings))
    }

    /// This PM's resources and warnings.
    pub async fn pm_view(&self) -> Result<PmView> {
        let settings = self.settings()?;
        let holders = self.holders("")?;
        let vcpu_capacity = admission::vcpu_capacity(self.inner.host, Self::reserve(&settings));
        let vcpus_used: u32 = holders.iter().map(|h| h.vcpus).sum();
        let mut warnings = Vec::new();
        if vcpus_used > vcpu_capacity {
            warnings.push(
                admission::Warning::VcpuOverprovisioned {
                    total_vcpus: vcpus_used,
                    capacity: vcpu_capacity,
                }
                .to_string(),
            );
        }
        for g in self.list_storage_groups()? {
            warnings.extend(g.warnings);
        }
        for vm in self.list_vms()? {
            let missing: Vec<String> = vm
                .health
                .paravirtual
                .iter()
                .filter(|d| !d.driver_ok)
                .map(|d| format!("{} ({})", d.kind, d.device))
                .collect();
            if vm.state == "running" && !missing.is_empty() {
                warnings.push(format!(
                    "VM '{}' runs without paravirtual drivers for {}: disk and network are \
                     slow and live migration may not be clean; install the virtio drivers in the guest",
                    vm.name,
                    missing.join(", ")
                ));
            }
        }
        let qemu_version =
            pairvisor_hypervisor::qemu_version(std::path::Path::new(&settings.qemu_binary))
                .await
                .ok()
                .map(|v| v.to_string());
        Ok(PmView {
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            threads: self.inner.host.threads,
            memory_mib: self.inner.host.memory_mib,
            reserve_mib: settings.memory_reserve_mib,
            vm_memory_capacity_mib: self.memory_capacity(&settings),
            vm_memory_used_mib: holders.iter().map(|h| h.memory_mib).sum(),
            vcpu_capacity,
            vcpus_used,
            volumes_and_vcds: self.volume_and_vcd_count()?,
            qemu_version,
            accel: format!("{:?}", settings.accel).to_lowercase(),
            warnings,
        })
    }

    // ----------------------------------------------------------- create/remove

    /// Creates a VM (stopped). Volumes named in the request are created or
    /// attached; everything is validated before anything is written.
    pub async fn create_vm(&self, req: CreateVm) -> Result<VmView> {
        let _g = self.inner.ops.lock().await;
        let settings = self.settings()?;
        validate_name("VM", &req.name)?;
        if self.inner.store.get::<VmRecord>(&req.name)?.is_some() {
            return Err(AgentError::AlreadyExists {
                kind: "VM",
                name: req.name,
            });
        }
        admission::check_vcpus(req.vcpus)?;
        self.check_memory_size(req.memory_mib, req.guest_type, &settings)?;
        if let Some(cd) = &req.cdrom {
            self.load_vcd(cd)?;
        }
        if let Some(k) = &req.kernel {
            self.check_host_file("kernel", &k.kernel)?;
            if let Some(i) = &k.initrd {
                self.check_host_file("initrd", i)?;
            }
            if k.cmdline.contains('\0') {
                return Err(AgentError::Invalid(
                    "kernel command line contains a NUL byte".into(),
                ));
            }
        }
        let nics = req
            .nics
            .iter()
            .map(nic_record)
            .collect::<Result<Vec<_>>>()?;

        let mut boot = req.boot_volume.clone();
        if boot.name.is_none() && boot.size_bytes.is_some() {
            boot.name = Some(format!("{}-boot", req.name));
        }
        let mut wanted = vec![boot];
        wanted.extend(req.data_volumes.iter().cloned());
        let plan = self.plan_volumes(&wanted, &req.name)?;

        let rec = VmRecord {
            name: req.name.clone(),
            id: uuid::Uuid::new_v4().to_string(),
            guest_type: req.guest_type,
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            boot_volume: plan[0].name.clone(),
            data_volumes: plan[1..].iter().map(|p| p.name.clone()).collect(),
            nics,
            cdrom: req.cdrom.clone(),
            kernel: req.kernel.clone().map(Into::into),
            instance_check: req.instance_check,
            state: VmState::Stopped,
            mtbf: Default::default(),
            mtbf_threshold: req.mtbf_threshold,
            last_crash: None,
            last_dump: None,
            created_at: now(),
            host: self.pm_name(),
            preferred_pm: None,
        };
        self.apply_volume_plan(&plan, |tx| tx.put(&rec).map_err(Into::into))?;
        self.reconcile_mirrors().await;
        self.emit(&rec.name, rec.state, "VM created");
        Ok(self.view(&rec, &settings))
    }

    /// Removes a VM: its boot volume always, its data volumes only when
    /// `delete_data_volumes` (otherwise they are detached and kept).
    pub async fn remove_vm(&self, name: &str, delete_data_volumes: bool) -> Result<()> {
        let rec = self.load_vm_here(name)?;
        vm::check_operation(name, rec.state, Operation::Remove)?;
        if rec.state == VmState::Stopping {
            self.power_off(name).await?;
        }
        let _g = self.inner.ops.lock().await;
        let rec = self.load_vm_here(name)?;
        vm::check_operation(name, rec.state, Operation::Remove)?;
        let mut delete = vec![rec.boot_volume.clone()];
        if delete_data_volumes {
            delete.extend(rec.data_volumes.iter().cloned());
        }
        let volumes: Vec<VolumeRecord> = self.inner.store.list()?;
        let files = self.inner.store.write(|tx| {
            tx.delete::<VmRecord>(name)?;
            let mut files = Vec::new();
            for v in volumes.iter().filter(|v| v.vm.as_deref() == Some(name)) {
                if delete.contains(&v.name) {
                    tx.delete::<VolumeRecord>(&v.name)?;
                    if v.mirror.is_none() {
                        files.push(self.volume_path(v)?);
                    }
                } else {
                    let mut v = v.clone();
                    v.vm = None;
                    tx.put(&v)?;
                }
            }
            Ok::<_, AgentError>(files)
        })?;
        for f in files {
            if let Err(e) = std::fs::remove_file(&f) {
                warn!(file = %f.display(), "could not delete volume file: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(self.inner.paths.vm_run_dir(&rec.id));
        drop(_g);
        self.reconcile_mirrors().await;
        self.clear_alerts_about(&format!("vm/{name}"));
        self.emit(name, VmState::Stopped, "VM removed");
        Ok(())
    }

    // -------------------------------------------------------------- life cycle

    /// Starts a stopped VM. Returns warnings (e.g. vCPU over-provisioning).
    pub async fn start(&self, name: &str) -> Result<OpResult> {
        self.start_inner(name, Operation::Start, None).await
    }

    /// Starts a stopped VM once from `vcd`, which is inserted in its CD drive.
    pub async fn boot_from_cd(&self, name: &str, vcd: &str) -> Result<OpResult> {
        self.start_inner(name, Operation::BootFromCd, Some(vcd))
            .await
    }

    async fn start_inner(&self, name: &str, op: Operation, cd: Option<&str>) -> Result<OpResult> {
        let _g = self.inner.ops.lock().await;
        let settings = self.settings()?;
        let mut rec = self.load_vm_here(name)?;
        vm::check_operation(name, rec.state, op)?;
        if !self.holds_lease() {
            return Err(AgentError::Conflict(
                "this PM does not hold its lease (it cannot reach a majority of the unit), so it                  may not start VMs (SPEC U6); restore the links, or force quorum if the partner                  is gone"
                    .into(),
            ));
        }
        if let Some(cd) = cd {
            self.load_vcd(cd)?;
            rec.cdrom = Some(cd.to_string());
        }
        let warnings = self.admit_start(&rec, &settings)?;
        self.launch(&mut rec, &settings, cd.is_some()).await?;
        self.set_state(&mut rec, VmEvent::Launched, "VM started")?;
        Ok(OpResult {
            vm: self.view(&rec, &settings),
            warnings: types::warning_texts(&warnings),
        })
    }

    /// ACPI shutdown; powers off after the shutdown timeout.
    pub async fn shutdown(&self, name: &str) -> Result<VmView> {
        let _g = self.inner.ops.lock().await;
        let settings = self.settings()?;
        let mut rec = self.load_vm_here(name)?;
        vm::check_operation(name, rec.state, Operation::Shutdown)?;
        let run = self.running(name).ok_or_else(|| no_process(name))?;
        *run.intent.lock().unwrap_or_else(|e| e.into_inner()) = Intent::Shutdown;
        bounded("ACPI shutdown", run.qemu.system_powerdown()).await?;
        self.set_state(&mut rec, VmEvent::ShutdownSent, "ACPI shutdown sent")?;
        let agent = self.clone();
        let name = name.to_string();
        let timeout = Duration::from_secs(settings.shutdown_timeout_secs);
        let generation = run.generation;
        tokio::spawn(async move {
            if run.qemu.wait_exit(timeout).await.is_err() {
                let still = agent
                    .running(&name)
                    .is_some_and(|r| r.generation == generation);
                if still {
                    warn!(vm = %name, "guest did not shut down in time; powering off");
                    let _ = agent.power_off(&name).await;
                }
            }
        });
        Ok(self.view(&rec, &settings))
    }

    /// Stops the VM immediately (memory state discarded).
    pub async fn power_off(&self, name: &str) -> Result<VmView> {
        let run = {
            let _g = self.inner.ops.lock().await;
            let rec = self.load_vm_here(name)?;
            vm::check_operation(name, rec.state, Operation::PowerOff)?;
            let run = self.running(name);
            if let Some(run) = &run {
                *run.intent.lock().unwrap_or_else(|e| e.into_inner()) = Intent::PowerOff;
            }
            run
        };
        if let Some(run) = run {
            stop_process(&run.qemu).await;
        }
        // The monitor records `stopped` when it sees the exit; make sure it
        // has before answering, so that the caller sees the final state.
        let _g = self.inner.ops.lock().await;
        let mut rec = self.load_vm_here(name)?;
        if rec.state != VmState::Stopped {
            self.forget(name);
            self.set_state(&mut rec, VmEvent::Stopped, "VM powered off")?;
        }
        Ok(self.view(&rec, &self.settings()?))
    }

    /// Writes the guest's memory to a dump file, then restarts the VM.
    pub async fn dump(&self, name: &str) -> Result<VmView> {
        let _g = self.inner.ops.lock().await;
        let settings = self.settings()?;
        let mut rec = self.load_vm_here(name)?;
        vm::check_operation(name, rec.state, Operation::Dump)?;
        let run = self.running(name).ok_or_else(|| no_process(name))?;
        // The dump holds the guest's whole memory.
        let dump_dir = self.inner.paths.dump_dir();
        self.check_file_space(
            &format!("the memory dump of {name}"),
            &dump_dir,
            rec.memory_mib.saturating_mul(1 << 20),
        )?;
        let file = dump_dir.join(format!("{}-{}.elf", rec.name, now()));
        self.set_state(&mut rec, VmEvent::DumpStarted, "memory dump started")?;
        let agent = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let result = run
                .qemu
                .dump_guest_memory(&file, Duration::from_secs(3600), |_| {})
                .await;
            let _g = agent.inner.ops.lock().await;
            let Ok(mut rec) = agent.load_vm(&name) else {
                return;
            };
            if rec.state != VmState::Dumping {
                return; // powered off meanwhile
            }
            match result {
                Ok(_) => rec.last_dump = Some(file.display().to_string()),
                Err(e) => warn!(vm = %name, "memory dump failed: {e}"),
            }
            *run.intent.lock().unwrap_or_else(|e| e.into_inner()) = Intent::Restart;
            stop_process(&run.qemu).await;
            agent.forget(&name);
            if let Err(e) = agent
                .relaunch(&mut rec, "restarted after memory dump")
                .await
            {
                warn!(vm = %name, "restart after dump failed: {e}");
            }
        });
        Ok(self.view(&rec, &settings))
    }

    /// Restarts a critical VM and clears its crash counter.
    pub async fn reset_device(&self, name: &str) -> Result<VmView> {
        let _g = self.inner.ops.lock().await;
        let settings = self.settings()?;
        let mut rec = self.load_vm_here(name)?;
        vm::check_operation(name, rec.state, Operation::ResetDevice)?;
        self.admit_start(&rec, &settings)?;
        rec.mtbf.reset();
        rec.last_crash = None;
        self.clear_alert("vm_critical", &format!("vm/{name}"));
        self.clear_alert("vm_crashed", &format!("vm/{name}"));
        self.launch(&mut rec, &settings, false).await?;
        self.set_state(&mut rec, VmEvent::Launched, "reset device: VM restarted")?;
        Ok(self.view(&rec, &settings))
    }

    /// Inserts a VCD into the VM's CD drive (running or not).
    pub async fn insert_cd(&self, name: &str, vcd: &str) -> Result<VmView> {
        let _g = self.inner.ops.lock().await;
        let mut rec = self.load_vm_here(name)?;
        vm::check_operation(name, rec.state, Operation::ChangeCd)?;
        let cd = self.load_vcd(vcd)?;
        if let Some(run) = self.running(name) {
            bounded(
                "inserting the CD",
                run.qemu.insert_cdrom(std::path::Path::new(&cd.file)),
            )
            .await?;
        }
        rec.cdrom = Some(vcd.to_string());
        self.save_vm(&rec)?;
        Ok(self.view(&rec, &self.settings()?))
    }

    /// Ejects the VM's CD.
    pub async fn eject_cd(&self, name: &str) -> Result<VmView> {
        let _g = self.inner.ops.lock().await;
        let mut rec = self.load_vm_here(name)?;
        vm::check_operation(name, rec.state, Operation::ChangeCd)?;
        if rec.cdrom.is_none() {
            return Err(AgentError::Conflict(format!(
                "VM '{name}' has no CD inserted"
            )));
        }
        if let Some(run) = self.running(name) {
            bounded("ejecting the CD", run.qemu.eject_cdrom()).await?;
        }
        rec.cdrom = None;
        self.save_vm(&rec)?;
        Ok(self.view(&rec, &self.settings()?))
    }

    /// Re-provisions a stopped VM (SPEC V5 Config).
    pub async fn config_vm(&self, name: &str, req: ConfigVm) -> Result<VmView> {
        let _g = self.inner.ops.lock().await;
        let settings = self.settings()?;
        let mut rec = self.load_vm_here(name)?;
        vm::check_operation(name, rec.state, Operation::Config)?;
        if let Some(n) = req.vcpus {
            admission::check_vcpus(n)?;
            rec.vcpus = n;
        }
        if let Some(gt) = req.guest_type {
            rec.guest_type = gt;
        }
        if let Some(m) = req.memory_mib {
            rec.memory_mib = m;
        }
        self.check_memory_size(rec.memory_mib, rec.guest_type, &settings)?;
        let mut detach: Vec<String> = Vec::new();
        for (list, delete) in [(&req.detach_volumes, false), (&req.delete_volumes, true)] {
            for v in list.iter() {
                let what = if delete { "delete" } else { "detach" };
                if *v == rec.boot_volume {
                    return Err(AgentError::Conflict(format!(
                        "volume '{v}' is the boot volume of VM '{name}'; it cannot be {what}d \
                         (remove the VM to delete it)"
                    )));
                }
                if !rec.data_volumes.contains(v) {
                    return Err(AgentError::Invalid(format!(
                        "cannot {what} volume '{v}': it is not a data volume of VM '{name}' \
                         (its data volumes: {})",
                        list_or_none(&rec.data_volumes)
                    )));
                }
                if detach.contains(v) {
                    return Err(AgentError::Invalid(format!(
                        "volume '{v}' is named twice in the detach/delete lists"
                    )));
                }
                detach.push(v.clone());
            }
        }
        for o in &req.macs {
            let mac: Mac = o
                .mac
                .parse()
                .map_err(|e: pairvisor_model::mac::MacError| AgentError::Invalid(e.to_string()))?;
            let count = rec.nics.len();
            let nic = rec.nics.get_mut(o.nic).ok_or_else(|| {
                AgentError::Invalid(format!(
                    "NIC index {} does not exist; VM '{name}' has {count} NIC(s)",
                    o.nic
                ))
            })?;
            nic.mac = mac;
        }
        for n in &req.add_nics {
            rec.nics.push(nic_record(n)?);
        }
        let plan = self.plan_volumes(&req.add_volumes, name)?;
        rec.data_volumes.retain(|v| !detach.contains(v));
        rec.data_volumes.extend(plan.iter().map(|p| p.name.clone()));
        let volumes: Vec<VolumeRecord> = self.inner.store.list()?;
        let mut delete_files = Vec::new();
        for v in volumes
            .iter()
            .filter(|v| req.delete_volumes.contains(&v.name))
        {
            delete_files.push(self.volume_path(v)?);
        }
        self.apply_volume_plan(&plan, |tx| {
            for v in volumes.iter().filter(|v| detach.contains(&v.name)) {
                if req.delete_volumes.contains(&v.name) {
                    tx.delete::<VolumeRecord>(&v.name)?;
                } else {
                    let mut v = v.clone();
                    v.vm = None;
                    tx.put(&v)?;
                }
            }
            tx.put(&rec)?;
            Ok(())
        })?;
        for f in delete_files {
            let _ = std::fs::remove_file(f);
        }
        self.reconcile_mirrors().await;
        self.emit(name, rec.state, "VM re-configured");
        Ok(self.view(&rec, &settings))
    }

    /// Reads the tail of the VM's serial console log: at most `max_bytes`
    /// from the end, and the offset where the returned text ends (for
    /// following).
    pub fn console_log(
        &self,
        name: &str,
        from: Option<u64>,
        max_bytes: u64,
    ) -> Result<(Vec<u8>, u64)> {
        let rec = self.load_vm_here(name)?;
        let path = self.inner.paths.vm_run_dir(&rec.id).join("console.log");
        console::read(&path, from, max_bytes).map_err(AgentError::io("reading the console log"))
    }

    /// The VNC socket of a running VM (for the console bridge).
    pub fn vnc_socket(&self, name: &str) -> Result<PathBuf> {
        let rec = self.load_vm_here(name)?;
        vm::check_operation(name, rec.state, Operation::Console)?;
        Ok(self.inner.paths.vm_run_dir(&rec.id).join("vnc.sock"))
    }

    /// The serial console socket of a running VM (interactive console).
    pub fn console_socket(&self, name: &str) -> Result<PathBuf> {
        let rec = self.load_vm_here(name)?;
        vm::check_operation(name, rec.state, Operation::Console)?;
        Ok(self.inner.paths.vm_run_dir(&rec.id).join("console.sock"))
    }

    // -------------------------------------------------------------- internals

    fn forget(&self, name: &str) {
        if let Ok(mut m) = self.inner.running.lock() {
            m.remove(name);
        }
    }

    fn spec_for(
        &self,
        rec: &VmRecord,
        settings: &Settings,
        boot_cd: bool,
    ) -> Result<pairvisor_hypervisor::VmSpec> {
        use pairvisor_hypervisor::{Accel, Disk, DiskSource, KernelBoot, Nic, NicBackend, VmSpec};
        // Checked again here, not only when set: it is run as root.
        pairvisor_model::names::validate_qemu_binary(&settings.qemu_binary)
            .map_err(AgentError::Invalid)?;
        let volumes: Vec<VolumeRecord> = self.inner.store.list()?;
        let mut disks = Vec::new();
        for (i, vname) in rec.volumes().enumerate() {
            let v =
                volumes
                    .iter()
                    .find(|v| &v.name == vname)
                    .ok_or_else(|| AgentError::NotFound {
                        kind: "volume",
                        name: vname.clone(),
                    })?;
            let source = if v.mirror.is_some() && self.unit().is_some() {
                // Unit mode: the local primary replica, over NBD.
                let socket = self.nbd_socket(vname).ok_or_else(|| {
                    AgentError::Conflict(format!(
                        "the local replica of volume '{vname}' is not open on this PM yet; \
                         check the volume's mirror status and retry"
                    ))
                })?;
                DiskSource::NbdUnix {
                    socket,
                    export: vname.clone(),
                }
            } else {
                DiskSource::RawFile {
                    path: self.volume_path(v)?,
                }
            };
            disks.push(Disk {
                id: format!("disk{i}"),
                source,
                read_only: false,
            });
        }
        let cdrom = match &rec.cdrom {
            Some(cd) => Some(PathBuf::from(self.load_vcd(cd)?.file)),
            None => None,
        };
        let mut spec = VmSpec::new(&rec.name, &rec.id, rec.vcpus, rec.memory_mib);
        spec.accel = match settings.accel {
            pairvisor_store::Accel::Kvm => Accel::Kvm,
            pairvisor_store::Accel::Tcg => Accel::Tcg,
        };
        spec.disks = disks;
        spec.cdrom = cdrom;
        spec.boot_once_cdrom = boot_cd;
        // Checked again at every launch: QEMU (root) reads these files.
        if let Some(k) = &rec.kernel {
            self.check_host_file("kernel", &k.kernel)?;
            if let Some(i) = &k.initrd {
                self.check_host_file("initrd", i)?;
            }
        }
        spec.kernel_boot = rec.kernel.as_ref().map(|k| KernelBoot {
            kernel: PathBuf::from(&k.kernel),
            initrd: k.initrd.as_ref().map(PathBuf::from),
            cmdline: k.cmdline.clone(),
        });
        spec.nics = rec
            .nics
            .iter()
            .map(|n| Nic {
                mac: n.mac.to_string(),
                backend: NicBackend::User,
            })
            .collect();
        spec.pvpanic = true;
        spec.guest_agent = true;
        spec.vnc = true;
        Ok(spec)
    }

    /// Launches QEMU for `rec` and starts its monitor. Does not change the
    /// record's state.
    async fn launch(&self, rec: &mut VmRecord, settings: &Settings, boot_cd: bool) -> Result<()> {
        let spec = self.spec_for(rec, settings, boot_cd)?;
        let run_dir = self.inner.paths.vm_run_dir(&rec.id);
        let qemu = QemuVm::launch(std::path::Path::new(&settings.qemu_binary), &spec, &run_dir)
            .await
            .map_err(|e| AgentError::Hypervisor(e.to_string()))?;
        self.adopt(rec, qemu);
        Ok(())
    }

    /// Registers a QEMU process for `rec` and spawns its monitor.
    fn adopt(&self, rec: &VmRecord, qemu: QemuVm) {
        let generation = self
            .inner
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let run = Arc::new(Running {
            qemu,
            intent: StdMutex::new(Intent::None),
            guest_shutdown: StdMutex::new(false),
            health: StdMutex::new(GuestHealth {
                system_ok: true,
                ..Default::default()
            }),
            failing_since: StdMutex::new(None),
            crash_reason: StdMutex::new(None),
            generation,
        });
        if let Ok(mut m) = self.inner.running.lock() {
            m.insert(rec.name.clone(), run.clone());
        }
        let agent = self.clone();
        let name = rec.name.clone();
        tokio::spawn(async move { agent.monitor(name, run).await });
    }

    /// Launches again after a crash or a dump (state → booting).
    async fn relaunch(&self, rec: &mut VmRecord, why: &str) -> Result<()> {
        let settings = self.settings()?;
        self.launch(rec, &settings, false).await?;
        self.set_state(rec, VmEvent::Launched, why)
    }

    /// Watches one QEMU process until it is gone.
    async fn monitor(self, name: String, run: Arc<Running>) {
        let mut events = run.qemu.subscribe();
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_check = 0u64;
        let launched = now();
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Ok(QmpEvent::GuestPanicked { .. }) => {
                        self.on_exit(&name, &run, Some("guest kernel panicked")).await;
                        return;
                    }
                    Ok(QmpEvent::Shutdown { guest, .. }) => {
                        if guest {
                            *run.guest_shutdown.lock().unwrap_or_else(|e| e.into_inner()) = true;
                        }
                    }
                    Ok(QmpEvent::Disconnected) | Err(broadcast::error::RecvError::Closed) => {
                        self.on_exit(&name, &run, None).await;
                        return;
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                },
                _ = ticker.tick() => {
                    if !self.still_current(&name, &run) {
                        return;
                    }
                    self.rotate_console(&name).await;
                    let state = self.load_vm(&name).map(|r| r.state).ok();
                    let interval = self.settings().map(|s| s.instance_check_interval_secs).unwrap_or(5);
                    let due = state == Some(VmState::Booting) || now().saturating_sub(last_check) >= interval;
                    if due {
                        last_check = now();
                        self.instance_check(&name, &run, launched).await;
                    }
                }
            }
        }
    }

    /// Caps the VM's console log (a guest printing without pause must not
    /// fill the disk), off the async runtime.
    async fn rotate_console(&self, name: &str) {
        let Ok(rec) = self.load_vm(name) else { return };
        let cap = self
            .settings()
            .map(|s| s.console_log_max_mib)
            .unwrap_or(Settings::default().console_log_max_mib)
            .saturating_mul(1 << 20);
        let log = self.inner.paths.vm_run_dir(&rec.id).join("console.log");
        let r = tokio::task::spawn_blocking(move || console::rotate_if_over(&log, cap)).await;
        match r {
            Ok(Ok(true)) => tracing::debug!(vm = %name, "console log rotated"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => warn!(vm = %name, "rotating the console log: {e}"),
            Err(e) => warn!(vm = %name, "rotating the console log: {e}"),
        }
    }

    fn still_current(&self, name: &str, run: &Arc<Running>) -> bool {
        self.running(name)
            .is_some_and(|r| r.generation == run.generation)
    }

    /// V7: asks the guest agent whether the guest is up; the first answer
    /// moves a booting VM to running.
    async fn instance_check(&self, name: &str, run: &Arc<Running>, launched: u64) {
        let Ok(rec) = self.load_vm(name) else { return };
        let settings = self.settings().unwrap_or_default();
        // Bounded: a hung QEMU must not hang its monitor.
        let bound = Duration::from_secs(2);
        let status = match tokio::time::timeout(bound, run.qemu.status()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("QMP did not answer".to_string()),
        };
        let answered = match rec.instance_check {
            pairvisor_store::InstanceCheck::Agent => Some(
                run.qemu
                    .guest_ping(Duration::from_millis(800))
                    .await
                    .is_ok(),
            ),
            pairvisor_store::InstanceCheck::None => None,
        };
        // V8: which virtio devices the guest drives. Only meaningful once the
        // guest has had time to load its drivers.
        let paravirtual = if rec.state == VmState::Running {
            tokio::time::timeout(bound, run.qemu.query_virtio_drivers())
                .await
                .ok()
                .and_then(|r| r.ok())
                .map(|devs| {
                    devs.into_iter()
                        .map(|d| ParavirtualDevice {
                            device: d.device_id.unwrap_or(d.path),
                            kind: d.name,
                            driver_ok: d.driver_ok,
                        })
                        .collect::<Vec<_>>()
                })
        } else {
            None
        };
        if let Ok(mut h) = run.health.lock() {
            if let Some(p) = paravirtual {
                h.paravirtual = p;
            }
            h.system_ok = status.is_ok();
            h.run_state = status
                .as_ref()
                .ok()
                .map(|s| format!("{s:?}").to_lowercase());
            h.instance_ok = answered;
            if answered == Some(true) {
                h.last_answer = Some(now());
            }
        }
        if rec.state == VmState::Running {
            self.judge_instance_check(&rec.name, run, answered, &settings);
        }
        let up = match answered {
            Some(a) => a,
            None => now().saturating_sub(launched) >= settings.boot_grace_secs,
        };
        if rec.state == VmState::Booting && up {
            let _g = self.inner.ops.lock().await;
            if !self.still_current(name, run) {
                return;
            }
            if let Ok(mut rec) = self.load_vm(name) {
                if rec.state == VmState::Booting {
                    let _ = self.set_state(&mut rec, VmEvent::GuestUp, "guest is up");
                }
            }
        }
    }

    /// V7: a running guest that stops answering raises an alert; with the
    /// restart policy on, it is treated as a crash after the configured time.
    fn judge_instance_check(
        &self,
        name: &str,
        run: &Arc<Running>,
        answered: Option<bool>,
        settings: &Settings,
    ) {
        let subject = format!("vm/{name}");
        let mut since = run.failing_since.lock().unwrap_or_else(|e| e.into_inner());
        match answered {
            Some(false) => {
                let start = *since.get_or_insert(now());
                let failing = now().saturating_sub(start);
                // Three missed checks before alerting: one slow answer is noise.
                if failing >= 3 * settings.instance_check_interval_secs {
                    self.raise_alert(
                        "guest_unresponsive",
                        &subject,
                        Severity::Warning,
                        format!("VM '{name}' runs but its guest has not answered for {failing} s"),
                        "Open the VM's console to see why; dump its memory if it is hung, or \
                         restart it",
                    );
                }
                let policy = settings.unresponsive_restart_secs;
                let already = run
                    .crash_reason
                    .lock()
                    .map(|r| r.is_some())
                    .unwrap_or(false);
                if policy > 0 && failing >= policy && !already {
                    *run.crash_reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!(
                        "guest stopped answering its instance check for {failing} s"
                    ));
                    let _ = run.qemu.kill();
                }
            }
            Some(true) => {
                let was_failing = since.take().is_some();
                if was_failing {
                    self.clear_alert("guest_unresponsive", &subject);
                }
            }
            None => {}
        }
    }

    /// The QEMU process is gone, or the guest panicked: decide between
    /// stopped, crashed-and-restart, and critical.
    async fn on_exit(&self, name: &str, run: &Arc<Running>, panic: Option<&str>) {
        let _g = self.inner.ops.lock().await;
        if !self.still_current(name, run) {
            return;
        }
        let intent = *run.intent.lock().unwrap_or_else(|e| e.into_inner());
        let guest_off = *run.guest_shutdown.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(mut rec) = self.load_vm(name) else {
            return;
        };
        let clean =
            panic.is_none() && (matches!(intent, Intent::Shutdown | Intent::PowerOff) || guest_off);
        if matches!(intent, Intent::Restart | Intent::Fenced | Intent::Migrated) {
            return; // whoever killed it relaunches it
        }
        if clean {
            self.forget(name);
            let msg = if guest_off {
                "guest powered off"
            } else {
                "VM powered off"
            };
            let _ = self.set_state(&mut rec, VmEvent::Stopped, msg);
            return;
        }
        let killed_for = run
            .crash_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let reason = panic
            .map(str::to_string)
            .or(killed_for)
            .unwrap_or_else(|| "QEMU process exited unexpectedly".to_string());
        if panic.is_some() {
            stop_process(&run.qemu).await;
        }
        self.forget(name);
        self.crash(&mut rec, &reason).await;
    }

    /// V6: count the crash; restart unless the threshold is exceeded.
    async fn crash(&self, rec: &mut VmRecord, reason: &str) {
        let settings = self.settings().unwrap_or_default();
        let threshold = rec.mtbf_threshold.unwrap_or(settings.vm_mtbf);
        let critical = rec.mtbf.record(now(), threshold);
        rec.last_crash = Some(reason.to_string());
        let msg = if critical {
            format!(
                "VM crashed ({reason}) more than {} times in {} s: critical, stays down until \
                 Reset Device",
                threshold.max_failures, threshold.window_secs
            )
        } else {
            format!("VM crashed ({reason}); restarting it")
        };
        if let Err(e) = self.set_state(rec, VmEvent::Crashed { critical }, &msg) {
            warn!(vm = %rec.name, "cannot record crash: {e}");
            return;
        }
        let subject = format!("vm/{}", rec.name);
        self.clear_alert("guest_unresponsive", &subject);
        if critical {
            self.clear_alert("vm_crashed", &subject);
            self.raise_alert(
                "vm_critical",
                &subject,
                Severity::Critical,
                msg,
                "Read the VM's console log and last crash reason, fix the cause, then use Reset \
                 Device to start it again",
            );
            return;
        }
        self.raise_alert(
            "vm_crashed",
            &subject,
            Severity::Warning,
            format!(
                "VM '{}' crashed ({reason}) and was restarted automatically",
                rec.name
            ),
            "Check the VM's console log; acknowledge this alert once understood",
        );
        if let Err(e) = self.relaunch(rec, "restarted after crash").await {
            warn!(vm = %rec.name, "restart after crash failed: {e}");
            // A VM that cannot even be launched stays down instead of
            // being retried forever.
            rec.last_crash = Some(format!("restart failed: {e}"));
            let _ = self.set_state(rec, VmEvent::Crashed { critical: true }, "restart failed");
            self.raise_alert(
                "vm_critical",
                &subject,
                Severity::Critical,
                format!("VM '{}' crashed and could not be restarted: {e}", rec.name),
                "Fix the cause shown, then use Reset Device",
            );
        }
    }

    /// After a daemon restart: re-attach to QEMU processes that kept running,
    /// and settle VMs whose process disappeared meanwhile.
    pub async fn recover(&self) {
        let Ok(vms) = self.inner.store.list::<VmRecord>() else {
            return;
        };
        let unit = self.unit().is_some();
        for mut rec in vms {
            if !self.is_mine(&rec) {
                // Hosted by the partner now (a takeover while this daemon
                // was down): a QEMU left here must not run on.
                if let Ok(qemu) = QemuVm::attach(&self.inner.paths.vm_run_dir(&rec.id)).await {
                    warn!(vm = %rec.name, "stopping a stale QEMU: the VM is hosted by the partner");
                    stop_process(&qemu).await;
                }
                continue;
            }
            if unit && !rec.state.has_process() {
                continue;
            }
            if unit && rec.state != VmState::Stopping {
                // In a unit, processes that are gone are started by
                // `ensure_running` once the lease is held, not here.
                if let Ok(qemu) = QemuVm::attach(&self.inner.paths.vm_run_dir(&rec.id)).await {
                    info!(vm = %rec.name, pid = qemu.pid(), "re-attached to running QEMU");
                    self.adopt(&rec, qemu);
                }
                continue;
            }
            if rec.state == VmState::Crashed {
                let _g = self.inner.ops.lock().await;
                if let Err(e) = self.relaunch(&mut rec, "restarted after crash").await {
                    warn!(vm = %rec.name, "restart after crash failed: {e}");
                }
                continue;
            }
            if !rec.state.has_process() {
                continue;
            }
            let run_dir = self.inner.paths.vm_run_dir(&rec.id);
            match QemuVm::attach(&run_dir).await {
                Ok(qemu) => {
                    info!(vm = %rec.name, pid = qemu.pid(), "re-attached to running QEMU");
                    self.adopt(&rec, qemu);
                    if let Some(run) = self.running(&rec.name) {
                        let intent = match rec.state {
                            VmState::Stopping => Intent::Shutdown,
                            _ => Intent::None,
                        };
                        *run.intent.lock().unwrap_or_else(|e| e.into_inner()) = intent;
                    }
                    if rec.state == VmState::Dumping {
                        // The dump was started by the previous daemon; its end
                        // cannot be observed any more: restart the VM.
                        let _g = self.inner.ops.lock().await;
                        if let Some(run) = self.running(&rec.name) {
                            *run.intent.lock().unwrap_or_else(|e| e.into_inner()) = Intent::Restart;
                            stop_process(&run.qemu).await;
                        }
                        self.forget(&rec.name);
                        let _ = self.relaunch(&mut rec, "restarted after memory dump").await;
                    }
                }
                Err(e) => {
                    let _g = self.inner.ops.lock().await;
                    if rec.state == VmState::Stopping {
                        let _ = self.set_state(
                            &mut rec,
                            VmEvent::Stopped,
                            "VM stopped while the daemon was down",
                        );
                    } else {
                        warn!(vm = %rec.name, "QEMU is gone: {e}");
                        self.crash(&mut rec, "QEMU process ended while the daemon was down")
                            .await;
                    }
                }
            }
        }
    }

    /// Stops monitoring without touching QEMU (daemon shutdown): the VMs keep
    /// running and the next daemon re-attaches.
    pub fn detach_all(&self) {
        if let Ok(mut m) = self.inner.running.lock() {
            m.clear();
        }
    }
}

/// How long an operation waits for QEMU to answer QMP before giving up: a
/// hung QEMU must never hang an operation (which holds the agent's lock).
const QMP_BOUND: Duration = Duration::from_secs(10);

/// Runs a QMP call with [`QMP_BOUND`].
async fn bounded<T, E: std::fmt::Display>(
    what: &str,
    fut: impl std::future::Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(QMP_BOUND, fut).await {
        Ok(r) => r.map_err(|e| AgentError::Hypervisor(format!("{what}: {e}"))),
        Err(_) => Err(AgentError::Hypervisor(format!(
            "{what}: QEMU did not answer within {} s; the VM may be hung — power it off",
            QMP_BOUND.as_secs()
        ))),
    }
}

/// Asks QEMU to quit, then kills it if it does not; waits until it is gone.
pub(crate) async fn stop_process(qemu: &QemuVm) {
    let _ = tokio::time::timeout(Duration::from_secs(5), qemu.quit()).await;
    if qemu.wait_exit(Duration::from_secs(5)).await.is_err() {
        let _ = qemu.kill();
        let _ = qemu.wait_exit(Duration::from_secs(10)).await;
    }
}

fn no_process(name: &str) -> AgentError {
    AgentError::Conflict(format!(
        "VM '{name}' has no QEMU process although its state says so; power it off and start it again"
    ))
}

fn nic_record(n: &NicRequest) -> Result<pairvisor_store::NicRecord> {
    if n.network != "user" {
        return Err(AgentError::Invalid(format!(
            "network '{}' does not exist; the only network on a single PM is 'user' (NAT)",
            n.network
        )));
    }
    let mac = match &n.mac {
        Some(m) => m
            .parse()
            .map_err(|e: pairvisor_model::mac::MacError| AgentError::Invalid(e.to_string()))?,
        None => Mac::from_random(rand::random()),
    };
    Ok(pairvisor_store::NicRecord {
        mac,
        network: n.network.clone(),
    })
}

impl Agent {
    /// A host file an API call names (kernel, initrd, VCD source): it must
    /// be in an import directory.
    pub(crate) fn check_host_file(&self, what: &str, path: &str) -> Result<()> {
        self.inner
            .paths
            .check_import(what, path)
            .map(|_| ())
            .map_err(AgentError::Invalid)
    }
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

impl Agent {
    fn load_vcd(&self, name: &str) -> Result<VcdRecord> {
        self.load("VCD", name)
    }
}

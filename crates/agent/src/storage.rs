//! Storage groups, volumes (sparse raw files) and VCDs on this PM.
//!
//! Capacity is accounted logically: a volume's full size counts against its
//! group even though its file is sparse, so that a group can never be
//! over-committed and fill its disk under a running guest.

use crate::error::{AgentError, Result};
use crate::types::*;
use crate::{now, Agent};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use pairvisor_model::admission;
use pairvisor_model::names::validate_name;
use pairvisor_store::{StorageGroupRecord, Tx, VcdRecord, VmRecord, VolumeRecord};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// A volume a request will create or attach.
pub(crate) struct PlannedVolume {
    pub name: String,
    /// `Some((group, size))` for a new volume; `None` to attach an existing one.
    pub new: Option<(String, u64)>,
}

/// Bytes available to unprivileged users on the file system holding `path`.
pub(crate) fn fs_available(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable
    // memory large enough for a statvfs; we read it only when the call
    // reports success, which means it was filled in.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so the struct is initialised.
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

impl Agent {
    pub(crate) fn ensure_default_group(&self) -> Result<()> {
        let groups: Vec<StorageGroupRecord> = self.store().list()?;
        if !groups.is_empty() {
            return Ok(());
        }
        let dir = self.paths().default_storage();
        std::fs::create_dir_all(&dir).map_err(AgentError::io(format!(
            "creating storage directory {}",
            dir.display()
        )))?;
        // The default group gets what the file system can hold, in whole MiB.
        let avail = fs_available(&dir).unwrap_or(0) / admission::MIB * admission::MIB;
        let g = StorageGroupRecord {
            name: "default".into(),
            path: dir.display().to_string(),
            capacity_bytes: avail,
        };
        self.store().write(|tx| tx.put(&g))?;
        Ok(())
    }

    pub(crate) fn volume_path(&self, v: &VolumeRecord) -> Result<PathBuf> {
        if v.mirror.is_some() && self.unit().is_some() {
            return Ok(self.replica_dir(v)?.join("data.raw"));
        }
        let g = self.load_group(&v.group)?;
        Ok(Path::new(&g.path).join(format!("{}.raw", v.name)))
    }

    fn load_group(&self, name: &str) -> Result<StorageGroupRecord> {
        self.load("storage group", name)
    }

    pub(crate) fn volume_and_vcd_count(&self) -> Result<usize> {
        Ok(self.store().list::<VolumeRecord>()?.len() + self.store().list::<VcdRecord>()?.len())
    }

    /// Storage groups with usage.
    pub fn list_storage_groups(&self) -> Result<Vec<StorageGroupView>> {
        let groups: Vec<StorageGroupRecord> = self.store().list()?;
        let volumes: Vec<VolumeRecord> = self.store().list()?;
        Ok(groups
            .into_iter()
            .map(|g| {
                let mine: Vec<&VolumeRecord> =
                    volumes.iter().filter(|v| v.group == g.name).collect();
                let used: u64 = mine.iter().map(|v| v.size_bytes).sum();
                let free = g.capacity_bytes.saturating_sub(used);
                StorageGroupView {
                    warnings: admission::free_space_warning(&g.name, free)
                        .map(|w| vec![w.to_string()])
                        .unwrap_or_default(),
                    name: g.name,
                    path: g.path,
                    capacity_bytes: g.capacity_bytes,
                    used_bytes: used,
                    free_bytes: free,
                    volumes: mine.len(),
                }
            })
            .collect())
    }

    /// Creates a storage group in a directory.
    pub async fn create_storage_group(&self, req: CreateStorageGroup) -> Result<StorageGroupView> {
        let _g = self.inner.ops.lock().await;
        validate_name("storage group", &req.name)?;
        let path = Path::new(&req.path);
        if !path.is_absolute() || req.path.split('/').any(|c| c == "..") {
            return Err(AgentError::Invalid(format!(
                "storage group path '{}' must be absolute and contain no '..'",
                req.path
            )));
        }
        if req.capacity_bytes == 0 || !req.capacity_bytes.is_multiple_of(admission::MIB) {
            return Err(AgentError::Invalid(format!(
                "capacity {} bytes is not allowed; give a positive multiple of 1 MiB",
                req.capacity_bytes
            )));
        }
        let groups: Vec<StorageGroupRecord> = self.store().list()?;
        if groups.iter().any(|g| g.name == req.name) {
            return Err(AgentError::AlreadyExists {
                kind: "storage group",
                name: req.name,
            });
        }
        if let Some(g) = groups.iter().find(|g| Path::new(&g.path) == path) {
            return Err(AgentError::Conflict(format!(
                "directory {} already holds storage group '{}'",
                req.path, g.name
            )));
        }
        std::fs::create_dir_all(path).map_err(AgentError::io(format!("creating {}", req.path)))?;
        let rec = StorageGroupRecord {
            name: req.name.clone(),
            path: req.path.clone(),
            capacity_bytes: req.capacity_bytes,
        };
        self.store().write(|tx| tx.put(&rec))?;
        drop(_g);
        self.list_storage_groups()?
            .into_iter()
            .find(|g| g.name == req.name)
            .ok_or_else(|| AgentError::NotFound {
                kind: "storage group",
                name: req.name,
            })
    }

    /// Validates the volumes a request wants (new or existing) without
    /// changing anything.
    pub(crate) fn plan_volumes(
        &self,
        wanted: &[VolumeRequest],
        vm: &str,
    ) -> Result<Vec<PlannedVolume>> {
        let volumes: Vec<VolumeRecord> = self.store().list()?;
        let groups = self.list_storage_groups()?;
        let mut planned: Vec<PlannedVolume> = Vec::new();
        let mut planned_bytes: std::collections::HashMap<String, u64> = Default::default();
        for w in wanted {
            let name = w.name.clone().ok_or_else(|| {
                AgentError::Invalid(
                    "a volume needs a name (or a size_bytes to create a new boot volume)".into(),
                )
            })?;
            validate_name("volume", &name)?;
            if planned.iter().any(|p| p.name == name) {
                return Err(AgentError::Invalid(format!(
                    "volume '{name}' is named twice in the request"
                )));
            }
            match w.size_bytes {
                Some(size) => {
                    if volumes.iter().any(|v| v.name == name) {
                        return Err(AgentError::AlreadyExists {
                            kind: "volume",
                            name,
                        });
                    }
                    let group = w.group.clone().unwrap_or_else(|| "default".into());
                    let g = groups.iter().find(|g| g.name == group).ok_or_else(|| {
                        AgentError::NotFound {
                            kind: "storage group",
                            name: group.clone(),
                        }
                    })?;
                    let already = planned_bytes.entry(group.clone()).or_default();
                    admission::check_volume_size(
                        &group,
                        size,
                        g.free_bytes.saturating_sub(*already),
                    )?;
                    *already += size;
                    planned.push(PlannedVolume {
                        name,
                        new: Some((group, size)),
                    });
                }
                None => {
                    if w.group.is_some() {
                        return Err(AgentError::Invalid(format!(
                            "volume '{name}': a group is only given with size_bytes for a new volume"
                        )));
                    }
                    let v = volumes.iter().find(|v| v.name == name).ok_or_else(|| {
                        AgentError::NotFound {
                            kind: "volume",
                            name: name.clone(),
                        }
                    })?;
                    if let Some(owner) = &v.vm {
                        return Err(AgentError::Conflict(format!(
                            "volume '{name}' is attached to VM '{owner}'; detach it first"
                        )));
                    }
                    planned.push(PlannedVolume { name, new: None });
                }
            }
        }
        let adding = planned.iter().filter(|p| p.new.is_some()).count();
        if adding > 0 {
            admission::check_volume_count(self.volume_and_vcd_count()?, adding)?;
        }
        let _ = vm;
        Ok(planned)
    }

    /// Creates the files of new planned volumes, then writes the volume
    /// records (attached to the VM `extra` writes) and whatever `extra`
    /// writes, in one transaction. Created files are removed if anything
    /// fails.
    pub(crate) fn apply_volume_plan(
        &self,
        plan: &[PlannedVolume],
        extra: impl Fn(&mut Tx<'_>) -> Result<()>,
    ) -> Result<()> {
        let mut created: Vec<PathBuf> = Vec::new();
        let result = (|| -> Result<()> {
            let mut records: Vec<VolumeRecord> = Vec::new();
            let existing: Vec<VolumeRecord> = self.store().list()?;
            for p in plan {
                let rec = match &p.new {
                    Some((group, size)) => {
                        let mut known = existing.clone();
                        known.extend(records.iter().cloned());
                        let rec = VolumeRecord {
                            name: p.name.clone(),
                            group: group.clone(),
                            size_bytes: *size,
                            vm: None,
                            created_at: now(),
                            mirror: self.new_mirror_record(&known),
                        };
                        if rec.mirror.is_some() {
                            // A mirror: the replicas are created on each PM
                            // by the reconciler (`reconcile_mirrors`).
                            records.push(rec);
                            continue;
                        }
                        let path = self.volume_path(&rec)?;
                        let f = std::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .open(&path)
                            .map_err(AgentError::io(format!("creating {}", path.display())))?;
                        created.push(path.clone());
                        f.set_len(*size)
                            .map_err(AgentError::io(format!("sizing {}", path.display())))?;
                        rec
                    }
                    None => self.store().get::<VolumeRecord>(&p.name)?.ok_or_else(|| {
                        AgentError::NotFound {
                            kind: "volume",
                            name: p.name.clone(),
                        }
                    })?,
                };
                records.push(rec);
            }
            self.store().write(|tx| {
                extra(tx)?;
                // `extra` stored the VM; attach the volumes to whichever VM
                // lists them.
                let vms: Vec<VmRecord> = tx.list()?;
                for mut rec in records.iter().cloned() {
                    rec.vm = vms
                        .iter()
                        .find(|vm| vm.volumes().any(|n| *n == rec.name))
                        .map(|vm| vm.name.clone());
                    tx.put(&rec)?;
                }
                Ok(())
            })
        })();
        if result.is_err() {
            for f in created {
                let _ = std::fs::remove_file(f);
            }
        }
        result
    }

    /// Lists volumes (SPEC S6).
    pub fn list_volumes(&self) -> Result<Vec<VolumeView>> {
        let volumes: Vec<VolumeRecord> = self.store().list()?;
        let vms: Vec<VmRecord> = self.store().list()?;
        volumes
            .iter()
            .map(|v| {
                let boot = vms.iter().any(|vm| vm.boot_volume == v.name);
                let allocated = self
                    .volume_path(v)
                    .ok()
                    .and_then(|p| std::fs::metadata(p).ok())
                    .map(|m| m.blocks() * 512)
                    .unwrap_or(0);
                let mut view = VolumeView::new(v, boot, allocated);
                if v.mirror.is_some() {
                    if let Some(r) = self.replica_status(&v.name) {
                        view.sync = crate::unit::sync_word(&r.status);
                        view.replica = serde_json::to_value(&r.status).ok();
                    } else {
                        view.sync = "not open on this PM".into();
                    }
                }
                Ok(view)
            })
            .collect()
    }

    /// Shows one volume.
    pub fn get_volume(&self, name: &str) -> Result<VolumeView> {
        self.list_volumes()?
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| AgentError::NotFound {
                kind: "volume",
                name: name.to_string(),
            })
    }

    /// Creates an unattached volume.
    pub async fn create_volume(&self, req: CreateVolume) -> Result<VolumeView> {
        let _g = self.inner.ops.lock().await;
        let plan = self.plan_volumes(
            &[VolumeRequest {
                name: Some(req.name.clone()),
                size_bytes: Some(req.size_bytes),
                group: req.group,
            }],
            "",
        )?;
        self.apply_volume_plan(&plan, |_| Ok(()))?;
        self.reconcile_mirrors().await;
        drop(_g);
        self.get_volume(&req.name)
    }

    /// Attaches an unattached volume to a stopped VM as a data volume.
    pub async fn attach_volume(&self, volume: &str, vm: &str) -> Result<VolumeView> {
        self.config_vm(
            vm,
            ConfigVm {
                add_volumes: vec![VolumeRequest {
                    name: Some(volume.to_string()),
                    size_bytes: None,
                    group: None,
                }],
                ..Default::default()
            },
        )
        .await?;
        self.get_volume(volume)
    }

    /// Detaches a data volume from its (stopped) VM, keeping its data.
    pub async fn detach_volume(&self, volume: &str) -> Result<VolumeView> {
        let v = self.get_volume(volume)?;
        if v.vm == "none" {
            return Err(AgentError::Conflict(format!(
                "volume '{volume}' is not attached to any VM"
            )));
        }
        self.config_vm(
            &v.vm,
            ConfigVm {
                detach_volumes: vec![volume.to_string()],
                ..Default::default()
            },
        )
        .await?;
        self.get_volume(volume)
    }

    /// Deletes an unattached volume and its data.
    pub async fn delete_volume(&self, volume: &str) -> Result<()> {
        let _g = self.inner.ops.lock().await;
        let v: VolumeRecord = self.load("volume", volume)?;
        if let Some(vm) = &v.vm {
            let rec = self.store().get::<VmRecord>(vm)?;
            let what = if rec.is_some_and(|r| r.boot_volume == v.name) {
                "the boot volume of"
            } else {
                "attached to"
            };
            return Err(AgentError::Conflict(format!(
                "volume '{volume}' is {what} VM '{vm}'; detach it (data volumes only) or remove \
                 the VM first"
            )));
        }
        if v.mirror.is_some() {
            // Each PM's reconciler removes its replica.
            self.store().write(|tx| tx.delete::<VolumeRecord>(volume))?;
            drop(_g);
            self.reconcile_mirrors().await;
            return Ok(());
        }
        let path = self.volume_path(&v)?;
        self.store().write(|tx| tx.delete::<VolumeRecord>(volume))?;
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(file = %path.display(), "could not delete volume file: {e}");
        }
        Ok(())
    }

    // ------------------------------------------------------------------- VCDs

    /// Lists VCDs with where they are inserted (SPEC I1).
    pub fn list_vcds(&self) -> Result<Vec<VcdView>> {
        let vcds: Vec<VcdRecord> = self.store().list()?;
        let vms: Vec<VmRecord> = self.store().list()?;
        Ok(vcds
            .iter()
            .map(|c| {
                let inserted = vms
                    .iter()
                    .filter(|vm| vm.cdrom.as_deref() == Some(&c.name))
                    .map(|vm| vm.name.clone())
                    .collect();
                VcdView::new(c, inserted)
            })
            .collect())
    }

    fn check_new_vcd(&self, name: &str) -> Result<()> {
        validate_name("VCD", name)?;
        if self.store().get::<VcdRecord>(name)?.is_some() {
            return Err(AgentError::AlreadyExists {
                kind: "VCD",
                name: name.to_string(),
            });
        }
        admission::check_volume_count(self.volume_and_vcd_count()?, 1)?;
        Ok(())
    }

    /// Refuses to write `needed` bytes in `dir` unless the reserve stays
    /// free (unknown free space: not refused).
    pub(crate) fn check_file_space(&self, what: &str, dir: &Path, needed: u64) -> Result<()> {
        if let Some(free) = fs_available(dir) {
            admission::check_file_space(what, &dir.display().to_string(), needed, free)?;
        }
        Ok(())
    }

    fn tmp_file(&self, name: &str) -> PathBuf {
        self.paths()
            .tmp_dir()
            .join(format!(".{name}.{:016x}.partial", rand::random::<u64>()))
    }

    /// Records a finished VCD file (already in the temporary directory).
    fn commit_vcd(&self, name: &str, tmp: &Path, source: String) -> Result<VcdView> {
        let file = self.paths().vcd_dir().join(format!("{name}.iso"));
        let size = std::fs::metadata(tmp)
            .map_err(AgentError::io("reading the uploaded image"))?
            .len();
        // Re-check under the lock: another request may have taken the name.
        self.check_new_vcd(name)?;
        std::fs::rename(tmp, &file).map_err(AgentError::io("storing the VCD"))?;
        let rec = VcdRecord {
            name: name.to_string(),
            size_bytes: size,
            file: file.display().to_string(),
            source,
            created_at: now(),
        };
        if let Err(e) = self.store().write(|tx| tx.put(&rec)) {
            let _ = std::fs::remove_file(&file);
            return Err(e.into());
        }
        Ok(VcdView::new(&rec, vec![]))
    }

    /// Adds a VCD by copying an ISO file on the PM.
    pub async fn add_vcd_from_path(&self, req: AddVcd) -> Result<VcdView> {
        self.check_new_vcd(&req.name)?;
        let src = self
            .paths()
            .check_import("VCD", &req.path)
            .map_err(AgentError::Invalid)?;
        if std::fs::metadata(&src).map(|m| m.len()).unwrap_or(0) == 0 {
            return Err(AgentError::Invalid(format!(
                "VCD file '{}' is empty",
                req.path
            )));
        }
        let src = src.as_path();
        let len = std::fs::metadata(src).map(|m| m.len()).unwrap_or(0);
        self.check_file_space("the VCD copy", &self.paths().tmp_dir(), len)?;
        let tmp = self.tmp_file(&req.name);
        if let Err(e) = tokio::fs::copy(src, &tmp).await {
            let _ = std::fs::remove_file(&tmp);
            return Err(AgentError::io(format!("copying {}", req.path))(e));
        }
        let _g = self.inner.ops.lock().await;
        let r = self.commit_vcd(&req.name, &tmp, req.path.clone());
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r
    }

    /// Adds a VCD from an uploaded byte stream. If the stream fails half-way
    /// (client gone), nothing is left behind.
    pub async fn add_vcd_from_stream<S, E>(&self, name: &str, mut body: S) -> Result<VcdView>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        self.check_new_vcd(name)?;
        let dir = self.paths().tmp_dir();
        // The size is not known up front: checked as it grows, against the
        // space free when it started (nothing else writes big files here).
        let free = fs_available(&dir);
        let tmp = self.tmp_file(name);
        let result: Result<()> = async {
            if let Some(free) = free {
                admission::check_file_space("the upload", &dir.display().to_string(), 0, free)?;
            }
            let mut f = tokio::fs::File::create(&tmp)
                .await
                .map_err(AgentError::io("creating the upload file"))?;
            let mut total = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| {
                    AgentError::Invalid(format!(
                        "the upload was interrupted after {total} bytes ({e}); nothing was kept"
                    ))
                })?;
                total += chunk.len() as u64;
                if let Some(free) = free {
                    admission::check_file_space(
                        "the upload",
                        &dir.display().to_string(),
                        total,
                        free,
                    )?;
                }
                f.write_all(&chunk)
                    .await
                    .map_err(AgentError::io("writing the upload"))?;
            }
            if total == 0 {
                return Err(AgentError::Invalid("the uploaded image is empty".into()));
            }
            f.sync_all()
                .await
                .map_err(AgentError::io("writing the upload"))?;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let _g = self.inner.ops.lock().await;
        let r = self.commit_vcd(name, &tmp, "upload".into());
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r
    }

    /// Removes a VCD that no VM holds.
    pub async fn remove_vcd(&self, name: &str) -> Result<()> {
        let _g = self.inner.ops.lock().await;
        let v = self
            .list_vcds()?
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| AgentError::NotFound {
                kind: "VCD",
                name: name.to_string(),
            })?;
        if !v.can_remove {
            return Err(AgentError::Conflict(format!(
                "VCD '{name}' is inserted in VM(s) {}; eject it first",
                v.inserted_in.join(", ")
            )));
        }
        let rec = self.load_vcd(name)?;
        self.store().write(|tx| tx.delete::<VcdRecord>(name))?;
        let _ = std::fs::remove_file(&rec.file);
        Ok(())
    }
}

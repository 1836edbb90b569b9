//! One replica of a volume on local disk.
//!
//! A replica directory holds:
//!
//! * `data.raw` — the volume's bytes, a sparse raw file of exactly the
//!   volume size;
//! * `bitmap` — the persistent dirty bitmap: a 4096-byte header
//!   (`PVBITMAP`, format version, region size, number of regions) followed
//!   by one bit per region, least significant bit first;
//! * `meta.json` — volume id, size, region size, generation identifiers,
//!   highest epoch seen, consistency flag; replaced atomically (write a
//!   temporary file, fsync, rename, fsync the directory);
//! * `lock` — held with `flock` while a process has the replica open.
//!
//! All methods are blocking; async callers use `spawn_blocking`.

use crate::genid::GenIds;
use crate::region::{self, Bits};
use crate::sync::GroupSync;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const BITMAP_MAGIC: &[u8; 8] = b"PVBITMAP";
const BITMAP_VERSION: u32 = 1;
const BITMAP_HEADER: u64 = 4096;
const META_FORMAT: u32 = 1;

/// Errors of the replica store.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// An I/O error on one of the replica's files.
    #[error("replica {path}: {what}")]
    Io {
        /// File concerned.
        path: PathBuf,
        /// Operation that failed.
        what: &'static str,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The replica is already open in another process.
    #[error("replica {0} is in use by another process")]
    Locked(PathBuf),
    /// A file of the replica is malformed.
    #[error("replica {path}: {reason}")]
    Corrupt {
        /// File concerned.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Bad creation parameters.
    #[error("invalid replica parameters: {0}")]
    Invalid(String),
    /// A replica already exists where one was to be created.
    #[error("a replica already exists in {0}")]
    Exists(PathBuf),
}

/// Shorthand result.
pub type Result<T> = std::result::Result<T, ReplicaError>;

/// A split-brain decision recorded on a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Keep this replica's data; the partner is resynced from it.
    KeepLocal,
    /// Discard this replica's data; it is resynced from the partner.
    DiscardLocal,
}

/// Persistent metadata of a replica (`meta.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Format version of this file.
    pub format: u32,
    /// Volume identifier; both replicas of a volume share it.
    pub volume_id: String,
    /// Volume size in bytes.
    pub size: u64,
    /// Dirty bitmap granularity in bytes.
    pub region_size: u64,
    /// Generation identifiers.
    pub gen: GenIds,
    /// Highest epoch this replica has seen (as primary or from a primary).
    pub epoch: u64,
    /// False while this replica is the target of an unfinished resync: its
    /// contents are then a mix of old and new and must not be served.
    pub consistent: bool,
    /// A pending split-brain decision, consumed by the next resync.
    #[serde(default)]
    pub decision: Option<Decision>,
}

/// Parameters for creating a replica.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Volume identifier (the same on both replicas).
    pub volume_id: String,
    /// Volume size in bytes.
    pub size: u64,
    /// Dirty bitmap granularity (power of two, 4 KiB – 1 GiB).
    pub region_size: u64,
    /// Initial generation identifier. Give both replicas of a new (all
    /// zero) volume the same value and they start in sync; `None` makes an
    /// empty replica that needs a full copy from its partner.
    pub initial_gen: Option<u64>,
}

/// Default region size: 1 MiB.
pub const DEFAULT_REGION_SIZE: u64 = 1 << 20;

struct BitmapState {
    bits: Bits,
    /// Ticket of the last bitmap write that set a bit.
    last_set_ticket: u64,
}

/// A replica opened by this process.
pub struct Replica {
    dir: PathBuf,
    data: File,
    bitmap_file: File,
    bitmap: Mutex<BitmapState>,
    meta: Mutex<Meta>,
    data_sync: GroupSync,
    bitmap_sync: GroupSync,
    _lock: File,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("dir", &self.dir).finish()
    }
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> ReplicaError + 'a {
    move |source| ReplicaError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join("lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path, "open lock file"))?;
    // SAFETY: flock on a valid, owned file descriptor; no memory is shared.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(ReplicaError::Locked(dir.to_path_buf()));
    }
    Ok(f)
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync directory"))
}

fn write_meta(dir: &Path, meta: &Meta) -> Result<()> {
    let tmp = dir.join("meta.json.tmp");
    let path = dir.join("meta.json");
    let mut json = serde_json::to_vec_pretty(meta).expect("meta serialises");
    json.push(b'\n');
    let mut f = File::create(&tmp).map_err(io_err(&tmp, "create"))?;
    f.write_all(&json).map_err(io_err(&tmp, "write"))?;
    f.sync_all().map_err(io_err(&tmp, "fsync"))?;
    fs::rename(&tmp, &path).map_err(io_err(&path, "rename"))?;
    fsync_dir(dir)
}

fn bitmap_header(region_size: u64, nbits: u64) -> Vec<u8> {
    let mut h = vec![0u8; BITMAP_HEADER as usize];
    h[0..8].copy_from_slice(BITMAP_MAGIC);
    h[8..12].copy_from_slice(&BITMAP_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&region_size.to_le_bytes());
    h[24..32].copy_from_slice(&nbits.to_le_bytes());
    h
}

/// Random non-zero generation identifier.
pub fn fresh_gen() -> u64 {
    loop {
        let v: u64 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

impl Replica {
    /// Creates a new replica in `dir` (created if missing, must not hold a
    /// replica yet).
    pub fn create(dir: &Path, opts: &CreateOptions) -> Result<Replica> {
        region::check_region_size(opts.region_size)
            .map_err(|e| ReplicaError::Invalid(e.to_string()))?;
        if opts.size == 0 || opts.size & 511 != 0 {
            return Err(ReplicaError::Invalid(format!(
                "volume size {} must be a non-zero multiple of 512",
                opts.size
            )));
        }
        if opts.volume_id.is_empty() || opts.volume_id.len() > 128 {
            return Err(ReplicaError::Invalid(
                "volume id must be 1 to 128 bytes".into(),
            ));
        }
        fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
        if dir.join("meta.json").exists() {
            return Err(ReplicaError::Exists(dir.to_path_buf()));
        }
        let lock = lock_dir(dir)?;
        let data_path = dir.join("data.raw");
        let data = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(io_err(&data_path, "create"))?;
        data.set_len(opts.size)
            .map_err(io_err(&data_path, "set length"))?;
        data.sync_all().map_err(io_err(&data_path, "fsync"))?;
        let nbits = region::region_count(opts.size, opts.region_size);
        let bm_path = dir.join("bitmap");
        let bm = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&bm_path)
            .map_err(io_err(&bm_path, "create"))?;
        bm.write_all_at(&bitmap_header(opts.region_size, nbits), 0)
            .map_err(io_err(&bm_path, "write"))?;
        bm.set_len(BITMAP_HEADER + nbits.div_ceil(8))
            .map_err(io_err(&bm_path, "set length"))?;
        bm.sync_all().map_err(io_err(&bm_path, "fsync"))?;
        let gen = match opts.initial_gen {
            Some(g) if g != 0 => GenIds::new_volume(g),
            _ => GenIds::empty(),
        };
        let meta = Meta {
            format: META_FORMAT,
            volume_id: opts.volume_id.clone(),
            size: opts.size,
            region_size: opts.region_size,
            gen,
            epoch: 0,
            consistent: true,
            decision: None,
        };
        write_meta(dir, &meta)?;
        drop(lock);
        drop(bm);
        drop(data);
        Self::open(dir)
    }

    /// Opens an existing replica.
    pub fn open(dir: &Path) -> Result<Replica> {
        let lock = lock_dir(dir)?;
        let meta_path = dir.join("meta.json");
        let raw = fs::read(&meta_path).map_err(io_err(&meta_path, "read"))?;
        let meta: Meta = serde_json::from_slice(&raw).map_err(|e| ReplicaError::Corrupt {
            path: meta_path.clone(),
            reason: e.to_string(),
        })?;
        if meta.format != META_FORMAT {
            return Err(ReplicaError::Corrupt {
                path: meta_path,
                reason: format!(
                    "format {} is not supported (only {META_FORMAT})",
                    meta.format
                ),
            });
        }
        region::check_region_size(meta.region_size).map_err(|e| ReplicaError::Corrupt {
            path: meta_path.clone(),
            reason: e.to_string(),
        })?;
        let data_path = dir.join("data.raw");
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(io_err(&data_path, "open"))?;
        let len = data.metadata().map_err(io_err(&data_path, "stat"))?.len();
        if len != meta.size {
            return Err(ReplicaError::Corrupt {
                path: data_path,
                reason: format!("size {len} differs from the volume size {}", meta.size),
            });
        }
        let bm_path = dir.join("bitmap");
        let bm = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&bm_path)
            .map_err(io_err(&bm_path, "open"))?;
        let nbits = region::region_count(meta.size, meta.region_size);
        let mut header = vec![0u8; BITMAP_HEADER as usize];
        bm.read_exact_at(&mut header, 0)
            .map_err(io_err(&bm_path, "read header"))?;
        if header != bitmap_header(meta.region_size, nbits) {
            return Err(ReplicaError::Corrupt {
                path: bm_path,
                reason: "header does not match the volume geometry".into(),
            });
        }
        let mut bytes = vec![0u8; nbits.div_ceil(8) as usize];
        bm.read_exact_at(&mut bytes, BITMAP_HEADER)
            .map_err(io_err(&bm_path, "read bits"))?;
        let bits = Bits::from_bytes(nbits, &bytes);
        let data_sync = GroupSync::new(data.try_clone().map_err(io_err(&data_path, "dup"))?);
        let bitmap_sync = GroupSync::new(bm.try_clone().map_err(io_err(&bm_path, "dup"))?);
        Ok(Replica {
            dir: dir.to_path_buf(),
            data,
            bitmap_file: bm,
            bitmap: Mutex::new(BitmapState {
                bits,
                last_set_ticket: 0,
            }),
            meta: Mutex::new(meta),
            data_sync,
            bitmap_sync,
            _lock: lock,
        })
    }

    /// Opens the replica in `dir`, creating it when it does not exist.
    pub fn open_or_create(dir: &Path, opts: &CreateOptions) -> Result<Replica> {
        if dir.join("meta.json").exists() {
            let r = Self::open(dir)?;
            let m = r.meta();
            if m.size != opts.size || m.volume_id != opts.volume_id {
                return Err(ReplicaError::Invalid(format!(
                    "existing replica is volume {} of {} bytes, not {} of {} bytes",
                    m.volume_id, m.size, opts.volume_id, opts.size
                )));
            }
            Ok(r)
        } else {
            Self::create(dir, opts)
        }
    }

    /// The replica directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.meta_lock().size
    }

    /// Region size in bytes.
    pub fn region_size(&self) -> u64 {
        self.meta_lock().region_size
    }

    /// Number of regions.
    pub fn region_count(&self) -> u64 {
        let m = self.meta_lock();
        region::region_count(m.size, m.region_size)
    }

    fn meta_lock(&self) -> std::sync::MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bitmap_lock(&self) -> std::sync::MutexGuard<'_, BitmapState> {
        self.bitmap.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the metadata.
    pub fn meta(&self) -> Meta {
        self.meta_lock().clone()
    }

    /// Changes the metadata and persists it before returning.
    pub fn update_meta<R>(&self, f: impl FnOnce(&mut Meta) -> R) -> Result<R> {
        let mut m = self.meta_lock();
        let mut new = m.clone();
        let r = f(&mut new);
        if new != *m {
            write_meta(&self.dir, &new)?;
            *m = new;
        }
        Ok(r)
    }

    fn data_path(&self) -> PathBuf {
        self.dir.join("data.raw")
    }

    /// When the data was last written (the data file's modification time,
    /// seconds since the Unix epoch).
    pub fn last_write_unix(&self) -> Option<u64> {
        std::fs::metadata(self.data_path())
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        if region::in_bounds(offset, len, size) {
            Ok(())
        } else {
            Err(ReplicaError::Invalid(format!(
                "range {offset}+{len} lies outside the volume of {size} bytes"
            )))
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.data
            .read_exact_at(buf, offset)
            .map_err(io_err(&self.data_path(), "read"))
    }

    /// Reads `buf.len()` bytes at `offset` only if they are all in the page
    /// cache (`preadv2` with `RWF_NOWAIT`), without blocking on the disk;
    /// false when the caller must use [`Self::read_at`] (not cached, a
    /// partial or failed read, or a kernel without `RWF_NOWAIT`), which
    /// also reports errors properly.
    pub fn read_cached(&self, buf: &mut [u8], offset: u64) -> bool {
        if self.check(offset, buf.len() as u64).is_err() || buf.is_empty() {
            return false;
        }
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: one iovec over `buf`, which we borrow mutably for the
        // call; the descriptor is ours and stays open.
        let n = unsafe {
            libc::preadv2(
                self.data.as_raw_fd(),
                &iov,
                1,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        n >= 0 && n as usize == buf.len()
    }

    /// Writes `data` at `offset` (not yet durable: see [`Self::sync_data`]).
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        self.data
            .write_all_at(data, offset)
            .map_err(io_err(&self.data_path(), "write"))
    }

    /// Makes `[offset, offset+len)` read as zeroes: punches a hole (keeps
    /// the file size), or writes zeroes where that is not supported.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: fallocate on a valid, owned descriptor with a range that
        // was checked to lie inside the file; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.data.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let zero = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zero.len() as u64);
            self.write_at(&zero[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// Starts writing `[offset, offset+len)` back to disk without waiting
    /// for it (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that a later
    /// [`Self::sync_data`] has less left to do. Only a hint: durability
    /// still comes from `sync_data`, which also reports write-back errors.
    pub fn start_writeback(&self, offset: u64, len: u64) {
        if self.check(offset, len).is_err() || len == 0 {
            return;
        }
        // SAFETY: sync_file_range on a valid, owned descriptor with a range
        // inside the file; no memory is passed.
        unsafe {
            libc::sync_file_range(
                self.data.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    /// Makes every data write completed before the call durable (group
    /// commit with concurrent callers).
    pub fn sync_data(&self) -> Result<()> {
        self.data_sync
            .sync()
            .map_err(io_err(&self.data_path(), "fdatasync"))
    }

    fn write_bitmap_byte(&self, bm: &BitmapState, region: u64) -> Result<()> {
        let byte = region / 8;
        self.bitmap_file
            .write_all_at(&[bm.bits.byte(byte)], BITMAP_HEADER + byte)
            .map_err(io_err(&self.dir.join("bitmap"), "write"))
    }

    /// Marks regions dirty and returns once the marks are durable.
    pub fn mark_dirty(&self, regions: std::ops::Range<u64>) -> Result<()> {
        self.set_dirty(regions)
    }

    /// True if every region in `regions` is marked and the marks are
    /// durable: [`Self::mark_dirty`] would return at once.
    pub fn is_marked(&self, regions: std::ops::Range<u64>) -> bool {
        let bm = self.bitmap_lock();
        regions.into_iter().all(|r| bm.bits.get(r))
            && self.bitmap_sync.is_durable(bm.last_set_ticket)
    }

    /// Adds every region set in `bits` and waits until durable.
    pub fn merge_dirty(&self, bits: &Bits) -> Result<()> {
        self.set_dirty(bits.iter_set())
    }

    /// Sets the given regions in the persistent bitmap (writing only the
    /// bytes that change) and waits until the marks are durable.
    fn set_dirty(&self, regions: impl IntoIterator<Item = u64>) -> Result<()> {
        let ticket = {
            let mut bm = self.bitmap_lock();
            let mut changed = false;
            for r in regions {
                if bm.bits.set(r) {
                    self.write_bitmap_byte(&bm, r)?;
                    changed = true;
                }
            }
            if changed {
                bm.last_set_ticket = self.bitmap_sync.note_write();
            }
            bm.last_set_ticket
        };
        self.bitmap_sync
            .wait_durable(ticket)
            .map_err(io_err(&self.dir.join("bitmap"), "fdatasync"))
    }

    /// Marks every region dirty (full resync) and waits until durable.
    pub fn mark_all_dirty(&self) -> Result<()> {
        let mut all = Bits::new(self.region_count());
        all.set_all();
        self.merge_dirty(&all)
    }

    /// Clears region `r` in the bitmap. The clear is written but not synced:
    /// losing it only causes an unnecessary resync of the region.
    pub fn clear_dirty(&self, r: u64) -> Result<()> {
        let mut bm = self.bitmap_lock();
        if bm.bits.clear(r) {
            self.write_bitmap_byte(&bm, r)?;
        }
        Ok(())
    }

    /// Clears every region; persisted before returning.
    pub fn clear_all_dirty(&self) -> Result<()> {
        {
            let mut bm = self.bitmap_lock();
            let n = bm.bits.len();
            bm.bits = Bits::new(n);
            let zero = vec![0u8; n.div_ceil(8) as usize];
            self.bitmap_file
                .write_all_at(&zero, BITMAP_HEADER)
                .map_err(io_err(&self.dir.join("bitmap"), "write"))?;
        }
        self.bitmap_sync
            .sync()
            .map_err(io_err(&self.dir.join("bitmap"), "fdatasync"))
    }

    /// True if region `r` is marked dirty.
    pub fn is_dirty(&self, r: u64) -> bool {
        self.bitmap_lock().bits.get(r)
    }

    /// A copy of the dirty bitmap.
    pub fn dirty_bits(&self) -> Bits {
        self.bitmap_lock().bits.clone()
    }

    /// Number of dirty regions.
    pub fn dirty_count(&self) -> u64 {
        self.bitmap_lock().bits.count()
    }

    /// The first dirty region at or after `from`.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        self.bitmap_lock().bits.next_set(from)
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> Option<u64> {
        // SAFETY: lseek on a valid, owned descriptor; no memory is passed.
        let r = unsafe { libc::lseek(self.data.as_raw_fd(), offset as libc::off_t, whence) };
        (r >= 0).then_some(r as u64)
    }

    /// Allocation map of `[offset, offset+len)`: consecutive `(length,
    /// is_hole)` extents from `SEEK_DATA`/`SEEK_HOLE`. Holes read as zero.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(len).min(self.size());
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = self.seek(pos, libc::SEEK_DATA).unwrap_or(end).min(end);
            if data > pos {
                out.push((data - pos, true));
                pos = data;
                continue;
            }
            let hole = self.seek(pos, libc::SEEK_HOLE).unwrap_or(end).min(end);
            let hole = if hole <= pos { end } else { hole };
            out.push((hole - pos, false));
            pos = hole;
        }
        out
    }

    /// True if `[offset, offset+len)` contains no allocated data.
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        let e = self.extents(offset, len);
        e.len() == 1 && e[0].1
    }

    /// SHA-256 of region `r`'s contents (holes hashed as zeroes).
    pub fn hash_region(&self, r: u64) -> Result<[u8; 32]> {
        let (off, len) = region::region_span(r, self.region_size(), self.size());
        self.hash_range(off, len)
    }

    /// SHA-256 of `[off, off+len)` (holes hashed as zeroes); the range must
    /// lie within the volume.
    pub fn hash_range(&self, off: u64, len: u64) -> Result<[u8; 32]> {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            self.read_at(&mut buf[..n], off + done)?;
            h.update(&buf[..n]);
            done += n as u64;
        }
        Ok(h.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(size: u64) -> CreateOptions {
        CreateOptions {
            volume_id: "vol1".into(),
            size,
            region_size: 65536,
            initial_gen: Some(42),
        }
    }

    #[test]
    fn create_write_reopen() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("r");
        {
            let r = Replica::create(&dir, &opts(1 << 20)).unwrap();
            assert!(matches!(Replica::open(&dir), Err(ReplicaError::Locked(_))));
            r.write_at(b"hello", 4096).unwrap();
            r.sync_data().unwrap();
            r.mark_dirty(3..5).unwrap();
            r.update_meta(|m| m.epoch = 7).unwrap();
            assert!(r.write_at(b"x", 1 << 20).is_err());
            assert!(r.write_at(b"xy", (1 << 20) - 1).is_err());
        }
        let r = Replica::open(&dir).unwrap();
        let mut buf = [0u8; 5];
        r.read_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(r.dirty_bits().iter_set().collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(r.meta().epoch, 7);
        assert_eq!(r.meta().gen.current, 42);
        r.clear_dirty(3).unwrap();
        drop(r);
        let r = Replica::open(&dir).unwrap();
        assert_eq!(r.dirty_count(), 1);
    }

    #[test]
    fn cached_reads_copy_from_the_page_cache_and_refuse_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let r = Replica::create(&d.path().join("r"), &opts(1 << 20)).unwrap();
        r.write_at(&[7u8; 8192], 4096).unwrap();
        let mut buf = [0u8; 8192];
        assert!(
            r.read_cached(&mut buf, 4096),
            "just written: in the page cache"
        );
        assert!(buf.iter().all(|&b| b == 7));
        // Out of range or empty: the caller takes the ordinary path, which
        // reports the error.
        assert!(!r.read_cached(&mut buf, (1 << 20) - 4096));
        assert!(!r.read_cached(&mut [], 0));
        assert!(r.read_at(&mut buf, (1 << 20) - 4096).is_err());
    }

    #[test]
    fn zeroes_and_extents() {
        let d = tempfile::tempdir().unwrap();
        let r = Replica::create(d.path(), &opts(1 << 20)).unwrap();
        assert!(r.is_hole(0, 1 << 20));
        r.write_at(&[1u8; 8192], 65536).unwrap();
        let e = r.extents(0, 1 << 20);
        assert_eq!(e.iter().map(|x| x.0).sum::<u64>(), 1 << 20);
        assert!(e.iter().any(|x| !x.1));
        r.write_zeroes(65536, 8192).unwrap();
        let mut buf = [9u8; 16];
        r.read_at(&mut buf, 65536).unwrap();
        assert_eq!(buf, [0u8; 16]);
        let h1 = r.hash_region(1).unwrap();
        let h2 = r.hash_region(2).unwrap();
        assert_eq!(h1, h2);
    }

    #[test]
    fn rejects_bad_parameters() {
        let d = tempfile::tempdir().unwrap();
        let mut o = opts(1000);
        assert!(Replica::create(d.path(), &o).is_err());
        o.size = 1 << 20;
        o.region_size = 1000;
        assert!(Replica::create(d.path(), &o).is_err());
    }
}

//! The mirror engine for one volume: a local [`Replica`], its role
//! (primary or secondary), the replication link to the partner, degraded
//! mode, resync, split-brain detection, verify and statistics.
//!
//! ## Write path on the primary
//!
//! 1. Wait for the byte range (overlapping writes are serialised) and share
//!    its regions (resync/verify may hold a region exclusively).
//! 2. Mark the regions in the persistent dirty bitmap and wait until the
//!    mark is durable. While connected this is an *activity log*: regions
//!    that may hold writes in flight; the cleaner clears marks of regions
//!    idle for a while. While degraded it records what the partner misses.
//! 3. Write locally and send the write to the partner at the same time;
//!    both make it durable (group commit) before answering.
//! 4. If the partner did not confirm, the write is acknowledged only in
//!    degraded mode: when the "may run degraded" predicate (the lease)
//!    holds, after the generation was rotated. Otherwise the write is held
//!    (resent if a link comes back) — I/O freezes, it is never acknowledged
//!    without the lease.

use crate::genid::{GenIds, Relation};
use crate::locks::{RegionLocks, SharedGuard};
use crate::nbd::proto::{EINVAL, EIO, ENOSPC, EPERM};
use crate::ratelimit::{self, TokenBucket};
use crate::region::{self, Bits};
use crate::repl::link::{PeerLink, PendingReply};
use crate::repl::proto::*;
use crate::replica::{self, fresh_gen, Decision, Replica, ReplicaError};
use pairvisor_model::sync_advice::{self, SyncLinkAdvice};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, OwnedRwLockReadGuard, RwLock as AsyncRwLock, Semaphore};
use tokio::task::{AbortHandle, JoinHandle};

/// An I/O failure reported to an NBD client, with its errno.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message} (errno {errno})")]
pub struct IoError {
    /// NBD error number.
    pub errno: u32,
    /// Human-readable explanation.
    pub message: String,
}

impl IoError {
    fn new(errno: u32, message: impl Into<String>) -> Self {
        IoError {
            errno,
            message: message.into(),
        }
    }
}

impl From<ReplicaError> for IoError {
    fn from(e: ReplicaError) -> Self {
        let errno = match e {
            ReplicaError::Invalid(_) => EINVAL,
            _ => EIO,
        };
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        IoError::new(errno, msg)
    }
}

/// Errors of control operations.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A promotion with an epoch not above the highest one seen.
    #[error("epoch {requested} is stale: this replica has seen epoch {seen}; promote with a higher epoch")]
    StaleEpoch {
        /// Epoch asked for.
        requested: u64,
        /// Highest epoch seen.
        seen: u64,
    },
    /// Promotion of a replica whose resync did not finish.
    #[error("replica is inconsistent (an unfinished resync); promote with force only if no better copy exists")]
    Inconsistent,
    /// The operation needs a state the volume is not in.
    #[error("{0}")]
    State(String),
    /// The replica store failed.
    #[error("replica store")]
    Replica(#[from] ReplicaError),
}

/// Role of this replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Serves I/O and replicates to the partner.
    Primary,
    /// Receives replication from the primary.
    Secondary,
}

/// When writes become durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Every write is durable on both replicas before it is acknowledged
    /// (the product's default, SPEC S3).
    EveryWrite,
    /// Writes reach both replicas (page cache) before they are
    /// acknowledged; FLUSH and FUA make them durable (NBD semantics).
    OnFlush,
}

/// Predicate deciding whether the primary may acknowledge writes without
/// its partner (the unit layer's lease).
pub type DegradedPredicate = Arc<dyn Fn() -> bool + Send + Sync>;

/// The partner's replica as it described itself in the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSide {
    /// Its generation identifiers.
    pub gen: GenIds,
    /// Whether it is a complete image.
    pub consistent: bool,
    /// Regions its dirty bitmap names (written without this replica, or in
    /// flight when the link broke).
    pub dirty_regions: u64,
    /// When its data was last written (seconds since the epoch).
    pub last_write_unix: Option<u64>,
}

/// Records, outside the mirror, that the partner's replica is outdated
/// (DRBD's outdate-peer handler): called with the primary's epoch before the
/// first write of a degraded period is acknowledged. The write waits until
/// it returns `Ok`; while it fails, writes are held, never acknowledged. In
/// a unit it is a Raft commit guarded by "this PM holds its lease and is not
/// fenced", so a replica that may be behind is never promoted silently.
/// `Ok(true)`: recorded; `Ok(false)`: there is no partner replica to
/// outdate (asked again at the next degraded write).
pub type PeerOutdater = Arc<
    dyn Fn(u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, String>> + Send>>
        + Send
        + Sync,
>;

/// Tunables of a volume.
#[derive(Clone)]
pub struct VolumeOptions {
    /// The unit secret authenticating replication.
    pub secret: Vec<u8>,
    /// Resync rate limit in bytes/s (0 = unlimited).
    pub resync_rate: u64,
    /// Durability policy.
    pub durability: Durability,
    /// A request over the link without reply for this long breaks the link.
    pub link_timeout: Duration,
    /// Activity-log marks of regions idle this long are cleared.
    pub cleaner_idle: Duration,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            secret: Vec::new(),
            resync_rate: 0,
            durability: Durability::EveryWrite,
            link_timeout: Duration::from_secs(5),
            cleaner_idle: Duration::from_secs(2),
        }
    }
}

/// State of the replication link, as seen from this replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum LinkState {
    /// Primary without a partner configured.
    Standalone,
    /// Primary trying to reach its partner (degraded meanwhile).
    Connecting {
        /// Why the last attempt failed.
        last_error: Option<String>,
    },
    /// Connected, copying dirty regions to the partner.
    Resyncing,
    /// Connected and in sync: every write goes to both replicas.
    InSync,
    /// Both replicas were written independently (or the partner is newer):
    /// replication refused until a decision names the replica to keep.
    SplitBrain {
        /// The relation of the generations.
        relation: Relation,
    },
    /// Secondary waiting for a primary.
    Waiting,
    /// Secondary receiving replication.
    Replicating {
        /// The primary's address.
        primary: String,
        /// Its epoch.
        epoch: u64,
    },
}

/// Progress of a resync.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResyncStatus {
    /// Regions to copy in this resync.
    pub total_regions: u64,
    /// Regions copied.
    pub done_regions: u64,
    /// Bytes copied (holes count as copied without traffic).
    pub done_bytes: u64,
    /// Bytes still to copy.
    pub remaining_bytes: u64,
    /// Observed copy rate.
    pub bytes_per_sec: f64,
    /// Estimated seconds to completion.
    pub eta_secs: Option<f64>,
    /// Seconds since the resync started.
    pub elapsed_secs: f64,
}

/// Per-volume counters (SPEC S9).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Read requests.
    pub read_ops: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Write requests (including write-zeroes and trim).
    pub write_ops: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Average write size in bytes.
    pub avg_write_bytes: f64,
    /// Recent write throughput, bytes/s.
    pub write_bytes_per_sec: f64,
    /// Flushes.
    pub flush_ops: u64,
    /// Requests replicated to the partner.
    pub replicated_ops: u64,
    /// Average replication latency (request sent to partner's durable
    /// reply), microseconds.
    pub replication_latency_avg_us: f64,
    /// Largest replication latency seen, microseconds.
    pub replication_latency_max_us: u64,
    /// Writes replicated cut-through: sent to the partner chunk by chunk
    /// while their data was still arriving.
    pub streamed_writes: u64,
    /// The S9 sync-link advice for these numbers.
    pub sync_link_advice: SyncLinkAdvice,
}

/// Result of an online verify.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Regions compared.
    pub regions_checked: u64,
    /// Number of regions whose contents differ.
    pub differing_count: u64,
    /// The differing regions (at most 1000 listed).
    pub differing: Vec<u64>,
    /// Region size, to turn indices into byte offsets.
    pub region_size: u64,
}

/// Everything a status query reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Volume identifier.
    pub volume_id: String,
    /// Size in bytes.
    pub size: u64,
    /// Region size in bytes.
    pub region_size: u64,
    /// Role.
    pub role: Role,
    /// Highest epoch seen.
    pub epoch: u64,
    /// Generation identifiers.
    pub gen: GenIds,
    /// False during an unfinished resync as target.
    pub consistent: bool,
    /// Pending split-brain decision.
    pub decision: Option<Decision>,
    /// Configured partner (primary side).
    pub partner: Option<String>,
    /// Link state.
    pub link: LinkState,
    /// Primary acknowledging writes without its partner.
    pub degraded: bool,
    /// Writes currently held because the lease does not allow degraded mode
    /// (or the partner could not be recorded as outdated yet).
    pub writes_held: u64,
    /// The partner's replica is recorded as outdated (see [`PeerOutdater`]).
    pub peer_outdated: bool,
    /// When this replica's data was last written (seconds since the epoch).
    pub last_write_unix: Option<u64>,
    /// The partner's side, as it described itself when the pair was found
    /// split (shown next to this side for the administrator's choice, S4).
    pub split_brain_peer: Option<PeerSide>,
    /// Dirty regions in the bitmap.
    pub dirty_regions: u64,
    /// Resync progress, while one runs.
    pub resync: Option<ResyncStatus>,
    /// Counters.
    pub stats: StatsSnapshot,
    /// Last verify result.
    pub last_verify: Option<VerifyReport>,
    /// The last completed resync (as source).
    pub last_resync: Option<ResyncStatus>,
}

#[derive(Default)]
struct Stats {
    read_ops: AtomicU64,
    read_bytes: AtomicU64,
    write_ops: AtomicU64,
    write_bytes: AtomicU64,
    flush_ops: AtomicU64,
    repl_ops: AtomicU64,
    repl_ns: AtomicU64,
    repl_max_ns: AtomicU64,
    streamed: AtomicU64,
}

struct ResyncProgress {
    total: u64,
    done: u64,
    done_bytes: u64,
    remaining_bytes: u64,
    started: Instant,
}

impl ResyncProgress {
    fn status(&self) -> ResyncStatus {
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 {
            self.done_bytes as f64 / elapsed
        } else {
            0.0
        };
        ResyncStatus {
            total_regions: self.total,
            done_regions: self.done,
            done_bytes: self.done_bytes,
            remaining_bytes: self.remaining_bytes,
            bytes_per_sec: rate,
            eta_secs: ratelimit::eta(self.remaining_bytes, rate).map(|d| d.as_secs_f64()),
            elapsed_secs: elapsed,
        }
    }
}

struct Inner {
    role: Role,
    partner: Option<String>,
    link: Option<Arc<PeerLink>>,
    link_state: LinkState,
    connector: Option<AbortHandle>,
    incoming: Option<(u64, AbortHandle)>,
    next_incoming: u64,
    rotated: bool,
    peer_outdated: bool,
    split_peer: Option<PeerSide>,
    resync: Option<ResyncProgress>,
    writes_held: u64,
    last_verify: Option<VerifyReport>,
    last_resync: Option<ResyncStatus>,
    write_rate: f64,
    rate_sample: (Instant, u64),
}

/// The mirror engine of one volume.
pub struct Volume {
    replica: Arc<Replica>,
    opts: VolumeOptions,
    resync_rate: AtomicU64,
    inner: Mutex<Inner>,
    changed: Notify,
    locks: Arc<RegionLocks>,
    stats: Stats,
    may_degrade: RwLock<DegradedPredicate>,
    outdater: RwLock<Option<PeerOutdater>>,
    rotate_lock: tokio::sync::Mutex<()>,
    /// Secondary: every frame being applied holds it shared; a new primary
    /// connection takes it exclusively once before it applies anything, so
    /// that no write of an older connection lands after the new one's
    /// (resync) writes.
    frame_gate: Arc<AsyncRwLock<()>>,
    size: u64,
    region_size: u64,
}

enum Op {
    Write { offset: u64, data: Arc<Vec<u8>> },
    Zero { offset: u64, len: u64 },
    Flush,
}

/// Largest read copied from the page cache on the calling task (see
/// [`Volume::read`]); longer copies would hold up the runtime's thread.
const INLINE_READ_MAX: u32 = 256 << 10;

/// Replication connections still in their handshake, at most.
const MAX_PENDING_HANDSHAKES: usize = 16;

/// Regions a resync keeps in flight to the partner.
const RESYNC_INFLIGHT: usize = 4;

/// The largest piece of a region a resync sends in one frame (regions can
/// be larger than a frame may be).
const RESYNC_PIECE: u64 = 8 << 20;

/// Returns a payload buffer to the pool once nobody else holds it.
fn recycle(data: Arc<Vec<u8>>) {
    if let Ok(v) = Arc::try_unwrap(data) {
        crate::bufpool::put(v);
    }
}

fn durable_flag(durable: bool) -> u16 {
    if durable {
        F_DURABLE
    } else {
        0
    }
}

async fn read_msg<R: AsyncRead + Unpin>(rd: &mut R) -> std::io::Result<Vec<u8>> {
    let len = rd.read_u32().await?;
    if len > MAX_HANDSHAKE {
        return Err(std::io::Error::other("handshake message too large"));
    }
    let mut v = vec![0u8; len as usize];
    rd.read_exact(&mut v).await?;
    Ok(v)
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    rand::rng().fill_bytes(&mut n);
    n
}

impl Volume {
    /// Starts the engine on an opened replica, as a secondary. Must be
    /// called inside a tokio runtime (it spawns the cleaner and the
    /// statistics sampler).
    pub fn start(replica: Replica, opts: VolumeOptions) -> Arc<Volume> {
        let size = replica.size();
        let region_size = replica.region_size();
        let v = Arc::new(Volume {
            replica: Arc::new(replica),
            resync_rate: AtomicU64::new(opts.resync_rate),
            opts,
            inner: Mutex::new(Inner {
                role: Role::Secondary,
                partner: None,
                link: None,
                link_state: LinkState::Waiting,
                connector: None,
                incoming: None,
                next_incoming: 0,
                rotated: false,
                peer_outdated: false,
                split_peer: None,
                resync: None,
                writes_held: 0,
                last_verify: None,
                last_resync: None,
                write_rate: 0.0,
                rate_sample: (Instant::now(), 0),
            }),
            changed: Notify::new(),
            locks: Arc::new(RegionLocks::default()),
            stats: Stats::default(),
            may_degrade: RwLock::new(Arc::new(|| true)),
            outdater: RwLock::new(None),
            rotate_lock: tokio::sync::Mutex::new(()),
            frame_gate: Arc::new(AsyncRwLock::new(())),
            size,
            region_size,
        });
        let weak = Arc::downgrade(&v);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let Some(v) = weak.upgrade() else { return };
                v.sample_rate();
                v.clean_activity_log();
            }
        });
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The local replica.
    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    /// Current role.
    pub fn role(&self) -> Role {
        self.lock().role
    }

    /// Installs the "may run degraded" predicate (the lease).
    pub fn set_degraded_predicate(&self, p: DegradedPredicate) {
        *self.may_degrade.write().unwrap_or_else(|e| e.into_inner()) = p;
        self.changed.notify_waiters();
    }

    /// Installs the outdate-peer step (see [`PeerOutdater`]). Each degraded
    /// period of each promotion records the partner as outdated afresh (a
    /// repeated mark is harmless; a missed one would not be).
    pub fn set_peer_outdater(&self, f: PeerOutdater) {
        *self.outdater.write().unwrap_or_else(|e| e.into_inner()) = Some(f);
        self.lock().peer_outdated = false;
        self.changed.notify_waiters();
    }

    /// Clears the partner's outdated mark once the pair is in sync again:
    /// runs `clear` (the commit that records the pair in sync) only while
    /// the link is in sync, serialised with the outdate step, so that a
    /// write acknowledged degraded after a new link loss always waits for a
    /// fresh outdate commit ordered after this clear. Ok(false) when not in
    /// sync now (nothing done).
    pub async fn clear_peer_outdated<F>(&self, clear: F) -> Result<bool, String>
    where
        F: std::future::Future<Output = Result<(), String>>,
    {
        let _g = self.rotate_lock.lock().await;
        if self.lock().link_state != LinkState::InSync {
            return Ok(false);
        }
        clear.await?;
        self.lock().peer_outdated = false;
        Ok(true)
    }

    /// Wakes writes held for the lease so they re-evaluate the predicate.
    pub fn lease_changed(&self) {
        self.changed.notify_waiters();
    }

    fn may_degrade(&self) -> bool {
        let p = self
            .may_degrade
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        p()
    }

    /// Changes the resync rate limit (bytes/s, 0 = unlimited).
    pub fn set_resync_rate(&self, bytes_per_sec: u64) {
        self.resync_rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, IoError>
    where
        T: Send + 'static,
        F: FnOnce(&Replica) -> replica::Result<T> + Send + 'static,
    {
        let r = self.replica.clone();
        match tokio::task::spawn_blocking(move || f(&r)).await {
            Ok(res) => res.map_err(IoError::from),
            Err(_) => Err(IoError::new(EIO, "storage task failed")),
        }
    }

    /// True while a replication link to the partner is up (in sync or
    /// resyncing).
    pub fn is_replicating(&self) -> bool {
        self.active_link().is_some()
    }

    fn active_link(&self) -> Option<Arc<PeerLink>> {
        let l = self.lock().link.clone()?;
        l.is_alive().then_some(l)
    }

    fn check_primary(&self) -> Result<(), IoError> {
        if self.role() == Role::Primary {
            Ok(())
        } else {
            Err(IoError::new(EPERM, "this replica is not primary"))
        }
    }

    // ------------------------------------------------------------------
    // Data path.

    /// Reads `len` bytes at `offset` from the local replica.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError> {
        if self.role() != Role::Primary && !self.replica.meta().consistent {
            return Err(IoError::new(EIO, "replica is inconsistent (resync target)"));
        }
        if !region::in_bounds(offset, len as u64, self.size) {
            return Err(IoError::new(EINVAL, "read beyond the end of the volume"));
        }
        // Data in the page cache is copied right here: a trip to the
        // blocking pool costs more than the copy (two thread wake-ups per
        // 4 KiB read). Only a read that would wait for the disk goes there.
        let mut buf = vec![0u8; len as usize];
        let data = if len <= INLINE_READ_MAX && self.replica.read_cached(&mut buf, offset) {
            buf
        } else {
            self.blocking(move |r| {
                r.read_at(&mut buf, offset)?;
                Ok(buf)
            })
            .await?
        };
        self.stats.read_ops.fetch_add(1, Ordering::Relaxed);
        self.stats
            .read_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(data)
    }

    /// Allocation extents of a range of the local replica.
    pub async fn extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, IoError> {
        self.blocking(move |r| Ok(r.extents(offset, len))).await
    }

    /// Writes `data` at `offset`; returns when durable on both replicas (or
    /// locally in degraded mode, see the module documentation).
    pub async fn write(
        self: &Arc<Self>,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> Result<(), IoError> {
        self.check_primary()?;
        let len = data.len() as u64;
        if !region::in_bounds(offset, len, self.size) {
            return Err(IoError::new(ENOSPC, "write beyond the end of the volume"));
        }
        if len == 0 {
            return Ok(());
        }
        let data = Arc::new(data);
        let op = Op::Write {
            offset,
            data: data.clone(),
        };
        let res = self.modify(op, fua).await;
        recycle(data);
        res?;
        self.stats.write_ops.fetch_add(1, Ordering::Relaxed);
        self.stats.write_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Starts a write of `len` bytes at `offset` whose data will arrive in
    /// chunks, replicated as it arrives (cut-through). Does up front what
    /// [`Volume::write`] does before it needs the data: checks the role and
    /// the range, waits for the byte range and shares its regions, makes
    /// the dirty-bitmap mark durable, and picks the link. The caller then
    /// hands over the data with [`StreamedWrite::push`] and completes with
    /// [`StreamedWrite::finish`], which returns when [`Volume::write`]
    /// would. See [`StreamedWrite`] for a write dropped before it finished.
    pub async fn begin_write(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<StreamedWrite, IoError> {
        self.check_primary()?;
        if !region::in_bounds(offset, len, self.size) {
            return Err(IoError::new(ENOSPC, "write beyond the end of the volume"));
        }
        if len == 0 {
            return Err(IoError::new(EINVAL, "a streamed write needs data"));
        }
        let regions = region::regions_for(offset, len, self.region_size);
        let guard = self
            .locks
            .shared(regions.clone(), offset, offset + len)
            .await;
        // As in `modify`: the mark is durable before any byte reaches disk,
        // and the link is taken after the mark.
        self.mark_dirty(regions.clone()).await?;
        self.locks.touch(regions);
        Ok(StreamedWrite {
            vol: self.clone(),
            guard: Arc::new(guard),
            offset,
            len,
            pushed: 0,
            durable: fua || self.opts.durability == Durability::EveryWrite,
            link: self.active_link(),
            started: None,
            chunks: Vec::new(),
            local: Vec::new(),
            remote: Vec::new(),
            remote_failed: None,
            sending: false,
            finishing: false,
            done: false,
        })
    }

    /// Makes a range read as zeroes (WRITE_ZEROES and TRIM).
    pub async fn write_zeroes(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<(), IoError> {
        self.check_primary()?;
        if !region::in_bounds(offset, len, self.size) {
            return Err(IoError::new(ENOSPC, "range beyond the end of the volume"));
        }
        if len == 0 {
            return Ok(());
        }
        self.modify(Op::Zero { offset, len }, fua).await?;
        self.stats.write_ops.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Makes every acknowledged write durable on both replicas.
    pub async fn flush(self: &Arc<Self>) -> Result<(), IoError> {
        self.check_primary()?;
        let link = self.active_link();
        let local = self.blocking(|r| r.sync_data());
        let remote = async {
            match &link {
                Some(l) => Some(l.request(K_FLUSH, 0, 0, 0, &[]).await),
                None => None,
            }
        };
        let (lres, rres) = tokio::join!(local, remote);
        lres?;
        self.stats.flush_ops.fetch_add(1, Ordering::Relaxed);
        match (rres, link) {
            (Some(Ok(rep)), _) if rep.status == 0 => Ok(()),
            (Some(_), Some(l)) => {
                self.link_lost(&l, "flush failed on the partner");
                self.degraded_ack(Op::Flush).await
            }
            _ => self.degraded_ack(Op::Flush).await,
        }
    }

    /// Marks `regions` dirty in the bitmap, durably. A hot region is
    /// usually marked already: then there is no trip to the blocking pool
    /// (the caller's request waits for this).
    async fn mark_dirty(&self, regions: std::ops::Range<u64>) -> Result<(), IoError> {
        if self.replica.is_marked(regions.clone()) {
            return Ok(());
        }
        self.blocking(move |r| r.mark_dirty(regions)).await
    }

    async fn modify(self: &Arc<Self>, op: Op, fua: bool) -> Result<(), IoError> {
        let (offset, len) = match &op {
            Op::Write { offset, data } => (*offset, data.len() as u64),
            Op::Zero { offset, len } => (*offset, *len),
            Op::Flush => unreachable!("flush is not a modification"),
        };
        let regions = region::regions_for(offset, len, self.region_size);
        let _guard = self
            .locks
            .shared(regions.clone(), offset, offset + len)
            .await;
        // The mark is durable before any byte of the write can reach disk.
        self.mark_dirty(regions.clone()).await?;
        self.locks.touch(regions);
        let durable = fua || self.opts.durability == Durability::EveryWrite;
        // Taken after the mark: a write that sees no link has its region
        // marked before any link could snapshot the bitmap for resync.
        let link = self.active_link();
        let started = Instant::now();
        let local = {
            let op_data = match &op {
                Op::Write { data, .. } => Some(data.clone()),
                _ => None,
            };
            self.blocking(move |r| {
                match op_data {
                    Some(d) => r.write_at(&d, offset)?,
                    None => r.write_zeroes(offset, len)?,
                }
                if durable {
                    r.sync_data()?;
                }
                Ok(())
            })
        };
        let remote = async {
            match &link {
                Some(l) => Some(self.send_op(l, &op, durable).await),
                None => None,
            }
        };
        let (lres, rres) = tokio::join!(local, remote);
        lres?;
        match (rres, link) {
            (Some(Ok(())), _) => {
                self.note_replication(started.elapsed());
                Ok(())
            }
            (Some(Err(why)), Some(l)) => {
                self.link_lost(&l, &why);
                self.degraded_ack(op).await
            }
            _ => self.degraded_ack(op).await,
        }
    }

    fn note_replication(&self, d: Duration) {
        let ns = d.as_nanos() as u64;
        self.stats.repl_ops.fetch_add(1, Ordering::Relaxed);
        self.stats.repl_ns.fetch_add(ns, Ordering::Relaxed);
        self.stats.repl_max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    async fn send_op(&self, link: &PeerLink, op: &Op, durable: bool) -> Result<(), String> {
        let res = match op {
            Op::Write { offset, data } => {
                link.request_shared(K_WRITE, durable_flag(durable), *offset, data.clone())
                    .await
            }
            Op::Zero { offset, len } => {
                // Ranges longer than a frame can describe are split.
                let mut done = 0u64;
                let mut last = None;
                while done < *len {
                    let n = (*len - done).min(1 << 30);
                    let r = link
                        .request(K_ZERO, durable_flag(durable), offset + done, n as u32, &[])
                        .await;
                    match r {
                        Ok(rep) if rep.status == 0 => {}
                        other => {
                            last = Some(other);
                            break;
                        }
                    }
                    done += n;
                }
                match last {
                    None => return Ok(()),
                    Some(r) => r,
                }
            }
            Op::Flush => link.request(K_FLUSH, 0, 0, 0, &[]).await,
        };
        match res {
            Ok(rep) if rep.status == 0 => Ok(()),
            Ok(rep) => Err(format!(
                "partner failed the request with errno {}: {}",
                rep.status,
                String::from_utf8_lossy(&rep.payload)
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Acknowledges an operation that the partner did not confirm: resend
    /// over a new link, or accept it in degraded mode while the lease
    /// allows, or hold it.
    async fn degraded_ack(self: &Arc<Self>, op: Op) -> Result<(), IoError> {
        let mut held = false;
        let res = loop {
            let n = self.changed.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.role() != Role::Primary {
                break Err(IoError::new(
                    EIO,
                    "replica was demoted with the write in flight",
                ));
            }
            if let Some(l) = self.active_link() {
                match self.send_op(&l, &op, true).await {
                    Ok(()) => break Ok(()),
                    Err(why) => {
                        self.link_lost(&l, &why);
                        continue;
                    }
                }
            }
            if self.may_degrade() {
                match self.ensure_peer_outdated().await {
                    Ok(()) => break self.ensure_rotated().await,
                    Err(why) => {
                        if !held {
                            tracing::warn!(
                                "writes held: the partner's replica cannot be recorded as \
                                 outdated ({why})"
                            );
                        }
                    }
                }
            }
            if !held {
                held = true;
                self.lock().writes_held += 1;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), n).await;
        };
        if held {
            self.lock().writes_held -= 1;
        }
        res
    }

    /// Records the partner's replica as outdated before the first degraded
    /// acknowledgement (no-op without an outdater, e.g. a lone mirror).
    async fn ensure_peer_outdated(&self) -> Result<(), String> {
        let f = self
            .outdater
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(f) = f else { return Ok(()) };
        let _g = self.rotate_lock.lock().await;
        if self.lock().peer_outdated {
            return Ok(());
        }
        let epoch = self.replica.meta().epoch;
        if f(epoch).await? {
            self.lock().peer_outdated = true;
            tracing::warn!(epoch, "partner's replica recorded as outdated");
        }
        Ok(())
    }

    /// Starts a new generation before the first degraded acknowledgement.
    async fn ensure_rotated(&self) -> Result<(), IoError> {
        let _g = self.rotate_lock.lock().await;
        if self.lock().rotated {
            return Ok(());
        }
        self.blocking(|r| r.update_meta(|m| m.gen.rotate_for_degraded_write(fresh_gen())))
            .await?;
        self.lock().rotated = true;
        tracing::warn!("volume running degraded: new generation started");
        Ok(())
    }

    fn link_lost(&self, link: &Arc<PeerLink>, why: &str) {
        link.close(why);
        let mut st = self.lock();
        if st.link.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
            st.link = None;
            st.resync = None;
            if st.role == Role::Primary {
                st.link_state = LinkState::Connecting {
                    last_error: Some(why.to_string()),
                };
            }
        }
        drop(st);
        self.changed.notify_waiters();
    }

    // ------------------------------------------------------------------
    // Background: statistics and the activity-log cleaner.

    fn sample_rate(&self) {
        let bytes = self.stats.write_bytes.load(Ordering::Relaxed);
        let mut st = self.lock();
        let (t0, b0) = st.rate_sample;
        let dt = t0.elapsed().as_secs_f64();
        if dt > 0.0 {
            let sample = bytes.saturating_sub(b0) as f64 / dt;
            st.write_rate = ratelimit::ewma(st.write_rate, sample, 0.3);
            if st.write_rate < 1.0 {
                st.write_rate = sample;
            }
        }
        st.rate_sample = (Instant::now(), bytes);
    }

    fn clean_activity_log(&self) {
        let link = {
            let st = self.lock();
            if st.role != Role::Primary || st.link_state != LinkState::InSync {
                return;
            }
            st.link.clone()
        };
        let Some(link) = link else { return };
        let idle = self
            .locks
            .take_idle(Instant::now() - self.opts.cleaner_idle);
        for r in idle {
            let Some(_g) = self.locks.try_exclusive(r) else {
                self.locks.retouch(r);
                continue;
            };
            let still = {
                let st = self.lock();
                st.link_state == LinkState::InSync
                    && st.link.as_ref().is_some_and(|l| Arc::ptr_eq(l, &link))
                    && link.is_alive()
            };
            if !still {
                self.locks.retouch(r);
                return;
            }
            if self.replica.clear_dirty(r).is_err() {
                self.locks.retouch(r);
            }
        }
    }

    // ------------------------------------------------------------------
    // Control.

    /// Promotes this replica to primary with `epoch`, which must exceed
    /// every epoch it has seen. `force` promotes an inconsistent replica.
    pub async fn promote(self: &Arc<Self>, epoch: u64, force: bool) -> Result<(), ControlError> {
        let meta = self.replica.meta();
        if self.role() == Role::Primary && epoch == meta.epoch {
            return Ok(());
        }
        if epoch <= meta.epoch {
            return Err(ControlError::StaleEpoch {
                requested: epoch,
                seen: meta.epoch,
            });
        }
        if !meta.consistent && !force {
            return Err(ControlError::Inconsistent);
        }
        let r = self.replica.clone();
        tokio::task::spawn_blocking(move || {
            r.update_meta(|m| {
                m.epoch = epoch;
                m.consistent = true;
                if m.gen.current == 0 {
                    // A new, never written volume: from now on it has data
                    // (all zeroes) that an empty partner must copy.
                    m.gen.current = fresh_gen();
                }
            })
        })
        .await
        .map_err(|_| ControlError::State("storage task failed".into()))??;
        self.become_primary();
        Ok(())
    }

    /// Resumes as primary after a restart, with the epoch it was promoted
    /// with (no other replica can have been promoted with it).
    pub fn resume_primary(self: &Arc<Self>, epoch: u64) -> Result<(), ControlError> {
        let meta = self.replica.meta();
        if epoch != meta.epoch {
            return Err(ControlError::StaleEpoch {
                requested: epoch,
                seen: meta.epoch,
            });
        }
        if !meta.consistent {
            return Err(ControlError::Inconsistent);
        }
        self.become_primary();
        Ok(())
    }

    fn become_primary(self: &Arc<Self>) {
        let mut st = self.lock();
        if let Some((_, h)) = st.incoming.take() {
            h.abort();
        }
        st.role = Role::Primary;
        st.rotated = false;
        st.peer_outdated = false;
        st.link_state = if st.partner.is_some() {
            LinkState::Connecting { last_error: None }
        } else {
            LinkState::Standalone
        };
        drop(st);
        self.restart_connector();
        tracing::info!(epoch = self.replica.meta().epoch, "promoted to primary");
    }

    /// Demotes this replica to secondary: writes are refused, the link is
    /// closed, and the replica waits for a primary.
    pub fn demote(&self) {
        let mut st = self.lock();
        st.role = Role::Secondary;
        st.peer_outdated = false;
        if let Some(c) = st.connector.take() {
            c.abort();
        }
        if let Some(l) = st.link.take() {
            l.close("demoted");
        }
        st.resync = None;
        st.link_state = LinkState::Waiting;
        drop(st);
        self.changed.notify_waiters();
    }

    /// Sets (or clears) the partner's replication address.
    pub fn set_partner(self: &Arc<Self>, addr: Option<String>) {
        let mut st = self.lock();
        if st.partner == addr {
            return;
        }
        st.partner = addr;
        st.peer_outdated = false;
        if let Some(l) = st.link.take() {
            l.close("partner changed");
        }
        if st.role == Role::Primary {
            st.link_state = if st.partner.is_some() {
                LinkState::Connecting { last_error: None }
            } else {
                LinkState::Standalone
            };
        }
        drop(st);
        self.restart_connector();
    }

    /// Records the split-brain decision for this replica.
    pub async fn decide(&self, d: Decision) -> Result<(), ControlError> {
        let r = self.replica.clone();
        tokio::task::spawn_blocking(move || r.update_meta(|m| m.decision = Some(d)))
            .await
            .map_err(|_| ControlError::State("storage task failed".into()))??;
        self.changed.notify_waiters();
        Ok(())
    }

    fn restart_connector(self: &Arc<Self>) {
        let mut st = self.lock();
        if let Some(c) = st.connector.take() {
            c.abort();
        }
        if st.role != Role::Primary {
            return;
        }
        let Some(addr) = st.partner.clone() else {
            return;
        };
        let me = self.clone();
        let h = tokio::spawn(async move { me.connector(addr).await });
        st.connector = Some(h.abort_handle());
        drop(st);
        self.changed.notify_waiters();
    }

    /// A status snapshot.
    pub fn status(&self) -> Status {
        let meta = self.replica.meta();
        // A stat(2): not under the volume's lock.
        let last_write_unix = self.replica.last_write_unix();
        let st = self.lock();
        let s = &self.stats;
        let write_ops = s.write_ops.load(Ordering::Relaxed);
        let write_bytes = s.write_bytes.load(Ordering::Relaxed);
        let avg = if write_ops == 0 {
            0.0
        } else {
            write_bytes as f64 / write_ops as f64
        };
        let repl_ops = s.repl_ops.load(Ordering::Relaxed);
        let repl_avg = if repl_ops == 0 {
            0.0
        } else {
            s.repl_ns.load(Ordering::Relaxed) as f64 / repl_ops as f64 / 1000.0
        };
        let resync = st.resync.as_ref().map(ResyncProgress::status);
        Status {
            volume_id: meta.volume_id.clone(),
            size: meta.size,
            region_size: meta.region_size,
            role: st.role,
            epoch: meta.epoch,
            gen: meta.gen.clone(),
            consistent: meta.consistent,
            decision: meta.decision,
            partner: st.partner.clone(),
            link: st.link_state.clone(),
            degraded: st.role == Role::Primary
                && !matches!(st.link_state, LinkState::InSync | LinkState::Resyncing),
            writes_held: st.writes_held,
            peer_outdated: st.peer_outdated,
            last_write_unix,
            split_brain_peer: st.split_peer.clone(),
            dirty_regions: self.replica.dirty_count(),
            resync,
            stats: StatsSnapshot {
                read_ops: s.read_ops.load(Ordering::Relaxed),
                read_bytes: s.read_bytes.load(Ordering::Relaxed),
                write_ops,
                write_bytes,
                avg_write_bytes: avg,
                write_bytes_per_sec: st.write_rate,
                flush_ops: s.flush_ops.load(Ordering::Relaxed),
                replicated_ops: repl_ops,
                replication_latency_avg_us: repl_avg,
                replication_latency_max_us: s.repl_max_ns.load(Ordering::Relaxed) / 1000,
                streamed_writes: s.streamed.load(Ordering::Relaxed),
                sync_link_advice: sync_advice::advise(st.write_rate, avg),
            },
            last_verify: st.last_verify.clone(),
            last_resync: st.last_resync.clone(),
        }
    }

    /// Waits until `pred` holds for the status, or the deadline passes.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&Status) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let n = self.changed.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if pred(&self.status()) {
                return true;
            }
            if tokio::time::timeout_at(
                deadline,
                tokio::time::timeout(Duration::from_millis(100), n),
            )
            .await
            .is_err()
            {
                return pred(&self.status());
            }
        }
    }

    // ------------------------------------------------------------------
    // Primary side of replication.

    async fn connector(self: Arc<Self>, addr: String) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.role() != Role::Primary {
                return;
            }
            let n = self.changed.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            match self.connect_once(&addr).await {
                Ok(link) => {
                    let up = Instant::now();
                    link.closed().await;
                    self.link_lost(&link, &link.close_reason().unwrap_or_default());
                    if up.elapsed() > Duration::from_secs(2) {
                        backoff = Duration::from_millis(100);
                    } else {
                        // A plain sleep: `changed` fires on every link loss
                        // and lease change, which would turn a flapping
                        // link into a tight reconnect-and-resync loop. A
                        // role or partner change aborts this task anyway.
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
                Err(why) => {
                    {
                        let mut st = self.lock();
                        if !matches!(st.link_state, LinkState::SplitBrain { .. }) {
                            st.link_state = LinkState::Connecting {
                                last_error: Some(why.clone()),
                            };
                        }
                    }
                    tracing::debug!("connecting to partner {addr}: {why}");
                    let _ = tokio::time::timeout(backoff, n).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn connect_once(self: &Arc<Self>, addr: &str) -> Result<Arc<PeerLink>, String> {
        let t = self.opts.link_timeout;
        let stream = tokio::time::timeout(t, TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        let hs = tokio::time::timeout(t * 2, self.client_handshake(&mut rd, &mut wr))
            .await
            .map_err(|_| "handshake timed out".to_string())??;
        let Some(resync_full) = hs else {
            return Err("split brain: waiting for a decision".into());
        };
        let link = PeerLink::start(rd, wr, addr.to_string(), t);
        {
            let mut st = self.lock();
            if st.role != Role::Primary {
                link.close("demoted during handshake");
                return Err("demoted".into());
            }
            st.link = Some(link.clone());
            st.rotated = false;
            // The next degraded period records the partner again (its mark
            // may be cleared once in sync; a repeated mark is harmless).
            st.peer_outdated = false;
            st.split_peer = None;
            st.link_state = LinkState::Resyncing;
        }
        self.changed.notify_waiters();
        tracing::info!(
            peer = addr,
            full = resync_full,
            "replication link up, resync starting"
        );
        let me = self.clone();
        let l2 = link.clone();
        tokio::spawn(async move { me.resync(l2).await });
        let me = self.clone();
        let l2 = link.clone();
        tokio::spawn(async move {
            while l2.is_alive() {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Err(e) = l2.request(K_PING, 0, 0, 0, &[]).await {
                    me.link_lost(&l2, &e.to_string());
                }
            }
        });
        Ok(link)
    }

    /// Returns `Some(full)` when replication may start, `None` on split brain.
    async fn client_handshake<R, W>(&self, rd: &mut R, wr: &mut W) -> Result<Option<bool>, String>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let io = |e: std::io::Error| format!("handshake: {e}");
        let mut greet = [0u8; 12];
        rd.read_exact(&mut greet).await.map_err(io)?;
        if &greet[0..8] != GREETING || greet[8..12] != VERSION.to_be_bytes() {
            return Err(format!(
                "partner does not speak pv-mirror protocol version {VERSION}"
            ));
        }
        let mut ns = [0u8; 32];
        rd.read_exact(&mut ns).await.map_err(io)?;
        let meta = self.replica.meta();
        let hello = serde_json::to_vec(&Hello {
            volume_id: meta.volume_id.clone(),
            size: meta.size,
            region_size: meta.region_size,
            epoch: meta.epoch,
        })
        .expect("hello serialises");
        let nc = nonce();
        let tag = mac(&self.opts.secret, LABEL_CLIENT, &[&ns, &nc, &hello]);
        let mut out = (hello.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&hello);
        out.extend_from_slice(&nc);
        out.extend_from_slice(&tag);
        wr.write_all(&out).await.map_err(io)?;
        wr.flush().await.map_err(io)?;
        let welcome_raw = read_msg(rd).await.map_err(io)?;
        let blen = rd.read_u32().await.map_err(io)?;
        let nregions = self.replica.region_count();
        if blen as u64 > nregions.div_ceil(8) {
            return Err("partner sent an oversized bitmap".into());
        }
        let mut bitmap = vec![0u8; blen as usize];
        rd.read_exact(&mut bitmap).await.map_err(io)?;
        let mut stag = [0u8; 32];
        rd.read_exact(&mut stag).await.map_err(io)?;
        if !mac_ok(
            &self.opts.secret,
            LABEL_SERVER,
            &[&nc, &ns, &welcome_raw, &bitmap],
            &stag,
        ) {
            return Err("partner failed authentication (wrong unit secret?)".into());
        }
        let welcome: Welcome =
            serde_json::from_slice(&welcome_raw).map_err(|e| format!("bad welcome: {e}"))?;
        if !welcome.accepted {
            return Err(format!(
                "partner refused: {}",
                welcome.error.unwrap_or_default()
            ));
        }
        let meta = self.replica.meta();
        let relation = meta.gen.compare(&welcome.gen);
        let decided = meta.decision == Some(Decision::KeepLocal)
            || welcome.decision == Some(Decision::DiscardLocal);
        let plan = if meta.decision == Some(Decision::DiscardLocal) {
            Err(
                "this replica is marked to be discarded: demote it and promote the partner"
                    .to_string(),
            )
        } else {
            match relation {
                Relation::Equal => Ok(false),
                Relation::LocalAhead { full } => Ok(full),
                Relation::PeerAhead { full } | Relation::SplitBrain { full } if decided => Ok(full),
                other => Err(format!(
                    "generations diverged ({other:?}); a decision is needed"
                )),
            }
        };
        let full = match plan {
            Ok(full) => full,
            Err(reason) => {
                let p = serde_json::to_vec(&Plan {
                    proceed: false,
                    reason: Some(reason.clone()),
                    resync: false,
                })
                .expect("plan serialises");
                let mut out = (p.len() as u32).to_be_bytes().to_vec();
                out.extend_from_slice(&p);
                let _ = wr.write_all(&out).await;
                let _ = wr.flush().await;
                {
                    let mut st = self.lock();
                    st.link_state = LinkState::SplitBrain { relation };
                    st.split_peer = Some(PeerSide {
                        gen: welcome.gen.clone(),
                        consistent: welcome.consistent,
                        dirty_regions: bitmap.iter().map(|b| u64::from(b.count_ones())).sum(),
                        last_write_unix: welcome.last_write_unix,
                    });
                }
                self.changed.notify_waiters();
                tracing::error!("split brain with partner: {reason}");
                return Ok(None);
            }
        };
        let peer_bits = Bits::from_bytes(nregions, &bitmap);
        let r = self.replica.clone();
        tokio::task::spawn_blocking(move || {
            if full {
                r.mark_all_dirty()
            } else {
                r.merge_dirty(&peer_bits)
            }
        })
        .await
        .map_err(|_| "storage task failed".to_string())?
        .map_err(|e| format!("bitmap: {e}"))?;
        let p = serde_json::to_vec(&Plan {
            proceed: true,
            reason: None,
            resync: self.replica.dirty_count() > 0,
        })
        .expect("plan serialises");
        let mut out = (p.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&p);
        wr.write_all(&out).await.map_err(io)?;
        wr.flush().await.map_err(io)?;
        Ok(Some(full))
    }

    async fn resync(self: Arc<Self>, link: Arc<PeerLink>) {
        let todo: Vec<u64> = self.replica.dirty_bits().iter_set().collect();
        let total_bytes: u64 = todo
            .iter()
            .map(|&r| region::region_span(r, self.region_size, self.size).1)
            .sum();
        let origin = Instant::now();
        {
            let mut st = self.lock();
            st.resync = Some(ResyncProgress {
                total: todo.len() as u64,
                done: 0,
                done_bytes: 0,
                remaining_bytes: total_bytes,
                started: origin,
            });
        }
        let mut bucket = TokenBucket::new(
            self.resync_rate.load(Ordering::Relaxed),
            self.region_size,
            Duration::ZERO,
        );
        // Several regions in flight: the partner applies them concurrently
        // and its group commit lets them share a flush, where one at a time
        // each region waits for a flush of its own. A region's bit is
        // cleared only once the partner has made it durable.
        let mut inflight = tokio::task::JoinSet::new();
        for idx in todo {
            while inflight.len() >= RESYNC_INFLIGHT {
                let Some(done) = inflight.join_next().await else {
                    break;
                };
                if !self.resync_step_done(&link, done) {
                    return;
                }
            }
            let rate = self.resync_rate.load(Ordering::Relaxed);
            if rate != bucket.rate() {
                bucket.set_rate(rate, origin.elapsed());
            }
            let (off, len) = region::region_span(idx, self.region_size, self.size);
            let wait = bucket.take(len, origin.elapsed());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            if !link.is_alive() {
                return;
            }
            inflight.spawn(self.clone().resync_region(link.clone(), idx, off, len));
        }
        while let Some(done) = inflight.join_next().await {
            if !self.resync_step_done(&link, done) {
                return;
            }
        }
        let cur = self.replica.meta().gen.current;
        match link
            .request(K_RESYNC_DONE, 0, 0, 8, &cur.to_be_bytes())
            .await
        {
            Ok(rep) if rep.status == 0 => {}
            Ok(rep) => {
                self.link_lost(
                    &link,
                    &format!("partner failed to finish resync: errno {}", rep.status),
                );
                return;
            }
            Err(e) => {
                self.link_lost(&link, &e.to_string());
                return;
            }
        }
        let r = self.replica.clone();
        let ok = tokio::task::spawn_blocking(move || {
            r.update_meta(|m| {
                if m.gen.current == cur {
                    m.gen.resync_finished_as_source();
                }
                m.decision = None;
            })
        })
        .await;
        if !matches!(ok, Ok(Ok(()))) {
            self.link_lost(&link, "could not record the end of resync");
            return;
        }
        {
            let mut st = self.lock();
            if st.link.as_ref().is_some_and(|l| Arc::ptr_eq(l, &link)) && link.is_alive() {
                st.link_state = LinkState::InSync;
                st.last_resync = st.resync.take().map(|p| p.status());
            }
        }
        self.changed.notify_waiters();
        tracing::info!("resync finished: volume in sync");
    }

    /// Copies region `idx` (`len` bytes at `off`) to the partner under the
    /// region's lock, and clears its dirty bit once the partner has it
    /// durable. Returns the bytes done, or why the link must be dropped
    /// (`None`: it already is).
    async fn resync_region(
        self: Arc<Self>,
        link: Arc<PeerLink>,
        idx: u64,
        off: u64,
        len: u64,
    ) -> Result<u64, Option<String>> {
        let _x = self.locks.exclusive(idx).await;
        if !link.is_alive() {
            return Err(None);
        }
        if !self.replica.is_dirty(idx) {
            // A write made it clean meanwhile (it reached both replicas).
            return Ok(len);
        }
        // Regions may be larger than a frame: send them in pieces, each
        // durable before the bit is cleared.
        for (at, n) in region::pieces(off, len, RESYNC_PIECE) {
            self.resync_piece(&link, at, n).await.map_err(Some)?;
        }
        let _ = self.replica.clear_dirty(idx);
        Ok(len)
    }

    /// Sends `len` bytes at `off` to the partner as one durable resync
    /// frame (a zero-fill frame where the local replica has a hole).
    async fn resync_piece(&self, link: &PeerLink, off: u64, len: u64) -> Result<(), String> {
        let data = self
            .blocking(move |r| {
                if r.is_hole(off, len) {
                    return Ok(None);
                }
                let mut buf = crate::bufpool::get(len as usize);
                r.read_at(&mut buf, off)?;
                Ok(Some(buf))
            })
            .await
            .map_err(|e| format!("resync read failed: {e}"))?;
        let flags = F_DURABLE | F_RESYNC;
        let reply = match data {
            None => link.request(K_ZERO, flags, off, len as u32, &[]).await,
            Some(buf) => {
                let buf = Arc::new(buf);
                let r = link.request_shared(K_WRITE, flags, off, buf.clone()).await;
                recycle(buf);
                r
            }
        };
        match reply {
            Ok(rep) if rep.status == 0 => Ok(()),
            Ok(rep) => Err(format!("partner failed resync write: errno {}", rep.status)),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Accounts for one finished [`Self::resync_region`]; false when the
    /// resync must stop (the link is then dropped, unless it already was).
    fn resync_step_done(
        &self,
        link: &Arc<PeerLink>,
        done: Result<Result<u64, Option<String>>, tokio::task::JoinError>,
    ) -> bool {
        let len = match done {
            Ok(Ok(len)) => len,
            Ok(Err(why)) => {
                if let Some(why) = why {
                    self.link_lost(link, &why);
                }
                return false;
            }
            Err(_) => {
                self.link_lost(link, "resync task failed");
                return false;
            }
        };
        let mut st = self.lock();
        // A resync of an older link must not count into a newer one's.
        if !st.link.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
            return false;
        }
        if let Some(p) = st.resync.as_mut() {
            p.done += 1;
            p.done_bytes += len;
            p.remaining_bytes = p.remaining_bytes.saturating_sub(len);
        }
        true
    }

    // ------------------------------------------------------------------
    // Verify.

    /// Compares every region of both replicas by SHA-256 (each region is
    /// held against writes while it is hashed on both sides).
    pub async fn verify(self: &Arc<Self>) -> Result<VerifyReport, ControlError> {
        let link = {
            let st = self.lock();
            if st.role != Role::Primary || st.link_state != LinkState::InSync {
                return Err(ControlError::State(
                    "verify needs a primary in sync with its partner".into(),
                ));
            }
            st.link.clone()
        };
        let Some(link) = link else {
            return Err(ControlError::State("no replication link".into()));
        };
        let n = self.replica.region_count();
        let mut report = VerifyReport {
            regions_checked: 0,
            differing_count: 0,
            differing: Vec::new(),
            region_size: self.region_size,
        };
        for idx in 0..n {
            let _x = self.locks.exclusive(idx).await;
            let (off, len) = region::region_span(idx, self.region_size, self.size);
            // Hashed in pieces, both sides at once: a large region's hash
            // would otherwise outlast the link timeout.
            let mut same = true;
            for (at, n) in region::pieces(off, len, u64::from(MAX_VERIFY_LEN)) {
                let local = self.blocking(move |r| r.hash_range(at, n));
                let remote = link.request(K_VERIFY, 0, at, n as u32, &[]);
                let (local, remote) = tokio::join!(local, remote);
                let local = local.map_err(|e| ControlError::State(format!("local hash: {e}")))?;
                let remote = remote.map_err(|e| ControlError::State(e.to_string()))?;
                if remote.status != 0 || remote.payload.len() != 32 {
                    return Err(ControlError::State(format!(
                        "partner could not hash region {idx}"
                    )));
                }
                if remote.payload[..] != local[..] {
                    same = false;
                    break;
                }
            }
            report.regions_checked += 1;
            if !same {
                report.differing_count += 1;
                if report.differing.len() < 1000 {
                    report.differing.push(idx);
                }
            }
        }
        self.lock().last_verify = Some(report.clone());
        Ok(report)
    }

    // ------------------------------------------------------------------
    // Secondary side of replication.

    /// Accepts replication connections until the task is cancelled.
    pub async fn serve_replication(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        // Unauthenticated connections (before the handshake, each bounded
        // by its timeout) are capped: a stranger opening many cannot
        // exhaust the daemon. The one partner needs one at a time.
        let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
        loop {
            let (s, peer) = listener.accept().await?;
            // The partner's own address is never crowded out by strangers.
            let from_partner = self.lock().partner.as_deref().is_some_and(|p| {
                p.rsplit_once(':')
                    .map(|(h, _)| h.trim_matches(['[', ']']))
                    .and_then(|h| h.parse::<std::net::IpAddr>().ok())
                    == Some(peer.ip())
            });
            let permit = match pending.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) if from_partner => None,
                Err(_) => {
                    tracing::debug!("replication connection from {peer} dropped: {MAX_PENDING_HANDSHAKES} handshakes pending");
                    continue;
                }
            };
            let _ = s.set_nodelay(true);
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.handle_incoming(s, peer.to_string(), permit).await {
                    tracing::info!("replication connection from {peer}: {e}");
                }
            });
        }
    }

    async fn handle_incoming(
        self: Arc<Self>,
        stream: TcpStream,
        peer: String,
        handshake: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<(), String> {
        let (mut rd, mut wr) = stream.into_split();
        let t = self.opts.link_timeout;
        let hs = tokio::time::timeout(t * 2, self.server_handshake(&mut rd, &mut wr))
            .await
            .map_err(|_| "handshake timed out".to_string())??;
        drop(handshake);
        let Some((epoch, _resync)) = hs else {
            return Ok(());
        };
        // Register as the one primary connection, replacing an older one.
        let (tx_abort, rx_abort) = tokio::sync::oneshot::channel::<()>();
        let (tx_id, rx_id) = tokio::sync::oneshot::channel::<u64>();
        let me = self.clone();
        let task = tokio::spawn(async move {
            let _keep = tx_abort;
            let conn = rx_id
                .await
                .map_err(|_| "connection was not registered".to_string())?;
            me.serve_frames(rd, wr, epoch, conn).await
        });
        let id = {
            let mut st = self.lock();
            if st.role == Role::Primary {
                task.abort();
                return Err("became primary during handshake".into());
            }
            if let Some((_, old)) = st.incoming.take() {
                old.abort();
            }
            st.next_incoming += 1;
            let id = st.next_incoming;
            st.incoming = Some((id, task.abort_handle()));
            st.link_state = LinkState::Replicating {
                primary: peer.clone(),
                epoch,
            };
            id
        };
        let _ = tx_id.send(id);
        self.changed.notify_waiters();
        let _ = rx_abort.await;
        let res = match task.await {
            Ok(r) => r,
            Err(_) => Err("replaced by a newer primary connection".into()),
        };
        {
            let mut st = self.lock();
            if st.incoming.as_ref().is_some_and(|(i, _)| *i == id) {
                st.incoming = None;
                if st.role == Role::Secondary {
                    st.link_state = LinkState::Waiting;
                }
            }
        }
        self.changed.notify_waiters();
        res
    }

    /// Returns `Some((epoch, resync))` when the primary proceeds.
    async fn server_handshake<R, W>(
        &self,
        rd: &mut R,
        wr: &mut W,
    ) -> Result<Option<(u64, bool)>, String>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let io = |e: std::io::Error| format!("handshake: {e}");
        let ns = nonce();
        let mut out = GREETING.to_vec();
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&ns);
        wr.write_all(&out).await.map_err(io)?;
        wr.flush().await.map_err(io)?;
        let hello_raw = read_msg(rd).await.map_err(io)?;
        let mut nc = [0u8; 32];
        rd.read_exact(&mut nc).await.map_err(io)?;
        let mut tag = [0u8; 32];
        rd.read_exact(&mut tag).await.map_err(io)?;
        if !mac_ok(
            &self.opts.secret,
            LABEL_CLIENT,
            &[&ns, &nc, &hello_raw],
            &tag,
        ) {
            tracing::warn!("rejected an unauthenticated replication connection");
            return Err("client failed authentication".into());
        }
        let hello: Hello =
            serde_json::from_slice(&hello_raw).map_err(|e| format!("bad hello: {e}"))?;
        let meta = self.replica.meta();
        let refusal = if hello.volume_id != meta.volume_id {
            Some(format!(
                "volume {} is not this replica's volume {}",
                hello.volume_id, meta.volume_id
            ))
        } else if hello.size != meta.size || hello.region_size != meta.region_size {
            Some("volume geometry differs".to_string())
        } else if self.role() == Role::Primary {
            Some("this replica is primary too".to_string())
        } else if hello.epoch < meta.epoch {
            Some(format!(
                "stale epoch {}: this replica has seen epoch {}",
                hello.epoch, meta.epoch
            ))
        } else {
            None
        };
        if refusal.is_none() && hello.epoch > meta.epoch {
            let r = self.replica.clone();
            let e = hello.epoch;
            tokio::task::spawn_blocking(move || r.update_meta(|m| m.epoch = m.epoch.max(e)))
                .await
                .map_err(|_| "storage task failed".to_string())?
                .map_err(|e| format!("meta: {e}"))?;
        }
        let meta = self.replica.meta();
        let welcome = serde_json::to_vec(&Welcome {
            accepted: refusal.is_none(),
            error: refusal.clone(),
            gen: meta.gen.clone(),
            epoch: meta.epoch,
            consistent: meta.consistent,
            decision: meta.decision,
            last_write_unix: self.replica.last_write_unix(),
        })
        .expect("welcome serialises");
        let bitmap = if refusal.is_none() {
            self.replica.dirty_bits().to_bytes()
        } else {
            Vec::new()
        };
        let stag = mac(
            &self.opts.secret,
            LABEL_SERVER,
            &[&nc, &ns, &welcome, &bitmap],
        );
        let mut out = (welcome.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&welcome);
        out.extend_from_slice(&(bitmap.len() as u32).to_be_bytes());
        out.extend_from_slice(&bitmap);
        out.extend_from_slice(&stag);
        wr.write_all(&out).await.map_err(io)?;
        wr.flush().await.map_err(io)?;
        if let Some(r) = refusal {
            return Err(format!("refused primary: {r}"));
        }
        let plan_raw = read_msg(rd).await.map_err(io)?;
        let plan: Plan = serde_json::from_slice(&plan_raw).map_err(|e| format!("bad plan: {e}"))?;
        if !plan.proceed {
            tracing::error!(
                "primary refuses to replicate: {}",
                plan.reason.unwrap_or_default()
            );
            return Ok(None);
        }
        if plan.resync {
            let r = self.replica.clone();
            tokio::task::spawn_blocking(move || r.update_meta(|m| m.consistent = false))
                .await
                .map_err(|_| "storage task failed".to_string())?
                .map_err(|e| format!("meta: {e}"))?;
        }
        Ok(Some((hello.epoch, plan.resync)))
    }

    /// The id of the registered primary connection, if any.
    fn current_incoming(&self) -> Option<u64> {
        self.lock().incoming.as_ref().map(|(id, _)| *id)
    }

    async fn serve_frames(
        self: Arc<Self>,
        mut rd: tokio::net::tcp::OwnedReadHalf,
        wr: tokio::net::tcp::OwnedWriteHalf,
        epoch: u64,
        conn: u64,
    ) -> Result<(), String> {
        // Writes of an older connection may still be running (their tasks
        // outlive it): let them finish before this primary's frames, which
        // start with a resync of exactly those regions. Frames of the older
        // connection that start later see that it is no longer current.
        drop(self.frame_gate.write().await);
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(1024);
        let writer = tokio::spawn(async move {
            let mut wr = BufWriter::new(wr);
            while let Some(b) = rx.recv().await {
                wr.write_all(&b).await?;
                while let Ok(more) = rx.try_recv() {
                    wr.write_all(&more).await?;
                }
                wr.flush().await?;
            }
            Ok::<_, std::io::Error>(())
        });
        struct AbortOnDrop(AbortHandle);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _w = AbortOnDrop(writer.abort_handle());
        let slots = Arc::new(Semaphore::new(256));
        let parts = Arc::new(Parts::default());
        let mut part_seq = 0u64;
        let fd = Some(rd.as_ref().as_raw_fd());
        loop {
            let mut hdr = [0u8; Frame::LEN];
            rd.read_exact(&mut hdr)
                .await
                .map_err(|e| format!("primary connection closed: {e}"))?;
            let f = Frame::decode(&hdr).ok_or("bad frame magic")?;
            let payload_len = if f.has_payload() { f.len } else { 0 };
            if payload_len > MAX_FRAME_PAYLOAD {
                return Err(format!("frame payload {payload_len} too large"));
            }
            let mut payload = crate::bufpool::get(payload_len as usize);
            crate::lowat::read_exact(&mut rd, fd, &mut payload)
                .await
                .map_err(|e| format!("primary connection closed: {e}"))?;
            if self.role() != Role::Secondary || self.replica.meta().epoch != epoch {
                return Err("a newer primary took over; closing".into());
            }
            // Frames run concurrently. A chunk of a streamed write that is
            // not the last one (PART) is numbered; a frame that makes data
            // durable first waits until every PART received before it is
            // written, so that the final chunk's sync covers the whole write.
            let part = (f.flags & F_PART != 0).then(|| {
                part_seq += 1;
                parts.start(part_seq)
            });
            let barrier = (part.is_none() && makes_durable(&f)).then_some(part_seq);
            let permit = slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| "closed".to_string())?;
            let me = self.clone();
            let tx = tx.clone();
            let parts = parts.clone();
            tokio::spawn(async move {
                if let Some(upto) = barrier {
                    parts.wait_upto(upto).await;
                }
                let hold = FrameHold {
                    _gate: me.frame_gate.clone().read_owned().await,
                    _part: part,
                };
                let reply = me.apply_frame(f, payload, hold, conn).await;
                let _ = tx.send(reply).await;
                drop(permit);
            });
        }
    }

    /// Applies one frame of connection `conn`, unless a newer connection
    /// took over, and encodes the reply.
    async fn apply_frame(&self, f: Frame, payload: Vec<u8>, hold: FrameHold, conn: u64) -> Vec<u8> {
        let res = if self.current_incoming() == Some(conn) {
            self.execute_frame(f, payload, hold).await
        } else {
            Err(IoError::new(EIO, "a newer primary connection took over"))
        };
        let (status, body) = match res {
            Ok(b) => (0, b),
            Err(e) => (e.errno, e.message.into_bytes()),
        };
        let mut out = Frame {
            kind: K_REPLY,
            flags: 0,
            id: f.id,
            offset: f.offset,
            len: body.len() as u32,
            aux: status,
        }
        .encode()
        .to_vec();
        out.extend_from_slice(&body);
        out
    }

    /// Executes a request frame. `hold` is kept until the storage work is
    /// done (moved into the blocking task, which outlives a cancelled
    /// caller).
    async fn execute_frame(
        &self,
        f: Frame,
        payload: Vec<u8>,
        hold: FrameHold,
    ) -> Result<Vec<u8>, IoError> {
        if f.flags & !F_KNOWN != 0 {
            return Err(IoError::new(
                EINVAL,
                format!("unknown frame flags {:#x}", f.flags),
            ));
        }
        if f.flags & F_PART != 0 && f.kind != K_WRITE {
            return Err(IoError::new(EINVAL, "PART is only valid on WRITE"));
        }
        let durable = f.flags & F_DURABLE != 0;
        let part = f.flags & F_PART != 0;
        match f.kind {
            K_WRITE => {
                if !region::in_bounds(f.offset, payload.len() as u64, self.size) {
                    return Err(IoError::new(EINVAL, "write outside the volume"));
                }
                let off = f.offset;
                self.blocking(move |r| {
                    let _hold = hold;
                    r.write_at(&payload, off)?;
                    let len = payload.len() as u64;
                    crate::bufpool::put(payload);
                    if durable && part {
                        // The final chunk's sync makes it durable; start now.
                        r.start_writeback(off, len);
                    } else if durable {
                        r.sync_data()?;
                    }
                    Ok(Vec::new())
                })
                .await
            }
            K_ZERO => {
                let (off, len) = (f.offset, f.len as u64);
                if !region::in_bounds(off, len, self.size) {
                    return Err(IoError::new(EINVAL, "range outside the volume"));
                }
                self.blocking(move |r| {
                    let _hold = hold;
                    r.write_zeroes(off, len)?;
                    if durable {
                        r.sync_data()?;
                    }
                    Ok(Vec::new())
                })
                .await
            }
            K_FLUSH => {
                self.blocking(move |r| {
                    let _hold = hold;
                    r.sync_data().map(|_| Vec::new())
                })
                .await
            }
            K_PING => Ok(Vec::new()),
            K_VERIFY => {
                let (off, len) = (f.offset, u64::from(f.len));
                if len == 0
                    || len > u64::from(MAX_VERIFY_LEN)
                    || !region::in_bounds(off, len, self.size)
                {
                    return Err(IoError::new(EINVAL, "verify range outside the volume"));
                }
                self.blocking(move |r| r.hash_range(off, len).map(|h| h.to_vec()))
                    .await
            }
            K_RESYNC_DONE => {
                let Ok(cur) = <[u8; 8]>::try_from(&payload[..]) else {
                    return Err(IoError::new(EINVAL, "RESYNC_DONE carries 8 bytes"));
                };
                let cur = u64::from_be_bytes(cur);
                if cur == 0 {
                    return Err(IoError::new(EINVAL, "generation 0 is reserved"));
                }
                self.blocking(move |r| {
                    let _hold = hold;
                    r.sync_data()?;
                    r.update_meta(|m| {
                        m.gen.resync_finished_as_target(cur);
                        m.consistent = true;
                        m.decision = None;
                    })?;
                    r.clear_all_dirty()?;
                    Ok(Vec::new())
                })
                .await
            }
            _ => Err(IoError::new(
                EINVAL,
                format!("unknown frame kind {}", f.kind),
            )),
        }
    }
}

/// True for a frame after which data must be durable: it waits for the
/// PART frames received before it (see `serve_frames`).
fn makes_durable(f: &Frame) -> bool {
    f.flags & F_DURABLE != 0 || matches!(f.kind, K_FLUSH | K_RESYNC_DONE)
}

/// Secondary, per connection: the PART frames (by arrival number) still
/// being written.
#[derive(Default)]
struct Parts {
    inflight: Mutex<std::collections::BTreeSet<u64>>,
    done: Notify,
}

/// A PART frame being written; dropped when it is.
struct PartGuard {
    parts: Arc<Parts>,
    seq: u64,
}

impl Parts {
    fn start(self: &Arc<Self>, seq: u64) -> PartGuard {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(seq);
        PartGuard {
            parts: self.clone(),
            seq,
        }
    }

    /// Waits until every PART frame numbered `upto` or lower was written.
    async fn wait_upto(&self, upto: u64) {
        loop {
            let n = self.done.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            let first = self
                .inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .first()
                .copied();
            if first.is_none_or(|s| s > upto) {
                return;
            }
            n.await;
        }
    }
}

impl Drop for PartGuard {
    fn drop(&mut self) {
        self.parts
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.seq);
        self.parts.done.notify_waiters();
    }
}

/// What a frame holds until its storage work is done: the connection gate
/// (shared) and, for a PART frame, its place among the PARTs in flight.
struct FrameHold {
    _gate: OwnedRwLockReadGuard<()>,
    _part: Option<PartGuard>,
}

/// A write whose data arrives in chunks and is replicated as it arrives
/// (cut-through), started with [`Volume::begin_write`].
///
/// Each chunk is queued on the replication link at once as its own `WRITE`
/// frame (all but the last with `PART`; the last with `DURABLE` when the
/// write must be durable) and written locally at once, without sync.
/// [`StreamedWrite::finish`] waits for every local write, syncs, and
/// collects the partner's replies. The chunks are kept until then: if the
/// partner did not confirm every one, the whole write takes the degraded
/// path of [`Volume::write`] (resent over a new link, or acknowledged
/// degraded, or held).
///
/// Dropped before `finish` (the NBD client went away mid-payload), the
/// write is *abandoned* with some chunks on one replica or on both. The
/// activity-log cleaner would later clear the region's mark as "in sync",
/// so a task settles it first, still holding the region: it waits for
/// every local write and partner reply, makes the chunks durable on both
/// sides when the write had to be durable, and, if anything failed (or
/// what reached the partner is unknown), breaks the link — the reconnection
/// resyncs every marked region. If everything succeeded, both replicas hold
/// the same bytes and the link stays up.
pub struct StreamedWrite {
    vol: Arc<Volume>,
    /// Shared with each local write task: the region stays locked until the
    /// last local write ended, even if this value is dropped first.
    guard: Arc<SharedGuard>,
    offset: u64,
    len: u64,
    pushed: u64,
    durable: bool,
    link: Option<Arc<PeerLink>>,
    /// When the first chunk was sent to the partner.
    started: Option<Instant>,
    chunks: Vec<Arc<Vec<u8>>>,
    local: Vec<JoinHandle<replica::Result<()>>>,
    remote: Vec<PendingReply>,
    /// Why a chunk could not be sent; later chunks are not sent.
    remote_failed: Option<String>,
    /// A chunk is being queued: whether it reached the link is unknown.
    sending: bool,
    /// `finish` took the pending work: a drop from now on cannot settle.
    finishing: bool,
    done: bool,
}

impl std::fmt::Debug for StreamedWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamedWrite")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("pushed", &self.pushed)
            .finish()
    }
}

impl StreamedWrite {
    /// Bytes handed over so far.
    pub fn pushed(&self) -> u64 {
        self.pushed
    }

    /// Hands over the next chunk of data: queues it to the partner and
    /// starts writing it locally, without waiting for either.
    pub async fn push(&mut self, chunk: Vec<u8>) -> Result<(), IoError> {
        let n = chunk.len() as u64;
        if n == 0 || n > self.len - self.pushed {
            return Err(IoError::new(
                EINVAL,
                "chunk is empty or beyond the write's length",
            ));
        }
        let off = self.offset + self.pushed;
        self.pushed += n;
        let last = self.pushed == self.len;
        let data = Arc::new(chunk);
        let (r, held, d) = (self.vol.replica.clone(), self.guard.clone(), data.clone());
        let writeback = self.durable && !last;
        self.local.push(tokio::task::spawn_blocking(move || {
            let _held = held;
            r.write_at(&d, off)?;
            if writeback {
                // The sync in `finish` will need it on disk anyway.
                r.start_writeback(off, d.len() as u64);
            }
            Ok(())
        }));
        self.chunks.push(data.clone());
        if let (Some(link), None) = (&self.link, &self.remote_failed) {
            let flags = durable_flag(self.durable) | if last { 0 } else { F_PART };
            self.started.get_or_insert_with(Instant::now);
            self.sending = true;
            let res = link.send_shared(K_WRITE, flags, off, data).await;
            self.sending = false;
            match res {
                Ok(p) => self.remote.push(p),
                Err(e) => self.remote_failed = Some(e.to_string()),
            }
            // Let the link's writer send this chunk before the caller reads
            // the next one (with one worker thread it would otherwise wait
            // until the caller blocks, i.e. usually for the whole payload).
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    /// Completes the write once all its data was pushed: returns when it is
    /// durable on both replicas (written, with `on-flush` and no FUA), or
    /// acknowledged the degraded way, exactly like [`Volume::write`].
    pub async fn finish(mut self) -> Result<(), IoError> {
        if self.pushed != self.len {
            return Err(IoError::new(
                EIO,
                "streamed write finished before all its data arrived",
            ));
        }
        self.finishing = true;
        let vol = self.vol.clone();
        let durable = self.durable;
        let local = std::mem::take(&mut self.local);
        let local = async {
            let mut res = Ok(());
            for h in local {
                let r = match h.await {
                    Ok(r) => r.map_err(IoError::from),
                    Err(_) => Err(IoError::new(EIO, "storage task failed")),
                };
                res = res.and(r);
            }
            res?;
            if durable {
                vol.blocking(|r| r.sync_data()).await?;
            }
            Ok::<(), IoError>(())
        };
        let (lres, rres) = tokio::join!(local, wait_replies(std::mem::take(&mut self.remote)));
        self.done = true;
        let why = self.remote_failed.take().or(rres.err());
        if let (Some(why), Some(l)) = (&why, &self.link) {
            vol.link_lost(l, why);
        }
        lres?;
        match (why, &self.link) {
            (None, Some(_)) => {
                if let Some(t) = self.started {
                    vol.note_replication(t.elapsed());
                }
                vol.stats.streamed.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                let data = if self.chunks.len() == 1 {
                    self.chunks[0].clone()
                } else {
                    let mut v = Vec::with_capacity(self.len as usize);
                    for c in &self.chunks {
                        v.extend_from_slice(c);
                    }
                    Arc::new(v)
                };
                let op = Op::Write {
                    offset: self.offset,
                    data,
                };
                vol.degraded_ack(op).await?;
            }
        }
        vol.stats.write_ops.fetch_add(1, Ordering::Relaxed);
        vol.stats.write_bytes.fetch_add(self.len, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for StreamedWrite {
    fn drop(&mut self) {
        for c in self.chunks.drain(..) {
            recycle(c);
        }
        if self.done || self.pushed == 0 {
            return;
        }
        let runtime = tokio::runtime::Handle::try_current();
        if self.finishing || self.sending || runtime.is_err() {
            // What reached the partner is unknown: resync.
            if let Some(l) = &self.link {
                self.vol
                    .link_lost(l, "streamed write interrupted; resyncing marked regions");
            }
            return;
        }
        let settle = settle_abandoned(
            self.vol.clone(),
            self.guard.clone(),
            self.link.take(),
            std::mem::take(&mut self.local),
            std::mem::take(&mut self.remote),
            self.remote_failed.take(),
            self.durable,
        );
        if let Ok(rt) = runtime {
            rt.spawn(settle);
        }
    }
}

/// Waits for every reply; the first failure, described.
async fn wait_replies(pending: Vec<PendingReply>) -> Result<(), String> {
    for p in pending {
        match p.wait().await {
            Ok(rep) if rep.status == 0 => {}
            Ok(rep) => {
                return Err(format!(
                    "partner failed the request with errno {}: {}",
                    rep.status,
                    String::from_utf8_lossy(&rep.payload)
                ))
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// Settles a streamed write abandoned mid-payload (see [`StreamedWrite`]):
/// keeps its region locked until both replicas are known to hold the same
/// bytes — durable, if the write had to be — or breaks the link.
async fn settle_abandoned(
    vol: Arc<Volume>,
    guard: Arc<SharedGuard>,
    link: Option<Arc<PeerLink>>,
    local: Vec<JoinHandle<replica::Result<()>>>,
    remote: Vec<PendingReply>,
    failed: Option<String>,
    durable: bool,
) {
    let _held = guard;
    let mut local_ok = true;
    for h in local {
        local_ok &= matches!(h.await, Ok(Ok(())));
    }
    if durable && local_ok {
        local_ok = vol.blocking(|r| r.sync_data()).await.is_ok();
    }
    // Without a link the region stays marked until the next resync.
    let Some(link) = link else { return };
    let mut why = match failed {
        Some(w) => Some(w),
        None => wait_replies(remote).await.err(),
    };
    if why.is_none() && !local_ok {
        why = Some("local write failed".into());
    }
    if why.is_none() && durable {
        // The partner wrote the chunks without sync (PART; the final,
        // syncing chunk never came): a flush makes them durable.
        match link.request(K_FLUSH, 0, 0, 0, &[]).await {
            Ok(rep) if rep.status == 0 => {}
            Ok(rep) => why = Some(format!("partner flush failed: errno {}", rep.status)),
            Err(e) => why = Some(e.to_string()),
        }
    }
    match why {
        Some(why) => vol.link_lost(
            &link,
            &format!("write abandoned mid-stream, replicas may differ ({why}); resyncing"),
        ),
        None => tracing::debug!("write abandoned mid-stream: both replicas hold the same chunks"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::CreateOptions;

    fn simplex(dir: &std::path::Path) -> Arc<Volume> {
        let r = Replica::create(
            dir,
            &CreateOptions {
                volume_id: "v".into(),
                size: 8 << 20,
                region_size: 1 << 20,
                initial_gen: Some(1),
            },
        )
        .unwrap();
        Volume::start(r, VolumeOptions::default())
    }

    #[tokio::test]
    async fn durable_frames_wait_for_earlier_parts() {
        let parts = Arc::new(Parts::default());
        let (p1, p2) = (parts.start(1), parts.start(2));
        let nothing_before = tokio::time::timeout(Duration::from_secs(1), parts.wait_upto(0));
        nothing_before.await.expect("no PART numbered 0 or lower");
        let waiter = {
            let parts = parts.clone();
            tokio::spawn(async move { parts.wait_upto(2).await })
        };
        let p3 = parts.start(3); // arrived after the durable frame
        drop(p2);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "PART 1 is still being written");
        drop(p1);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("PARTs 1 and 2 written")
            .unwrap();
        drop(p3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streamed_write_without_partner() {
        let d = tempfile::tempdir().unwrap();
        let v = simplex(d.path());
        // Not primary yet: refused before any data is read.
        assert_eq!(
            v.begin_write(0, 4096, false).await.unwrap_err().errno,
            EPERM
        );
        v.promote(1, false).await.unwrap();
        assert_eq!(
            v.begin_write(8 << 20, 1, false).await.unwrap_err().errno,
            ENOSPC
        );
        assert_eq!(v.begin_write(0, 0, false).await.unwrap_err().errno, EINVAL);
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = v.begin_write(100, data.len() as u64, false).await.unwrap();
        for c in data.chunks(1 << 20) {
            w.push(c.to_vec()).await.unwrap();
        }
        assert_eq!(w.push(vec![1]).await.unwrap_err().errno, EINVAL);
        w.finish().await.unwrap();
        assert_eq!(v.read(100, data.len() as u32).await.unwrap(), data);
        assert_eq!(v.status().stats.write_ops, 1);
        assert_eq!(v.status().stats.write_bytes, data.len() as u64);
        // Abandoned after one chunk: the chunk may be there, the range is
        // released, and a later write to it goes through.
        let mut w = v.begin_write(0, 2 << 20, true).await.unwrap();
        w.push(vec![7u8; 1 << 20]).await.unwrap();
        drop(w);
        let w = v.begin_write(0, 2 << 20, true).await.unwrap();
        assert_eq!(w.finish().await.unwrap_err().errno, EIO, "incomplete");
        tokio::time::timeout(Duration::from_secs(5), v.write(0, vec![9u8; 4096], true))
            .await
            .expect("range released")
            .unwrap();
        assert_eq!(v.read(0, 4096).await.unwrap(), vec![9u8; 4096]);
    }

    /// The partner is recorded as outdated before the first write
    /// acknowledged without it; while that fails the write is held, never
    /// acknowledged; once recorded, later writes of the same degraded
    /// period do not record again, and a new promotion records afresh.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_write_is_acknowledged_degraded_before_the_partner_is_outdated() {
        let d = tempfile::tempdir().unwrap();
        let v = simplex(d.path());
        let calls = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
        let allow = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c2, a2) = (calls.clone(), allow.clone());
        v.set_peer_outdater(Arc::new(move |epoch| {
            c2.lock().unwrap().push(epoch);
            let ok = a2.load(Ordering::SeqCst);
            Box::pin(async move {
                if ok {
                    Ok(true)
                } else {
                    Err("no quorum".to_string())
                }
            })
        }));
        v.promote(3, false).await.unwrap();
        // A partner nobody answers on: the volume is degraded.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = l.local_addr().unwrap().to_string();
        drop(l);
        v.set_partner(Some(dead));
        let w = {
            let v = v.clone();
            tokio::spawn(async move { v.write(0, vec![5u8; 4096], true).await })
        };
        assert!(
            v.wait_for(Duration::from_secs(10), |s| s.writes_held == 1)
                .await,
            "the write is held while the outdate cannot be recorded"
        );
        assert!(!w.is_finished(), "not acknowledged");
        assert!(!v.status().peer_outdated);
        allow.store(true, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("acknowledged once the outdate is recorded")
            .unwrap()
            .unwrap();
        assert!(v.status().peer_outdated);
        let n = calls.lock().unwrap().len();
        assert!(n >= 2, "tried until it was recorded: {n}");
        assert!(calls.lock().unwrap().iter().all(|e| *e == 3), "the epoch");
        v.write(8192, vec![6u8; 4096], true).await.unwrap();
        v.flush().await.unwrap();
        assert_eq!(calls.lock().unwrap().len(), n, "recorded once per period");
        // Demoted and promoted again: the next degraded write records anew.
        v.demote();
        v.promote(4, false).await.unwrap();
        v.write(0, vec![7u8; 4096], true).await.unwrap();
        assert_eq!(calls.lock().unwrap().last(), Some(&4));
        // Clearing is refused while not in sync.
        let cleared = v.clear_peer_outdated(async { Ok(()) }).await.unwrap();
        assert!(!cleared);
        assert!(v.status().peer_outdated);
    }

    /// An outdater that finds no partner replica to outdate (a unit of one
    /// PM so far) lets the write through but records nothing: it is asked
    /// again at the next degraded write, so that a partner that joined
    /// meanwhile is recorded before a write is acknowledged without it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_to_outdate_is_asked_again() {
        let d = tempfile::tempdir().unwrap();
        let v = simplex(d.path());
        let calls = Arc::new(AtomicU64::new(0));
        let partner = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c2, p2) = (calls.clone(), partner.clone());
        v.set_peer_outdater(Arc::new(move |_| {
            c2.fetch_add(1, Ordering::SeqCst);
            let there = p2.load(Ordering::SeqCst);
            Box::pin(async move { Ok(there) })
        }));
        v.promote(2, false).await.unwrap();
        v.write(0, vec![1u8; 4096], true).await.unwrap();
        v.write(4096, vec![2u8; 4096], true).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2, "asked at every write");
        assert!(!v.status().peer_outdated);
        partner.store(true, Ordering::SeqCst);
        v.write(8192, vec![3u8; 4096], true).await.unwrap();
        v.write(8192, vec![4u8; 4096], true).await.unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "recorded once, then not asked"
        );
        assert!(v.status().peer_outdated);
        // A new partner address: recorded afresh at the next degraded write.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = l.local_addr().unwrap().to_string();
        drop(l);
        v.set_partner(Some(dead));
        assert!(!v.status().peer_outdated);
    }
}

//! Raft storage on redb: the log store (`log.redb`: entries, vote, committed,
//! last purged) and the state machine (`state.redb`: the records, last
//! applied, membership, current snapshot).
//!
//! Every write is one redb transaction committed with immediate durability
//! (fsync) in a blocking task, and only then reported to openraft: a vote or
//! an appended entry is on disk before the RPC that carried it is answered.

use crate::logic;
use crate::types::{
    Applied, Change, Entry, Event, LogId, NodeId, NodeInfo, Op, Record, Snapshot, SnapshotMeta,
    StorageError, StoredMembership, TypeConfig, Vote,
};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::{
    CommittedLeaderId, EntryPayload, ErrorSubject, ErrorVerb, Membership, OptionalSend, RaftLogId,
    RaftLogReader, RaftSnapshotBuilder, StorageIOError,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::{broadcast, watch};

const ENTRIES: TableDefinition<'static, u64, &'static [u8]> = TableDefinition::new("raft_log");
const LOG_META: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("raft_meta");
const RECORDS: TableDefinition<'static, (&'static str, &'static str), &'static [u8]> =
    TableDefinition::new("records");
const SM_META: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("sm_meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";
const LAST_APPLIED: &str = "last_applied";
const MEMBERSHIP: &str = "membership";
const SNAPSHOT_META: &str = "snapshot_meta";
const SNAPSHOT_DATA: &str = "snapshot_data";

/// A failure of the local disk database (not of Raft).
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// redb failed.
    #[error("redb: {0}")]
    Db(#[source] Box<redb::Error>),
    /// A stored value does not parse.
    #[error("stored value is unreadable (written by a newer version, or damaged)")]
    Json(#[from] serde_json::Error),
    /// The blocking task running the I/O died.
    #[error("the disk I/O task was cancelled or panicked")]
    Task,
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for DiskError {
            fn from(e: $t) -> Self {
                DiskError::Db(Box::new(e.into()))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Runs blocking disk work off the async threads.
async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, DiskError> + Send + 'static,
) -> Result<R, DiskError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| DiskError::Task)?
}

fn sto(subject: ErrorSubject<NodeId>, verb: ErrorVerb, e: DiskError) -> StorageError {
    StorageIOError::new(subject, verb, &e).into()
}

fn get_json<T: serde::de::DeserializeOwned>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>, DiskError> {
    match t.get(key)? {
        Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
        None => Ok(None),
    }
}

fn put_json<T: Serialize>(
    t: &mut redb::Table<'_, &'static str, &'static [u8]>,
    key: &str,
    value: &T,
) -> Result<(), DiskError> {
    let bytes = serde_json::to_vec(value)?;
    t.insert(key, bytes.as_slice())?;
    Ok(())
}

fn open_db(path: &Path) -> Result<Database, DiskError> {
    Ok(Database::create(path)?)
}

// ---------------------------------------------------------------------------
// Log store

/// The Raft log, vote and committed pointer, in `log.redb`.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    /// Opens (or creates) the log database at `path`.
    pub fn open(path: &Path) -> Result<LogStore, DiskError> {
        let db = open_db(path)?;
        let txn = db.begin_write()?;
        txn.open_table(ENTRIES)?;
        txn.open_table(LOG_META)?;
        txn.commit()?;
        Ok(LogStore { db: Arc::new(db) })
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, DiskError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(LOG_META)?;
        get_json(&t, key)
    }

    async fn write_meta<T: Serialize + Send + Sync + 'static>(
        &self,
        key: &'static str,
        value: T,
    ) -> Result<(), DiskError> {
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write()?;
            {
                let mut t = txn.open_table(LOG_META)?;
                put_json(&mut t, key, &value)?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }

    fn read_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<Vec<Entry>, DiskError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(ENTRIES)?;
        let mut out = Vec::new();
        for item in t.range::<u64>((start, end))? {
            let (_, v) = item?;
            out.push(serde_json::from_slice(v.value())?);
        }
        Ok(out)
    }

    /// The log entries after `index` (all of them for `None`): on a follower,
    /// what it has stored but not applied yet.
    pub(crate) fn entries_after(&self, index: Option<u64>) -> Result<Vec<Entry>, DiskError> {
        let start = match index {
            Some(i) => Bound::Excluded(i),
            None => Bound::Unbounded,
        };
        self.read_range(start, Bound::Unbounded)
    }

    /// Force quorum, on a stopped node: appends a membership entry that makes
    /// `id` the only voter (and the only member), in a term above every term
    /// this node has voted in or logged, and records a vote for `id` in that
    /// term. One redb transaction, so a crash leaves either the old or the
    /// new state.
    ///
    /// Why the term: in a unit of two voters, every entry the other node can
    /// hold was written by a leader that this node voted for (or by this
    /// node), so its terms are at most this node's vote term. The forced
    /// entry's term is higher, which makes this node's log more up to date
    /// than the other's forever: Raft's vote check refuses the other node's
    /// candidacy, and its stale entries can never overwrite this log.
    ///
    /// `expected_voters` guards against a membership that changed since the
    /// caller checked it.
    pub(crate) fn force_single_voter(
        &self,
        id: NodeId,
        info: NodeInfo,
        expected_voters: &BTreeSet<NodeId>,
        applied_membership: &StoredMembership,
    ) -> Result<ForcedEntry, ForceStorageError> {
        let txn = self.db.begin_write().map_err(DiskError::from)?;
        let forced = {
            let mut meta = txn.open_table(LOG_META).map_err(DiskError::from)?;
            let mut entries = txn.open_table(ENTRIES).map_err(DiskError::from)?;
            let vote: Option<Vote> = get_json(&meta, VOTE)?;
            let last_purged: Option<LogId> = get_json(&meta, LAST_PURGED)?;
            let last: Option<Entry> = match entries.last().map_err(DiskError::from)? {
                Some((_, v)) => Some(serde_json::from_slice(v.value()).map_err(DiskError::from)?),
                None => None,
            };
            let last_id = last.as_ref().map(|e| e.log_id).or(last_purged);
            let Some(last_id) = last_id else {
                return Err(ForceStorageError::Refused(
                    "this node has no Raft log: it never belonged to a unit".into(),
                ));
            };
            // The effective membership is the last one in the log, or the
            // applied one when the log holds none.
            let mut membership = applied_membership.membership().clone();
            for item in entries.iter().map_err(DiskError::from)?.rev() {
                let (_, v) = item.map_err(DiskError::from)?;
                let e: Entry = serde_json::from_slice(v.value()).map_err(DiskError::from)?;
                if let EntryPayload::Membership(m) = e.payload {
                    membership = m;
                    break;
                }
            }
            let configs = membership.get_joint_config();
            if configs.len() != 1 || configs.first() != Some(expected_voters) {
                return Err(ForceStorageError::Refused(format!(
                    "the stored membership ({configs:?}) differs from the one checked ({expected_voters:?}): retry"
                )));
            }
            let vote_term = vote.map(|v| v.leader_id().term).unwrap_or(0);
            let term = vote_term.max(last_id.leader_id.term) + 1;
            let log_id = LogId::new(CommittedLeaderId::new(term, id), last_id.index + 1);
            let mut nodes = BTreeMap::new();
            nodes.insert(id, info);
            let mut voters = BTreeSet::new();
            voters.insert(id);
            let entry = Entry {
                log_id,
                payload: EntryPayload::Membership(Membership::new(vec![voters], nodes)),
            };
            let bytes = serde_json::to_vec(&entry).map_err(DiskError::from)?;
            entries
                .insert(log_id.index, bytes.as_slice())
                .map_err(DiskError::from)?;
            put_json(&mut meta, VOTE, &Vote::new(term, id))?;
            ForcedEntry { log_id }
        };
        txn.commit().map_err(DiskError::from)?;
        Ok(forced)
    }
}

/// The membership entry written by [`LogStore::force_single_voter`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ForcedEntry {
    /// Its log id (term and index).
    pub log_id: LogId,
}

/// Why [`LogStore::force_single_voter`] wrote nothing.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForceStorageError {
    /// The stored state does not allow it.
    #[error("{0}")]
    Refused(String),
    /// The disk failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
}

fn owned_bound(b: Bound<&u64>) -> Bound<u64> {
    match b {
        Bound::Included(x) => Bound::Included(*x),
        Bound::Excluded(x) => Bound::Excluded(*x),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.read_range(
            owned_bound(range.start_bound()),
            owned_bound(range.end_bound()),
        )
        .map_err(|e| sto(ErrorSubject::Logs, ErrorVerb::Read, e))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let read = || -> Result<LogState<TypeConfig>, DiskError> {
            let txn = self.db.begin_read()?;
            let meta = txn.open_table(LOG_META)?;
            let last_purged: Option<LogId> = get_json(&meta, LAST_PURGED)?;
            let entries = txn.open_table(ENTRIES)?;
            let last = match entries.last()? {
                Some((_, v)) => {
                    let e: Entry = serde_json::from_slice(v.value())?;
                    Some(*e.get_log_id())
                }
                None => last_purged,
            };
            Ok(LogState {
                last_purged_log_id: last_purged,
                last_log_id: last,
            })
        };
        read().map_err(|e| sto(ErrorSubject::Logs, ErrorVerb::Read, e))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_meta(VOTE, *vote)
            .await
            .map_err(|e| sto(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(VOTE)
            .map_err(|e| sto(ErrorSubject::Vote, ErrorVerb::Read, e))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.write_meta(COMMITTED, committed)
            .await
            .map_err(|e| sto(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.read_meta::<Option<LogId>>(COMMITTED)
            .map(Option::flatten)
            .map_err(|e| sto(ErrorSubject::Store, ErrorVerb::Read, e))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for e in entries {
            let bytes = serde_json::to_vec(&e)
                .map_err(|err| sto(ErrorSubject::Logs, ErrorVerb::Write, err.into()))?;
            rows.push((e.get_log_id().index, bytes));
        }
        let db = self.db.clone();
        let res = blocking(move || {
            let txn = db.begin_write()?;
            {
                let mut t = txn.open_table(ENTRIES)?;
                for (i, b) in &rows {
                    t.insert(*i, b.as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await;
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(sto(ErrorSubject::Logs, ErrorVerb::Write, e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write()?;
            {
                let mut t = txn.open_table(ENTRIES)?;
                t.retain_in(log_id.index.., |_, _| false)?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| sto(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write()?;
            {
                let mut meta = txn.open_table(LOG_META)?;
                put_json(&mut meta, LAST_PURGED, &log_id)?;
                let mut t = txn.open_table(ENTRIES)?;
                t.retain_in(..=log_id.index, |_, _| false)?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| sto(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

// ---------------------------------------------------------------------------
// State machine

/// The stored form of a record: 8 bytes of big-endian version, then JSON.
fn encode_record(version: u64, value: &serde_json::Value) -> Result<Vec<u8>, DiskError> {
    let mut out = version.to_be_bytes().to_vec();
    serde_json::to_writer(&mut out, value)?;
    Ok(out)
}

fn record_version(bytes: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    if bytes.len() >= 8 {
        v.copy_from_slice(&bytes[..8]);
    }
    u64::from_be_bytes(v)
}

fn decode_record(bytes: &[u8]) -> Result<Record, DiskError> {
    let value = serde_json::from_slice(bytes.get(8..).unwrap_or_default())?;
    Ok(Record {
        value,
        version: record_version(bytes),
    })
}

/// The snapshot format (JSON): every record with its version.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    format: u32,
    records: Vec<SnapshotRecord>,
}

#[derive(Serialize, Deserialize)]
struct SnapshotRecord {
    table: String,
    key: String,
    version: u64,
    value: serde_json::Value,
}

const SNAPSHOT_FORMAT: u32 = 1;

/// Read access to the applied state, usable from any task.
#[derive(Clone)]
pub struct StateReader {
    db: Arc<Database>,
}

impl StateReader {
    /// One record.
    pub fn get(&self, table: &str, key: &str) -> Result<Option<Record>, DiskError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(RECORDS)?;
        let found = t.get((table, key))?;
        match found {
            Some(v) => Ok(Some(decode_record(v.value())?)),
            None => Ok(None),
        }
    }

    /// Every record of a table, ordered by key.
    pub fn list(&self, table: &str) -> Result<Vec<(String, Record)>, DiskError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(RECORDS)?;
        let mut out = Vec::new();
        for item in t.range((table, "")..)? {
            let (k, v) = item?;
            let (tb, key) = k.value();
            if tb != table {
                break;
            }
            out.push((key.to_string(), decode_record(v.value())?));
        }
        Ok(out)
    }

    /// The names of the tables that hold at least one record.
    pub fn tables(&self) -> Result<Vec<String>, DiskError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(RECORDS)?;
        let mut out: Vec<String> = Vec::new();
        for item in t.iter()? {
            let (k, _) = item?;
            let (tb, _) = k.value();
            if out.last().map(String::as_str) != Some(tb) {
                out.push(tb.to_string());
            }
        }
        Ok(out)
    }

    /// One record and the last applied log id, from one consistent read.
    pub fn get_with_applied(
        &self,
        table: &str,
        key: &str,
    ) -> Result<(Option<Record>, Option<LogId>), DiskError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(RECORDS)?;
        let rec = match t.get((table, key))? {
            Some(v) => Some(decode_record(v.value())?),
            None => None,
        };
        let m = txn.open_table(SM_META)?;
        Ok((rec, get_json(&m, LAST_APPLIED)?))
    }

    /// The membership stored by the state machine (the last applied one).
    pub fn applied_membership(&self) -> Result<StoredMembership, DiskError> {
        let txn = self.db.begin_read()?;
        let m = txn.open_table(SM_META)?;
        Ok(get_json(&m, MEMBERSHIP)?.unwrap_or_default())
    }

    /// The log id of the last applied entry.
    pub fn last_applied(&self) -> Result<Option<LogId>, DiskError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(SM_META)?;
        get_json(&t, LAST_APPLIED)
    }
}

/// The replicated tables, in `state.redb`.
pub struct StateMachine {
    db: Arc<Database>,
    events: broadcast::Sender<Event>,
    /// Dropped with the state machine: lets a restart wait until openraft's
    /// state machine worker of the previous engine has finished its queue.
    alive: watch::Sender<()>,
}

impl StateMachine {
    /// Opens (or creates) the state database at `path`; applied changes are
    /// announced on `events`.
    pub fn open(path: &Path, events: broadcast::Sender<Event>) -> Result<StateMachine, DiskError> {
        let db = open_db(path)?;
        let txn = db.begin_write()?;
        txn.open_table(RECORDS)?;
        txn.open_table(SM_META)?;
        txn.commit()?;
        Ok(StateMachine {
            db: Arc::new(db),
            events,
            alive: watch::channel(()).0,
        })
    }

    /// A reader sharing this state machine's database.
    pub fn reader(&self) -> StateReader {
        StateReader {
            db: self.db.clone(),
        }
    }

    /// A state machine on the database of `reader` (already open), for a
    /// restarted Raft engine.
    pub(crate) fn on_shared(reader: &StateReader, events: broadcast::Sender<Event>) -> Self {
        StateMachine {
            db: reader.db.clone(),
            events,
            alive: watch::channel(()).0,
        }
    }

    /// A receiver whose `changed()` fails once this state machine is dropped.
    pub(crate) fn drop_signal(&self) -> watch::Receiver<()> {
        self.alive.subscribe()
    }
}

fn apply_entries(
    db: &Database,
    entries: Vec<Entry>,
) -> Result<(Vec<Applied>, Vec<Event>), DiskError> {
    let txn = db.begin_write()?;
    let mut replies = Vec::with_capacity(entries.len());
    let mut events = Vec::new();
    {
        let mut records = txn.open_table(RECORDS)?;
        let mut meta = txn.open_table(SM_META)?;
        let mut last = None;
        for entry in entries {
            let log_id = *entry.get_log_id();
            let index = log_id.index;
            last = Some(log_id);
            match entry.payload {
                EntryPayload::Blank => replies.push(Applied::Internal { index }),
                EntryPayload::Membership(m) => {
                    put_json(
                        &mut meta,
                        MEMBERSHIP,
                        &StoredMembership::new(Some(log_id), m),
                    )?;
                    replies.push(Applied::Internal { index });
                }
                EntryPayload::Normal(batch) => {
                    let mut lookup_err = None;
                    let checked =
                        logic::check_all(&batch.preconditions, |t, k| match records.get((t, k)) {
                            Ok(v) => v.map(|g| record_version(g.value())),
                            Err(e) => {
                                lookup_err = Some(e);
                                None
                            }
                        });
                    if let Some(e) = lookup_err {
                        return Err(e.into());
                    }
                    match checked {
                        Err(conflict) => replies.push(Applied::Rejected { index, conflict }),
                        Ok(()) => {
                            let mut changes = Vec::with_capacity(batch.ops.len());
                            for op in batch.ops {
                                match op {
                                    Op::Put { table, key, value } => {
                                        let bytes = encode_record(index, &value)?;
                                        records.insert(
                                            (table.as_str(), key.as_str()),
                                            bytes.as_slice(),
                                        )?;
                                        changes.push(Change {
                                            table,
                                            key,
                                            value: Some(value),
                                        });
                                    }
                                    Op::Delete { table, key } => {
                                        records.remove((table.as_str(), key.as_str()))?;
                                        changes.push(Change {
                                            table,
                                            key,
                                            value: None,
                                        });
                                    }
                                }
                            }
                            if !changes.is_empty() {
                                events.push(Event::Applied { index, changes });
                            }
                            replies.push(Applied::Done { index });
                        }
                    }
                }
            }
        }
        if let Some(last) = last {
            put_json(&mut meta, LAST_APPLIED, &last)?;
        }
    }
    txn.commit()?;
    Ok((replies, events))
}

fn build_snapshot(db: &Database) -> Result<(SnapshotMeta, Vec<u8>), DiskError> {
    let (meta, data) = {
        let txn = db.begin_read()?;
        let m = txn.open_table(SM_META)?;
        let last_applied: Option<LogId> = get_json(&m, LAST_APPLIED)?;
        let membership: StoredMembership = get_json(&m, MEMBERSHIP)?.unwrap_or_default();
        let t = txn.open_table(RECORDS)?;
        let mut records = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            let (table, key) = k.value();
            let r = decode_record(v.value())?;
            records.push(SnapshotRecord {
                table: table.to_string(),
                key: key.to_string(),
                version: r.version,
                value: r.value,
            });
        }
        let data = serde_json::to_vec(&SnapshotFile {
            format: SNAPSHOT_FORMAT,
            records,
        })?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{nanos}", l.leader_id.term, l.index),
            None => format!("0-0-{nanos}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        (meta, data)
    };
    store_snapshot(db, &meta, &data, None)?;
    Ok((meta, data))
}

/// Saves `meta`/`data` as the current snapshot; with `replace`, also
/// replaces every record, the applied pointer and the membership (install).
fn store_snapshot(
    db: &Database,
    meta: &SnapshotMeta,
    data: &[u8],
    replace: Option<SnapshotFile>,
) -> Result<(), DiskError> {
    let txn = db.begin_write()?;
    {
        let mut m = txn.open_table(SM_META)?;
        if let Some(file) = replace {
            let mut t = txn.open_table(RECORDS)?;
            t.retain(|_, _| false)?;
            for r in file.records {
                let bytes = encode_record(r.version, &r.value)?;
                t.insert((r.table.as_str(), r.key.as_str()), bytes.as_slice())?;
            }
            put_json(&mut m, LAST_APPLIED, &meta.last_log_id)?;
            put_json(&mut m, MEMBERSHIP, &meta.last_membership)?;
        }
        put_json(&mut m, SNAPSHOT_META, meta)?;
        m.insert(SNAPSHOT_DATA, data)?;
    }
    txn.commit()?;
    Ok(())
}

/// Builds snapshots from a consistent read of the state database.
pub struct SnapshotBuilder {
    db: Arc<Database>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let db = self.db.clone();
        let (meta, data) = blocking(move || build_snapshot(&db))
            .await
            .map_err(|e| sto(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        tracing::info!(
            snapshot = %meta.snapshot_id,
            bytes = data.len(),
            "built a unit database snapshot"
        );
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let read = || -> Result<_, DiskError> {
            let txn = self.db.begin_read()?;
            let m = txn.open_table(SM_META)?;
            let applied: Option<LogId> = get_json(&m, LAST_APPLIED)?;
            let membership: StoredMembership = get_json(&m, MEMBERSHIP)?.unwrap_or_default();
            Ok((applied, membership))
        };
        read().map_err(|e| sto(ErrorSubject::StateMachine, ErrorVerb::Read, e))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let db = self.db.clone();
        let (replies, events) = blocking(move || apply_entries(&db, entries))
            .await
            .map_err(|e| sto(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
        for ev in events {
            // No subscriber is fine.
            let _ = self.events.send(ev);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let file: SnapshotFile = serde_json::from_slice(&data).map_err(|e| {
            sto(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                e.into(),
            )
        })?;
        let db = self.db.clone();
        let m = meta.clone();
        blocking(move || store_snapshot(&db, &m, &data, Some(file)))
            .await
            .map_err(|e| {
                sto(
                    ErrorSubject::Snapshot(Some(meta.signature())),
                    ErrorVerb::Write,
                    e,
                )
            })?;
        tracing::info!(snapshot = %meta.snapshot_id, "installed a unit database snapshot");
        let index = meta.last_log_id.map(|l| l.index).unwrap_or_default();
        let _ = self.events.send(Event::Reset { index });
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let read = || -> Result<Option<Snapshot>, DiskError> {
            let txn = self.db.begin_read()?;
            let m = txn.open_table(SM_META)?;
            let meta: Option<SnapshotMeta> = get_json(&m, SNAPSHOT_META)?;
            let Some(meta) = meta else {
                return Ok(None);
            };
            let data = match m.get(SNAPSHOT_DATA)? {
                Some(v) => v.value().to_vec(),
                None => return Ok(None),
            };
            Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            }))
        };
        read().map_err(|e| sto(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_encoding_round_trips() {
        let v = serde_json::json!({"name": "web", "vcpus": 2});
        let b = encode_record(42, &v).unwrap();
        let r = decode_record(&b).unwrap();
        assert_eq!(r.version, 42);
        assert_eq!(r.value, v);
    }
}

//! The PM's persistent state, kept in one redb database under the daemon's
//! data directory. Records are JSON values in per-kind tables, so that the
//! format is readable with ordinary tools and tolerant of added fields.
//!
//! Every change goes through [`Store::write`], one ACID transaction, so that
//! a multi-record change (e.g. a VM re-configuration) is all-or-nothing even
//! if the daemon is killed half-way.
//!
//! Once the PM is in a unit, the records live in the unit database instead
//! ([`Store::attach`] with a [`Replicated`] backend): reads come from this
//! PM's applied copy, and a write closure becomes an optimistic transaction —
//! every record it read is a version precondition of the batch it produces,
//! and a batch that lost a race re-runs the closure. The audit log stays
//! local (each PM records what was done through it).

mod records;

pub use records::*;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use thiserror::Error;

/// A failure of the store itself (disk, corruption), never of the caller's
/// input.
#[derive(Debug, Error)]
pub enum StoreError {
    /// Another process holds the database's lock: another daemon on the same
    /// data directory, or one that was killed a moment ago and is still
    /// exiting.
    #[error(
        "the state database {path} is in use by another process; stop the other pairvisor daemon using this data directory"
    )]
    InUse {
        /// Its path.
        path: String,
    },
    /// The database could not be opened.
    #[error("cannot open the state database {path}")]
    Open {
        /// Its path.
        path: String,
        /// Why.
        #[source]
        source: redb::DatabaseError,
    },
    /// A redb operation failed.
    #[error("state database error")]
    Db(#[source] Box<redb::Error>),
    /// A stored record does not parse (written by a newer version, or
    /// damaged).
    #[error("record '{key}' in table '{table}' is unreadable")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// The key.
        key: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The unit database could not take the change (no quorum, timeout).
    #[error("the unit database did not accept the change: {0}")]
    Unit(String),
    /// Other PMs kept changing the same records; the change was not made.
    #[error("the change conflicted with concurrent changes {0} times; try again")]
    Conflict(u32),
}

/// A record as kept by a [`Replicated`] backend.
#[derive(Debug, Clone)]
pub struct Versioned {
    /// The record's key.
    pub key: String,
    /// Its version (the unit database's log index of its last change).
    pub version: u64,
    /// The record.
    pub value: serde_json::Value,
}

/// A change produced by a transaction on a [`Replicated`] backend.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Insert or replace.
    Put {
        /// Table.
        table: String,
        /// Key.
        key: String,
        /// Record.
        value: serde_json::Value,
    },
    /// Remove.
    Delete {
        /// Table.
        table: String,
        /// Key.
        key: String,
    },
}

/// What a transaction read: `(table, key)` at `version` (`None` = absent).
#[derive(Debug, Clone)]
pub struct ReadCheck {
    /// Table.
    pub table: String,
    /// Key.
    pub key: String,
    /// Version seen, `None` when the record did not exist.
    pub version: Option<u64>,
}

/// A replicated home for the records: the unit database. Implemented
/// outside this crate (by the unit layer) so that the store stays free of
/// networking.
pub trait Replicated: Send + Sync {
    /// One record from the applied state.
    fn get(&self, table: &str, key: &str) -> Result<Option<Versioned>, StoreError>;
    /// Every record of a table, ordered by key.
    fn list(&self, table: &str) -> Result<Vec<Versioned>, StoreError>;
    /// Applies `writes` atomically if every read still holds; `Ok(false)`
    /// when a read is stale (the caller re-runs its transaction).
    fn commit(&self, reads: Vec<ReadCheck>, writes: Vec<WriteOp>) -> Result<bool, StoreError>;
}

/// How many times a conflicting transaction is re-run before giving up.
const MAX_ATTEMPTS: u32 = 8;

/// Tables that move to the unit database when the PM joins a unit.
pub const REPLICATED_TABLES: &[&str] = &[
    VmRecord::TABLE,
    VolumeRecord::TABLE,
    VcdRecord::TABLE,
    StorageGroupRecord::TABLE,
    UserRecord::TABLE,
    TokenRecord::TABLE,
    AlertRecord::TABLE,
    MigrationRecord::TABLE,
    PmStateRecord::TABLE,
    UnitStateRecord::TABLE,
    META,
];

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        StoreError::Db(Box::new(e.into()))
    }
}

/// A kind of record kept in its own table, keyed by a string.
pub trait Record: Serialize + DeserializeOwned {
    /// The table's name.
    const TABLE: &'static str;
    /// The record's key (its name).
    fn key(&self) -> &str;
}

fn table(name: &'static str) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}

const META: &str = "meta";
const AUDIT: TableDefinition<'static, u64, &'static [u8]> = TableDefinition::new("audit");

/// How much audit history a PM keeps (from the settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRetention {
    /// Records kept at most.
    pub max_records: u64,
    /// Records older than this (seconds) are dropped.
    pub max_age_secs: u64,
}

impl AuditRetention {
    /// What `settings` ask for.
    pub fn of(settings: &Settings) -> AuditRetention {
        AuditRetention {
            max_records: settings.audit_max_records,
            max_age_secs: settings.audit_max_days.saturating_mul(86_400),
        }
    }
}

/// The PM's state database.
pub struct Store {
    db: Database,
    unit: RwLock<Option<Arc<dyn Replicated>>>,
}

/// An open write transaction: changes become visible and durable together
/// when [`Store::write`]'s closure returns `Ok`.
pub struct Tx<'a> {
    inner: TxInner<'a>,
}

enum TxInner<'a> {
    Local(&'a redb::WriteTransaction),
    Unit(UnitTx<'a>),
}

/// An optimistic transaction on the unit database: reads are recorded as
/// preconditions, writes are buffered (and visible to later reads).
struct UnitTx<'a> {
    db: &'a dyn Replicated,
    reads: BTreeMap<(String, String), Option<u64>>,
    writes: BTreeMap<(String, String), Option<serde_json::Value>>,
}

impl UnitTx<'_> {
    fn get_value(
        &mut self,
        table: &str,
        key: &str,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        let k = (table.to_string(), key.to_string());
        if let Some(w) = self.writes.get(&k) {
            return Ok(w.clone());
        }
        let found = self.db.get(table, key)?;
        self.reads
            .entry(k)
            .or_insert(found.as_ref().map(|v| v.version));
        Ok(found.map(|v| v.value))
    }

    fn list_values(&mut self, table: &str) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        let mut out: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        for v in self.db.list(table)? {
            self.reads
                .entry((table.to_string(), v.key.clone()))
                .or_insert(Some(v.version));
            out.insert(v.key, v.value);
        }
        for ((t, k), w) in &self.writes {
            if t == table {
                match w {
                    Some(v) => out.insert(k.clone(), v.clone()),
                    None => out.remove(k),
                };
            }
        }
        Ok(out.into_iter().collect())
    }
}

fn decode_value<T: DeserializeOwned>(
    table: &'static str,
    key: &str,
    v: serde_json::Value,
) -> Result<T, StoreError> {
    serde_json::from_value(v).map_err(|source| StoreError::Corrupt {
        table,
        key: key.to_string(),
        source,
    })
}

fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        table,
        key: key.to_string(),
        source,
    })
}

fn get_in<T: Record>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>, StoreError> {
    let found = t.get(key)?;
    let r = match found {
        Some(v) => Some(decode(T::TABLE, key, v.value())?),
        None => None,
    };
    Ok(r)
}

fn list_in<T: Record>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    for item in t.iter()? {
        let (k, v) = item?;
        out.push(decode(T::TABLE, k.value(), v.value())?);
    }
    Ok(out)
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own plain data types cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

impl Tx<'_> {
    /// Reads one record.
    pub fn get<T: Record>(&mut self, key: &str) -> Result<Option<T>, StoreError> {
        match &mut self.inner {
            TxInner::Local(txn) => get_in(&txn.open_table(table(T::TABLE))?, key),
            TxInner::Unit(u) => u
                .get_value(T::TABLE, key)?
                .map(|v| decode_value(T::TABLE, key, v))
                .transpose(),
        }
    }

    /// Inserts or replaces a record.
    pub fn put<T: Record>(&mut self, rec: &T) -> Result<(), StoreError> {
        match &mut self.inner {
            TxInner::Local(txn) => {
                let mut t = txn.open_table(table(T::TABLE))?;
                t.insert(rec.key(), encode(rec).as_slice())?;
            }
            TxInner::Unit(u) => {
                let v = serde_json::to_value(rec).unwrap_or_default();
                u.writes
                    .insert((T::TABLE.to_string(), rec.key().to_string()), Some(v));
            }
        }
        Ok(())
    }

    /// Deletes a record; true if it existed.
    pub fn delete<T: Record>(&mut self, key: &str) -> Result<bool, StoreError> {
        match &mut self.inner {
            TxInner::Local(txn) => {
                let mut t = txn.open_table(table(T::TABLE))?;
                let existed = t.remove(key)?.is_some();
                Ok(existed)
            }
            TxInner::Unit(u) => {
                let existed = u.get_value(T::TABLE, key)?.is_some();
                u.writes
                    .insert((T::TABLE.to_string(), key.to_string()), None);
                Ok(existed)
            }
        }
    }

    /// Whether a raw key exists in a table of the unit database that holds
    /// no store records (e.g. its fences). In a unit transaction the read
    /// becomes a precondition like any other, so "absent" holds at commit;
    /// on a single PM such tables do not exist and the answer is false.
    pub fn exists_raw(&mut self, table: &str, key: &str) -> Result<bool, StoreError> {
        match &mut self.inner {
            TxInner::Local(_) => Ok(false),
            TxInner::Unit(u) => Ok(u.get_value(table, key)?.is_some()),
        }
    }

    /// All records of a kind, ordered by key.
    pub fn list<T: Record>(&mut self) -> Result<Vec<T>, StoreError> {
        match &mut self.inner {
            TxInner::Local(txn) => list_in(&txn.open_table(table(T::TABLE))?),
            TxInner::Unit(u) => u
                .list_values(T::TABLE)?
                .into_iter()
                .map(|(k, v)| decode_value(T::TABLE, &k, v))
                .collect(),
        }
    }

    /// Reads the settings (defaults if never written).
    pub fn settings(&mut self) -> Result<Settings, StoreError> {
        match &mut self.inner {
            TxInner::Local(txn) => {
                let t = txn.open_table(table(META))?;
                let found = t.get("settings")?;
                let r = match found {
                    Some(v) => decode(META, "settings", v.value())?,
                    None => Settings::default(),
                };
                Ok(r)
            }
            TxInner::Unit(u) => match u.get_value(META, "settings")? {
                Some(v) => decode_value(META, "settings", v),
                None => Ok(Settings::default()),
            },
        }
    }

    /// Replaces the settings.
    pub fn put_settings(&mut self, s: &Settings) -> Result<(), StoreError> {
        match &mut self.inner {
            TxInner::Local(txn) => {
                let mut t = txn.open_table(table(META))?;
                t.insert("settings", encode(s).as_slice())?;
            }
            TxInner::Unit(u) => {
                let v = serde_json::to_value(s).unwrap_or_default();
                u.writes
                    .insert((META.to_string(), "settings".to_string()), Some(v));
            }
        }
        Ok(())
    }
}

impl Store {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::create(path).map_err(|source| match source {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
                path: path.display().to_string(),
            },
            source => StoreError::Open {
                path: path.display().to_string(),
                source,
            },
        })?;
        let store = Store {
            db,
            unit: RwLock::new(None),
        };
        // Create every table up front so that read transactions never meet a
        // missing table.
        let txn = store.db.begin_write()?;
        for name in REPLICATED_TABLES {
            txn.open_table(table(name))?;
        }
        txn.open_table(AUDIT)?;
        txn.commit()?;
        Ok(store)
    }

    /// From now on, keeps the records in `backend` (the unit database).
    pub fn attach(&self, backend: Arc<dyn Replicated>) {
        *self.unit.write().unwrap_or_else(|e| e.into_inner()) = Some(backend);
    }

    /// Whether the records live in the unit database.
    pub fn is_replicated(&self) -> bool {
        self.backend().is_some()
    }

    fn backend(&self) -> Option<Arc<dyn Replicated>> {
        self.unit.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every local record of the replicated tables, as `(table, key, value)`
    /// (used to seed the unit database when this PM founds a unit).
    pub fn export_local(&self) -> Result<Vec<(String, String, serde_json::Value)>, StoreError> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        for name in REPLICATED_TABLES {
            let t = txn.open_table(table(name))?;
            for item in t.iter()? {
                let (k, v) = item?;
                let value: serde_json::Value = decode(name, k.value(), v.value())?;
                out.push((name.to_string(), k.value().to_string(), value));
            }
        }
        Ok(out)
    }

    /// Runs `f` in one write transaction; commits if it returns `Ok`, rolls
    /// back otherwise. On the unit database `f` may run more than once (when
    /// another PM changed a record it read meanwhile), so it must not have
    /// side effects outside the transaction that cannot be repeated.
    pub fn write<R, E: From<StoreError>>(
        &self,
        mut f: impl FnMut(&mut Tx<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        if let Some(db) = self.backend() {
            for _ in 0..MAX_ATTEMPTS {
                let mut tx = Tx {
                    inner: TxInner::Unit(UnitTx {
                        db: db.as_ref(),
                        reads: BTreeMap::new(),
                        writes: BTreeMap::new(),
                    }),
                };
                let r = f(&mut tx)?;
                let TxInner::Unit(u) = tx.inner else {
                    unreachable!("built as a unit transaction above")
                };
                if u.writes.is_empty() {
                    return Ok(r);
                }
                let reads = u
                    .reads
                    .into_iter()
                    .map(|((table, key), version)| ReadCheck {
                        table,
                        key,
                        version,
                    })
                    .collect();
                let writes = u
                    .writes
                    .into_iter()
                    .map(|((table, key), v)| match v {
                        Some(value) => WriteOp::Put { table, key, value },
                        None => WriteOp::Delete { table, key },
                    })
                    .collect();
                if db.commit(reads, writes)? {
                    return Ok(r);
                }
            }
            return Err(StoreError::Conflict(MAX_ATTEMPTS).into());
        }
        self.write_local(f)
    }

    /// Like [`Store::write`], but always in this PM's own database, even in
    /// a unit (for what must work without a quorum: a login token when the
    /// unit database cannot commit).
    pub fn write_local<R, E: From<StoreError>>(
        &self,
        mut f: impl FnMut(&mut Tx<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        let txn = self.db.begin_write().map_err(StoreError::from)?;
        let mut tx = Tx {
            inner: TxInner::Local(&txn),
        };
        match f(&mut tx) {
            Ok(r) => {
                txn.commit().map_err(StoreError::from)?;
                Ok(r)
            }
            Err(e) => {
                txn.abort().map_err(StoreError::from)?;
                Err(e)
            }
        }
    }

    /// Reads one record outside a write transaction.
    pub fn get<T: Record>(&self, key: &str) -> Result<Option<T>, StoreError> {
        if let Some(db) = self.backend() {
            return db
                .get(T::TABLE, key)?
                .map(|v| decode_value(T::TABLE, key, v.value))
                .transpose();
        }
        let txn = self.db.begin_read()?;
        get_in(&txn.open_table(table(T::TABLE))?, key)
    }

    /// Reads one record from this PM's own database (see
    /// [`Store::write_local`]).
    pub fn get_local<T: Record>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read()?;
        get_in(&txn.open_table(table(T::TABLE))?, key)
    }

    /// All records of a kind, ordered by key.
    pub fn list<T: Record>(&self) -> Result<Vec<T>, StoreError> {
        if let Some(db) = self.backend() {
            return db
                .list(T::TABLE)?
                .into_iter()
                .map(|v| decode_value(T::TABLE, &v.key, v.value))
                .collect();
        }
        let txn = self.db.begin_read()?;
        list_in(&txn.open_table(table(T::TABLE))?)
    }

    /// The settings (defaults if never written).
    pub fn settings(&self) -> Result<Settings, StoreError> {
        if let Some(db) = self.backend() {
            return match db.get(META, "settings")? {
                Some(v) => decode_value(META, "settings", v.value),
                None => Ok(Settings::default()),
            };
        }
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table(META))?;
        match t.get("settings")? {
            Some(v) => decode(META, "settings", v.value()),
            None => Ok(Settings::default()),
        }
    }

    /// Appends an audit record, assigning its sequence number.
    pub fn append_audit(
        &self,
        mut rec: AuditRecord,
        keep: AuditRetention,
    ) -> Result<AuditRecord, StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(AUDIT)?;
            let next = t.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
            rec.seq = next;
            t.insert(next, encode(&rec).as_slice())?;
            // Bounded history: the oldest records go once there are more
            // than `max_records` or they are older than `max_age_secs`. Keys
            // only ever leave from the front, so first..=next are all held.
            // A few per append: a lowered limit is reached gradually.
            for _ in 0..64 {
                let Some((k, v)) = t.first()? else { break };
                let (first, old) = (k.value(), v.value().to_vec());
                drop((k, v));
                let too_many = next - first + 1 > keep.max_records.max(1);
                let too_old = decode::<AuditRecord>("audit", &first.to_string(), &old)
                    .map(|r| r.time.saturating_add(keep.max_age_secs) < rec.time)
                    .unwrap_or(true);
                if first == next || !(too_many || too_old) {
                    break;
                }
                t.remove(first)?;
            }
        }
        txn.commit()?;
        Ok(rec)
    }

    /// The newest `limit` audit records, newest first.
    pub fn audit(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(AUDIT)?;
        let mut out = Vec::new();
        for item in t.iter()?.rev().take(limit) {
            let (k, v) = item?;
            out.push(decode("audit", &k.value().to_string(), v.value())?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pairvisor_model::roles::Role;

    fn user(name: &str) -> UserRecord {
        UserRecord {
            name: name.into(),
            role: Role::Operator,
            password_hash: "x".into(),
            created_at: 1,
        }
    }

    #[test]
    fn a_database_held_elsewhere_is_reported_as_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let first = Store::open(&path).unwrap();
        let err = Store::open(&path).err().expect("second open must fail");
        assert!(matches!(err, StoreError::InUse { .. }), "{err:?}");
        assert!(
            err.to_string().contains("in use by another process"),
            "{err}"
        );
        drop(first);
        Store::open(&path).expect("free again once the holder is gone");
    }

    #[test]
    fn survives_reopen_and_rolls_back_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let s = Store::open(&path).unwrap();
            s.write(|tx| tx.put(&user("alice"))).unwrap();
            let r: Result<(), StoreError> = s.write(|tx| {
                tx.put(&user("bob"))?;
                Err(StoreError::Corrupt {
                    table: "t",
                    key: "k".into(),
                    source: serde_json::from_str::<u8>("x").unwrap_err(),
                })
            });
            assert!(r.is_err());
            s.append_audit(
                AuditRecord {
                    seq: 0,
                    time: 5,
                    user: "alice".into(),
                    action: "create".into(),
                    target: "vm/web".into(),
                    result: "ok".into(),
                },
                AuditRetention::of(&Settings::default()),
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let users: Vec<UserRecord> = s.list().unwrap();
        assert_eq!(users.len(), 1, "bob's transaction was rolled back");
        assert_eq!(users[0].name, "alice");
        let audit = s.audit(10).unwrap();
        assert_eq!(audit.len(), 1);
        assert_eq!(audit[0].seq, 1);
        assert_eq!(s.settings().unwrap(), Settings::default());
    }
}

#[cfg(test)]
mod audit_tests {
    use super::*;

    fn rec(time: u64) -> AuditRecord {
        AuditRecord {
            seq: 0,
            time,
            user: "u".into(),
            action: "POST /x".into(),
            target: "x".into(),
            result: "ok".into(),
        }
    }

    #[test]
    fn the_audit_log_keeps_at_most_its_count_and_age() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(&t.path().join("s.redb")).unwrap();
        let keep = AuditRetention {
            max_records: 10,
            max_age_secs: 100,
        };
        for i in 0..25 {
            s.append_audit(rec(1000 + i), keep).unwrap();
        }
        let a = s.audit(1000).unwrap();
        assert_eq!(a.len(), 10);
        assert_eq!((a[0].seq, a[9].seq), (25, 16), "the newest kept");
        // Much later: the old ones age out.
        s.append_audit(rec(1200), keep).unwrap();
        let a = s.audit(1000).unwrap();
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(a[0].seq, 26);
    }
}

#[cfg(test)]
mod replicated_tests {
    //! The optimistic-transaction logic against an in-memory backend that
    //! behaves like the unit database's preconditions (the real database is
    //! exercised end to end by the unit tests of the `pairvisor` binary).
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Mem {
        rows: Mutex<BTreeMap<(String, String), (u64, serde_json::Value)>>,
        index: AtomicU32,
        /// Before the first commit, another "PM" changes this key.
        interfere: Mutex<Option<(String, String)>>,
    }

    impl Replicated for Mem {
        fn get(&self, table: &str, key: &str) -> Result<Option<Versioned>, StoreError> {
            let rows = self.rows.lock().unwrap();
            Ok(rows
                .get(&(table.into(), key.into()))
                .map(|(v, val)| Versioned {
                    key: key.into(),
                    version: *v,
                    value: val.clone(),
                }))
        }
        fn list(&self, table: &str) -> Result<Vec<Versioned>, StoreError> {
            let rows = self.rows.lock().unwrap();
            Ok(rows
                .iter()
                .filter(|((t, _), _)| t == table)
                .map(|((_, k), (v, val))| Versioned {
                    key: k.clone(),
                    version: *v,
                    value: val.clone(),
                })
                .collect())
        }
        fn commit(&self, reads: Vec<ReadCheck>, writes: Vec<WriteOp>) -> Result<bool, StoreError> {
            let mut rows = self.rows.lock().unwrap();
            if let Some(k) = self.interfere.lock().unwrap().take() {
                let idx = self.index.fetch_add(1, Ordering::SeqCst) as u64 + 1;
                if let Some(r) = rows.get_mut(&k) {
                    r.0 = 1000 + idx;
                }
            }
            for r in &reads {
                let now = rows.get(&(r.table.clone(), r.key.clone())).map(|x| x.0);
                if now != r.version {
                    return Ok(false);
                }
            }
            let idx = self.index.fetch_add(1, Ordering::SeqCst) as u64 + 1;
            for w in writes {
                match w {
                    WriteOp::Put { table, key, value } => {
                        rows.insert((table, key), (idx, value));
                    }
                    WriteOp::Delete { table, key } => {
                        rows.remove(&(table, key));
                    }
                }
            }
            Ok(true)
        }
    }

    fn user(name: &str) -> UserRecord {
        UserRecord {
            name: name.into(),
            role: pairvisor_model::roles::Role::Operator,
            password_hash: "x".into(),
            created_at: 1,
        }
    }

    #[test]
    fn transactions_rerun_on_conflict_and_see_their_own_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("state.redb")).unwrap();
        s.write(|tx| tx.put(&user("local-only"))).unwrap();
        let exported = s.export_local().unwrap();
        assert_eq!(exported.len(), 1);
        let mem = Arc::new(Mem::default());
        s.attach(mem.clone());
        assert!(s.is_replicated());
        assert!(
            s.list::<UserRecord>().unwrap().is_empty(),
            "reads come from the unit"
        );

        s.write(|tx| {
            tx.put(&user("alice"))?;
            // Reads see the transaction's own writes.
            assert!(tx.get::<UserRecord>("alice")?.is_some());
            assert_eq!(tx.list::<UserRecord>()?.len(), 1);
            Ok::<_, StoreError>(())
        })
        .unwrap();

        // Another PM changes alice between our read and our commit: the
        // closure runs again and its second run wins.
        *mem.interfere.lock().unwrap() = Some(("users".into(), "alice".into()));
        let mut runs = 0;
        s.write(|tx| {
            runs += 1;
            let mut a: UserRecord = tx.get("alice")?.unwrap();
            a.created_at += 1;
            tx.put(&a)
        })
        .unwrap();
        assert_eq!(runs, 2, "the conflicting first run was re-run");
        assert_eq!(s.get::<UserRecord>("alice").unwrap().unwrap().created_at, 2);

        // A failing closure changes nothing.
        let r: Result<(), StoreError> = s.write(|tx| {
            tx.delete::<UserRecord>("alice")?;
            Err(StoreError::Unit("refused".into()))
        });
        assert!(r.is_err());
        assert!(s.get::<UserRecord>("alice").unwrap().is_some());
        // Delete reports whether the record existed.
        assert!(s.write(|tx| tx.delete::<UserRecord>("alice")).unwrap());
        assert!(!s.write(|tx| tx.delete::<UserRecord>("alice")).unwrap());
    }
}

//! The PM's persistent state, kept in one redb database under the daemon's
//! data directory. Records are JSON values in per-kind tables, so that the
//! format is readable with ordinary tools and tolerant of added fields.
//!
//! Every change goes through [`Store::write`], one ACID transaction, so that
//! a multi-record change (e.g. a VM re-configuration) is all-or-nothing even
//! if the daemon is killed half-way.

mod records;

pub use records::*;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;
use thiserror::Error;

/// A failure of the store itself (disk, corruption), never of the caller's
/// input.
#[derive(Debug, Error)]
pub enum StoreError {
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
}

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

/// The PM's state database.
pub struct Store {
    db: Database,
}

/// An open write transaction: changes become visible and durable together
/// when [`Store::write`]'s closure returns `Ok`.
pub struct Tx<'a> {
    txn: &'a redb::WriteTransaction,
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
    pub fn get<T: Record>(&self, key: &str) -> Result<Option<T>, StoreError> {
        get_in(&self.txn.open_table(table(T::TABLE))?, key)
    }

    /// Inserts or replaces a record.
    pub fn put<T: Record>(&mut self, rec: &T) -> Result<(), StoreError> {
        let mut t = self.txn.open_table(table(T::TABLE))?;
        t.insert(rec.key(), encode(rec).as_slice())?;
        Ok(())
    }

    /// Deletes a record; true if it existed.
    pub fn delete<T: Record>(&mut self, key: &str) -> Result<bool, StoreError> {
        let mut t = self.txn.open_table(table(T::TABLE))?;
        let existed = t.remove(key)?.is_some();
        Ok(existed)
    }

    /// All records of a kind, ordered by key.
    pub fn list<T: Record>(&self) -> Result<Vec<T>, StoreError> {
        list_in(&self.txn.open_table(table(T::TABLE))?)
    }

    /// Reads the settings (defaults if never written).
    pub fn settings(&self) -> Result<Settings, StoreError> {
        let t = self.txn.open_table(table(META))?;
        let found = t.get("settings")?;
        let r = match found {
            Some(v) => decode(META, "settings", v.value())?,
            None => Settings::default(),
        };
        Ok(r)
    }

    /// Replaces the settings.
    pub fn put_settings(&mut self, s: &Settings) -> Result<(), StoreError> {
        let mut t = self.txn.open_table(table(META))?;
        t.insert("settings", encode(s).as_slice())?;
        Ok(())
    }
}

impl Store {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::create(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let store = Store { db };
        // Create every table up front so that read transactions never meet a
        // missing table.
        store.write(|tx| {
            for name in [
                VmRecord::TABLE,
                VolumeRecord::TABLE,
                VcdRecord::TABLE,
                StorageGroupRecord::TABLE,
                UserRecord::TABLE,
                TokenRecord::TABLE,
                AlertRecord::TABLE,
                META,
            ] {
                tx.txn.open_table(table(name))?;
            }
            tx.txn.open_table(AUDIT)?;
            Ok::<_, StoreError>(())
        })?;
        Ok(store)
    }

    /// Runs `f` in one write transaction; commits if it returns `Ok`, rolls
    /// back otherwise.
    pub fn write<R, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        let txn = self.db.begin_write().map_err(StoreError::from)?;
        let mut tx = Tx { txn: &txn };
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
        let txn = self.db.begin_read()?;
        get_in(&txn.open_table(table(T::TABLE))?, key)
    }

    /// All records of a kind, ordered by key.
    pub fn list<T: Record>(&self) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read()?;
        list_in(&txn.open_table(table(T::TABLE))?)
    }

    /// The settings (defaults if never written).
    pub fn settings(&self) -> Result<Settings, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table(META))?;
        match t.get("settings")? {
            Some(v) => decode(META, "settings", v.value()),
            None => Ok(Settings::default()),
        }
    }

    /// Appends an audit record, assigning its sequence number.
    pub fn append_audit(&self, mut rec: AuditRecord) -> Result<AuditRecord, StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(AUDIT)?;
            let next = t.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
            rec.seq = next;
            t.insert(next, encode(&rec).as_slice())?;
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
            s.append_audit(AuditRecord {
                seq: 0,
                time: 5,
                user: "alice".into(),
                action: "create".into(),
                target: "vm/web".into(),
                result: "ok".into(),
            })
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

//! The unit database as the home of the store's records once this PM is in
//! a unit (see `pairvisor_store::Replicated`): reads from this node's
//! applied state, writes as batches whose preconditions are the versions the
//! transaction read.

use pairvisor_store::{ReadCheck, Replicated, StoreError, Versioned, WriteOp};
use pairvisor_unitdb::{Batch, Op, Precondition, UnitDb, WriteError};

/// [`Replicated`] over a [`UnitDb`].
pub struct UnitStore {
    db: UnitDb,
    handle: tokio::runtime::Handle,
}

impl UnitStore {
    /// Wraps `db`; must be created inside the daemon's (multi-thread)
    /// runtime, whose handle commits the batches.
    pub fn new(db: UnitDb) -> UnitStore {
        UnitStore {
            db,
            handle: tokio::runtime::Handle::current(),
        }
    }
}

fn unit_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unit(e.to_string())
}

impl Replicated for UnitStore {
    fn get(&self, table: &str, key: &str) -> Result<Option<Versioned>, StoreError> {
        Ok(self
            .db
            .get(table, key)
            .map_err(unit_err)?
            .map(|r| Versioned {
                key: key.to_string(),
                version: r.version,
                value: r.value,
            }))
    }

    fn list(&self, table: &str) -> Result<Vec<Versioned>, StoreError> {
        Ok(self
            .db
            .list(table)
            .map_err(unit_err)?
            .into_iter()
            .map(|(key, r)| Versioned {
                key,
                version: r.version,
                value: r.value,
            })
            .collect())
    }

    fn commit(&self, reads: Vec<ReadCheck>, writes: Vec<WriteOp>) -> Result<bool, StoreError> {
        let batch = Batch {
            preconditions: reads
                .into_iter()
                .map(|r| match r.version {
                    Some(version) => Precondition::Version {
                        table: r.table,
                        key: r.key,
                        version,
                    },
                    None => Precondition::Absent {
                        table: r.table,
                        key: r.key,
                    },
                })
                .collect(),
            ops: writes
                .into_iter()
                .map(|w| match w {
                    WriteOp::Put { table, key, value } => Op::Put { table, key, value },
                    WriteOp::Delete { table, key } => Op::Delete { table, key },
                })
                .collect(),
        };
        let db = self.db.clone();
        // The store's API is synchronous (redb); on the unit database a
        // commit is a network round trip, run on the runtime without
        // starving it.
        let r = tokio::task::block_in_place(|| {
            self.handle.block_on(async {
                let index = db.write(batch).await?;
                // Read-your-writes: on a follower the write returns when the
                // leader has committed it; wait until this node has applied
                // it, so that the caller's next read sees it.
                let _ = db
                    .wait_applied(index, std::time::Duration::from_secs(5))
                    .await;
                Ok::<_, WriteError>(index)
            })
        });
        match r {
            Ok(_) => Ok(true),
            Err(WriteError::Rejected(_)) => Ok(false),
            Err(e) => Err(unit_err(e)),
        }
    }
}

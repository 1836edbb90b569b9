//! The data model: what a write carries (a [`Batch`]), what a record is, and
//! the openraft type configuration built from them.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Cursor;

/// A node of the unit (a PM or the witness), as Raft knows it: a small
/// positive number chosen when the node is formed or joins, never reused.
pub type NodeId = u64;

/// What a node is for. Both kinds are full Raft voters; the orchestrator runs
/// VMs only on PMs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    /// A physical machine that runs VMs.
    #[default]
    Pm,
    /// The witness: votes, holds a copy of the database, runs no VMs.
    Witness,
}

impl fmt::Display for NodeRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeRole::Pm => "pm",
            NodeRole::Witness => "witness",
        })
    }
}

/// How to reach a node and what it is; kept in the Raft membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// `host:port` of the node's unit-database endpoint (HTTPS, mutual TLS).
    pub addr: String,
    /// PM or witness.
    pub role: NodeRole,
}

impl NodeInfo {
    /// A node at `addr` with `role`.
    pub fn new(addr: impl Into<String>, role: NodeRole) -> Self {
        NodeInfo {
            addr: addr.into(),
            role,
        }
    }
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.role, self.addr)
    }
}

/// One change in a [`Batch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Insert or replace the record `key` of `table`.
    Put {
        /// The table (a kind of record, e.g. `vms`).
        table: String,
        /// The record's key (its name).
        key: String,
        /// The record, as JSON.
        value: serde_json::Value,
    },
    /// Remove the record `key` of `table` (no error if absent).
    Delete {
        /// The table.
        table: String,
        /// The key.
        key: String,
    },
}

/// A condition that must hold, when the state machine applies the batch, for
/// any of the batch's changes to be made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "require", rename_all = "snake_case")]
pub enum Precondition {
    /// The record must not exist.
    Absent {
        /// The table.
        table: String,
        /// The key.
        key: String,
    },
    /// The record must exist (any version).
    Present {
        /// The table.
        table: String,
        /// The key.
        key: String,
    },
    /// The record must exist with exactly this version (the log index of the
    /// write that last changed it, see [`Record::version`]).
    Version {
        /// The table.
        table: String,
        /// The key.
        key: String,
        /// The expected version.
        version: u64,
    },
}

impl Precondition {
    /// The (table, key) the condition is about.
    pub fn target(&self) -> (&str, &str) {
        match self {
            Precondition::Absent { table, key }
            | Precondition::Present { table, key }
            | Precondition::Version { table, key, .. } => (table, key),
        }
    }
}

/// An atomic write: if every precondition holds, every op is applied, in
/// order, on every node; otherwise nothing is changed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// Checked first, all of them, against the state before the batch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preconditions: Vec<Precondition>,
    /// Applied in order when the preconditions hold.
    pub ops: Vec<Op>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Batch::default()
    }

    /// Adds a put of a JSON value.
    pub fn put(mut self, table: &str, key: &str, value: serde_json::Value) -> Self {
        self.ops.push(Op::Put {
            table: table.into(),
            key: key.into(),
            value,
        });
        self
    }

    /// Adds a put of any serializable record.
    pub fn put_json<T: Serialize>(
        self,
        table: &str,
        key: &str,
        value: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(self.put(table, key, serde_json::to_value(value)?))
    }

    /// Adds a delete.
    pub fn delete(mut self, table: &str, key: &str) -> Self {
        self.ops.push(Op::Delete {
            table: table.into(),
            key: key.into(),
        });
        self
    }

    /// Requires the record to be absent.
    pub fn require_absent(mut self, table: &str, key: &str) -> Self {
        self.preconditions.push(Precondition::Absent {
            table: table.into(),
            key: key.into(),
        });
        self
    }

    /// Requires the record to be present.
    pub fn require_present(mut self, table: &str, key: &str) -> Self {
        self.preconditions.push(Precondition::Present {
            table: table.into(),
            key: key.into(),
        });
        self
    }

    /// Requires the record to have exactly `version`.
    pub fn require_version(mut self, table: &str, key: &str, version: u64) -> Self {
        self.preconditions.push(Precondition::Version {
            table: table.into(),
            key: key.into(),
            version,
        });
        self
    }
}

/// A stored record: its JSON value and its version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The value.
    pub value: serde_json::Value,
    /// The Raft log index of the write that last put it. Versions only grow,
    /// so "has version N" means "unchanged since I read it".
    pub version: u64,
}

impl Record {
    /// Decodes the value into a typed record.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_value(self.value.clone())
    }
}

/// Why a batch was not applied: the first precondition that did not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("precondition failed on '{key}' in table '{table}': required {required}, found {found}; re-read the record and retry")]
pub struct Conflict {
    /// The table.
    pub table: String,
    /// The key.
    pub key: String,
    /// What was required ("absent", "present", "version 12").
    pub required: String,
    /// What was found ("absent", "version 15").
    pub found: String,
}

/// What the state machine answers for each log entry it applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Applied {
    /// The batch's ops were applied at this log index.
    Done {
        /// The log index (also the new version of every record it put).
        index: u64,
    },
    /// A precondition failed: nothing was changed.
    Rejected {
        /// The log index of the (rejected) entry.
        index: u64,
        /// Which condition failed.
        conflict: Conflict,
    },
    /// A membership or blank entry (nothing for the application).
    Internal {
        /// Its log index.
        index: u64,
    },
}

impl Default for Applied {
    fn default() -> Self {
        Applied::Internal { index: 0 }
    }
}

/// One record changed by an applied batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// The table.
    pub table: String,
    /// The key.
    pub key: String,
    /// The new value, or `None` when deleted.
    pub value: Option<serde_json::Value>,
}

/// What subscribers of [`crate::UnitDb::subscribe`] receive, in log order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A batch was applied (only batches that changed something; rejected
    /// batches are not announced).
    Applied {
        /// Its log index.
        index: u64,
        /// What changed.
        changes: Vec<Change>,
    },
    /// The whole state was replaced by a snapshot from the leader: re-read
    /// everything you cache.
    Reset {
        /// The last log index the snapshot covers.
        index: u64,
    },
}

openraft::declare_raft_types!(
    /// The openraft type configuration of the unit database.
    pub TypeConfig:
        D = Batch,
        R = Applied,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A Raft log entry of the unit database.
pub type Entry = openraft::Entry<TypeConfig>;
/// A Raft log id.
pub type LogId = openraft::LogId<NodeId>;
/// A Raft vote.
pub type Vote = openraft::Vote<NodeId>;
/// Storage errors as openraft wants them.
pub type StorageError = openraft::StorageError<NodeId>;
/// Membership as stored by the state machine.
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeInfo>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeInfo>;
/// A snapshot.
pub type Snapshot = openraft::Snapshot<TypeConfig>;

//! Pairvisor's unit database: the replicated state of a unit (two PMs and an
//! optional witness), kept by Raft ([openraft]) on every member.
//!
//! * Data model: tables of JSON records with string keys. A write is a
//!   [`Batch`] of puts and deletes applied atomically by the state machine on
//!   every node, guarded by optional [`Precondition`]s ("absent", "present",
//!   "has version N") so that a caller can validate and then commit without
//!   races. A record's version is the log index that last wrote it.
//! * Storage: redb files per node (`log.redb` for the Raft log and vote,
//!   `state.redb` for the tables and snapshots), see [`storage`].
//! * Transport: HTTP/2 over mutual TLS with a unit CA made at `unit init`,
//!   see [`tls`]; nodes join with a one-time [`JoinToken`].
//! * API: [`UnitDb`] — `write` from any node (forwarded to the leader),
//!   local `get`/`list`, a `linearizable` read barrier, `metrics`,
//!   `subscribe` to applied changes, membership changes, `shutdown`.
//! * Leases and fences ([`lease`]): voters answer lease requests
//!   (`request_lease`), refusing fenced nodes (`fence`, `unfence`,
//!   `fenced`); `force_quorum` lets the survivor of a two-voter unit write
//!   again (SPEC U6).
//!
//! See README.md in this crate for the operator's view.

mod error;
mod force;
pub mod lease;
pub mod logic;
mod net;
mod node;
pub mod storage;
pub mod tls;
pub mod types;

pub use error::{Error, OpenError, WriteError};
pub use force::{ForcedQuorum, FORCED_QUORUM_TABLE};
pub use lease::{Fence, LeaseAnswer, LeaseRefusal, FENCES_TABLE};
pub use net::CallError;
pub use node::{
    Config, Member, NodeState, Replication, Timing, UnitDb, UnitMetrics, JOIN_TOKENS_TABLE,
    NODES_TABLE,
};
pub use storage::DiskError;
pub use tls::{node_name, JoinToken, NodeIdentity, NodePem, TlsError, UnitCa};
pub use types::*;

//! Errors of the unit database, worded for the administrator who reads them.

use crate::net::CallError;
use crate::storage::DiskError;
use crate::tls::TlsError;
use crate::types::{Conflict, NodeId};

/// Why a node could not be opened or could not join.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The TLS identity is missing or unusable.
    #[error("the node's TLS identity is unusable")]
    Identity(#[from] TlsError),
    /// The listen address is taken or not local.
    #[error("cannot listen on {addr}: pick a free local address and port")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The data directory cannot be created.
    #[error("cannot create the data directory {dir}")]
    DataDir {
        /// The directory.
        dir: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The redb files cannot be opened.
    #[error("cannot open the unit database files in {dir} (is another process using them?)")]
    Disk {
        /// The directory.
        dir: String,
        /// Why.
        #[source]
        source: DiskError,
    },
    /// The configuration is inconsistent (e.g. timeouts).
    #[error("invalid unit database configuration: {0}")]
    Config(String),
    /// The identity belongs to another node id than configured.
    #[error("the TLS identity in the data directory belongs to node {found}, not node {configured}: use the node id this machine joined with")]
    WrongNode {
        /// Configured id.
        configured: NodeId,
        /// Id in the identity.
        found: NodeId,
    },
    /// openraft could not start.
    #[error("the Raft engine failed to start: {0}")]
    Raft(String),
    /// Joining failed.
    #[error(transparent)]
    Join(#[from] Error),
}

/// Why a write was not (certainly) made.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The batch itself is unusable.
    #[error("invalid write: {0}")]
    Invalid(String),
    /// A precondition failed: nothing was changed.
    #[error(transparent)]
    Rejected(#[from] Conflict),
    /// No leader could be reached in time; nothing was proposed.
    #[error("no leader: this node cannot reach a majority of the unit ({detail}). The change was not made. Check that the other PMs and the witness are running and that the links between them work")]
    NoQuorum {
        /// Reach and timing details.
        detail: String,
    },
    /// This node is the leader and proposed the change, but a majority did
    /// not confirm it in time.
    #[error("not committed within {secs} s: {detail}. The change will take effect only if this node regains a majority while still leader: re-read before retrying")]
    NotCommitted {
        /// Time limit.
        secs: u64,
        /// Reach details.
        detail: String,
    },
    /// The leader received the change and then stopped answering.
    #[error("the leader (node {leader}) did not answer after receiving the change ({reason}); it may or may not have been made: re-read and retry, with a precondition to make the retry safe")]
    Indeterminate {
        /// The leader.
        leader: NodeId,
        /// What happened.
        reason: String,
    },
    /// This node is shut down.
    #[error("this node's unit database is shut down")]
    Shutdown,
    /// The local disk failed.
    #[error("the local unit database failed")]
    Disk(#[source] DiskError),
}

/// Why a read, membership change or other operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The local disk failed.
    #[error("the local unit database failed")]
    Disk(#[from] DiskError),
    /// No leader / no majority.
    #[error("no leader: this node cannot reach a majority of the unit ({detail}). Check that the other PMs and the witness are running and that the links between them work")]
    NoQuorum {
        /// Reach and timing details.
        detail: String,
    },
    /// This node is shut down.
    #[error("this node's unit database is shut down")]
    Shutdown,
    /// The unit was already formed here.
    #[error(
        "this node already belongs to a unit; 'unit init' is only for the first PM of a new unit"
    )]
    AlreadyInitialized,
    /// A membership change was refused.
    #[error("membership change refused: {0}")]
    Membership(String),
    /// A write behind the operation failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// TLS material problem (e.g. no CA key here).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A peer could not be reached or refused.
    #[error(transparent)]
    Call(#[from] CallError),
    /// A join token was refused by the issuing PM.
    #[error("join refused: {0}")]
    JoinRefused(String),
    /// A value does not decode into the requested type.
    #[error("record '{key}' in table '{table}' does not decode into the requested type")]
    Decode {
        /// The table.
        table: String,
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Force quorum refused: the partner still talks to this node.
    #[error("node {node} was heard {ms_ago} ms ago: the unit still has its majority, so force quorum is refused (it is for a partner that is gone; to replace a PM, remove it instead)")]
    PartnerAlive {
        /// The partner.
        node: NodeId,
        /// How long ago it was last heard.
        ms_ago: u64,
    },
    /// Waiting for a condition timed out.
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        secs: u64,
    },
}

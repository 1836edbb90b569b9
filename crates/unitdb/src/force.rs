//! Force quorum (SPEC U6; docs/fencing.md "Without a witness"): the
//! deliberate, unsafe-recovery act that lets the surviving PM of a unit
//! without a witness write again when its partner is gone, like etcd's
//! `--force-new-cluster`.
//!
//! openraft 0.9 has no API for it (`initialize` works only on a pristine
//! node and membership changes must be committed by the old majority), so
//! the node does it below the engine: it stops the engine, appends to its
//! own log a membership entry naming itself as the only voter (with a vote
//! for itself in a new, higher term; see
//! [`LogStore::force_single_voter`](crate::storage::LogStore)), and starts a
//! new engine on the same files. That engine elects itself (one voter is a
//! majority of one) and commits the entry, together with whatever this node
//! held uncommitted.
//!
//! When the other PM comes back with its old files, it still believes in
//! the two-voter membership, so it needs this node's vote to lead, which it
//! never gets: the forced entry's term is above every term in its log, so
//! Raft's "candidate's log must be at least as up to date" check refuses it
//! (openraft answers such a vote request without adopting its term, so the
//! survivor's leadership is not disturbed). It cannot commit anything alone
//! either (it needs two of two), and voters refuse its lease requests
//! because it is no longer a member. The survivor re-admits it with
//! [`UnitDb::add_voter`]: it receives the survivor's log as a learner,
//! which replaces its uncommitted entries, and becomes a voter once it has
//! caught up. (Wiping its data directory and joining with a new join token
//! works as well.)

use crate::error::{Error, WriteError};
use crate::node::{start_engine, NodeState, UnitDb};
use crate::storage::{ForceStorageError, StateMachine};
use crate::types::NodeId;
use crate::Batch;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

/// Reserved table recording every force quorum (audit), keyed by the log
/// index of the forced membership entry.
pub const FORCED_QUORUM_TABLE: &str = "_forced_quorum";

/// What [`UnitDb::force_quorum`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForcedQuorum {
    /// The log index of the membership entry that made this node the only
    /// voter.
    pub membership_index: u64,
    /// That entry's term.
    pub term: u64,
    /// The voters removed (empty when this node already was alone).
    pub removed: Vec<NodeId>,
}

/// The audit record in [`FORCED_QUORUM_TABLE`].
#[derive(Debug, Serialize, Deserialize)]
struct ForcedQuorumRecord {
    by: NodeId,
    term: u64,
    removed: Vec<NodeId>,
    at_ms: u64,
}

impl UnitDb {
    /// Makes this node the only voter of the unit, so that it leads and its
    /// writes commit again without its partner (see the module
    /// documentation for what happens when the partner returns).
    ///
    /// Refused unless the membership is exactly two voters (this node and
    /// one other) with no change in progress: with a witness the survivor
    /// does not need it, and with more voters the others could still form a
    /// majority of the old membership on their own. Also refused while the
    /// partner was heard within the last `Timing::election_max`
    /// ([`Error::PartnerAlive`]): it is for a partner that is gone. Returns
    /// once this node leads alone and has committed an audit record
    /// ([`FORCED_QUORUM_TABLE`]). Idempotent: on a node that is already the
    /// only voter it changes nothing.
    pub async fn force_quorum(&self) -> Result<ForcedQuorum, Error> {
        self.check_open()?;
        // Held until the new engine runs, so that `shutdown` cannot stop the
        // old engine while this replaces it.
        let restart = self.inner.restart.lock().await;
        self.check_open()?;
        let me = self.inner.id;
        let (configs, membership_index, term) = {
            let raft = self.raft();
            let m = raft.metrics().borrow().clone();
            (
                m.membership_config.membership().get_joint_config().clone(),
                m.membership_config
                    .log_id()
                    .as_ref()
                    .map(|l| l.index)
                    .unwrap_or(0),
                m.current_term,
            )
        };
        let voters: BTreeSet<NodeId> = match configs.as_slice() {
            [one] => one.clone(),
            _ => {
                return Err(Error::Membership(
                    "a membership change is in progress: wait for it to finish (or fail) before forcing quorum".into(),
                ))
            }
        };
        if !voters.contains(&me) {
            return Err(Error::Membership(format!(
                "node {me} is not a voter of the unit, so it cannot force quorum"
            )));
        }
        let others: Vec<NodeId> = voters.iter().copied().filter(|v| *v != me).collect();
        match others.as_slice() {
            [] => {
                return Ok(ForcedQuorum {
                    membership_index,
                    term,
                    removed: vec![],
                })
            }
            [partner] => {
                if let Some(ago) = self.inner.net.health.last_seen(*partner) {
                    if ago < self.inner.timing.election_max {
                        return Err(Error::PartnerAlive {
                            node: *partner,
                            ms_ago: ago.as_millis() as u64,
                        });
                    }
                }
            }
            _ => {
                return Err(Error::Membership(format!(
                    "force quorum is for a unit of two PMs without a witness, and this unit has {} voters: the others could still form a majority of the current membership and continue without this node. With a witness, the surviving PM and the witness already form a majority",
                    voters.len()
                )))
            }
        }

        // Stop the engine; lease requests are refused meanwhile.
        self.inner.restarting.store(true, Ordering::SeqCst);
        let result = self.rewrite_and_restart(me, &voters).await;
        self.inner.restarting.store(false, Ordering::SeqCst);
        drop(restart);
        let forced = result?;
        tracing::warn!(
            node = me,
            index = forced.log_id.index,
            term = forced.log_id.leader_id.term,
            removed = ?others,
            "forced quorum: this node is now the only voter of the unit"
        );

        let limit = self.inner.timing.election_max * 4 + self.inner.timing.request;
        self.wait_until("this node to lead alone after force quorum", limit, |m| {
            m.state == NodeState::Leader && m.leader == Some(me)
        })
        .await?;
        let rec = ForcedQuorumRecord {
            by: me,
            term: forced.log_id.leader_id.term,
            removed: others.clone(),
            at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default(),
        };
        let batch = Batch::new()
            .put_json(FORCED_QUORUM_TABLE, &forced.log_id.index.to_string(), &rec)
            .map_err(|e| WriteError::Invalid(e.to_string()))?;
        self.write_internal(batch).await?;
        Ok(ForcedQuorum {
            membership_index: forced.log_id.index,
            term: forced.log_id.leader_id.term,
            removed: others,
        })
    }

    /// Stops the engine, rewrites the membership on disk and starts a new
    /// engine (also when the rewrite was refused, then on unchanged files).
    async fn rewrite_and_restart(
        &self,
        me: NodeId,
        voters: &BTreeSet<NodeId>,
    ) -> Result<crate::storage::ForcedEntry, Error> {
        let _ = self.raft().shutdown().await;
        // openraft does not wait for its state machine worker at shutdown,
        // and that worker drains its queue: wait until it has dropped the
        // state machine, or an old apply could land after the new engine's.
        let gone = self.inner.sm_gone.lock().ok().and_then(|mut g| g.take());
        if let Some(mut rx) = gone {
            let wait = self.inner.timing.request * 2;
            let drained =
                tokio::time::timeout(wait, async { while rx.changed().await.is_ok() {} }).await;
            if drained.is_err() {
                // Two engines must never share the files: stay stopped.
                self.inner.closed.store(true, Ordering::SeqCst);
                return Err(Error::Timeout {
                    what: "the stopped Raft engine to release the state machine (the node stopped itself; restart it)".into(),
                    secs: wait.as_secs(),
                });
            }
        }
        let log = self
            .inner
            .log
            .read()
            .ok()
            .and_then(|l| l.clone())
            .ok_or(Error::Shutdown)?;
        let reader = self.reader()?;
        let rewrite = {
            let log = log.clone();
            let reader = reader.clone();
            let info = self.node_info();
            let voters = voters.clone();
            tokio::task::spawn_blocking(move || {
                let applied = reader
                    .applied_membership()
                    .map_err(ForceStorageError::Disk)?;
                log.force_single_voter(me, info, &voters, &applied)
            })
            .await
        };
        let sm = StateMachine::on_shared(&reader, self.inner.events.clone());
        if let Ok(mut g) = self.inner.sm_gone.lock() {
            *g = Some(sm.drop_signal());
        }
        match start_engine(me, self.inner.raft_config.clone(), &self.inner.net, log, sm).await {
            Ok(raft) => self.set_raft(raft),
            Err(e) => {
                self.inner.closed.store(true, Ordering::SeqCst);
                return Err(Error::Membership(format!(
                    "the Raft engine did not restart ({e}); the node stopped itself: restart it"
                )));
            }
        }
        match rewrite {
            Ok(Ok(forced)) => Ok(forced),
            Ok(Err(ForceStorageError::Refused(why))) => Err(Error::Membership(why)),
            Ok(Err(ForceStorageError::Disk(e))) => Err(Error::Disk(e)),
            Err(_) => Err(Error::Disk(crate::storage::DiskError::Task)),
        }
    }
}

//! Lease grants and fences (docs/fencing.md).
//!
//! A PM asks every voter for a lease (`/unit/lease` on the mutual-TLS
//! endpoint, or locally when it is the voter itself); a voter grants it
//! unless its state says the PM is fenced. Fences are records of table
//! [`FENCES_TABLE`] keyed by node id, written through Raft by
//! [`UnitDb::fence`] (so a fence needs a majority) and removed by
//! [`UnitDb::unfence`].
//!
//! The safety argument of the takeover rests on one property: once a voter
//! has *stored* a fence entry in its log, it refuses the fenced node, even
//! before it applies the entry. A fence is committed only when a majority
//! has stored it, and a lease needs a majority of grants; the two majorities
//! share a voter, which granted the last lease before it stored the fence,
//! so before the commit. That lease was requested even earlier and ends at
//! most `lease_ms` after the request, hence before `commit + lease_ms` (see
//! `pairvisor_unit::lease` for the waiting side).

use crate::error::{Error, WriteError};
use crate::node::UnitDb;
use crate::types::{Entry, NodeId, Op};
use crate::Batch;
use openraft::EntryPayload;
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Table of fences, keyed by the fenced node's id (decimal). A record there
/// means "refuse this node's lease requests", whatever its content.
pub const FENCES_TABLE: &str = "fences";

/// A fence: the unit refuses leases to `node` until it is removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    /// The fenced node.
    pub node: NodeId,
    /// The log index of the write that fenced it (the record's version;
    /// filled in when the fence is read).
    #[serde(default)]
    pub fenced_at: u64,
    /// Why, for the administrator.
    pub reason: String,
    /// The node that asked for the fence.
    pub by: NodeId,
    /// Wall-clock time of the request (milliseconds since the Unix epoch),
    /// for humans only: no decision depends on it.
    #[serde(default)]
    pub at_ms: u64,
}

/// A lease request as sent to a voter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LeaseRequest {
    /// The node asking (must match the client certificate).
    pub node: NodeId,
}

/// A voter's answer to a lease request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseAnswer {
    /// The voter grants the lease for the round the request belongs to.
    Granted,
    /// The voter refuses, and says why.
    Refused(LeaseRefusal),
}

impl LeaseAnswer {
    /// True for [`LeaseAnswer::Granted`].
    pub fn is_granted(&self) -> bool {
        matches!(self, LeaseAnswer::Granted)
    }
}

/// Why a voter refused a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum LeaseRefusal {
    /// The voter's applied state holds a fence for the requester.
    #[error("node {} is fenced (log index {}, by node {}): {}", fence.node, fence.fenced_at, fence.by, fence.reason)]
    Fenced {
        /// The fence.
        fence: Fence,
    },
    /// A change of the requester's fence is stored in the voter's log but not
    /// applied yet; the voter refuses until it knows the outcome.
    #[error("a change of node {node}'s fence is in this voter's log (index {index}) but not applied yet")]
    FencePending {
        /// The requester.
        node: NodeId,
        /// The log index of the pending change.
        index: u64,
    },
    /// The requester is not a member of the unit as the voter knows it (for
    /// example after force quorum removed it).
    #[error("node {node} is not a member of the unit as this voter knows it")]
    NotMember {
        /// The requester.
        node: NodeId,
    },
    /// The asked node is not a voter (any more).
    #[error("node {voter} is not a voter of the unit")]
    NotVoter {
        /// The asked node.
        voter: NodeId,
    },
    /// The request claims a node id its TLS certificate does not name.
    #[error("the request claims to come from node {claimed}, but its certificate is not node {claimed}'s")]
    WrongIdentity {
        /// The claimed id.
        claimed: NodeId,
    },
    /// The voter cannot decide now (its state is unreadable, it is shutting
    /// down, or force quorum is restarting it); refusing is the safe answer.
    #[error("the voter cannot decide now: {detail}")]
    Unavailable {
        /// Why.
        detail: String,
    },
}

/// The first entry among `entries` that changes `node`'s fence (a put or a
/// delete of its record in [`FENCES_TABLE`]), by log index.
pub fn fence_change_in(entries: &[Entry], node: NodeId) -> Option<u64> {
    let key = node.to_string();
    entries.iter().find_map(|e| match &e.payload {
        EntryPayload::Normal(batch) => batch
            .ops
            .iter()
            .any(|op| match op {
                Op::Put { table, key: k, .. } | Op::Delete { table, key: k } => {
                    table == FENCES_TABLE && *k == key
                }
            })
            .then_some(e.log_id.index),
        _ => None,
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl UnitDb {
    /// Asks voter `voter` for a lease for this node, bounded by
    /// `Timing::request`. When `voter` is this node, the answer is local (no
    /// network). An `Err` means no answer (treat it as "not granted").
    pub async fn request_lease(&self, voter: NodeId) -> Result<LeaseAnswer, Error> {
        self.request_lease_within(voter, self.inner.timing.request)
            .await
    }

    /// Like [`UnitDb::request_lease`], with the time limit `limit` (a lease
    /// keeper uses less than its renewal interval).
    pub async fn request_lease_within(
        &self,
        voter: NodeId,
        limit: Duration,
    ) -> Result<LeaseAnswer, Error> {
        self.check_open()?;
        if voter == self.inner.id {
            return Ok(self.lease_decision(self.inner.id));
        }
        let addr = self
            .raft()
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&voter)
            .map(|n| n.addr.clone())
            .ok_or_else(|| {
                Error::Membership(format!(
                    "node {voter} is not a member of the unit as this node knows it"
                ))
            })?;
        let answer: LeaseAnswer = self
            .inner
            .net
            .call(
                voter,
                &addr,
                "/unit/lease",
                &LeaseRequest {
                    node: self.inner.id,
                },
                limit,
            )
            .await?;
        Ok(answer)
    }

    /// The voter's side: grants `requester` a lease unless this node's state
    /// says it must not. Never fails: anything unknown is a refusal.
    pub(crate) fn lease_decision(&self, requester: NodeId) -> LeaseAnswer {
        match self.lease_check(requester) {
            Ok(()) => LeaseAnswer::Granted,
            Err(r) => LeaseAnswer::Refused(r),
        }
    }

    fn lease_check(&self, requester: NodeId) -> Result<(), LeaseRefusal> {
        let unavailable = |detail: String| LeaseRefusal::Unavailable { detail };
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(unavailable("this voter is shutting down".into()));
        }
        if self.inner.restarting.load(Ordering::SeqCst) {
            return Err(unavailable(
                "this voter is restarting its Raft engine (force quorum)".into(),
            ));
        }
        {
            let metrics = self.raft().metrics();
            let m = metrics.borrow();
            let membership = m.membership_config.membership();
            if !membership.voter_ids().any(|v| v == self.inner.id) {
                return Err(LeaseRefusal::NotVoter {
                    voter: self.inner.id,
                });
            }
            if membership.get_node(&requester).is_none() {
                return Err(LeaseRefusal::NotMember { node: requester });
            }
        }
        let key = requester.to_string();
        let reader = self.reader().map_err(|e| unavailable(e.to_string()))?;
        let fenced = |rec: crate::Record| {
            let mut fence: Fence = rec.decode().unwrap_or_else(|_| Fence {
                node: requester,
                fenced_at: 0,
                reason: "(unreadable fence record)".into(),
                by: 0,
                at_ms: 0,
            });
            fence.fenced_at = rec.version;
            LeaseRefusal::Fenced { fence }
        };
        // 1. The applied state, and up to where it is applied (one read).
        let (rec, applied) = reader
            .get_with_applied(FENCES_TABLE, &key)
            .map_err(|e| unavailable(e.to_string()))?;
        if let Some(rec) = rec {
            return Err(fenced(rec));
        }
        // 2. Entries stored but not applied yet: a fence counts from the
        //    moment it is in this voter's log (see the module comment).
        let log = self
            .inner
            .log
            .read()
            .ok()
            .and_then(|l| l.clone())
            .ok_or_else(|| unavailable("this voter is shutting down".into()))?;
        let pending = log
            .entries_after(applied.map(|l| l.index))
            .map_err(|e| unavailable(e.to_string()))?;
        if let Some(index) = fence_change_in(&pending, requester) {
            return Err(LeaseRefusal::FencePending {
                node: requester,
                index,
            });
        }
        // 3. Again the applied state: an entry applied (and its log purged)
        //    between the two reads above is seen here.
        if let Some(rec) = reader
            .get(FENCES_TABLE, &key)
            .map_err(|e| unavailable(e.to_string()))?
        {
            return Err(fenced(rec));
        }
        Ok(())
    }

    /// Fences `node`: from the moment each voter stores this write, it
    /// refuses `node`'s lease requests. Committed through Raft (needs a
    /// majority); returns the log index. The caller that wants to take over
    /// `node`'s work waits `lease_ms + drift_margin_ms` after this returns
    /// (see `pairvisor_unit::lease::fence_partner`). Fencing a fenced node
    /// again replaces the record (and restarts that wait).
    pub async fn fence(&self, node: NodeId, reason: &str) -> Result<u64, WriteError> {
        let fence = Fence {
            node,
            fenced_at: 0,
            reason: reason.to_string(),
            by: self.inner.id,
            at_ms: now_ms(),
        };
        let batch = Batch::new()
            .put_json(FENCES_TABLE, &node.to_string(), &fence)
            .map_err(|e| WriteError::Invalid(e.to_string()))?;
        let index = self.write(batch).await?;
        tracing::warn!(node, index, reason, "fenced a node");
        // So that `fenced` answers true here right away; the fence is
        // committed whether or not this wait succeeds.
        let _ = self.wait_applied(index, self.inner.timing.request).await;
        Ok(index)
    }

    /// Removes `node`'s fence (committed through Raft); voters grant its
    /// lease requests again once they have applied this. Returns the log
    /// index (also when there was no fence).
    pub async fn unfence(&self, node: NodeId) -> Result<u64, WriteError> {
        let index = self
            .write(Batch::new().delete(FENCES_TABLE, &node.to_string()))
            .await?;
        tracing::info!(node, index, "removed a node's fence");
        let _ = self.wait_applied(index, self.inner.timing.request).await;
        Ok(index)
    }

    /// Whether this node's applied state fences `node`. Also true when the
    /// state cannot be read (fail safe).
    pub fn fenced(&self, node: NodeId) -> bool {
        !matches!(self.fence_of(node), Ok(None))
    }

    /// `node`'s fence in this node's applied state, if any.
    pub fn fence_of(&self, node: NodeId) -> Result<Option<Fence>, Error> {
        let Some(rec) = self.get(FENCES_TABLE, &node.to_string())? else {
            return Ok(None);
        };
        Ok(Some(Self::decode_fence(node, rec)))
    }

    /// Every fence in this node's applied state.
    pub fn fences(&self) -> Result<Vec<Fence>, Error> {
        Ok(self
            .list(FENCES_TABLE)?
            .into_iter()
            .map(|(k, rec)| Self::decode_fence(k.parse().unwrap_or_default(), rec))
            .collect())
    }

    fn decode_fence(node: NodeId, rec: crate::Record) -> Fence {
        let mut f: Fence = rec.decode().unwrap_or_else(|_| Fence {
            node,
            fenced_at: 0,
            reason: "(unreadable fence record)".into(),
            by: 0,
            at_ms: 0,
        });
        f.fenced_at = rec.version;
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::TypeConfig;
    use openraft::{CommittedLeaderId, LogId};

    fn entry(index: u64, payload: EntryPayload<TypeConfig>) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload,
        }
    }

    #[test]
    fn pending_fence_changes_are_found() {
        let put = |table: &str, key: &str| {
            EntryPayload::Normal(Batch::new().put(table, key, serde_json::json!({})))
        };
        let entries = vec![
            entry(5, EntryPayload::Blank),
            entry(6, put("vms", "2")),
            entry(7, put(FENCES_TABLE, "3")),
            entry(
                8,
                EntryPayload::Normal(Batch::new().delete(FENCES_TABLE, "2")),
            ),
            entry(9, put(FENCES_TABLE, "2")),
        ];
        // (node, first pending change)
        for (node, want) in [(2, Some(8)), (3, Some(7)), (4, None), (22, None)] {
            assert_eq!(fence_change_in(&entries, node), want, "node {node}");
        }
        assert_eq!(fence_change_in(&[], 2), None);
    }

    #[test]
    fn answers_serialize_for_the_api() {
        let a = LeaseAnswer::Refused(LeaseRefusal::NotMember { node: 2 });
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"refused": {"why": "not_member", "node": 2}})
        );
        let back: LeaseAnswer = serde_json::from_value(v).unwrap();
        assert_eq!(back, a);
        assert_eq!(
            serde_json::to_value(LeaseAnswer::Granted).unwrap(),
            serde_json::json!("granted")
        );
        assert!(a.to_string_lossy().contains("not a member"));
    }

    impl LeaseAnswer {
        fn to_string_lossy(&self) -> String {
            match self {
                LeaseAnswer::Granted => "granted".into(),
                LeaseAnswer::Refused(r) => r.to_string(),
            }
        }
    }
}

//! Generation identifiers: the write history of a replica.
//!
//! Modelled on DRBD's generation identifiers. Every replica keeps:
//!
//! * `current` — identifies the data it holds now. Two replicas with the
//!   same `current` hold the same data (except for regions marked in their
//!   dirty bitmaps, see the crate README). `0` means "just created, never
//!   held data" (a replica that must receive a full copy).
//! * `bitmap` — the `current` of the last moment this replica was in sync
//!   with its partner, when its dirty bitmap started to record changes made
//!   without the partner. `0` when the bitmap records nothing of the kind.
//! * `history` — older identifiers, newest first, bounded.
//!
//! A primary that writes without its partner (degraded mode) first
//! *rotates*: the old `current` becomes `bitmap` and a fresh random
//! `current` is drawn. Comparing two replicas' identifiers then tells who is
//! ahead, who is behind, and whether both were written independently
//! (split brain). Pure logic, no I/O.

use serde::{Deserialize, Serialize};

/// How many old identifiers a replica remembers.
pub const HISTORY_LEN: usize = 8;

/// The generation identifiers of one replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenIds {
    /// Identifies the data held now; 0 for a brand-new, empty replica.
    pub current: u64,
    /// `current` at the last sync point when the dirty bitmap started
    /// recording writes made without the partner; 0 if none.
    pub bitmap: u64,
    /// Older identifiers, newest first.
    pub history: Vec<u64>,
}

/// How a local replica relates to its partner's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "relation")]
pub enum Relation {
    /// Both hold the same generation (dirty bitmaps may still name regions
    /// written while the pair was connected, which get resynced).
    Equal,
    /// The local replica holds newer data; the partner must be resynced from
    /// it. `full` when the dirty bitmap does not cover the difference.
    LocalAhead {
        /// A full copy is needed.
        full: bool,
    },
    /// The partner holds newer data; the local replica must be resynced from
    /// it.
    PeerAhead {
        /// A full copy is needed.
        full: bool,
    },
    /// Both were written independently since their last common point. Never
    /// resolved automatically. `full` when no common bitmap base exists (the
    /// union of both bitmaps does not cover the difference).
    SplitBrain {
        /// A full copy is needed after the decision.
        full: bool,
    },
}

impl GenIds {
    /// Identifiers for a brand-new replica that will receive a full copy.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Identifiers for a new volume whose initial contents (all zeroes) are
    /// known: both replicas created with the same `initial` start in sync.
    pub fn new_volume(initial: u64) -> Self {
        GenIds {
            current: initial,
            bitmap: 0,
            history: Vec::new(),
        }
    }

    /// True for a replica that never held data.
    pub fn is_empty(&self) -> bool {
        self.current == 0
    }

    fn push_history(&mut self, id: u64) {
        if id == 0 || self.history.first() == Some(&id) {
            return;
        }
        self.history.insert(0, id);
        self.history.truncate(HISTORY_LEN);
    }

    /// Called before a primary's first write without its partner: starts a
    /// new generation (`fresh` must be random and non-zero).
    pub fn rotate_for_degraded_write(&mut self, fresh: u64) {
        debug_assert_ne!(fresh, 0);
        if self.bitmap == 0 {
            self.bitmap = self.current;
        } else {
            let old = self.current;
            self.push_history(old);
        }
        self.current = fresh;
    }

    /// Called on the sync source when a resync to its partner completed:
    /// the bitmap no longer records a difference.
    pub fn resync_finished_as_source(&mut self) {
        let b = self.bitmap;
        self.push_history(b);
        self.bitmap = 0;
    }

    /// Called on the sync target when a resync from `source` completed: it
    /// now holds the source's generation.
    pub fn resync_finished_as_target(&mut self, source_current: u64) {
        if self.current != source_current {
            let old = self.current;
            self.push_history(old);
        }
        let b = self.bitmap;
        self.push_history(b);
        self.current = source_current;
        self.bitmap = 0;
    }

    /// Compares the local identifiers with the partner's.
    pub fn compare(&self, peer: &GenIds) -> Relation {
        let local = self;
        match (local.current, peer.current) {
            (0, 0) => return Relation::Equal,
            (_, 0) => return Relation::LocalAhead { full: true },
            (0, _) => return Relation::PeerAhead { full: true },
            _ => {}
        }
        if local.current == peer.current {
            return Relation::Equal;
        }
        if local.bitmap != 0 && local.bitmap == peer.current {
            return Relation::LocalAhead { full: false };
        }
        if peer.bitmap != 0 && peer.bitmap == local.current {
            return Relation::PeerAhead { full: false };
        }
        if local.bitmap != 0 && local.bitmap == peer.bitmap {
            return Relation::SplitBrain { full: false };
        }
        if local.history.contains(&peer.current) {
            return Relation::LocalAhead { full: true };
        }
        if peer.history.contains(&local.current) {
            return Relation::PeerAhead { full: true };
        }
        Relation::SplitBrain { full: true }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(current: u64, bitmap: u64, history: &[u64]) -> GenIds {
        GenIds {
            current,
            bitmap,
            history: history.to_vec(),
        }
    }

    #[test]
    fn compare_table() {
        use Relation::*;
        let table = [
            ("both new", g(0, 0, &[]), g(0, 0, &[]), Equal),
            (
                "peer new",
                g(7, 0, &[]),
                g(0, 0, &[]),
                LocalAhead { full: true },
            ),
            (
                "local new",
                g(0, 0, &[]),
                g(7, 3, &[]),
                PeerAhead { full: true },
            ),
            ("in sync", g(7, 0, &[1]), g(7, 0, &[1]), Equal),
            ("in sync, stale bitmaps", g(7, 3, &[]), g(7, 0, &[]), Equal),
            (
                "local wrote degraded",
                g(9, 7, &[]),
                g(7, 0, &[]),
                LocalAhead { full: false },
            ),
            (
                "peer wrote degraded",
                g(7, 0, &[]),
                g(9, 7, &[]),
                PeerAhead { full: false },
            ),
            (
                "both wrote",
                g(9, 7, &[]),
                g(8, 7, &[]),
                SplitBrain { full: false },
            ),
            (
                "local far ahead",
                g(11, 9, &[7]),
                g(7, 0, &[]),
                LocalAhead { full: true },
            ),
            (
                "peer far ahead",
                g(7, 0, &[]),
                g(11, 9, &[7, 5]),
                PeerAhead { full: true },
            ),
            (
                "unrelated",
                g(5, 0, &[1]),
                g(6, 0, &[2]),
                SplitBrain { full: true },
            ),
            (
                "diverged long ago",
                g(20, 9, &[7]),
                g(30, 8, &[7]),
                SplitBrain { full: true },
            ),
        ];
        for (name, local, peer, expected) in table {
            assert_eq!(local.compare(&peer), expected, "{name}");
            // The relation is symmetric.
            let mirrored = match expected {
                LocalAhead { full } => PeerAhead { full },
                PeerAhead { full } => LocalAhead { full },
                other => other,
            };
            assert_eq!(peer.compare(&local), mirrored, "{name} (mirrored)");
        }
    }

    #[test]
    fn degraded_then_resync_lifecycle() {
        // A and B in sync at generation 7.
        let mut a = g(7, 0, &[]);
        let mut b = g(7, 0, &[]);
        // B is lost; A writes degraded.
        a.rotate_for_degraded_write(9);
        assert_eq!(a, g(9, 7, &[]));
        // A loses B again before resync: the bitmap base stays 7.
        a.rotate_for_degraded_write(10);
        assert_eq!(a, g(10, 7, &[9]));
        assert_eq!(a.compare(&b), Relation::LocalAhead { full: false });
        // Resync A -> B.
        a.resync_finished_as_source();
        b.resync_finished_as_target(a.current);
        assert_eq!(a.compare(&b), Relation::Equal);
        assert_eq!(a.bitmap, 0);
        assert_eq!(b.bitmap, 0);
        assert_eq!(b.history, vec![7]);
    }

    #[test]
    fn failover_both_write_is_split_brain() {
        let mut a = g(7, 0, &[]);
        let mut b = g(7, 0, &[]);
        a.rotate_for_degraded_write(9);
        b.rotate_for_degraded_write(8);
        assert_eq!(a.compare(&b), Relation::SplitBrain { full: false });
    }

    #[test]
    fn history_is_bounded() {
        let mut a = g(1, 0, &[]);
        for i in 2..100 {
            a.rotate_for_degraded_write(i);
        }
        assert!(a.history.len() <= HISTORY_LEN);
        assert_eq!(a.bitmap, 1);
    }
}

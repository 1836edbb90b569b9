//! Decisions that need no I/O: precondition checks, quorum arithmetic and the
//! admin-facing explanations built from them. Table-driven tests below.

use crate::types::{Conflict, NodeId, Precondition};
use std::collections::BTreeSet;

/// Checks one precondition against the current version of its record
/// (`None` = absent).
pub fn check_precondition(pre: &Precondition, current: Option<u64>) -> Result<(), Conflict> {
    let ok = match (pre, current) {
        (Precondition::Absent { .. }, None) => true,
        (Precondition::Absent { .. }, Some(_)) => false,
        (Precondition::Present { .. }, found) => found.is_some(),
        (Precondition::Version { version, .. }, found) => found == Some(*version),
    };
    if ok {
        return Ok(());
    }
    let (table, key) = pre.target();
    Err(Conflict {
        table: table.to_string(),
        key: key.to_string(),
        required: match pre {
            Precondition::Absent { .. } => "absent".to_string(),
            Precondition::Present { .. } => "present".to_string(),
            Precondition::Version { version, .. } => format!("version {version}"),
        },
        found: match current {
            None => "absent".to_string(),
            Some(v) => format!("version {v}"),
        },
    })
}

/// Checks every precondition in order; the first that fails is reported.
/// `lookup` gives the current version of a record.
pub fn check_all(
    pres: &[Precondition],
    mut lookup: impl FnMut(&str, &str) -> Option<u64>,
) -> Result<(), Conflict> {
    for pre in pres {
        let (table, key) = pre.target();
        check_precondition(pre, lookup(table, key))?;
    }
    Ok(())
}

/// How many voters make a majority of `voters`.
pub fn majority(voters: usize) -> usize {
    voters / 2 + 1
}

/// What one node knows about its reach into the unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    /// The voters of the current membership.
    pub voters: BTreeSet<NodeId>,
    /// The voters this node has exchanged a message with recently
    /// (including itself when it is a voter).
    pub reachable: BTreeSet<NodeId>,
}

impl Reach {
    /// Voters needed for a majority.
    pub fn needed(&self) -> usize {
        majority(self.voters.len())
    }

    /// Voters reachable from here.
    pub fn reached(&self) -> usize {
        self.reachable.intersection(&self.voters).count()
    }

    /// True when a majority is reachable.
    pub fn has_majority(&self) -> bool {
        !self.voters.is_empty() && self.reached() >= self.needed()
    }

    /// The voters not reached.
    pub fn missing(&self) -> Vec<NodeId> {
        self.voters.difference(&self.reachable).copied().collect()
    }

    /// For an administrator: how many voters this node reaches, how many are
    /// needed, and which are missing ("reaches 1 of 3 voters, 2 needed; not
    /// reachable: node 2, node 3").
    pub fn explain(&self) -> String {
        if self.voters.is_empty() {
            return "is not a voter of any unit yet: initialize a unit here (unit init) or join one (unit join)".to_string();
        }
        let missing = self.missing();
        let missing_txt = if missing.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = missing.iter().map(|n| format!("node {n}")).collect();
            format!("; not reachable: {}", list.join(", "))
        };
        format!(
            "reaches {} of {} voters, {} needed{}",
            self.reached(),
            self.voters.len(),
            self.needed(),
            missing_txt
        )
    }
}

/// Whether a forwarded request may be retried after a transport failure
/// without risking applying it twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAdvice {
    /// The request never left this node (connect or TLS failure): retry.
    Retry,
    /// The request may have reached the leader: its outcome is unknown.
    Indeterminate,
}

/// Classifies a transport failure by whether the request was sent.
pub fn retry_advice(request_sent: bool) -> RetryAdvice {
    if request_sent {
        RetryAdvice::Indeterminate
    } else {
        RetryAdvice::Retry
    }
}

/// Table names starting with this prefix are kept by the unit database
/// itself (join tokens, issued certificates).
pub const RESERVED_PREFIX: &str = "_";

/// Checks that a table name is usable by applications: non-empty, at most 64
/// bytes, of `[a-z0-9_.-]`, not reserved.
pub fn validate_table(name: &str, allow_reserved: bool) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!(
            "table name '{name}' must be 1 to 64 characters long"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
    {
        return Err(format!(
            "table name '{name}' may only contain a-z, 0-9, '_', '.', '-'"
        ));
    }
    if !allow_reserved && name.starts_with(RESERVED_PREFIX) {
        return Err(format!(
            "table name '{name}' is reserved (names starting with '{RESERVED_PREFIX}' belong to the unit database)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn absent() -> Precondition {
        Precondition::Absent {
            table: "vms".into(),
            key: "web".into(),
        }
    }
    fn present() -> Precondition {
        Precondition::Present {
            table: "vms".into(),
            key: "web".into(),
        }
    }
    fn version(v: u64) -> Precondition {
        Precondition::Version {
            table: "vms".into(),
            key: "web".into(),
            version: v,
        }
    }

    #[test]
    fn precondition_table() {
        // (condition, current version, expected: Ok or (required, found))
        type Case = (
            Precondition,
            Option<u64>,
            Result<(), (&'static str, &'static str)>,
        );
        let cases: Vec<Case> = vec![
            (absent(), None, Ok(())),
            (absent(), Some(3), Err(("absent", "version 3"))),
            (present(), Some(3), Ok(())),
            (present(), None, Err(("present", "absent"))),
            (version(3), Some(3), Ok(())),
            (version(3), Some(4), Err(("version 3", "version 4"))),
            (version(3), None, Err(("version 3", "absent"))),
            (version(0), None, Err(("version 0", "absent"))),
        ];
        for (pre, cur, want) in cases {
            let got = check_precondition(&pre, cur);
            match (got, want) {
                (Ok(()), Ok(())) => {}
                (Err(c), Err((req, found))) => {
                    assert_eq!((c.required.as_str(), c.found.as_str()), (req, found));
                    assert_eq!((c.table.as_str(), c.key.as_str()), ("vms", "web"));
                    assert!(c.to_string().contains("re-read"), "{c}");
                }
                (g, w) => panic!("{pre:?} with {cur:?}: got {g:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn first_failing_precondition_is_reported() {
        let pres = vec![
            Precondition::Absent {
                table: "t".into(),
                key: "new".into(),
            },
            Precondition::Version {
                table: "t".into(),
                key: "old".into(),
                version: 5,
            },
            Precondition::Present {
                table: "t".into(),
                key: "gone".into(),
            },
        ];
        let lookup = |_t: &str, k: &str| match k {
            "old" => Some(6),
            _ => None,
        };
        let c = check_all(&pres, lookup).unwrap_err();
        assert_eq!(c.key, "old");
        assert!(check_all(&pres[..1], lookup).is_ok());
        assert!(check_all(&[], lookup).is_ok());
    }

    #[test]
    fn majority_table() {
        for (voters, needed) in [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (7, 4)] {
            assert_eq!(majority(voters), needed, "{voters} voters");
        }
    }

    #[test]
    fn reach_table() {
        let set = |v: &[u64]| v.iter().copied().collect::<BTreeSet<_>>();
        // (voters, reachable, has majority, explanation contains)
        let cases = [
            (
                &[1, 2, 3][..],
                &[1, 2, 3][..],
                true,
                "reaches 3 of 3 voters, 2 needed",
            ),
            (&[1, 2, 3], &[1, 3], true, "not reachable: node 2"),
            (
                &[1, 2, 3],
                &[1],
                false,
                "reaches 1 of 3 voters, 2 needed; not reachable: node 2, node 3",
            ),
            (&[1, 2], &[1], false, "reaches 1 of 2 voters, 2 needed"),
            (&[1], &[1], true, "reaches 1 of 1 voters, 1 needed"),
            // A learner (4) that is reachable does not count.
            (&[1, 2, 3], &[1, 4], false, "reaches 1 of 3"),
            (&[], &[1], false, "not a voter of any unit"),
        ];
        for (voters, reachable, ok, text) in cases {
            let r = Reach {
                voters: set(voters),
                reachable: set(reachable),
            };
            assert_eq!(r.has_majority(), ok, "{r:?}");
            assert!(r.explain().contains(text), "{} vs {text}", r.explain());
        }
    }

    #[test]
    fn retry_table() {
        assert_eq!(retry_advice(false), RetryAdvice::Retry);
        assert_eq!(retry_advice(true), RetryAdvice::Indeterminate);
    }

    #[test]
    fn table_names() {
        for (name, reserved_ok, ok) in [
            ("vms", false, true),
            ("storage-groups", false, true),
            ("a.b_c", false, true),
            ("", false, false),
            ("VMs", false, false),
            ("vm s", false, false),
            ("_join_tokens", false, false),
            ("_join_tokens", true, true),
        ] {
            assert_eq!(validate_table(name, reserved_ok).is_ok(), ok, "{name}");
        }
        assert!(validate_table(&"x".repeat(65), false).is_err());
    }
}

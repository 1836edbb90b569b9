//! Users' roles (SPEC A2) and what each may do.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A local account's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// May look at everything, change nothing.
    ReadOnly,
    /// May operate existing VMs (start, stop, console, CDs, migrate, dump).
    Operator,
    /// May do everything, including creating and removing objects, users and
    /// settings.
    Administrator,
}

/// The kind of access a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Reading state, logs, statistics.
    Read,
    /// Operating existing VMs.
    Operate,
    /// Creating, changing or removing objects; users; settings.
    Administer,
}

impl Role {
    /// Every role, least privileged first.
    pub const ALL: [Role; 3] = [Role::ReadOnly, Role::Operator, Role::Administrator];

    /// Whether this role may perform actions needing `access`.
    pub fn allows(self, access: Access) -> bool {
        match access {
            Access::Read => true,
            Access::Operate => self >= Role::Operator,
            Access::Administer => self == Role::Administrator,
        }
    }

    /// The name used in the API and CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ReadOnly => "read_only",
            Role::Operator => "operator",
            Role::Administrator => "administrator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Operate => "operate",
            Access::Administer => "administer",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_table() {
        // (role, read, operate, administer)
        let table = [
            (Role::ReadOnly, true, false, false),
            (Role::Operator, true, true, false),
            (Role::Administrator, true, true, true),
        ];
        for (role, r, o, a) in table {
            assert_eq!(role.allows(Access::Read), r, "{role}");
            assert_eq!(role.allows(Access::Operate), o, "{role}");
            assert_eq!(role.allows(Access::Administer), a, "{role}");
        }
    }
}

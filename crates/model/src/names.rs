//! Validation of names given by administrators (VMs, volumes, VCDs, users,
//! storage groups). Names end up in file names, URLs and QEMU option strings,
//! so the allowed alphabet is deliberately small.

use thiserror::Error;

/// Longest name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Why a name was refused. Each message says what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// The name is empty.
    #[error("{kind} name is empty; use 1 to {MAX_NAME_LEN} characters from A-Z a-z 0-9 . _ -")]
    Empty {
        /// What was being named ("VM", "volume", ...).
        kind: &'static str,
    },
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("{kind} name is {len} characters long; at most {MAX_NAME_LEN} are allowed")]
    TooLong {
        /// What was being named.
        kind: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// The name contains a character outside the allowed set.
    #[error("{kind} name contains {found}; only A-Z a-z 0-9 . _ - are allowed")]
    BadCharacter {
        /// What was being named.
        kind: &'static str,
        /// A printable description of the offending character.
        found: String,
    },
    /// The name starts with `.` or `-` (hidden files, option injection, `..`).
    #[error("{kind} name may not start with '{first}'; start with a letter, digit or '_'")]
    BadStart {
        /// What was being named.
        kind: &'static str,
        /// The first character.
        first: char,
    },
}

/// Checks that `name` is a valid name for an object of `kind`.
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            kind,
            len: name.len(),
        });
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        let found = if c.is_control() {
            format!("a control character (U+{:04X})", c as u32)
        } else if c == '/' {
            "'/' (names cannot be paths)".to_string()
        } else {
            format!("'{c}'")
        };
        return Err(NameError::BadCharacter { kind, found });
    }
    let first = name.chars().next().unwrap_or('_');
    if first == '.' || first == '-' {
        return Err(NameError::BadStart { kind, first });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_table() {
        let long = "a".repeat(MAX_NAME_LEN + 1);
        let max = "a".repeat(MAX_NAME_LEN);
        let cases: &[(&str, bool, &str)] = &[
            ("web1", true, ""),
            ("db_2.prod-eu", true, ""),
            (&max, true, ""),
            ("", false, "empty"),
            (&long, false, "at most 64"),
            ("a/b", false, "cannot be paths"),
            ("..", false, "may not start"),
            (".hidden", false, "may not start"),
            ("-rf", false, "may not start"),
            ("a\u{1}b", false, "control character"),
            ("a\nb", false, "control character"),
            ("caf\u{e9}", false, "only A-Z"),
            ("a b", false, "' '"),
            ("a,b", false, "','"),
        ];
        for (name, ok, msg) in cases {
            let r = validate_name("VM", name);
            assert_eq!(r.is_ok(), *ok, "{name:?}: {r:?}");
            if let Err(e) = r {
                assert!(e.to_string().contains(msg), "{name:?}: {e}");
            }
        }
    }
}

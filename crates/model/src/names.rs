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

/// Directories a QEMU binary given as an absolute path may live in: owned
/// by root, written by the package manager, never by an API call.
pub const QEMU_DIRS: &[&str] = &["/usr/bin", "/usr/local/bin", "/usr/libexec", "/bin"];

/// Checks the `qemu_binary` setting (issue 13): it is run as root on every
/// PM, so it must be a QEMU system emulator — `qemu-system-ARCH` (or
/// `qemu-kvm`) on the PATH, or that file in one of [`QEMU_DIRS`]. The error
/// says what is allowed.
pub fn validate_qemu_binary(b: &str) -> Result<(), String> {
    let allowed = || {
        format!(
            "qemu_binary '{}' is not allowed: give qemu-system-ARCH (or qemu-kvm), found on the \
             PATH, or its absolute path in {}",
            b.escape_default(),
            QEMU_DIRS.join(", ")
        )
    };
    let (dir, file) = match b.rsplit_once('/') {
        Some((d, f)) => (Some(if d.is_empty() { "/" } else { d }), f),
        None => (None, b),
    };
    let name_ok = file == "qemu-kvm"
        || file.strip_prefix("qemu-system-").is_some_and(|arch| {
            !arch.is_empty()
                && arch
                    .bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        });
    let dir_ok = dir.is_none_or(|d| QEMU_DIRS.contains(&d));
    if name_ok && dir_ok {
        Ok(())
    } else {
        Err(allowed())
    }
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

    #[test]
    fn qemu_binaries() {
        for ok in [
            "qemu-system-x86_64",
            "qemu-system-aarch64",
            "qemu-kvm",
            "/usr/bin/qemu-system-x86_64",
            "/usr/libexec/qemu-kvm",
        ] {
            assert!(validate_qemu_binary(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/tmp/qemu-system-x86_64",
            "/usr/bin/../../tmp/qemu-system-x86_64",
            "/usr/bin/sh",
            "sh",
            "qemu-system-",
            "qemu-system-x86_64 -evil",
            "qemu-system-X86",
            "/usr/bin/",
            "./qemu-system-x86_64",
        ] {
            let e = validate_qemu_binary(bad).unwrap_err();
            assert!(e.contains("qemu-system-ARCH"), "{bad}: {e}");
        }
    }
}

//! The layout of a PM's data directory.

use std::path::{Path, PathBuf};

/// Where everything of one PM lives.
#[derive(Debug, Clone)]
pub struct Paths {
    root: PathBuf,
}

impl Paths {
    /// The layout under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Paths {
        Paths { root: root.into() }
    }

    /// The data directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The state database.
    pub fn state_db(&self) -> PathBuf {
        self.root.join("state.redb")
    }

    /// A VM's run directory (QMP, console, VNC sockets, logs). Keyed by the
    /// VM's id, not its name, to keep Unix socket paths short (108 bytes).
    pub fn vm_run_dir(&self, vm_id: &str) -> PathBuf {
        self.root.join("run").join(vm_id)
    }

    /// Where VCD images are kept.
    pub fn vcd_dir(&self) -> PathBuf {
        self.root.join("vcds")
    }

    /// Where memory dumps go.
    pub fn dump_dir(&self) -> PathBuf {
        self.root.join("dumps")
    }

    /// Scratch space for partial uploads and copies (same file system as the
    /// VCD directory, so that a finished file is renamed into place).
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// The default storage group's directory.
    pub fn default_storage(&self) -> PathBuf {
        self.root.join("storage").join("default")
    }

    /// Creates the directories, private to the daemon's user (0700): they
    /// hold the unit secret, password hashes, TLS keys and guests' disks.
    pub fn create_all(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        for d in [
            self.root.clone(),
            self.root.join("run"),
            self.vcd_dir(),
            self.dump_dir(),
            self.tmp_dir(),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)?;
        }
        Ok(())
    }

    /// Makes the data directory itself private again (0700) and lists what
    /// inside it other users may read or write: created by an older
    /// version, or loosened by hand. The caller warns; nothing inside is
    /// changed (an admin may have a reason), but with the directory itself
    /// private none of it is reachable by other users.
    pub fn secure(&self) -> std::io::Result<PrivacyReport> {
        private_tree(&self.root)
    }
}

/// What [`Paths::secure`] found.
#[derive(Debug, Default, Clone)]
pub struct PrivacyReport {
    /// The directory's own mode before, when it was looser than 0700.
    pub root_was: Option<u32>,
    /// Entries inside with group or other permission bits (path, mode), the
    /// first [`PrivacyReport::SHOWN`].
    pub loose: Vec<(PathBuf, u32)>,
    /// How many such entries in all.
    pub loose_count: usize,
}

impl PrivacyReport {
    /// How many loose entries are listed by name.
    pub const SHOWN: usize = 10;
}

/// [`Paths::secure`] for any directory (the witness's too).
pub fn private_tree(root: &Path) -> std::io::Result<PrivacyReport> {
    use std::os::unix::fs::PermissionsExt;
    let mut r = PrivacyReport::default();
    let mode = std::fs::symlink_metadata(root)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        r.root_was = Some(mode);
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))?;
    }
    // Bounded walk: a data directory holds few entries (no guest file
    // system is ever unpacked here); symlinks are not followed.
    let mut stack = vec![(root.to_path_buf(), 0u32)];
    let mut seen = 0usize;
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            seen += 1;
            if seen > 100_000 {
                return Ok(r);
            }
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if md.file_type().is_symlink() {
                continue;
            }
            let m = md.permissions().mode() & 0o7777;
            // Unix sockets are reached through their 0700 directory.
            let socket = std::os::unix::fs::FileTypeExt::is_socket(&md.file_type());
            if m & 0o077 != 0 && !socket {
                r.loose_count += 1;
                if r.loose.len() < PrivacyReport::SHOWN {
                    r.loose.push((e.path(), m));
                }
            }
            if md.is_dir() && depth < 8 {
                stack.push((e.path(), depth + 1));
            }
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn create_all_makes_private_directories_and_secure_reports_loose_entries() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("data");
        let p = Paths::new(&root);
        p.create_all().unwrap();
        for d in [
            root.clone(),
            root.join("run"),
            p.vcd_dir(),
            p.dump_dir(),
            p.tmp_dir(),
        ] {
            let m = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(m, 0o700, "{}", d.display());
        }
        let r = p.secure().unwrap();
        assert!(r.root_was.is_none() && r.loose_count == 0, "{r:?}");
        // Loosened by hand: reported, and the directory itself made private.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = p.vcd_dir().join("x.iso");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let r = p.secure().unwrap();
        assert_eq!(r.root_was, Some(0o755), "{r:?}");
        assert_eq!(r.loose_count, 1, "{r:?}");
        assert_eq!(r.loose[0], (f, 0o644));
        let m = std::fs::metadata(&root).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, 0o700);
    }
}

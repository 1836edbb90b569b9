//! The layout of a PM's data directory.

use std::path::{Path, PathBuf};

/// Where everything of one PM lives.
#[derive(Debug, Clone)]
pub struct Paths {
    root: PathBuf,
    /// Host directories from which files may be taken by an API call (VCD
    /// copies, kernels, initrds): what an administrator's call may read on
    /// the host is confined to them (issue 13).
    import_dirs: Vec<PathBuf>,
}

impl Paths {
    /// The layout under `root`; files are imported from `root/import` only.
    pub fn new(root: impl Into<PathBuf>) -> Paths {
        let root = root.into();
        Paths {
            import_dirs: vec![root.join("import")],
            root,
        }
    }

    /// The directories files may be imported from (the daemon's
    /// `--import-dir`; `DATA/import` always).
    pub fn with_import_dirs(mut self, dirs: impl IntoIterator<Item = PathBuf>) -> Paths {
        self.import_dirs.extend(dirs);
        self
    }

    /// Where an API call may take host files from.
    pub fn import_dirs(&self) -> &[PathBuf] {
        &self.import_dirs
    }

    /// Resolves `path` (absolute, symlinks and `..` followed) and checks
    /// that it is a regular file inside an import directory. The error says
    /// what is wrong and where files may come from.
    pub fn check_import(&self, what: &str, path: &str) -> Result<PathBuf, String> {
        let p = Path::new(path);
        if !p.is_absolute() {
            return Err(format!(
                "{what} path '{path}' is not absolute; give the full path of a file in an import \
                 directory ({})",
                self.import_list()
            ));
        }
        let real =
            std::fs::canonicalize(p).map_err(|_| format!("{what} file '{path}' does not exist"))?;
        let inside = self
            .import_dirs
            .iter()
            .any(|d| std::fs::canonicalize(d).is_ok_and(|d| real.starts_with(&d)));
        if !inside {
            return Err(format!(
                "{what} file '{path}' is outside the import directories ({}): an API call may \
                 only read host files from there. Copy the file into one of them, or start the \
                 daemon with --import-dir for its directory",
                self.import_list()
            ));
        }
        match std::fs::metadata(&real) {
            Ok(m) if m.is_file() => Ok(real),
            _ => Err(format!("{what} path '{path}' is not a regular file")),
        }
    }

    fn import_list(&self) -> String {
        self.import_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
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
            self.root.join("import"),
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

    #[test]
    fn imports_are_confined_to_the_import_directories() {
        let t = tempfile::tempdir().unwrap();
        let extra = t.path().join("images");
        std::fs::create_dir_all(&extra).unwrap();
        let p = Paths::new(t.path().join("data")).with_import_dirs([extra.clone()]);
        p.create_all().unwrap();
        let ok = extra.join("k");
        std::fs::write(&ok, b"k").unwrap();
        let inside = t.path().join("data/import/i");
        std::fs::write(&inside, b"i").unwrap();
        assert!(p.check_import("kernel", ok.to_str().unwrap()).is_ok());
        assert!(p.check_import("kernel", inside.to_str().unwrap()).is_ok());
        // Out: another file, `..`, a symlink pointing out, a relative path.
        let secret = t.path().join("data/state.redb");
        std::fs::write(&secret, b"s").unwrap();
        let dotdot = format!("{}/../data/state.redb", extra.display());
        let link = extra.join("link");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        for bad in [
            secret.to_str().unwrap(),
            dotdot.as_str(),
            link.to_str().unwrap(),
            "/etc/passwd",
        ] {
            let e = p.check_import("initrd", bad).unwrap_err();
            assert!(e.contains("outside the import directories"), "{bad}: {e}");
        }
        assert!(p
            .check_import("kernel", "k")
            .unwrap_err()
            .contains("not absolute"));
        assert!(p
            .check_import("kernel", extra.to_str().unwrap())
            .unwrap_err()
            .contains("not a regular file"));
    }
}

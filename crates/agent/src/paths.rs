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

    /// Creates the directories.
    pub fn create_all(&self) -> std::io::Result<()> {
        for d in [
            self.root.clone(),
            self.root.join("run"),
            self.vcd_dir(),
            self.dump_dir(),
            self.tmp_dir(),
        ] {
            std::fs::create_dir_all(&d)?;
        }
        Ok(())
    }
}

//! Where smolvm keeps its state and data on the host.

use std::path::{Path, PathBuf};

use crate::error::{io_err, Result};

/// The directories smolvm uses.
#[derive(Debug, Clone)]
pub struct Paths {
    /// State root: the database and one directory per VM (mode 0700).
    pub state_dir: PathBuf,
    /// Built images (read-only bases).
    pub images_dir: PathBuf,
}

impl Paths {
    /// Paths from the environment: `SMOLVM_HOME` (state) or `$XDG_STATE_HOME/smolvm` or
    /// `~/.local/state/smolvm`; images from `SMOLVM_DATA_DIR` or `~/.local/share/smolvm/images`.
    pub fn from_env() -> Self {
        let state_dir = std::env::var_os("SMOLVM_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("XDG_STATE_HOME").map(|d| PathBuf::from(d).join("smolvm")))
            .unwrap_or_else(|| home().join(".local/state/smolvm"));
        Paths {
            state_dir,
            images_dir: smolvm_image::default_images_dir(),
        }
    }

    /// The SQLite database file.
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("smolvm.db")
    }

    /// Directory holding every VM's private directory.
    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }

    /// Retained and shared disks.
    pub fn disks_dir(&self) -> PathBuf {
        self.state_dir.join("disks")
    }

    /// The private directory of one VM.
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.vms_dir().join(id)
    }

    /// Creates the state directories with owner-only permissions.
    pub fn ensure(&self) -> Result<()> {
        create_private_dir(&self.state_dir)?;
        create_private_dir(&self.vms_dir())?;
        create_private_dir(&self.disks_dir())
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// Creates `dir` (and parents) and sets it to mode 0700.
pub(crate) fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("setting permissions on {}", dir.display())))
}

//! Saved VM states. A *template* is an image booted once per shape (vCPUs, memory, devices)
//! and saved with its agent ready; new VMs of that shape resume from it instead of booting.
//! A *snapshot* is a running VM saved by name (`vm.snapshot(name)`), resumed by
//! `from_snapshot` and `fork`. Both are a directory holding the migration stream (`memory`,
//! RAM and device state), the frozen disk (`disk.qcow2`, the backing file of every VM made
//! from it) and `meta.json`. Directories are 0700 and files 0600/0400: they hold guest
//! memory.

mod gc;
pub mod ops;
pub mod overrides;
pub mod template;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{io_err, Error, Result};
use crate::hypervisor::Accelerator;
use crate::paths::Paths;

/// File names inside a saved state's directory.
pub mod files {
    /// QEMU's migration stream: RAM and device state.
    pub const MEMORY: &str = "memory";
    /// The disk as it was when saved (read-only; VMs made from the state build on it).
    pub const DISK: &str = "disk.qcow2";
    /// [`super::SavedState`] as JSON.
    pub const META: &str = "meta.json";
    /// A template's RAM, mapped by the VMs resumed from it (templates only).
    pub const RAM: &str = "ram";
}

/// Largest `meta.json` read (it is small; anything bigger is not ours).
const MAX_META: u64 = 64 * 1024;

/// What kind of saved state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An image booted once, idle, agent ready.
    Template,
    /// A running VM saved by name.
    Snapshot,
    /// A running VM saved for `fork` (removed once no VM builds on it).
    Fork,
}

/// What is recorded about a saved state (`meta.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// The snapshot's name, or the template's key.
    pub name: String,
    /// Template, snapshot or fork.
    pub kind: Kind,
    /// The image the saved VM booted from.
    pub image: String,
    /// The image's files as they were (see [`image_stamp`]); a rebuilt image no longer
    /// matches the saved disk.
    pub image_stamp: String,
    /// vCPUs of the saved VM (a restored VM has the same).
    pub vcpus: u32,
    /// Memory of the saved VM in MiB.
    pub mem_mib: u32,
    /// Whether the saved VM had a network device.
    pub nic: bool,
    /// The accelerator it ran under (a state loads only under the same one).
    pub accelerator: Accelerator,
    /// The kernel command line it booted with.
    pub cmdline: String,
    /// Its kernel.
    pub kernel: PathBuf,
    /// Its initramfs.
    pub initrd: PathBuf,
    /// The VM it was taken from (snapshots).
    pub source_vm: Option<String>,
    /// The source VM's extra kernel arguments.
    pub boot_args: Option<String>,
    /// The source VM's config (snapshots; secrets are never in it): VMs made from the
    /// snapshot start from it.
    #[serde(default)]
    pub config: Option<crate::config::VmConfig>,
    /// When it was saved, Unix seconds.
    pub created_at: i64,
}

/// A saved state on disk.
#[derive(Debug, Clone)]
pub struct Saved {
    /// Its directory.
    pub dir: PathBuf,
    /// Its description.
    pub meta: SavedState,
}

impl Saved {
    /// Reads the saved state in `dir`, checking its files are all there.
    pub fn open(dir: &Path) -> Result<Saved> {
        let meta_path = dir.join(files::META);
        let text = read_bounded(&meta_path)?;
        let meta: SavedState = serde_json::from_str(&text).map_err(|e| {
            Error::Snapshot(format!(
                "{} is not a valid description: {e}",
                meta_path.display()
            ))
        })?;
        for f in [files::MEMORY, files::DISK] {
            let p = dir.join(f);
            if !p.is_file() {
                return Err(Error::Snapshot(format!(
                    "{} of {:?} is missing ({})",
                    f,
                    meta.name,
                    p.display()
                )));
            }
        }
        Ok(Saved {
            dir: dir.to_path_buf(),
            meta,
        })
    }

    /// The migration stream.
    pub fn memory(&self) -> PathBuf {
        self.dir.join(files::MEMORY)
    }

    /// The RAM file VMs map, when the state has one (templates).
    pub fn ram(&self) -> Option<PathBuf> {
        let p = self.dir.join(files::RAM);
        p.is_file().then_some(p)
    }

    /// The frozen disk.
    pub fn disk(&self) -> PathBuf {
        self.dir.join(files::DISK)
    }

    /// Bytes on disk (memory stream and disk).
    pub fn size_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        [files::MEMORY, files::DISK, files::RAM]
            .iter()
            .filter_map(|f| std::fs::metadata(self.dir.join(f)).ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }
}

fn read_bounded(path: &Path) -> Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| {
        Error::Snapshot(format!(
            "cannot read {}: {e} (incomplete or removed)",
            path.display()
        ))
    })?;
    let mut text = String::new();
    f.take(MAX_META)
        .read_to_string(&mut text)
        .map_err(io_err(format!("reading {}", path.display())))?;
    Ok(text)
}

/// Directory of named snapshots.
pub fn snapshots_dir(paths: &Paths) -> PathBuf {
    paths.state_dir.join("snapshots")
}

/// Checks a snapshot name: 1 to 63 of `a-z A-Z 0-9 . _ -`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            field: "snapshot name",
            value: name.to_string(),
            allowed: "1 to 63 letters, digits, '.', '_' and '-', starting with a letter or digit"
                .into(),
        })
    }
}

/// Opens the named snapshot.
pub fn open_named(paths: &Paths, name: &str) -> Result<Saved> {
    validate_name(name)?;
    let dir = snapshots_dir(paths).join(name);
    if !dir.is_dir() {
        return Err(Error::SnapshotNotFound(name.to_string()));
    }
    Saved::open(&dir)
}

/// Every named snapshot (and fork state), by name. Broken ones are skipped with a warning.
pub fn list(paths: &Paths) -> Result<Vec<Saved>> {
    let dir = snapshots_dir(paths);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(format!("listing {}", dir.display()))(e)),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        match Saved::open(&e.path()) {
            Ok(s) => out.push(s),
            Err(err) => tracing::warn!(snapshot = %name, "skipping: {err}"),
        }
    }
    out.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
    Ok(out)
}

/// A fingerprint of an image's files (size, modification time and inode of kernel,
/// initramfs and root filesystem): it changes whenever the image is rebuilt.
pub fn image_stamp(files: &[&Path]) -> Result<String> {
    use sha2::Digest;
    use std::os::unix::fs::MetadataExt;
    let mut h = sha2::Sha256::new();
    for f in files {
        let m = std::fs::metadata(f).map_err(io_err(format!("reading {}", f.display())))?;
        h.update(f.as_os_str().as_encoded_bytes());
        h.update(m.len().to_le_bytes());
        h.update(m.mtime().to_le_bytes());
        h.update(m.mtime_nsec().to_le_bytes());
        h.update(m.ino().to_le_bytes());
    }
    Ok(hex::encode(&h.finalize()[..8]))
}

/// Moves a directory aside (so it vanishes at once) and deletes it.
pub(crate) fn remove_dir(dir: &Path) -> Result<()> {
    let Some(name) = dir.file_name() else {
        return Ok(());
    };
    let doomed = dir.with_file_name(format!(
        ".{}.rm-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    match std::fs::rename(dir, &doomed) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(format!("removing {}", dir.display()))(e)),
    }
    std::fs::remove_dir_all(&doomed).map_err(io_err(format!("removing {}", doomed.display())))
}

/// Makes the saved files read-only for their owner and nobody else (they hold guest memory).
pub(crate) fn seal(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (f, mode) in [
        (files::MEMORY, 0o400),
        (files::DISK, 0o400),
        (files::META, 0o400),
        (files::RAM, 0o400),
        (crate::supervisor::files::CONSOLE_LOG, 0o600),
        (crate::supervisor::files::SUPERVISOR_LOG, 0o600),
    ] {
        let p = dir.join(f);
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                .map_err(io_err(format!("setting permissions of {}", p.display())))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["a", "base-1", "v1.2_x", "A"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a b", "..", &"x".repeat(64)] {
            let e = validate_name(bad).unwrap_err().to_string();
            assert!(e.contains("snapshot name"), "{e}");
        }
    }

    #[test]
    fn missing_files_and_garbage_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let e = Saved::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("meta.json"), "{e}");
        std::fs::write(d.path().join(files::META), b"{not json").unwrap();
        let e = Saved::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("not a valid description"), "{e}");
        std::fs::write(d.path().join(files::META), vec![b' '; 200_000]).unwrap();
        assert!(Saved::open(d.path()).is_err());
    }

    #[test]
    fn the_stamp_changes_when_a_file_is_replaced() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("rootfs");
        std::fs::write(&f, b"one").unwrap();
        let a = image_stamp(&[&f]).unwrap();
        assert_eq!(a, image_stamp(&[&f]).unwrap());
        let g = d.path().join("new");
        std::fs::write(&g, b"two!").unwrap();
        std::fs::rename(&g, &f).unwrap();
        assert_ne!(a, image_stamp(&[&f]).unwrap());
    }
}

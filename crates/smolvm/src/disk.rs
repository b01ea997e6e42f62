//! Per-VM disks: a copy-on-write qcow2 overlay on an image's read-only base (O(1), no
//! copy), a shared writable disk per image, retained overlays, and the lock that keeps two
//! running VMs off one writable disk.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::error::{io_err, Error, Result};

/// The first bytes of every qcow2 file.
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Name of an isolated VM's overlay inside its directory.
pub const OVERLAY_NAME: &str = "disk.qcow2";

/// On-disk format of a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A raw filesystem image.
    Raw,
    /// A qcow2 image (possibly an overlay on a backing file).
    Qcow2,
}

impl DiskFormat {
    /// QEMU's name for the format.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// Reads the format from the file's first bytes (qcow2 magic, else raw).
pub fn detect_format(path: &Path) -> Result<DiskFormat> {
    let mut head = [0u8; 4];
    let mut f = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let n = f
        .read(&mut head)
        .map_err(io_err(format!("reading {}", path.display())))?;
    Ok(if n == 4 && head == QCOW2_MAGIC {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    })
}

/// The size the guest sees, in bytes: the file's length for raw, the header's size field
/// for qcow2.
pub fn virtual_size(path: &Path) -> Result<u64> {
    match detect_format(path)? {
        DiskFormat::Raw => Ok(std::fs::metadata(path)
            .map_err(io_err(format!("reading {}", path.display())))?
            .len()),
        DiskFormat::Qcow2 => {
            let mut header = [0u8; 32];
            File::open(path)
                .and_then(|mut f| f.read_exact(&mut header))
                .map_err(io_err(format!(
                    "reading the qcow2 header of {}",
                    path.display()
                )))?;
            let mut size = [0u8; 8];
            size.copy_from_slice(&header[24..32]);
            Ok(u64::from_be_bytes(size))
        }
    }
}

fn qemu_img() -> Result<PathBuf> {
    crate::util::which("qemu-img").ok_or_else(|| Error::MissingTool {
        tool: "qemu-img".into(),
        package: "qemu-utils".into(),
    })
}

/// Creates `overlay` as a qcow2 whose backing file is `base` (read, never written), of
/// `size_mib` when given (at least the base's size).
pub fn create_overlay(base: &Path, overlay: &Path, size_mib: Option<u64>) -> Result<()> {
    let format = detect_format(base)?;
    if let Some(mib) = size_mib {
        let base_size = virtual_size(base)?;
        if mib.saturating_mul(1 << 20) < base_size {
            return Err(Error::InvalidConfig {
                field: "disk_size_mib",
                value: mib.to_string(),
                allowed: format!(
                    "at least the image's size, {} MiB",
                    base_size.div_ceil(1 << 20)
                ),
            });
        }
    }
    let mut cmd = Command::new(qemu_img()?);
    cmd.args(["create", "-q", "-f", "qcow2", "-F", format.as_str(), "-b"])
        .arg(base)
        .arg(overlay);
    if let Some(mib) = size_mib {
        cmd.arg(format!("{mib}M"));
    }
    let out = cmd.output().map_err(io_err("running qemu-img"))?;
    if !out.status.success() {
        return Err(Error::Disk(format!(
            "qemu-img could not create the disk overlay {}: {}",
            overlay.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The shared writable disk of an image (created on first use as an overlay on the image,
/// so the image itself stays pristine).
pub fn shared_disk(disks_dir: &Path, image: &str, base: &Path) -> Result<PathBuf> {
    let path = disks_dir.join(format!("shared-{image}.qcow2"));
    if path.exists() {
        return Ok(path);
    }
    // Create beside it and link into place, so racing creators agree on one disk.
    let tmp = disks_dir.join(format!(
        ".shared-{image}.{}.tmp",
        crate::util::now_unix_ns()
    ));
    create_overlay(base, &tmp, None)?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(path),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(path),
        Err(e) => Err(io_err(format!("creating {}", path.display()))(e)),
    }
}

/// What is recorded beside a retained disk, so it can be booted again knowingly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetainedDisk {
    /// The VM it belonged to.
    pub vm_id: String,
    /// The image it was made from.
    pub image: String,
    /// Its backing file when it was retained.
    pub backing: Option<PathBuf>,
    /// When it was retained, Unix seconds.
    pub retained_at: i64,
}

/// Moves a deleted VM's overlay to `disks_dir/<id>.qcow2` (with a `.json` note beside it)
/// and returns the new path.
pub fn retain(
    overlay: &Path,
    disks_dir: &Path,
    vm_id: &str,
    image: &str,
    backing: Option<PathBuf>,
) -> Result<PathBuf> {
    crate::paths::create_private_dir(disks_dir)?;
    let mut dest = disks_dir.join(format!("{vm_id}.qcow2"));
    if dest.exists() {
        // An older retained disk of a VM with the same id: keep both.
        dest = disks_dir.join(format!("{vm_id}-{}.qcow2", crate::util::now_unix()));
    }
    std::fs::rename(overlay, &dest).map_err(io_err(format!(
        "moving {} to {}",
        overlay.display(),
        dest.display()
    )))?;
    let note = RetainedDisk {
        vm_id: vm_id.to_string(),
        image: image.to_string(),
        backing,
        retained_at: crate::util::now_unix(),
    };
    if let Ok(json) = serde_json::to_vec_pretty(&note) {
        let _ = std::fs::write(dest.with_extension("json"), json);
    }
    Ok(dest)
}

/// An exclusive hold on a writable disk, kept by the VM's supervisor for its whole life
/// (the kernel drops it when the process dies, however it dies).
#[derive(Debug)]
pub struct DiskLock {
    _lock: nix::fcntl::Flock<File>,
}

/// Takes the disk's lock, or fails at once when a running VM holds it.
pub fn lock(disk: &Path) -> Result<DiskLock> {
    let f = File::open(disk).map_err(io_err(format!("opening {}", disk.display())))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map(|l| DiskLock { _lock: l })
        .map_err(|_| {
            Error::Disk(format!(
                "the disk {} is in use by another running VM (a writable disk boots one VM at a time; use disk_mode isolated for more)",
                disk.display()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("base.ext4");
        std::fs::write(&raw, vec![0u8; 3 << 20]).unwrap();
        assert_eq!(detect_format(&raw).unwrap(), DiskFormat::Raw);
        assert_eq!(virtual_size(&raw).unwrap(), 3 << 20);
        if qemu_img().is_err() {
            return;
        }
        let ov = dir.path().join("ov.qcow2");
        create_overlay(&raw, &ov, Some(8)).unwrap();
        assert_eq!(detect_format(&ov).unwrap(), DiskFormat::Qcow2);
        assert_eq!(virtual_size(&ov).unwrap(), 8 << 20);
        let small = create_overlay(&raw, &dir.path().join("s.qcow2"), Some(1)).unwrap_err();
        assert!(small.to_string().contains("disk_size_mib"), "{small}");
        // A second holder of a disk's lock is refused while the first lives.
        let held = lock(&ov).unwrap();
        assert!(lock(&ov).unwrap_err().to_string().contains("in use"));
        drop(held);
        lock(&ov).unwrap();
    }
}

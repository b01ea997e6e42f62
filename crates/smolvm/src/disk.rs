//! Per-VM disks: a copy-on-write qcow2 overlay on an image's read-only base (O(1), no copy).

use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};

/// Creates `overlay` as a qcow2 whose backing file is the raw image `base`.
pub fn create_overlay(base: &Path, overlay: &Path) -> Result<()> {
    let qemu_img = crate::util::which("qemu-img").ok_or_else(|| Error::MissingTool {
        tool: "qemu-img".into(),
        package: "qemu-utils".into(),
    })?;
    let out = Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(overlay)
        .output()
        .map_err(crate::error::io_err("running qemu-img"))?;
    if !out.status.success() {
        return Err(Error::StartFailed {
            id: String::new(),
            reason: format!(
                "qemu-img could not create the disk overlay {}: {}",
                overlay.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

//! Removing what a VM leaves on the host: its directory (sockets, logs, overlay), its row,
//! and, when asked, moving its overlay aside first. Shared by delete, the supervisor of an
//! ephemeral VM whose owner died, and `gc`.

use std::path::{Path, PathBuf};

use crate::error::{io_err, Result};
use crate::store::{Store, VmRecord};

/// Removes a stopped VM's files and row; returns where its disk was retained, if it was.
/// Only paths under `state_dir` are ever removed; a disk the user supplied stays.
pub(crate) fn remove_vm(
    state_dir: &Path,
    store: &Store,
    rec: &VmRecord,
) -> Result<Option<PathBuf>> {
    let vms_dir = state_dir.join("vms");
    let dir = rec.dir.clone();
    let disk = rec.disk_path.clone();
    let mut retained = None;
    if rec.config.retain_disk_on_delete && disk.starts_with(&dir) && disk.is_file() {
        let backing = rec.config.rootfs_path.clone();
        retained = Some(crate::disk::retain(
            &disk,
            &state_dir.join("disks"),
            &rec.id,
            &rec.config.image,
            backing,
        )?);
    }
    if dir.starts_with(&vms_dir) && dir != vms_dir {
        remove_dir(&dir)?;
    }
    remove_network(store, &rec.id)?;
    store.delete(&rec.id)?;
    Ok(retained)
}

/// Removes what is left of the `nat` network of a VM that no longer runs (its TAP with its
/// address and route, its nft chain); its address is released with its row.
pub(crate) fn remove_network(store: &Store, id: &str) -> Result<()> {
    if let Some(addr) = store.address_of(id)? {
        let tap = crate::network::tap_name(addr);
        // A supervisor that ended normally removed both; one that was killed left both
        // (a chain left alone by a half-done teardown is found by `gc`).
        if crate::network::tap::exists(&tap) {
            crate::network::teardown(&tap)?;
        }
    }
    Ok(())
}

/// Removes a directory tree; one that is already gone is fine.
pub(crate) fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("removing {}", dir.display()))(e)),
    }
}

/// Pids of the processes that belong to the VM whose directory is `dir`: its supervisor
/// (`smolvm __supervise DIR`) and its QEMU (whose sockets live in DIR). Matching on the
/// directory, not on recorded pids, is immune to pid reuse.
pub(crate) fn vm_processes(dir: &Path) -> Vec<u32> {
    let exact = dir.display().to_string();
    let inside = format!("{exact}/");
    let me = std::process::id();
    crate::util::all_pids()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            crate::util::process_cmdline(pid)
                .iter()
                .any(|a| a == &exact || a.contains(&inside))
        })
        .collect()
}

/// Kills every process of the VM in `dir` (supervisors first, so none restarts anything)
/// and waits briefly for each to go; returns how many there were.
pub(crate) fn kill_vm_processes(dir: &Path) -> usize {
    let pids = vm_processes(dir);
    for &pid in &pids {
        crate::util::kill_and_wait(pid, std::time::Duration::from_secs(2));
    }
    pids.len()
}

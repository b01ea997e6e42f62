//! `gc`: repairs what crashes leave behind. Ephemeral VMs whose owner died are deleted;
//! VMs whose supervisor died are marked `error` with the reason and their orphan
//! processes and sockets removed; directories and processes without a VM are removed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::Result;
use crate::store::VmState;
use crate::supervisor::files;
use crate::vm::Runtime;

/// What one `gc` pass did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Ephemeral VMs deleted because their owner process is gone.
    pub deleted_vms: Vec<String>,
    /// VMs recorded as running whose supervisor was gone, now marked `error`.
    pub marked_error: Vec<String>,
    /// Stray processes killed (a QEMU or supervisor without a live VM).
    pub killed_processes: usize,
    /// Stale sockets and temporary files removed.
    pub removed_files: Vec<PathBuf>,
    /// VM directories with no VM recorded, removed.
    pub removed_dirs: Vec<PathBuf>,
    /// Rows whose directory had vanished, removed.
    pub removed_rows: Vec<String>,
    /// Recorded port forwards of VMs that no longer exist, removed (`VM host:port -> guest:port`).
    pub removed_forwards: Vec<String>,
    /// `nat` TAP devices with no running VM, removed (with their nft chains).
    pub removed_taps: Vec<String>,
    /// Per-VM nft chains with no running VM (and no TAP), removed.
    pub removed_chains: Vec<String>,
    /// Address allocations of VMs that no longer exist, released (`VM ADDRESS`).
    pub released_addresses: Vec<String>,
    /// Saved states removed: fork states no VM uses, templates of rebuilt images.
    pub removed_saved_states: Vec<String>,
}

impl GcReport {
    /// Whether the pass found nothing to do.
    pub fn is_clean(&self) -> bool {
        self.deleted_vms.is_empty()
            && self.marked_error.is_empty()
            && self.killed_processes == 0
            && self.removed_files.is_empty()
            && self.removed_dirs.is_empty()
            && self.removed_rows.is_empty()
            && self.removed_forwards.is_empty()
            && self.removed_taps.is_empty()
            && self.removed_chains.is_empty()
            && self.released_addresses.is_empty()
            && self.removed_saved_states.is_empty()
    }
}

const SOCKETS: [&str; 4] = [
    files::API_SOCK,
    files::AGENT_SOCK,
    files::CONSOLE_SOCK,
    files::QMP_SOCK,
];

/// A root file system link younger than this may belong to a disk being made.
const LINK_GRACE_SECS: i64 = 600;

/// A VM recorded this recently, with no disk yet, may be a create in progress (making its
/// directory and disk): gc leaves it and its processes (`qemu-img`) alone.
const CREATE_GRACE_SECS: i64 = 120;

/// Whether `rec` is a VM that `create` may still be making: recorded, diskless, recent.
fn being_created(rec: &crate::store::VmRecord, now: i64) -> bool {
    rec.state == VmState::Created
        && rec.disk_path.as_os_str().is_empty()
        && now - rec.created_at < CREATE_GRACE_SECS
}

/// Whether `path` is a disk's link to its root file system (`<name>.rootfs`) whose disk
/// (`<name>.qcow2`) is gone, and whose inode last changed (a link made or removed) over
/// `grace` seconds ago.
fn orphan_link(path: &std::path::Path, grace: i64) -> bool {
    use std::os::unix::fs::MetadataExt;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    name.strip_suffix(crate::disk::BESIDE_ROOTFS_SUFFIX)
        .is_some_and(|stem| !path.with_file_name(format!("{stem}.qcow2")).exists())
        && std::fs::symlink_metadata(path)
            .is_ok_and(|m| crate::util::now_unix() - m.ctime() > grace)
}

impl Runtime {
    /// Repairs the state left by crashed processes (see the module docs). Running VMs with
    /// a live supervisor and a live (or no) owner are never touched.
    pub fn gc(&self) -> Result<GcReport> {
        let mut report = GcReport::default();
        let state_dir = self.paths().state_dir.clone();
        let vms_dir = self.paths().vms_dir();
        let (records, corrupt) = self.with_store(|s| s.list())?;
        let mut known = BTreeSet::new();
        // A VM whose record does not read is left as it is (`smolvm rm ID` removes it):
        // its directory and processes are no orphans.
        for c in &corrupt {
            known.insert(c.dir.clone());
        }
        for rec in records {
            let dir = rec.dir.clone();
            known.insert(dir.clone());
            let alive = crate::supervisor::is_running(&dir);
            if rec.owner.is_some_and(|o| !o.alive()) {
                report.killed_processes += crate::cleanup::kill_vm_processes(&dir);
                self.with_store(|s| crate::cleanup::remove_vm(&state_dir, s, &rec))?;
                report.deleted_vms.push(rec.id);
                continue;
            }
            if being_created(&rec, crate::util::now_unix()) {
                continue;
            }
            if alive {
                continue;
            }
            report.killed_processes += crate::cleanup::kill_vm_processes(&dir);
            if !dir.is_dir() {
                self.with_store(|s| s.delete(&rec.id))?;
                report.removed_rows.push(rec.id);
                continue;
            }
            for name in SOCKETS {
                let p = dir.join(name);
                if std::fs::remove_file(&p).is_ok() {
                    report.removed_files.push(p);
                }
            }
            if rec.state == VmState::Running {
                let why = "its supervisor died (found by `smolvm gc`)";
                if self.with_store(|s| s.mark_lost(&rec.id, rec.supervisor_pid, why))? {
                    report.marked_error.push(rec.id);
                }
            }
        }
        // A VM is recorded before its directory is made and forgotten after it is removed,
        // so a directory (or a process naming one) whose VM is recorded *now* belongs to a
        // create that began after the list above: not an orphan.
        let recorded_now = |id: &str| self.with_store(|s| s.get(id)).is_ok_and(|r| r.is_some());
        // Directories no VM owns: a create that crashed before recording its disk, or a
        // delete that crashed half-way.
        if let Ok(rd) = std::fs::read_dir(&vms_dir) {
            for entry in rd.flatten() {
                let dir = entry.path();
                if known.contains(&dir) || !dir.is_dir() {
                    continue;
                }
                if recorded_now(&entry.file_name().to_string_lossy()) {
                    continue;
                }
                report.killed_processes += crate::cleanup::kill_vm_processes(&dir);
                if crate::cleanup::remove_dir(&dir).is_ok() {
                    report.removed_dirs.push(dir);
                }
            }
        }
        // Processes that name a VM directory that no longer exists at all.
        report.killed_processes += kill_strays(&vms_dir, |id| {
            known.contains(&vms_dir.join(id)) || recorded_now(id)
        });
        // Forwards whose VM is gone (their listeners died with its supervisor).
        for (id, f) in self.with_store(|s| s.remove_orphan_forwards())? {
            report.removed_forwards.push(format!("{id} {f}"));
        }
        self.gc_network(&mut report)?;
        self.gc_saved(&mut report);
        // Half-made shared disks, and the links to their root file system of disks the user
        // removed (unless just made: a disk is linked into place after its link).
        if let Ok(rd) = std::fs::read_dir(self.paths().disks_dir()) {
            for entry in rd.flatten() {
                let p = entry.path();
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let half_made = name.starts_with('.') && name.ends_with(".tmp");
                if (half_made || orphan_link(&p, LINK_GRACE_SECS))
                    && std::fs::remove_file(&p).is_ok()
                {
                    report.removed_files.push(p);
                }
            }
        }
        Ok(report)
    }
}

impl Runtime {
    /// Removes `nat` leftovers: address rows of VMs that are gone, and `smv*` TAPs and
    /// per-VM chains that no running VM of ours uses. A TAP that a process still has
    /// open (carrier on) is left alone: it may belong to a VM of another state directory.
    fn gc_network(&self, report: &mut GcReport) -> Result<()> {
        use crate::network::{nft, tap, TAP_PREFIX};
        for (ip, id) in self.with_store(|s| s.remove_orphan_addresses())? {
            report.released_addresses.push(format!("{id} {ip}"));
        }
        let (records, corrupt) = self.with_store(|s| s.list())?;
        let running: BTreeSet<String> = records
            .iter()
            .map(|r| (&r.id, &r.dir))
            .chain(corrupt.iter().map(|c| (&c.id, &c.dir)))
            .filter(|(_, dir)| crate::supervisor::is_running(dir))
            .map(|(id, _)| id.clone())
            .collect();
        let in_use: BTreeSet<String> = self
            .with_store(|s| s.addresses())?
            .into_iter()
            .filter(|(_, id)| running.contains(id))
            .map(|(ip, _)| crate::network::tap_name(ip))
            .collect();
        for name in tap::list(TAP_PREFIX) {
            if in_use.contains(&name) || tap::attached(&name) {
                continue;
            }
            match crate::network::teardown(&name) {
                Ok(()) => report.removed_taps.push(name),
                Err(e) => {
                    tracing::warn!(tap = %name, error = %e, "could not remove a leftover TAP")
                }
            }
        }
        if crate::util::which("nft").is_some() {
            for chain in nft::vm_chains() {
                if in_use.contains(&chain) || tap::exists(&chain) {
                    continue;
                }
                match nft::apply(&nft::render_teardown(&chain)) {
                    Ok(()) => report.removed_chains.push(chain),
                    Err(e) => {
                        tracing::warn!(%chain, error = %e, "could not remove a leftover nft chain")
                    }
                }
            }
        }
        Ok(())
    }
}

/// Kills processes whose command line points into `vms_dir` at a VM directory whose id is
/// not `known` (its directory is already gone, so the directory scan above missed them).
fn kill_strays(vms_dir: &Path, known: impl Fn(&str) -> bool) -> usize {
    let prefix = format!("{}/", vms_dir.display());
    let me = std::process::id();
    let mut killed = 0;
    for pid in crate::util::all_pids() {
        if pid == me {
            continue;
        }
        let stray = crate::util::process_cmdline(pid).iter().any(|arg| {
            arg.find(&prefix).is_some_and(|at| {
                let rest = &arg[at + prefix.len()..];
                let id = rest.split(['/', ',', ' ']).next().unwrap_or("");
                !id.is_empty() && !known(id)
            })
        });
        if stray {
            crate::util::kill_and_wait(pid, std::time::Duration::from_secs(2));
            killed += 1;
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::VmRecord;
    use crate::Error;

    /// A VM as `create` records it before making its directory and disk.
    fn diskless(rt: &Runtime, id: &str, created_at: i64) -> VmRecord {
        let dir = rt.paths().vm_dir(id);
        VmRecord {
            created_at,
            ..VmRecord::new(id, crate::VmConfig::default(), &dir, None)
        }
    }

    /// A process whose command line names `path`, as `qemu-img create` names a new disk;
    /// returned once its command line can be read (the kernel sets it just after `exec`).
    /// The shell waits in its `read` builtin: it forks nothing, so no second process (a
    /// fork not yet exec'd still shows its parent's command line) ever names `path`.
    fn naming(path: &Path) -> std::process::Child {
        let child = std::process::Command::new("sh")
            .args(["-c", "read line"])
            .arg(path)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        smolvm_testing::poll_until(
            std::time::Duration::from_secs(30),
            &format!("the command line of {pid} to name {}", path.display()),
            || smolvm_testing::processes_mentioning(path).contains(&pid),
        );
        child
    }

    #[test]
    fn a_create_in_progress_keeps_its_directory_and_processes_and_a_stale_one_does_not() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Runtime::with_paths(crate::Paths {
            state_dir: tmp.path().join("state"),
            images_dir: tmp.path().join("images"),
        })
        .unwrap();
        let now = crate::util::now_unix();
        for (id, created_at, left_alone) in [
            ("vm-making01", now, true),
            ("vm-crashed1", now - CREATE_GRACE_SECS - 1, false),
        ] {
            let rec = diskless(&rt, id, created_at);
            rt.with_store(|s| s.insert(&rec)).unwrap();
            let dir = rt.paths().vm_dir(id);
            std::fs::create_dir_all(&dir).unwrap();
            let mut writer = naming(&dir.join("disk.qcow2"));
            let report = rt.gc().unwrap();
            assert_eq!(
                writer.try_wait().unwrap().is_none(),
                left_alone,
                "{id}: {report:?}"
            );
            assert_eq!(report.killed_processes, usize::from(!left_alone), "{id}");
            assert!(dir.is_dir(), "{id}: a recorded VM keeps its directory");
            let _ = writer.kill();
            let _ = writer.wait();
        }
    }

    /// A VM whose record does not read: listed apart (the others still are), named by
    /// every call on it, left alone by gc, and removed whole by delete.
    #[test]
    fn a_corrupt_record_is_named_left_to_gc_and_removable() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Runtime::with_paths(crate::Paths {
            state_dir: tmp.path().join("state"),
            images_dir: tmp.path().join("images"),
        })
        .unwrap();
        let old = crate::util::now_unix() - CREATE_GRACE_SECS - 1;
        for id in ["vm-good0001", "vm-broken01"] {
            let mut rec = diskless(&rt, id, old);
            rec.state = VmState::Stopped;
            rt.with_store(|s| s.insert(&rec)).unwrap();
            std::fs::create_dir_all(rt.paths().vm_dir(id)).unwrap();
        }
        rt.with_store(|s| {
            s.execute_for_test(
                "UPDATE vms SET config='{not json' WHERE id=?1",
                "vm-broken01",
            );
            Ok(())
        })
        .unwrap();
        let (vms, corrupt) = rt.list_all().unwrap();
        let ids: Vec<_> = vms.iter().map(|v| v.record.id.as_str()).collect();
        assert_eq!(ids, ["vm-good0001"]);
        assert_eq!(corrupt.len(), 1);
        let text = corrupt[0].to_string();
        assert!(
            text.contains("vm-broken01") && text.contains("smolvm rm vm-broken01"),
            "{text}"
        );
        assert_eq!(rt.list().unwrap().len(), 1);
        // Every call on it names it; none takes defaults for its config.
        let vm = rt.get("vm-broken01").unwrap();
        for e in [vm.info().unwrap_err(), vm.start().unwrap_err()] {
            assert!(
                matches!(&e, Error::CorruptRecord { id, .. } if id == "vm-broken01"),
                "{e}"
            );
        }
        // gc leaves it (and its directory) alone.
        let report = rt.gc().unwrap();
        assert!(rt.paths().vm_dir("vm-broken01").is_dir(), "{report:?}");
        // Deleting it removes its row and directory.
        assert_eq!(vm.delete().unwrap(), None);
        assert!(!rt.paths().vm_dir("vm-broken01").exists());
        assert!(matches!(rt.get("vm-broken01"), Err(Error::VmNotFound(_))));
        let (vms, corrupt) = rt.list_all().unwrap();
        assert_eq!((vms.len(), corrupt.len()), (1, 0));
    }

    #[test]
    fn a_root_file_system_link_is_an_orphan_once_its_disk_is_gone_a_while() {
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp.path().join("vm-1.rootfs");
        let disk = tmp.path().join("vm-1.qcow2");
        std::fs::write(&link, b"").unwrap();
        std::fs::write(&disk, b"").unwrap();
        assert!(!orphan_link(&link, -1), "its disk is there");
        std::fs::remove_file(&disk).unwrap();
        assert!(orphan_link(&link, -1));
        assert!(!orphan_link(&link, LINK_GRACE_SECS), "just made");
        let other = tmp.path().join("vm-1.json");
        std::fs::write(&other, b"").unwrap();
        assert!(!orphan_link(&other, -1), "not a link");
    }
}

//! What VMs do with saved states: resume from a template or a snapshot at their first
//! start, pause and resume, save a snapshot, fork, and be created from a snapshot.

use std::path::{Path, PathBuf};

use smolvm_protocol::ApiRequest;

use super::overrides::SnapshotOverrides;
use super::template::{self, Recipe};
use super::{files, Kind, Saved, SavedState};
use crate::config::{DiskMode, NetworkMode, VmConfig};
use crate::error::{io_err, Error, Result};
use crate::hypervisor::qemu::QemuMicrovm;
use crate::hypervisor::{AccelReport, LaunchSpec};
use crate::paths::create_private_dir;
use crate::store::{Base, VmRecord};
use crate::supervisor::files as vm_files;
use crate::vm::{BootFiles, Runtime, Vm};

/// Most VMs one `fork` makes.
pub const MAX_FORKS: usize = 64;

/// A saved state a VM's first start resumes from.
pub(crate) struct ResumePoint {
    /// The saved state.
    pub saved: Saved,
    /// What the VM records as its base.
    pub base: Base,
}

impl ResumePoint {
    /// The template's image and key, when it is one.
    pub fn template(&self) -> Option<(&str, &str)> {
        match &self.base {
            Base::Template { image, key } => Some((image, key)),
            Base::Snapshot { .. } => None,
        }
    }
}

impl Runtime {
    /// Makes sure the template for `config`'s image and shape exists, building it now if not
    /// (`smolvm image warm`). Returns it and whether it was built.
    pub fn warm_template(&self, config: &VmConfig) -> Result<(Saved, bool)> {
        config.validate()?;
        let config = crate::vm::resolve_network(config.clone())?;
        if !template::eligible(&config) {
            return Err(Error::InvalidConfig {
                field: "snapshot",
                value: "false".into(),
                allowed: "templates serve isolated disks made from an image, with snapshots on"
                    .into(),
            });
        }
        let boot = self.boot_files(&config)?;
        let accel = crate::hypervisor::detect_accelerator();
        self.ensure_template(&config, &boot, &accel)
    }

    fn ensure_template(
        &self,
        config: &VmConfig,
        boot: &BootFiles,
        accel: &AccelReport,
    ) -> Result<(Saved, bool)> {
        let rootfs = boot
            .base
            .as_ref()
            .ok_or_else(|| Error::Disk("the image has no root filesystem".into()))?;
        let paths = self.paths();
        let made = template::ensure(
            &paths.images_dir,
            &Recipe {
                config,
                kernel: &boot.kernel,
                initrd: &boot.initrd,
                rootfs,
                accel,
                db_path: &paths.db_path(),
                state_dir: &paths.state_dir,
                ready_timeout_secs: crate::vm::ready_timeout_secs(accel.accelerator),
            },
        )?;
        if made.1 {
            // One more template: the image may now have more than it keeps.
            self.trim_templates(&config.image);
        }
        Ok(made)
    }

    /// Named snapshots (and the states forks were made from), by name.
    pub fn snapshots(&self) -> Result<Vec<Saved>> {
        super::list(self.paths())
    }

    /// Removes a named snapshot; refused while VMs build on it (they read its disk).
    pub fn remove_snapshot(&self, name: &str) -> Result<()> {
        let saved = super::open_named(self.paths(), name).or_else(|e| match e {
            // An incomplete one can still be removed.
            Error::Snapshot(_) => Ok(Saved {
                dir: super::snapshots_dir(self.paths()).join(name),
                meta: placeholder(name),
            }),
            other => Err(other),
        })?;
        let users = self.store().vms_on_base(&Base::snapshot(name))?;
        if !users.is_empty() {
            return Err(Error::SnapshotInUse {
                name: name.to_string(),
                users,
            });
        }
        super::remove_dir(&saved.dir)
    }

    /// Removes a fork's saved state once no VM builds on it.
    pub(crate) fn release_fork_state(&self, base: &Base) {
        let Base::Snapshot { name } = base else {
            return;
        };
        let Ok(saved) = super::open_named(self.paths(), name) else {
            return;
        };
        if saved.meta.kind == Kind::Fork
            && self
                .store()
                .vms_on_base(base)
                .is_ok_and(|users| users.is_empty())
        {
            if let Err(e) = super::remove_dir(&saved.dir) {
                tracing::warn!(snapshot = %name, "could not remove a fork's state: {e}");
            }
        }
    }

    /// Creates (does not start) a VM that will resume from the named snapshot at its first
    /// start, with `overrides` over the snapshot's config by the rules of
    /// [`SnapshotOverrides`]: an option that cannot apply is refused naming it, and nothing
    /// is created.
    pub fn create_from_snapshot(&self, name: &str, overrides: SnapshotOverrides) -> Result<Vm> {
        let saved = super::open_named(self.paths(), name)?;
        self.create_from_saved(&saved, &overrides)
    }

    /// [`Runtime::create_from_snapshot`], then [`Vm::start`]; a VM that does not start is
    /// deleted.
    pub fn create_started_from_snapshot(
        &self,
        name: &str,
        overrides: SnapshotOverrides,
    ) -> Result<(Vm, crate::vm::StartTimings)> {
        crate::vm::start_or_delete(self.create_from_snapshot(name, overrides)?)
    }

    fn create_from_saved(&self, saved: &Saved, overrides: &SnapshotOverrides) -> Result<Vm> {
        let config = overrides.merge(&saved.meta)?;
        let config = crate::vm::resolve_network(config)?;
        let owner = overrides.owner;
        let m = &saved.meta;
        let vm = self.create_with_owner(config, owner)?;
        let rebased = (|| {
            // Held while the disk is remade, so `gc` takes the `qemu-img` at work for no
            // leftover of a dead VM (it leaves locked VMs alone).
            let held = crate::supervisor::lock_within(vm.dir(), crate::supervisor::LOCK_RETRY)?;
            let _lock = held.ok_or_else(|| {
                Error::Snapshot(format!(
                    "the new VM {} is locked by another process (a start or delete of it); \
                     nothing was restored, try again",
                    vm.id()
                ))
            })?;
            let rec = vm.info()?;
            rebase_overlay(&rec, &saved.disk())?;
            // The snapshot holds its own link to the image's root file system.
            let _ = std::fs::remove_file(vm.dir().join(crate::disk::ROOTFS_LINK));
            self.store()
                .set_base(vm.id(), Some(&Base::snapshot(&m.name)))
        })();
        if let Err(e) = rebased {
            let _ = vm.delete();
            return Err(e);
        }
        Ok(vm)
    }
}

/// A stand-in description for a snapshot whose own is unreadable.
fn placeholder(name: &str) -> SavedState {
    SavedState {
        name: name.to_string(),
        kind: Kind::Snapshot,
        image: String::new(),
        image_stamp: String::new(),
        vcpus: 0,
        mem_mib: 0,
        nic: false,
        accelerator: crate::hypervisor::Accelerator::Tcg,
        cmdline: String::new(),
        kernel: PathBuf::new(),
        initrd: PathBuf::new(),
        source_vm: None,
        boot_args: None,
        config: None,
        created_at: 0,
    }
}

/// Makes a VM's never-used overlay a copy of a template's disk (its few hundred KiB of
/// changes) built on `rootfs`, the VM's own link to the image's root file system: the VM
/// then depends on no file of the template, which may be evicted or rebuilt at any time.
fn adopt_template_disk(rec: &VmRecord, template_disk: &Path, rootfs: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let overlay = &rec.disk_path;
    let fresh = overlay.with_extension("new");
    let _ = std::fs::remove_file(&fresh);
    let made = (|| {
        std::fs::copy(template_disk, &fresh).map_err(io_err(format!(
            "copying the template disk {}",
            template_disk.display()
        )))?;
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(format!("making {} writable", fresh.display())))?;
        crate::disk::set_backing(&fresh, rootfs, crate::disk::detect_format(rootfs)?)?;
        std::fs::rename(&fresh, overlay).map_err(io_err(format!(
            "replacing the overlay {}",
            overlay.display()
        )))
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&fresh);
    }
    made
}

/// Replaces a VM's never-used overlay with one on `backing` (a saved state's disk).
fn rebase_overlay(rec: &VmRecord, backing: &std::path::Path) -> Result<()> {
    let overlay = &rec.disk_path;
    let fresh = overlay.with_extension("new");
    let _ = std::fs::remove_file(&fresh);
    crate::disk::create_overlay(backing, &fresh, None)?;
    std::fs::rename(&fresh, overlay).map_err(io_err(format!(
        "replacing the overlay {}",
        overlay.display()
    )))
}

impl Vm {
    /// The saved state this start resumes from, with the VM's disk made to build on it; `None`
    /// boots cold. Only a first start of an isolated disk resumes; a template is made on
    /// first use of a shape (a failure to make one is logged and the VM boots cold).
    pub(crate) fn resume_point(
        &self,
        rec: &VmRecord,
        boot: &BootFiles,
        accel: &AccelReport,
    ) -> Result<Option<ResumePoint>> {
        if rec.started_at.is_some() || rec.config.disk_mode != DiskMode::Isolated {
            return Ok(None);
        }
        let rt = &self.rt;
        if let Some(base) = &rec.base {
            if let Base::Snapshot { name } = base {
                let saved = super::open_named(rt.paths(), name)?;
                check_loadable(&saved, boot, accel)?;
                return Ok(Some(ResumePoint {
                    saved,
                    base: base.clone(),
                }));
            }
            // A template base means an earlier first start failed: the disk is made anew
            // from the template below (which may have been rebuilt since).
        }
        if !template::eligible(&rec.config) {
            return Ok(None);
        }
        let Some(image_rootfs) = boot.base.as_deref() else {
            return Ok(None);
        };
        let own = rec.dir.join(crate::disk::ROOTFS_LINK);
        if own.exists() && !crate::disk::same_file(&own, image_rootfs) {
            // The image was rebuilt since this VM was made: it keeps the root file system
            // it was made with, and no template of the new one fits that.
            tracing::info!(id = %self.id(), "the image changed since this VM was made; booting cold");
            return Ok(None);
        }
        let saved = match rt.ensure_template(&rec.config, boot, accel) {
            Ok((saved, _)) => saved,
            Err(e) => {
                tracing::warn!(id = %self.id(), "no template; booting cold: {e}");
                return Ok(None);
            }
        };
        let backing = if own.exists() {
            own
        } else {
            image_rootfs.to_path_buf()
        };
        adopt_template_disk(rec, &saved.disk(), &backing)?;
        let base = Base::template(&rec.config.image, &saved.meta.name);
        rt.store().set_base(self.id(), Some(&base))?;
        Ok(Some(ResumePoint { saved, base }))
    }

    /// After a template failed to resume: drops it, puts the VM's disk back on its image and
    /// forgets the base, so the next start boots cold.
    pub(crate) fn abandon_template(&self, point: &ResumePoint) -> Result<()> {
        if let Some((image, key)) = point.template() {
            template::discard(&self.rt.paths().images_dir, image, key);
        }
        let rec = self.info()?;
        let own = self.dir().join(crate::disk::ROOTFS_LINK);
        if own.exists() {
            rebase_overlay(&rec, &own)?;
        } else if let Some(base) = &self.rt.boot_files(&rec.config)?.base {
            rebase_overlay(&rec, base)?;
        }
        self.rt.store().set_base(self.id(), None)
    }

    /// Freezes the VM's vCPUs (its clocks and timers stop with them); commands are refused
    /// until [`Vm::resume`].
    pub fn pause(&self) -> Result<()> {
        self.require_live()?;
        self.client().control(&ApiRequest::Pause)
    }

    /// Lets a paused VM run again.
    pub fn resume(&self) -> Result<()> {
        self.require_live()?;
        self.client().control(&ApiRequest::Resume)
    }

    /// Saves the running (or paused) VM as snapshot `name`: memory, devices and disk at one
    /// instant; the VM then goes on. Files are private to the owner.
    pub fn snapshot(&self, name: &str) -> Result<Saved> {
        self.save_state(name, Kind::Snapshot)
    }

    /// `n` new running VMs that continue from this VM's present state (memory, processes,
    /// files), each with its own identity (hostname, address, randomness). They belong to
    /// the same owner as this VM.
    pub fn fork(&self, n: usize) -> Result<Vec<Vm>> {
        if n == 0 || n > MAX_FORKS {
            return Err(Error::InvalidConfig {
                field: "n",
                value: n.to_string(),
                allowed: format!("1 to {MAX_FORKS} forks at once"),
            });
        }
        let rec = self.info()?;
        let mut tag = [0u8; 4];
        crate::util::random_bytes(&mut tag);
        let name = format!("fork-{}-{}", self.id(), hex::encode(tag));
        let saved = self.save_state(&name, Kind::Fork)?;
        let overrides = SnapshotOverrides {
            network: Some(rec.config.network),
            owner: rec.owner,
            ..Default::default()
        };
        let made: Vec<Result<Vm>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|_| {
                    let (saved, overrides) = (&saved, &overrides);
                    s.spawn(move || {
                        let vm = self.rt.create_from_saved(saved, overrides)?;
                        match vm.start() {
                            Ok(_) => Ok(vm),
                            Err(e) => {
                                // The siblings still need the fork's state.
                                let _ = vm.delete_keeping_saved_state();
                                Err(e)
                            }
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Snapshot("a fork's thread panicked".into())))
                })
                .collect()
        });
        let (ok, failed): (Vec<_>, Vec<_>) = made.into_iter().partition(|r| r.is_ok());
        let vms: Vec<Vm> = ok.into_iter().filter_map(|r| r.ok()).collect();
        if let Some(Err(e)) = failed.into_iter().next() {
            for vm in &vms {
                let _ = vm.delete();
            }
            self.rt.release_fork_state(&Base::snapshot(&name));
            return Err(e);
        }
        Ok(vms)
    }

    fn require_live(&self) -> Result<()> {
        let rec = self.info()?;
        if rec.state.is_live() {
            Ok(())
        } else {
            Err(Error::BadState {
                id: self.id().to_string(),
                state: rec.state.to_string(),
                hint: format!("start it first with `smolvm start {}`", self.id()),
            })
        }
    }

    fn save_state(&self, name: &str, kind: Kind) -> Result<Saved> {
        super::validate_name(name)?;
        self.require_live()?;
        let rec = self.info()?;
        let paths = self.rt.paths();
        let root = super::snapshots_dir(paths);
        create_private_dir(&root)?;
        let target = root.join(name);
        if target.exists() {
            return Err(Error::InvalidConfig {
                field: "snapshot name",
                value: name.to_string(),
                allowed: format!(
                    "a name not in use (remove the old one with `smolvm snapshot rm {name}`)"
                ),
            });
        }
        let work = root.join(format!(".{name}.tmp-{}", std::process::id()));
        if work.exists() {
            super::remove_dir(&work)?;
        }
        create_private_dir(&work)?;
        let made = (|| {
            let spec_path = self.dir().join(vm_files::SPEC);
            let spec: LaunchSpec = serde_json::from_slice(
                &std::fs::read(&spec_path)
                    .map_err(io_err(format!("reading {}", spec_path.display())))?,
            )
            .map_err(|e| Error::Snapshot(format!("the VM's launch spec is unreadable: {e}")))?;
            let boot = self.rt.boot_files(&rec.config)?;
            let stamp = image_stamp_of(&boot)?;
            self.client().control(&ApiRequest::Snapshot {
                dir: work.display().to_string(),
            })?;
            // The copy is a qcow2 smolvm wrote; what it builds on stays where the VM's disk
            // may build (checked before anything it names is opened).
            crate::disk::check_chain(
                &work.join(files::DISK),
                crate::disk::DiskFormat::Qcow2,
                &self.rt.disk_roots(&rec.config, self.dir()),
            )?;
            // The copy depends on no other saved state and no VM, only on its own link to
            // the image's root file system (done while the VM runs on).
            crate::disk::adopt_base(
                &work.join(files::DISK),
                &work,
                &target,
                crate::disk::ROOTFS_LINK,
            )?;
            let nic =
                spec.unplugged_nic || matches!(spec.network, NetworkMode::User | NetworkMode::Nat);
            let meta = SavedState {
                name: name.to_string(),
                kind,
                image: rec.config.image.clone(),
                image_stamp: stamp,
                vcpus: spec.vcpus,
                mem_mib: spec.mem_mib,
                nic,
                accelerator: spec.accelerator,
                cmdline: QemuMicrovm::boot_args(&spec),
                kernel: spec.kernel.clone(),
                initrd: spec.initrd.clone(),
                source_vm: Some(self.id().to_string()),
                boot_args: rec.config.boot_args.clone(),
                config: Some(rec.config.redacted()),
                created_at: crate::util::now_unix(),
            };
            std::fs::write(
                work.join(files::META),
                serde_json::to_vec_pretty(&meta).unwrap_or_default(),
            )
            .map_err(io_err("writing the snapshot's meta.json"))?;
            super::seal(&work)?;
            std::fs::rename(&work, &target).map_err(io_err(format!(
                "moving the snapshot into {}",
                target.display()
            )))?;
            Saved::open(&target)
        })();
        if made.is_err() {
            let _ = super::remove_dir(&work);
        }
        made
    }
}

/// The stamp of the image files a VM boots from.
fn image_stamp_of(boot: &BootFiles) -> Result<String> {
    let mut files: Vec<&std::path::Path> = vec![&boot.kernel, &boot.initrd];
    if let Some(b) = &boot.base {
        files.push(b);
    }
    super::image_stamp(&files)
}

/// Refuses a snapshot that cannot load here: another accelerator, or an image rebuilt
/// since (its disk builds on the old files).
fn check_loadable(saved: &Saved, boot: &BootFiles, accel: &AccelReport) -> Result<()> {
    let m = &saved.meta;
    if m.accelerator != accel.accelerator {
        return Err(Error::Snapshot(format!(
            "snapshot {:?} was taken under {} and this host runs VMs under {}; a saved state \
             only loads under the accelerator it was saved with",
            m.name, m.accelerator, accel.accelerator
        )));
    }
    if image_stamp_of(boot)? != m.image_stamp {
        return Err(Error::Snapshot(format!(
            "snapshot {:?} was taken from image {:?} before it was rebuilt; its disk no longer \
             matches the image (remove it with `smolvm snapshot rm {}`)",
            m.name, m.image, m.name
        )));
    }
    Ok(())
}

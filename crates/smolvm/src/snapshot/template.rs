//! Templates: the first time an image is used with a shape (vCPUs, memory, network device,
//! disk size, kernel arguments, accelerator), it is booted once, its agent awaited, and its
//! state saved under the image (`IMAGE/templates/KEY/`). Later VMs of that shape resume from
//! it. The key covers the image's files, so a rebuilt image (a new directory) never serves
//! an old template. Concurrent first uses build it once: a lock file serializes builders and
//! the finished directory appears by rename.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::{DiskMode, NetworkMode, VmConfig};
use crate::error::{io_err, Error, Result};
use crate::hypervisor::qemu::QemuMicrovm;
use crate::hypervisor::AccelReport;
use crate::paths::create_private_dir;
use crate::supervisor::files as vm_files;

use super::{files, Kind, Saved, SavedState};

/// Hostname of the booted template (each VM made from it gets its own at resume).
const TEMPLATE_HOSTNAME: &str = "smolvm-template";

/// Whether a VM with this config can start from a template: an isolated disk made from an
/// image, and snapshots not turned off.
pub fn eligible(c: &VmConfig) -> bool {
    c.snapshot
        && c.disk_mode == DiskMode::Isolated
        && c.disk_path.is_none()
        && c.kernel_path.is_none()
        && c.initrd_path.is_none()
        && c.rootfs_path.is_none()
}

/// Whether VMs of this config have a network device.
pub fn has_nic(c: &VmConfig) -> bool {
    matches!(
        c.network,
        NetworkMode::User | NetworkMode::Nat | NetworkMode::Auto
    )
}

/// Templates kept per image: past this many, the least recently used ones are removed
/// (see [`evictable`]), unless used in the last [`EVICT_GRACE`]. No VM needs its template
/// once started: its disk holds a copy of the template's.
pub const KEEP_PER_IMAGE: usize = 4;

/// A template used this recently is never evicted: a VM may be resuming from it.
pub const EVICT_GRACE: Duration = Duration::from_secs(600);

/// Where an image's templates live.
pub fn templates_dir(images_dir: &Path, image: &str) -> PathBuf {
    images_dir.join(image).join("templates")
}

/// The template key for a config on an image whose files have `stamp`.
pub fn key(c: &VmConfig, accel: &AccelReport, stamp: &str) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let qemu = QemuMicrovm::binary()
        .ok()
        .and_then(|b| std::fs::metadata(b).ok())
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            format!("{}:{}", m.len(), m.mtime())
        })
        .unwrap_or_default();
    // The kernel arguments smolvm itself adds (not the per-VM ones a restore replaces), so
    // a template made with an older command line is not reused.
    let machine_args = format!(
        "{} {}",
        crate::hypervisor::qemu::BASE_BOOT_ARGS,
        QemuMicrovm::machine_args(accel.accelerator, accel.tsc_khz, c.vcpu_count)
    );
    let fields = format!(
        "v1|smolvm={}|proto={}|stamp={stamp}|cpus={}|mem={}|nic={}|args={:?}|disk={:?}|accel={}|qemu={qemu}|kernel={machine_args:?}|devices={}",
        env!("CARGO_PKG_VERSION"),
        smolvm_protocol::PROTOCOL_VERSION,
        c.vcpu_count,
        c.mem_size_mib,
        has_nic(c),
        c.boot_args,
        c.disk_size_mib,
        accel.accelerator,
        QemuMicrovm::DEVICES_GENERATION,
    );
    h.update(fields.as_bytes());
    format!(
        "{}c-{}m-{}-{}",
        c.vcpu_count,
        c.mem_size_mib,
        if has_nic(c) { "net" } else { "nonet" },
        hex::encode(&h.finalize()[..6])
    )
}

/// What a template is made from.
pub(crate) struct Recipe<'a> {
    /// The VM config (its shape).
    pub config: &'a VmConfig,
    /// The image's kernel.
    pub kernel: &'a Path,
    /// The image's initramfs.
    pub initrd: &'a Path,
    /// The image's root filesystem.
    pub rootfs: &'a Path,
    /// The host's accelerator.
    pub accel: &'a AccelReport,
    /// The state database (the template records nothing there).
    pub db_path: &'a Path,
    /// The state directory.
    pub state_dir: &'a Path,
    /// Seconds to wait for the template's agent.
    pub ready_timeout_secs: u64,
}

impl Recipe<'_> {
    fn stamp(&self) -> Result<String> {
        super::image_stamp(&[self.kernel, self.initrd, self.rootfs])
    }
}

/// The template for this recipe, made now if there is none (`built` says so). Concurrent
/// callers wait for one builder.
pub(crate) fn ensure(images_dir: &Path, r: &Recipe<'_>) -> Result<(Saved, bool)> {
    let stamp = r.stamp()?;
    let key = key(r.config, r.accel, &stamp);
    let dir = templates_dir(images_dir, &r.config.image);
    let target = dir.join(&key);
    if let Ok(t) = Saved::open(&target) {
        touch(&t.dir);
        return Ok((t, false));
    }
    create_private_dir(&dir)?;
    // Held until this function returns; the kernel drops it if we die.
    let _lock = lock_key(&dir, &key, true)?;
    match Saved::open(&target) {
        Ok(t) => return Ok((t, false)),
        // A broken one (say, a crash mid-rename, or a corrupt file) is rebuilt.
        Err(_) if target.exists() => super::remove_dir(&target)?,
        Err(_) => {}
    }
    let t0 = Instant::now();
    tracing::info!(image = %r.config.image, %key, "building a template (once per image and shape)");
    let built = build(&dir, &key, &stamp, r)?;
    std::fs::rename(&built, &target).map_err(io_err(format!(
        "moving the template into {}",
        target.display()
    )))?;
    touch(&target);
    tracing::info!(%key, ms = t0.elapsed().as_millis() as u64, "template ready");
    Ok((Saved::open(&target)?, true))
}

/// How many templates `image` has and the bytes they take on disk (allocated blocks: their
/// RAM files are sparse).
pub fn usage(images_dir: &Path, image: &str) -> (usize, u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(templates_dir(images_dir, image)) else {
        return (0, 0);
    };
    let mut count = 0;
    let mut bytes = 0;
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with('.')
            || !e.file_type().is_ok_and(|t| t.is_dir())
        {
            continue;
        }
        count += 1;
        for f in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
            bytes += f.metadata().map_or(0, |m| m.blocks() * 512);
        }
    }
    (count, bytes)
}

/// Records that a template was just used: its directory's modification time orders
/// eviction (least recently used first).
pub(crate) fn touch(dir: &Path) {
    let now = std::time::SystemTime::now();
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.set_modified(now)) {
        tracing::debug!(dir = %dir.display(), "could not mark a template used: {e}");
    }
}

/// The templates of the image whose templates directory is `dir` that may be evicted, least
/// recently used first: all but the `keep` most recently used, sparing those used within
/// `grace` (a VM may be resuming from one).
pub(crate) fn evictable(dir: &Path, keep: usize, grace: Duration) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    // Newest first: the first `keep` stay.
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    let now = std::time::SystemTime::now();
    found
        .into_iter()
        .skip(keep)
        .filter(|(used, _)| now.duration_since(*used).is_ok_and(|idle| idle >= grace))
        .rev()
        .map(|(_, path)| path)
        .collect()
}

/// Takes the lock of template `key` in `dir` (`KEY.lock`), waiting for it when `wait`, else
/// `None` when another process holds it. The lock file may be removed (with its template)
/// by whoever holds it, so a lock taken on a file no longer at that path is taken again.
fn lock_key(dir: &Path, key: &str, wait: bool) -> Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    let path = dir.join(format!("{key}.lock"));
    for _ in 0..8 {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        let how = if wait {
            nix::fcntl::FlockArg::LockExclusive
        } else {
            nix::fcntl::FlockArg::LockExclusiveNonblock
        };
        let lock = match nix::fcntl::Flock::lock(file, how) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if !wait => return Ok(None),
            Err((_, e)) => {
                return Err(Error::Snapshot(format!(
                    "cannot lock {}: {e}",
                    path.display()
                )))
            }
        };
        use std::os::unix::fs::MetadataExt;
        let held = lock.metadata().ok().map(|m| (m.dev(), m.ino()));
        let named = std::fs::metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        if held.is_some() && held == named {
            return Ok(Some(lock));
        }
    }
    Err(Error::Snapshot(format!(
        "cannot lock {}: it keeps being replaced",
        path.display()
    )))
}

/// Removes the lock file of a template that is gone, unless someone holds it (a builder
/// making the template again).
pub(crate) fn remove_lock(dir: &Path, key: &str) {
    if let Ok(Some(_held)) = lock_key(dir, key, false) {
        if !dir.join(key).exists() {
            let _ = std::fs::remove_file(dir.join(format!("{key}.lock")));
        }
    }
}

/// Removes a template that failed to restore (it is rebuilt on next use).
pub(crate) fn discard(images_dir: &Path, image: &str, key: &str) {
    let target = templates_dir(images_dir, image).join(key);
    if let Err(e) = super::remove_dir(&target) {
        tracing::warn!(%key, "could not remove a broken template: {e}");
    }
}

/// Boots the template in a private build directory and saves it there; returns the
/// directory (the caller renames it into place). Nothing is left on failure.
fn build(dir: &Path, key: &str, stamp: &str, r: &Recipe<'_>) -> Result<PathBuf> {
    // Private to this build (one process may build several shapes at once); the pid
    // tells `smolvm gc` whether its builder is gone.
    let mut tag = [0u8; 4];
    crate::util::random_bytes(&mut tag);
    let work = dir.join(format!(".b-{}-{}", std::process::id(), hex::encode(tag)));
    if work.exists() {
        super::remove_dir(&work)?;
    }
    create_private_dir(&work)?;
    let made = (|| {
        let disk = work.join(files::DISK);
        crate::disk::create_overlay(r.rootfs, &disk, r.config.disk_size_mib)?;
        let nic = has_nic(r.config);
        let host = crate::launch::Host {
            vmm: crate::hypervisor::VmmKind::Qemu,
            accel: r.accel.clone(),
        };
        let mut spec = crate::launch::machine(
            TEMPLATE_HOSTNAME,
            r.config,
            (r.kernel, r.initrd),
            (disk, crate::disk::DiskFormat::Qcow2),
            &host,
            (r.db_path, r.state_dir),
        );
        // The template's network device has nothing behind it (a backend such as slirp
        // would save state of its own that a VM on a TAP cannot load); each VM made from
        // it gets its own backend and address when it resumes.
        spec.unplugged_nic = nic;
        spec.ready_timeout_secs = r.ready_timeout_secs;
        spec.template_out = Some(work.clone());
        let lock = crate::supervisor::try_lock(&work)?.ok_or_else(|| {
            Error::Snapshot(format!("{} is locked by another process", work.display()))
        })?;
        crate::launch::start(&work, &spec, lock, Instant::now()).map_err(|e| {
            Error::Snapshot(format!(
                "building the template of image {:?} failed: {}",
                r.config.image,
                e.reason()
            ))
        })?;
        let meta = SavedState {
            name: key.to_string(),
            kind: Kind::Template,
            image: r.config.image.clone(),
            image_stamp: stamp.to_string(),
            vcpus: r.config.vcpu_count,
            mem_mib: r.config.mem_size_mib,
            nic,
            accelerator: r.accel.accelerator,
            cmdline: QemuMicrovm::boot_args(&spec),
            kernel: r.kernel.to_path_buf(),
            initrd: r.initrd.to_path_buf(),
            source_vm: None,
            boot_args: r.config.boot_args.clone(),
            config: None,
            created_at: crate::util::now_unix(),
        };
        std::fs::write(
            work.join(files::META),
            serde_json::to_vec_pretty(&meta).unwrap_or_default(),
        )
        .map_err(io_err("writing the template's meta.json"))?;
        // Only the saved state (and the logs, for whoever debugs a bad template) stay.
        for f in [
            vm_files::SPEC,
            vm_files::LOCK,
            vm_files::API_SOCK,
            vm_files::AGENT_SOCK,
            vm_files::CONSOLE_SOCK,
            vm_files::QMP_SOCK,
        ] {
            let _ = std::fs::remove_file(work.join(f));
        }
        super::seal(&work)
    })();
    match made {
        Ok(()) => Ok(work),
        Err(e) => {
            crate::cleanup::kill_vm_processes(&work);
            let _ = super::remove_dir(&work);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::Accelerator;

    fn accel() -> AccelReport {
        AccelReport {
            accelerator: Accelerator::Tcg,
            kvm_usable: false,
            reason: String::new(),
            tsc_khz: Some(1),
        }
    }

    #[test]
    fn eviction_takes_the_least_recently_used_idle_templates() {
        let tmp = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        let now = std::time::SystemTime::now();
        // a: used 5 h ago, b: 4 h, c: 3 h, d: 2 h, e: 1 h, f: just now.
        for (i, key) in ["a", "b", "c", "d", "e", "f"].iter().enumerate() {
            let dir = tmp.path().join(key);
            std::fs::create_dir(&dir).unwrap();
            let used = now - hour * (5 - i as u32);
            std::fs::File::open(&dir)
                .unwrap()
                .set_modified(used)
                .unwrap();
        }
        // Work directories and lock files are never candidates.
        std::fs::create_dir(tmp.path().join(".b-1-00")).unwrap();
        std::fs::write(tmp.path().join("a.lock"), b"").unwrap();
        let names = |v: Vec<PathBuf>| -> Vec<String> {
            v.iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        // Keep 2 (f, e): d, c, b, a are past it. Oldest first.
        assert_eq!(
            names(evictable(tmp.path(), 2, EVICT_GRACE)),
            ["a", "b", "c", "d"]
        );
        // With a grace of 2.5 h, d (2 h idle) stays too.
        let grace = Duration::from_secs(9000);
        assert_eq!(names(evictable(tmp.path(), 2, grace)), ["a", "b", "c"]);
        // Under the cap nothing goes; a missing directory has nothing.
        assert!(evictable(tmp.path(), 6, EVICT_GRACE).is_empty());
        assert!(evictable(&tmp.path().join("none"), 0, EVICT_GRACE).is_empty());
        // Touching makes the oldest the newest.
        touch(&tmp.path().join("a"));
        assert_eq!(
            names(evictable(tmp.path(), 2, EVICT_GRACE)),
            ["b", "c", "d", "e"]
        );
    }

    #[test]
    fn a_template_lock_goes_only_when_free_and_its_template_is_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let lock = tmp.path().join("k.lock");
        let held = lock_key(tmp.path(), "k", true).unwrap();
        assert!(held.is_some() && lock.exists());
        // A builder holds it: it stays, and a second taker is told so.
        remove_lock(tmp.path(), "k");
        assert!(lock.exists());
        assert!(lock_key(tmp.path(), "k", false).unwrap().is_none());
        drop(held);
        // Its template exists: it stays.
        std::fs::create_dir(tmp.path().join("k")).unwrap();
        remove_lock(tmp.path(), "k");
        assert!(lock.exists());
        // Free, and no template: it goes.
        std::fs::remove_dir(tmp.path().join("k")).unwrap();
        remove_lock(tmp.path(), "k");
        assert!(!lock.exists());
        // And the next builder makes a new one.
        assert!(lock_key(tmp.path(), "k", false).unwrap().is_some());
    }

    #[test]
    fn the_key_follows_the_shape_and_the_image() {
        let c = VmConfig {
            network: NetworkMode::Nat,
            ..VmConfig::default()
        };
        let k = key(&c, &accel(), "s1");
        assert!(k.starts_with("2c-512m-net-"), "{k}");
        // Network modes with a device share a template; the env and id do not matter.
        let user = VmConfig {
            network: NetworkMode::User,
            vm_id: Some("x".into()),
            ..c.clone()
        };
        assert_eq!(k, key(&user, &accel(), "s1"));
        for other in [
            VmConfig {
                network: NetworkMode::None,
                ..c.clone()
            },
            VmConfig {
                vcpu_count: 1,
                ..c.clone()
            },
            VmConfig {
                mem_size_mib: 1024,
                ..c.clone()
            },
            VmConfig {
                boot_args: Some("x=1".into()),
                ..c.clone()
            },
            VmConfig {
                disk_size_mib: Some(4096),
                ..c.clone()
            },
        ] {
            assert_ne!(k, key(&other, &accel(), "s1"), "{other:?}");
        }
        assert_ne!(k, key(&c, &accel(), "s2"));
        // smolvm's own kernel arguments are part of it (here: the TSC rate under TCG).
        let mut other_clock = accel();
        other_clock.tsc_khz = Some(other_clock.tsc_khz.unwrap_or(1) + 1);
        assert_ne!(k, key(&c, &other_clock, "s1"));
    }

    #[test]
    fn only_isolated_image_disks_use_templates() {
        assert!(eligible(&VmConfig::default()));
        for c in [
            VmConfig {
                snapshot: false,
                ..VmConfig::default()
            },
            VmConfig {
                disk_mode: DiskMode::Shared,
                ..VmConfig::default()
            },
            VmConfig {
                disk_path: Some("/d".into()),
                ..VmConfig::default()
            },
            VmConfig {
                kernel_path: Some("/k".into()),
                ..VmConfig::default()
            },
        ] {
            assert!(!eligible(&c), "{c:?}");
        }
    }
}

//! Images on disk: one directory per image under the images directory, opened, listed and
//! removed here; plus the per-name lock and the safe removal of build leftovers.
//!
//! ```text
//! images_dir/
//!   NAME/            vmlinux  initrd.cpio  rootfs.ext4 (0444)  manifest.json
//!   .NAME.lock       held while NAME is built or removed
//!   .NAME.build-*    a build in progress (renamed to NAME when complete)
//!   .cache/          downloaded kernel packages
//! ```

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::ImageError;
use crate::manifest::{Manifest, MANIFEST_FILE};

/// File name of the uncompressed kernel in an image directory.
pub const VMLINUX_FILE: &str = "vmlinux";
/// File name of the initramfs in an image directory.
pub const INITRD_FILE: &str = "initrd.cpio";
/// File name of the root filesystem in an image directory.
pub const ROOTFS_FILE: &str = "rootfs.ext4";
/// Longest image name accepted.
const MAX_NAME_LEN: usize = 64;

/// A built image: its files and its manifest.
#[derive(Debug, Clone)]
pub struct Image {
    /// The image name (its directory name).
    pub name: String,
    /// The image directory.
    pub dir: PathBuf,
    /// The uncompressed kernel (ELF `vmlinux`, PVH entry), for QEMU `-kernel`.
    pub kernel: PathBuf,
    /// The initramfs (uncompressed newc cpio), for QEMU `-initrd`.
    pub initrd: PathBuf,
    /// The root filesystem, raw ext4, read-only: use it as a qcow2 backing file.
    pub rootfs: PathBuf,
    /// What the image was built from, with checksums.
    pub manifest: Manifest,
}

impl Image {
    /// Loads the image in `dir`, checking the manifest and that every file is present with
    /// the recorded size (checksums are checked by [`Image::verify`]).
    fn load(dir: PathBuf, name: &str) -> Result<Image, ImageError> {
        let damaged = |reason: String| ImageError::Damaged {
            name: name.to_string(),
            reason,
        };
        let manifest = Manifest::load(&dir).map_err(damaged)?;
        let files = &manifest.files;
        for info in [&files.vmlinux, &files.initrd, &files.rootfs] {
            let path = dir.join(&info.file);
            match std::fs::metadata(&path) {
                Ok(meta) if meta.len() == info.size => {}
                Ok(meta) => {
                    return Err(damaged(format!(
                        "{} is {} bytes, the manifest says {}",
                        path.display(),
                        meta.len(),
                        info.size
                    )))
                }
                Err(e) => return Err(damaged(format!("{}: {e}", path.display()))),
            }
        }
        Ok(Image {
            name: name.to_string(),
            kernel: dir.join(&files.vmlinux.file),
            initrd: dir.join(&files.initrd.file),
            rootfs: dir.join(&files.rootfs.file),
            dir,
            manifest,
        })
    }

    /// Re-hashes the image's files and compares them with the manifest (reads the whole
    /// root filesystem: about a second per GiB).
    pub fn verify(&self) -> Result<(), ImageError> {
        let files = &self.manifest.files;
        for info in [&files.vmlinux, &files.initrd, &files.rootfs] {
            let (sha256, _) = crate::manifest::hash_file(&self.dir.join(&info.file))?;
            if sha256 != info.sha256 {
                return Err(ImageError::Damaged {
                    name: self.name.clone(),
                    reason: format!("{} does not match its checksum", info.file),
                });
            }
        }
        Ok(())
    }
}

/// Opens the image `name` in `images_dir`.
pub fn open(images_dir: &Path, name: &str) -> Result<Image, ImageError> {
    Image::load(existing_dir(images_dir, name)?, name)
}

/// The directory of the image `name`, or [`ImageError::NotFound`] listing what exists.
fn existing_dir(images_dir: &Path, name: &str) -> Result<PathBuf, ImageError> {
    validate_name(name)?;
    let dir = images_dir.join(name);
    if !dir.is_dir() {
        return Err(ImageError::NotFound {
            name: name.to_string(),
            available: names(images_dir),
        });
    }
    Ok(dir)
}

/// Lists the images in `images_dir`, sorted by name. Damaged images are skipped with a
/// warning; a missing `images_dir` holds no images.
pub fn list(images_dir: &Path) -> Result<Vec<Image>, ImageError> {
    let mut images: Vec<Image> = candidates(images_dir)?
        .into_iter()
        .filter_map(|name| match Image::load(images_dir.join(&name), &name) {
            Ok(image) => Some(image),
            Err(e) => {
                tracing::warn!("{e}");
                None
            }
        })
        .collect();
    images.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(images)
}

/// Removes the image `name` from `images_dir`.
///
/// The directory is first renamed away, so the image disappears at once even if deleting
/// its files takes a while. Running VMs keep their open files.
pub fn remove(images_dir: &Path, name: &str) -> Result<(), ImageError> {
    let dir = existing_dir(images_dir, name)?;
    let _lock = lock(images_dir, name)?;
    let doomed = images_dir.join(format!(".{name}.removing-{}", std::process::id()));
    std::fs::rename(&dir, &doomed).map_err(ImageError::io("cannot remove", &dir))?;
    remove_dir_safely(&doomed)?;
    tracing::info!(image = name, "removed");
    Ok(())
}

/// Names of the images that load, for [`ImageError::NotFound`].
fn names(images_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = candidates(images_dir)
        .unwrap_or_default()
        .into_iter()
        .filter(|name| images_dir.join(name).join(MANIFEST_FILE).is_file())
        .collect();
    names.sort();
    names
}

/// Directory names in `images_dir` that are valid image names.
fn candidates(images_dir: &Path) -> Result<Vec<String>, ImageError> {
    let entries = match std::fs::read_dir(images_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ImageError::io("cannot list", images_dir)(e)),
    };
    Ok(entries
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|name| validate_name(name).is_ok())
        .collect())
}

/// Checks that `name` is usable as an image directory name.
pub fn validate_name(name: &str) -> Result<(), ImageError> {
    let invalid = |reason| {
        Err(ImageError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return invalid("use 1 to 64 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return invalid("start with a letter or digit");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return invalid("use only letters, digits, `.`, `_` and `-`");
    }
    Ok(())
}

/// An exclusive lock on one image name, released when dropped.
pub(crate) struct NameLock {
    _file: File,
}

/// Takes the lock for `name`, waiting for another build or removal of it to finish.
pub(crate) fn lock(images_dir: &Path, name: &str) -> Result<NameLock, ImageError> {
    lock_file(
        &images_dir.join(format!(".{name}.lock")),
        "waiting for another build or removal of this image",
    )
}

/// Takes an exclusive `flock` on `path` (created when missing), logging `waiting` when
/// another process holds it.
pub(crate) fn lock_file(path: &Path, waiting: &str) -> Result<NameLock, ImageError> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(ImageError::io("cannot open the lock file", path))?;
    if flock(&file, libc::LOCK_EX | libc::LOCK_NB).is_err() {
        tracing::info!(lock = %path.display(), "{waiting}");
        flock(&file, libc::LOCK_EX).map_err(ImageError::io("cannot lock", path))?;
    }
    Ok(NameLock { _file: file })
}

fn flock(file: &File, operation: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock only reads the descriptor, which `file` keeps open for the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), operation) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Removes a directory tree, unless something is mounted below it (an interrupted
/// `mmdebstrap` can leave `/proc` or `/dev` mounted in its root): deleting through such a
/// mount would delete host files, so the tree is left with a warning instead.
pub(crate) fn remove_dir_safely(dir: &Path) -> Result<(), ImageError> {
    if let Some(mount) = mount_below(dir) {
        tracing::warn!(
            dir = %dir.display(),
            mount = %mount,
            "not removing: something is mounted below it; unmount it and delete the directory"
        );
        return Ok(());
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ImageError::io("cannot remove", dir)(e)),
    }
}

/// The first mount point at or below `dir`, from `/proc/self/mountinfo`.
fn mount_below(dir: &Path) -> Option<String> {
    let dir = dir.canonicalize().ok()?;
    let dir = dir.to_string_lossy().into_owned();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mount_path)
        .find(|mount| mount == &dir || mount.starts_with(&format!("{dir}/")))
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo paths.
fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Moves a completed build from `staging` to `images_dir/name`, replacing an older image.
pub(crate) fn install(staging: &Path, images_dir: &Path, name: &str) -> Result<(), ImageError> {
    let target = images_dir.join(name);
    if target.exists() {
        let old = images_dir.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(&target, &old).map_err(ImageError::io("cannot move aside", &target))?;
        if let Err(e) = std::fs::rename(staging, &target) {
            // Put the old image back rather than leave none.
            let _ = std::fs::rename(&old, &target);
            return Err(ImageError::io("cannot move into place", &target)(e));
        }
        remove_dir_safely(&old)
    } else {
        std::fs::rename(staging, &target).map_err(ImageError::io("cannot move into place", &target))
    }
}

/// Removes leftovers of interrupted builds and removals of `name` (call with the lock held).
pub(crate) fn clean_leftovers(images_dir: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(images_dir) else {
        return;
    };
    let prefixes = [
        format!(".{name}.build-"),
        format!(".{name}.old-"),
        format!(".{name}.removing-"),
    ];
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if prefixes.iter().any(|p| file_name.starts_with(p)) {
            tracing::info!(dir = %entry.path().display(), "removing the leftovers of an interrupted build");
            if let Err(e) = remove_dir_safely(&entry.path()) {
                tracing::warn!("{e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{AgentInfo, FileInfo, Files, KernelInfo, FORMAT_VERSION};

    /// Writes a small fake image `name` into `images_dir`.
    fn fake_image(images_dir: &Path, name: &str) {
        let dir = images_dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let file = |file: &str, data: &[u8]| {
            std::fs::write(dir.join(file), data).unwrap();
            FileInfo {
                file: file.to_string(),
                size: data.len() as u64,
                sha256: crate::manifest::hash_bytes(data),
            }
        };
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            builder_version: crate::manifest::BUILDER_VERSION,
            name: name.to_string(),
            created: "2026-11-22T00:00:00Z".into(),
            suite: "bookworm".into(),
            mirror: "http://deb.debian.org/debian".into(),
            sources: vec![],
            kernel: KernelInfo {
                package: "linux-image-x".into(),
                version: "1".into(),
                release: "x".into(),
            },
            packages: vec!["python3".into()],
            modules: vec![],
            rootfs_size_mib: 1,
            agent: AgentInfo {
                sha256: String::new(),
                rootfs_path: "/usr/local/sbin/smolvm-agent".into(),
            },
            files: Files {
                vmlinux: file(VMLINUX_FILE, b"\x7fELF kernel"),
                initrd: file(INITRD_FILE, b"070701"),
                rootfs: file(ROOTFS_FILE, b"ext4"),
            },
            inputs_hash: "0".into(),
            build_steps: vec![],
            ssh: None,
        };
        manifest.save(&dir).unwrap();
    }

    #[test]
    fn open_list_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let images = tmp.path();
        assert!(list(&images.join("missing")).unwrap().is_empty());
        fake_image(images, "default");
        fake_image(images, "big");
        std::fs::create_dir_all(images.join(".cache")).unwrap();

        let image = open(images, "default").unwrap();
        assert_eq!(image.kernel, images.join("default/vmlinux"));
        assert_eq!(image.rootfs, images.join("default/rootfs.ext4"));
        image.verify().unwrap();

        let names: Vec<String> = list(images).unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["big", "default"]);

        let err = open(images, "foo").unwrap_err();
        assert_eq!(
            err.to_string(),
            "image \"foo\" not found (available: big, default); build it with `smolvm image build foo`"
        );
        remove(images, "big").unwrap();
        assert!(!images.join("big").exists());
        assert!(matches!(
            remove(images, "big"),
            Err(ImageError::NotFound { .. })
        ));
        let err = open(tmp.path().join("none").as_path(), "x").unwrap_err();
        assert!(err.to_string().contains("(available: none)"), "{err}");
    }

    #[test]
    fn damaged_images_are_reported_and_skipped_in_lists() {
        let tmp = tempfile::tempdir().unwrap();
        fake_image(tmp.path(), "a");
        fake_image(tmp.path(), "b");
        std::fs::write(tmp.path().join("b/rootfs.ext4"), b"truncated!").unwrap();
        let err = open(tmp.path(), "b").unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
        assert!(err.contains("smolvm image build b --force"), "{err}");
        std::fs::write(tmp.path().join("a/rootfs.ext4"), b"EXT4").unwrap();
        let image = open(tmp.path(), "a").unwrap();
        assert!(image.verify().is_err(), "same size, different bytes");
        std::fs::remove_file(tmp.path().join("a/manifest.json")).unwrap();
        assert!(list(tmp.path()).unwrap().is_empty());
    }

    #[test]
    fn names_are_validated() {
        for good in ["default", "py3.12", "a_b-c", "X"] {
            validate_name(good).unwrap();
        }
        for bad in ["", ".hidden", "-x", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn install_replaces_an_existing_image() {
        let tmp = tempfile::tempdir().unwrap();
        fake_image(tmp.path(), "img");
        let staging = tmp.path().join(".img.build-1");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::write(staging.join("new"), b"").unwrap();
        install(&staging, tmp.path(), "img").unwrap();
        assert!(tmp.path().join("img/new").exists());
        assert!(!tmp.path().join("img/vmlinux").exists());
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers, ["img"]);
    }

    #[test]
    fn leftovers_are_cleaned_and_locks_exclude() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join(".img.build-abc/x")).unwrap();
        std::fs::create_dir_all(tmp.path().join(".other.build-abc")).unwrap();
        let lock1 = lock(tmp.path(), "img").unwrap();
        clean_leftovers(tmp.path(), "img");
        assert!(!tmp.path().join(".img.build-abc").exists());
        assert!(tmp.path().join(".other.build-abc").exists());
        let file = File::open(tmp.path().join(".img.lock")).unwrap();
        assert!(flock(&file, libc::LOCK_EX | libc::LOCK_NB).is_err());
        drop(lock1);
        assert!(flock(&file, libc::LOCK_EX | libc::LOCK_NB).is_ok());
    }

    #[test]
    fn mountinfo_paths_are_unescaped_and_mounts_found() {
        assert_eq!(unescape_mount_path(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_mount_path(r"/x\0"), r"/x\0");
        assert!(mount_below(Path::new("/")).is_some());
        let tmp = tempfile::tempdir().unwrap();
        assert!(mount_below(tmp.path()).is_none());
    }
}

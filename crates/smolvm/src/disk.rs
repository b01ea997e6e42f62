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

/// Name of a directory's own hard link to the image root file system its disk builds on (a
/// VM's, a snapshot's), so rebuilding or removing the image never changes that disk.
pub const ROOTFS_LINK: &str = "rootfs.ext4";

/// On-disk format of a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A raw filesystem image.
    Raw,
    /// A qcow2 image (possibly an overlay on a backing file).
    Qcow2,
}

impl std::str::FromStr for DiskFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<DiskFormat> {
        match s {
            "raw" => Ok(DiskFormat::Raw),
            "qcow2" => Ok(DiskFormat::Qcow2),
            other => Err(Error::Disk(format!(
                "unknown disk format {other:?}; only raw and qcow2 are known"
            ))),
        }
    }
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

/// Runs qemu-img with `args`; its standard output, or an error that starts with `what` (what
/// could not be done) and ends with qemu-img's own words.
fn run_qemu_img<S: AsRef<std::ffi::OsStr>>(
    args: impl IntoIterator<Item = S>,
    what: impl FnOnce() -> String,
) -> Result<Vec<u8>> {
    let out = Command::new(qemu_img()?)
        .args(args)
        .output()
        .map_err(io_err("running qemu-img"))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr);
        // A qemu-img that was killed says nothing: its exit status is the only clue.
        let why = match said.trim() {
            "" => out.status.to_string(),
            said => said.to_string(),
        };
        return Err(Error::Disk(format!("qemu-img could not {}: {why}", what())));
    }
    Ok(out.stdout)
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
    let mut args: Vec<std::ffi::OsString> =
        ["create", "-q", "-f", "qcow2", "-F", format.as_str(), "-b"]
            .iter()
            .map(Into::into)
            .collect();
    args.push(base.into());
    args.push(overlay.into());
    if let Some(mib) = size_mib {
        args.push(format!("{mib}M").into());
    }
    run_qemu_img(args, || {
        format!("create the disk overlay {}", overlay.display())
    })?;
    Ok(())
}

/// Longest backing chain read (a VM's overlay, a template's or snapshot's disk, the image).
const MAX_CHAIN: usize = 16;

/// Largest `qemu-img info` answer read.
const MAX_INFO_BYTES: usize = 1 << 20;

/// The files of `disk`'s backing chain with their formats, `disk` first and the bottom (an
/// image's root filesystem) last. `disk` is read as qcow2, never probed (every disk this is
/// asked about is a qcow2 smolvm made: an overlay, a saved state's disk, a retained disk).
/// Works on disks a running VM has open.
pub fn backing_chain(disk: &Path) -> Result<Vec<(PathBuf, DiskFormat)>> {
    chain_of(disk, DiskFormat::Qcow2)
}

/// The backing chain of `disk` read as `format` (a raw disk is its own whole chain).
fn chain_of(disk: &Path, format: DiskFormat) -> Result<Vec<(PathBuf, DiskFormat)>> {
    if format == DiskFormat::Raw {
        return Ok(vec![(disk.to_path_buf(), DiskFormat::Raw)]);
    }
    #[derive(Deserialize)]
    struct Layer {
        filename: PathBuf,
        format: String,
    }
    let out = run_qemu_img(
        [
            "info".as_ref(),
            "-U".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "--backing-chain".as_ref(),
            "--output=json".as_ref(),
            disk.as_os_str(),
        ],
        || format!("read the backing chain of {}", disk.display()),
    )?;
    if out.len() > MAX_INFO_BYTES {
        return Err(Error::Disk(format!(
            "qemu-img said more than {MAX_INFO_BYTES} bytes about {}",
            disk.display()
        )));
    }
    let layers: Vec<Layer> = serde_json::from_slice(&out).map_err(|e| {
        Error::Disk(format!(
            "unexpected qemu-img answer for {}: {e}",
            disk.display()
        ))
    })?;
    if layers.is_empty() || layers.len() > MAX_CHAIN {
        return Err(Error::Disk(format!(
            "the backing chain of {} has {} layers (1 to {MAX_CHAIN} are allowed)",
            disk.display(),
            layers.len()
        )));
    }
    Ok(layers
        .into_iter()
        .map(|l| {
            let format = if l.format == "qcow2" {
                DiskFormat::Qcow2
            } else {
                DiskFormat::Raw
            };
            (l.filename, format)
        })
        .collect())
}

/// The name, inside a VM's directory, of the file that pins its disk's format: written once
/// when the disk is made or adopted, read at every start. A disk's format is never probed
/// again after that: a guest that can write a raw disk can write a qcow2 header onto it.
pub const FORMAT_FILE: &str = "disk.format";

/// Pins the format of the VM's disk (in `vm_dir`, mode 0600).
pub fn pin_format(vm_dir: &Path, format: DiskFormat) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = vm_dir.join(FORMAT_FILE);
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(format.as_str().as_bytes()))
        .map_err(io_err(format!("writing {}", path.display())))
}

/// The pinned format of the VM's disk. A VM made before formats were pinned has no pin: its
/// disk is probed this once (as before) and the answer pinned.
pub fn pinned_format(vm_dir: &Path, disk: &Path) -> Result<DiskFormat> {
    let path = vm_dir.join(FORMAT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let format = detect_format(disk)?;
            tracing::warn!(
                disk = %disk.display(),
                format = format.as_str(),
                "a VM from before disk formats were pinned: probed its disk once and pinned it"
            );
            pin_format(vm_dir, format)?;
            Ok(format)
        }
        Err(e) => Err(io_err(format!("reading {}", path.display()))(e)),
    }
}

/// Checks that every file the chain of `disk` (read as `format`) builds on lies inside one
/// of `allowed` (directories, or files the user named). A qcow2 header names its backing
/// file itself; one that names anything else (a host file a guest wrote into a header) is
/// refused before QEMU or `qemu-img` opens it. A qcow2 with an external data file is refused
/// too.
pub fn check_chain(disk: &Path, format: DiskFormat, allowed: &[PathBuf]) -> Result<()> {
    if format == DiskFormat::Raw {
        return Ok(());
    }
    check_no_data_file(disk)?;
    let roots: Vec<PathBuf> = allowed
        .iter()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect();
    // Only the header of `disk` is trusted to name the next layer; read one layer at a time,
    // so nothing a header names is opened before it is checked.
    let mut layer = disk.to_path_buf();
    for _ in 0..MAX_CHAIN {
        let Some(next) = backing_of(&layer)? else {
            return Ok(());
        };
        let real = std::fs::canonicalize(&next.path).map_err(|e| {
            Error::Disk(format!(
                "{} builds on {}, which cannot be found ({e})",
                layer.display(),
                next.path.display()
            ))
        })?;
        if !roots.iter().any(|r| real.starts_with(r)) {
            return Err(Error::Disk(format!(
                "{} builds on {}, outside smolvm's directories and the files the VM was \
                 given; refusing to use it (a guest that could write a raw disk may have \
                 written a qcow2 header onto it)",
                layer.display(),
                real.display()
            )));
        }
        if next.format == DiskFormat::Raw {
            return Ok(());
        }
        check_no_data_file(&real)?;
        layer = real;
    }
    Err(Error::Disk(format!(
        "the backing chain of {} is longer than {MAX_CHAIN} layers",
        disk.display()
    )))
}

/// The file a qcow2 `disk`'s header names as its backing file, with that file's format as
/// the header states it (raw unless it says qcow2), read from this one header only.
fn backing_of(disk: &Path) -> Result<Option<Backing>> {
    #[derive(Deserialize)]
    struct Info {
        #[serde(rename = "full-backing-filename")]
        full: Option<PathBuf>,
        #[serde(rename = "backing-filename-format")]
        format: Option<String>,
    }
    let out = run_qemu_img(
        [
            "info".as_ref(),
            "-U".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "--output=json".as_ref(),
            disk.as_os_str(),
        ],
        || format!("read the header of {}", disk.display()),
    )?;
    if out.len() > MAX_INFO_BYTES {
        return Err(Error::Disk(format!(
            "qemu-img said more than {MAX_INFO_BYTES} bytes about {}",
            disk.display()
        )));
    }
    let info: Info = serde_json::from_slice(&out).map_err(|e| {
        Error::Disk(format!(
            "unexpected qemu-img answer for {}: {e}",
            disk.display()
        ))
    })?;
    Ok(info.full.map(|path| Backing {
        path,
        format: if info.format.as_deref() == Some("qcow2") {
            DiskFormat::Qcow2
        } else {
            DiskFormat::Raw
        },
    }))
}

/// A backing file named by a qcow2 header.
struct Backing {
    path: PathBuf,
    format: DiskFormat,
}

/// Refuses a qcow2 whose header names an external data file (its data would be read and
/// written there).
fn check_no_data_file(disk: &Path) -> Result<()> {
    let mut header = vec![0u8; 64 << 10];
    let n = File::open(disk)
        .and_then(|mut f| {
            let mut n = 0;
            while n < header.len() {
                let r = f.read(&mut header[n..])?;
                if r == 0 {
                    break;
                }
                n += r;
            }
            Ok(n)
        })
        .map_err(io_err(format!("reading the header of {}", disk.display())))?;
    let be32 = |o: usize| {
        header
            .get(o..o + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let be64 = |o: usize| {
        header.get(o..o + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_be_bytes(a)
        })
    };
    // qcow2 v3: incompatible features at 72, header length at 100; bit 2 is the external
    // data file. (v2 headers have neither.)
    if be32(4).unwrap_or(0) >= 3 && n >= 104 {
        let incompatible = be64(72).unwrap_or(0);
        if incompatible & (1 << 2) != 0 {
            return Err(Error::Disk(format!(
                "{} keeps its data in an external file; smolvm refuses such disks",
                disk.display()
            )));
        }
    }
    Ok(())
}

/// Rewrites `disk`, a qcow2 overlay no VM has open, to build directly on the bottom of its
/// backing chain (the image's root filesystem), holding every difference from it. The
/// layers between (a template's or a snapshot's disk) are then no longer needed: a disk
/// that outlives its VM (a snapshot's, a retained one) depends on nothing but its image.
pub fn flatten_onto_base(disk: &Path) -> Result<()> {
    let chain = backing_chain(disk)?;
    if chain.len() <= 2 {
        return Ok(());
    }
    let Some((base, format)) = chain.last() else {
        return Ok(());
    };
    // Safe mode: the data of the layers in between is copied into `disk` (only what they
    // hold above the base is compared, so this is quick).
    rebase(disk, base, *format, true)
}

/// `qemu-img rebase` of the qcow2 `disk` onto `backing`: `safe` copies into `disk` whatever
/// differs between its old chain and the new one; otherwise only the header changes.
fn rebase(disk: &Path, backing: &Path, format: DiskFormat, safe: bool) -> Result<()> {
    let mut args: Vec<&std::ffi::OsStr> = vec!["rebase".as_ref(), "-q".as_ref()];
    if !safe {
        args.push("-u".as_ref());
    }
    args.extend::<[&std::ffi::OsStr; 6]>([
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        format.as_str().as_ref(),
        "-b".as_ref(),
        backing.as_os_str(),
    ]);
    args.push(disk.as_os_str());
    run_qemu_img(args, || {
        format!("rebase {} onto {}", disk.display(), backing.display())
    })?;
    Ok(())
}

/// Gives `dir` its own name for `backing` (a hard link, `link_name`, replaced atomically), so
/// the file lives as long as either does; returns the path to build on. Where a link cannot
/// be made (another file system) `backing` itself is returned.
pub fn link_backing(backing: &Path, dir: &Path, link_name: &str) -> PathBuf {
    let link = dir.join(link_name);
    if same_file(backing, &link) {
        return link;
    }
    let tmp = dir.join(format!(".{link_name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let made = std::fs::hard_link(backing, &tmp).and_then(|()| std::fs::rename(&tmp, &link));
    let _ = std::fs::remove_file(&tmp);
    match made {
        Ok(()) => link,
        Err(e) => {
            tracing::debug!(backing = %backing.display(), "no hard link ({e}); building on the file itself");
            backing.to_path_buf()
        }
    }
}

/// Whether two paths name the same file (device and inode); false if either is missing.
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Points the qcow2 `disk` at `backing` (of `format`) without touching its data: only right
/// when `backing` holds what its old backing file held (the same file by another name, or
/// a copy).
pub fn set_backing(disk: &Path, backing: &Path, format: DiskFormat) -> Result<()> {
    rebase(disk, backing, format, false)
}

/// Makes `disk`, a qcow2 that outlives the directory it was made in (a snapshot's copy, a
/// retained disk), depend on nothing but its own link to the image root file system at the
/// bottom of its chain: the layers between are flattened into it ([`flatten_onto_base`]),
/// the link is made as `link_name` in `dir`, and the disk is pointed at it under `final_dir`
/// (where `dir` is about to be renamed to; `dir` itself if it stays).
pub fn adopt_base(disk: &Path, dir: &Path, final_dir: &Path, link_name: &str) -> Result<()> {
    flatten_onto_base(disk)?;
    let chain = backing_chain(disk)?;
    if chain.len() < 2 {
        return Ok(());
    }
    let Some((base, format)) = chain.last() else {
        return Ok(());
    };
    if link_backing(base, dir, link_name) != *base {
        set_backing(disk, &final_dir.join(link_name), *format)?;
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
    // Create beside it and link into place, so racing creators agree on one disk. It builds
    // on its own link to the image's root file system: rebuilding the image leaves it as is.
    let tmp = disks_dir.join(format!(
        ".shared-{image}.{}.tmp",
        crate::util::now_unix_ns()
    ));
    let base = link_backing(
        base,
        disks_dir,
        &format!("shared-{image}{BESIDE_ROOTFS_SUFFIX}"),
    );
    create_overlay(&base, &tmp, None)?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(path),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(path),
        Err(e) => Err(io_err(format!("creating {}", path.display()))(e)),
    }
}

/// Ending of the own link to its image root file system that a disk in the disks directory
/// (retained, or an image's shared disk) keeps beside it: `<name>.rootfs` beside
/// `<name>.qcow2`.
pub const BESIDE_ROOTFS_SUFFIX: &str = ".rootfs";

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
    // It outlives its VM's directory, and the link to the image's root file system there:
    // it gets its own, `<name>.rootfs` beside it (`smolvm gc` removes one left alone). Done
    // before the move, so a failure leaves the VM as it was.
    let link_name = format!(
        "{}{BESIDE_ROOTFS_SUFFIX}",
        dest.file_stem().unwrap_or_default().to_string_lossy()
    );
    adopt_base(overlay, disks_dir, disks_dir, &link_name)?;
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

/// Copies the disk of a VM that goes on running into a saved state, as a qcow2: a qcow2 disk
/// is copied as it is (sparse where the file system allows); a raw one is converted (read as
/// raw, whatever its first bytes say), so a saved state's disk is always a qcow2 smolvm wrote.
pub(crate) async fn copy_for_snapshot(from: &Path, format: DiskFormat, to: &Path) -> Result<()> {
    let mut cmd = match format {
        DiskFormat::Qcow2 => {
            let mut c = tokio::process::Command::new("cp");
            c.args(["--sparse=always", "--reflink=auto"]);
            c
        }
        DiskFormat::Raw => {
            let mut c = tokio::process::Command::new(qemu_img()?);
            c.args(["convert", "-U", "-q", "-f", "raw", "-O", "qcow2"]);
            c
        }
    };
    let out = cmd
        .arg(from)
        .arg(to)
        .output()
        .await
        .map_err(io_err(format!("copying the disk {}", from.display())))?;
    if !out.status.success() {
        return Err(Error::Snapshot(format!(
            "copying the {} disk {} failed: {}",
            format.as_str(),
            from.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
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

    /// Writes `pattern` over 64 KiB at `offset` of a qcow2 with qemu-io.
    fn write(disk: &Path, offset: &str, pattern: &str) {
        let ok = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("write -P {pattern} {offset} 64k"))
            .arg(disk)
            .output()
            .unwrap();
        assert!(ok.status.success(), "{ok:?}");
    }

    /// Whether `disk` reads `pattern` over 64 KiB at `offset`.
    fn reads(disk: &Path, offset: &str, pattern: &str) -> bool {
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("read -P {pattern} {offset} 64k"))
            .arg(disk)
            .output()
            .unwrap();
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("mismatch")
    }

    #[test]
    fn a_flattened_disk_needs_only_the_base_and_keeps_every_layer() {
        if qemu_img().is_err() || crate::util::which("qemu-io").is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.ext4");
        std::fs::write(&base, vec![0u8; 4 << 20]).unwrap();
        // base <- mid (a template's disk) <- top (a VM's overlay, copied for a snapshot).
        let mid = dir.path().join("mid.qcow2");
        let top = dir.path().join("top.qcow2");
        create_overlay(&base, &mid, None).unwrap();
        write(&mid, "0", "0xab");
        write(&mid, "1M", "0xcd");
        let linked = link_backing(&mid, dir.path(), "link.qcow2");
        assert_eq!(linked, dir.path().join("link.qcow2"));
        create_overlay(&linked, &top, None).unwrap();
        write(&top, "1M", "0xef");
        assert_eq!(backing_chain(&top).unwrap().len(), 3);

        flatten_onto_base(&top).unwrap();
        let chain = backing_chain(&top).unwrap();
        assert_eq!(chain.len(), 2, "{chain:?}");
        assert_eq!(chain[1], (base.clone(), DiskFormat::Raw));
        // Without the middle layer: its data and the top's own writes are all there.
        std::fs::remove_file(&mid).unwrap();
        std::fs::remove_file(&linked).unwrap();
        assert!(reads(&top, "0", "0xab"));
        assert!(reads(&top, "1M", "0xef"));
        assert!(reads(&top, "2M", "0"));
        // Flattening what already builds on the base changes nothing.
        flatten_onto_base(&top).unwrap();
        assert!(reads(&top, "0", "0xab"));
        // Adopting: the disk gets its own link to the base, in a directory about to be
        // renamed, and then needs nothing else.
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let snap = work.join("disk.qcow2");
        std::fs::copy(&top, &snap).unwrap();
        let done = dir.path().join("done");
        adopt_base(&snap, &work, &done, ROOTFS_LINK).unwrap();
        assert!(same_file(&work.join(ROOTFS_LINK), &base));
        std::fs::rename(&work, &done).unwrap();
        let snap = done.join("disk.qcow2");
        let chain = backing_chain(&snap).unwrap();
        assert_eq!(chain[1].0, done.join(ROOTFS_LINK), "{chain:?}");
        std::fs::remove_file(&base).unwrap();
        assert!(reads(&snap, "0", "0xab") && reads(&snap, "1M", "0xef"));
        // A missing file is a clear error.
        let err = backing_chain(&dir.path().join("none.qcow2")).unwrap_err();
        assert!(err.to_string().contains("none.qcow2"), "{err}");
    }

    #[test]
    fn a_chain_that_leaves_the_allowed_directories_is_refused_before_it_is_opened() {
        let inside = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let base = outside.path().join("secret.raw");
        std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
        let overlay = inside.path().join("disk.qcow2");
        create_overlay(&base, &overlay, None).unwrap();
        let only_inside = [inside.path().to_path_buf()];
        let e = check_chain(&overlay, DiskFormat::Qcow2, &only_inside)
            .unwrap_err()
            .to_string();
        assert!(e.contains("secret.raw") && e.contains("outside"), "{e}");
        // Allowed where it lies (or named by the user), and a raw disk is its own chain.
        check_chain(
            &overlay,
            DiskFormat::Qcow2,
            &[inside.path().into(), base.clone()],
        )
        .unwrap();
        check_chain(&base, DiskFormat::Raw, &only_inside).unwrap();
    }

    #[test]
    fn a_pinned_format_is_read_and_a_missing_pin_is_made_once() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d");
        std::fs::write(&disk, b"QFI\xfbnot really").unwrap();
        pin_format(dir.path(), DiskFormat::Raw).unwrap();
        // The pin wins over what the first bytes say.
        assert_eq!(pinned_format(dir.path(), &disk).unwrap(), DiskFormat::Raw);
        std::fs::remove_file(dir.path().join(FORMAT_FILE)).unwrap();
        assert_eq!(pinned_format(dir.path(), &disk).unwrap(), DiskFormat::Qcow2);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(FORMAT_FILE)).unwrap(),
            "qcow2"
        );
        std::fs::write(dir.path().join(FORMAT_FILE), "vmdk").unwrap();
        assert!(pinned_format(dir.path(), &disk).is_err());
    }
}

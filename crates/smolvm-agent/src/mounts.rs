//! Filesystems of the guest: the early pseudo filesystems, the root disk, the switch into it
//! and the mounts a Debian userland expects afterwards.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

use crate::error::{AgentError, Result};

/// Where the root disk is mounted before the switch.
pub const NEW_ROOT: &str = "/newroot";

/// Pseudo filesystems carried from the initramfs into the new root.
const CARRIED: [&str; 3] = ["/dev", "/proc", "/sys"];

/// Symlinks a userland expects in /dev that devtmpfs does not create.
const DEV_LINKS: [(&str, &str); 4] = [
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
];

/// Whether something is mounted at `path` (it lies on another device than its parent).
fn is_mount_point(path: &Path) -> bool {
    let parent = path.parent().unwrap_or(Path::new("/"));
    match (fs::metadata(path), fs::metadata(parent)) {
        (Ok(here), Ok(up)) => here.dev() != up.dev(),
        _ => false,
    }
}

/// Mounts `fstype` at `target` unless something already is mounted there.
fn mount_once(source: &str, target: &str, fstype: &str, flags: MsFlags, data: &str) -> Result<()> {
    let path = Path::new(target);
    if is_mount_point(path) {
        return Ok(());
    }
    // A failure here shows up as ENOENT from mount, with a clearer message.
    let _ = fs::create_dir_all(path);
    let data = (!data.is_empty()).then_some(data);
    mount(Some(source), target, Some(fstype), flags, data)
        .map_err(|e| AgentError::sys(format!("mount {fstype} on {target}"), e))
}

/// Mounts devtmpfs on /dev (the console needs it, so this may run before logging exists).
pub fn mount_dev() -> Result<()> {
    mount_once(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        "mode=0755",
    )
}

/// Mounts /dev, /proc and /sys in the initramfs.
pub fn mount_early() -> Result<()> {
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_dev()?;
    mount_once("proc", "/proc", "proc", hardened, "")?;
    mount_once("sysfs", "/sys", "sysfs", hardened, "")
}

/// Splits `rootflags` into mount flags and the filesystem-specific data string.
pub fn parse_mount_options(options: Option<&str>) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data: Vec<&str> = Vec::new();
    for opt in options.unwrap_or("").split(',').filter(|o| !o.is_empty()) {
        match opt {
            "defaults" => {}
            "rw" => flags.remove(MsFlags::MS_RDONLY),
            "ro" => flags.insert(MsFlags::MS_RDONLY),
            "noatime" => flags.insert(MsFlags::MS_NOATIME),
            "nodiratime" => flags.insert(MsFlags::MS_NODIRATIME),
            "relatime" => flags.insert(MsFlags::MS_RELATIME),
            "strictatime" => flags.insert(MsFlags::MS_STRICTATIME),
            "lazytime" => flags.insert(MsFlags::MS_LAZYTIME),
            "nosuid" => flags.insert(MsFlags::MS_NOSUID),
            "nodev" => flags.insert(MsFlags::MS_NODEV),
            "noexec" => flags.insert(MsFlags::MS_NOEXEC),
            "sync" => flags.insert(MsFlags::MS_SYNCHRONOUS),
            "dirsync" => flags.insert(MsFlags::MS_DIRSYNC),
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

/// Mounts the root disk at [`NEW_ROOT`].
pub fn mount_root(device: &str, fstype: &str, options: Option<&str>) -> Result<()> {
    let (flags, data) = parse_mount_options(options);
    fs::create_dir_all(NEW_ROOT).map_err(|e| AgentError::io(format!("create {NEW_ROOT}"), e))?;
    let data = (!data.is_empty()).then_some(data.as_str());
    mount(Some(device), NEW_ROOT, Some(fstype), flags, data)
        .map_err(|e| AgentError::sys(format!("mount {device} ({fstype}) on {NEW_ROOT}"), e))
}

/// Makes [`NEW_ROOT`] the root: carries /dev, /proc and /sys over, moves the new root onto `/`
/// and chroots into it (what busybox `switch_root` does, minus emptying the initramfs).
pub fn switch_root() -> Result<()> {
    for dir in CARRIED {
        let target = format!("{NEW_ROOT}{dir}");
        let _ = fs::create_dir_all(&target);
        if let Err(e) = mount(
            Some(dir),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        ) {
            if dir == "/dev" {
                return Err(AgentError::sys(format!("move /dev to {target}"), e));
            }
            // /proc and /sys are mounted afresh in the new root.
            tracing::warn!(
                "cannot move {dir} to {target} ({}); remounting it later",
                e.desc()
            );
        }
    }
    nix::unistd::chdir(NEW_ROOT).map_err(|e| AgentError::sys(format!("chdir {NEW_ROOT}"), e))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| AgentError::sys(format!("move {NEW_ROOT} onto /"), e))?;
    nix::unistd::chroot(".").map_err(|e| AgentError::sys("chroot into the new root", e))?;
    nix::unistd::chdir("/").map_err(|e| AgentError::sys("chdir / in the new root", e))
}

/// Mounts what a userland expects once the real root is in place, and the /dev symlinks.
pub fn mount_late() -> Result<()> {
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let scratch = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_once("proc", "/proc", "proc", hardened, "")?;
    mount_once("sysfs", "/sys", "sysfs", hardened, "")?;
    mount_once(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    )?;
    mount_once("shm", "/dev/shm", "tmpfs", scratch, "mode=1777")?;
    mount_once("tmpfs", "/tmp", "tmpfs", scratch, "mode=1777")?;
    mount_once("tmpfs", "/run", "tmpfs", scratch, "mode=0755")?;
    for (link, target) in DEV_LINKS {
        if fs::symlink_metadata(link).is_err() {
            if let Err(e) = symlink(target, link) {
                tracing::warn!("cannot create {link} -> {target}: {e}");
            }
        }
    }
    Ok(())
}

/// Flushes and remounts the root read-only, for a clean power-off. Best effort.
pub fn quiesce_root() {
    nix::unistd::sync();
    let flags = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    match mount(None::<&str>, "/", None::<&str>, flags, None::<&str>) {
        Ok(()) | Err(Errno::EINVAL) => {}
        Err(e) => tracing::warn!("cannot remount / read-only: {}", e.desc()),
    }
    nix::unistd::sync();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_options_split_into_flags_and_data() {
        let (flags, data) =
            parse_mount_options(Some("noatime,ro,errors=remount-ro,nodev,commit=30"));
        assert_eq!(
            flags,
            MsFlags::MS_NOATIME | MsFlags::MS_RDONLY | MsFlags::MS_NODEV
        );
        assert_eq!(data, "errors=remount-ro,commit=30");
    }

    #[test]
    fn rw_overrides_an_earlier_ro() {
        let (flags, data) = parse_mount_options(Some("ro,rw,,defaults"));
        assert!(flags.is_empty());
        assert!(data.is_empty());
        assert_eq!(parse_mount_options(None), (MsFlags::empty(), String::new()));
    }

    #[test]
    fn root_is_not_a_mount_point_of_itself_but_proc_is() {
        assert!(!is_mount_point(Path::new("/")));
        assert!(is_mount_point(Path::new("/proc")));
    }
}

//! The root filesystem: a minimal Debian made by `mmdebstrap`, set up for smolvm, and turned
//! into a raw ext4 image by `mkfs.ext4 -d` (no mounting, no loop devices).

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::error::ImageError;
use crate::sources::Sources;
use crate::tools::{self, MKFS_EXT4, MMDEBSTRAP};

/// The Debian release the root filesystem (and the kernel's apt lists) come from.
pub const DEBIAN_SUITE: &str = "bookworm";

/// Packages installed on top of `minbase`. `openssh-server` is there for images derived with
/// [`crate::build_ssh_image`]; the guest agent starts it only in those (see [`SSHD_MARKER`]).
pub const BASE_PACKAGES: &[&str] = &[
    "python3",
    "ca-certificates",
    "procps",
    "iproute2",
    "openssh-server",
];

/// The file whose presence makes the guest agent start `sshd` at boot. The base image does
/// not have it; [`crate::build_ssh_image`] adds it with the keys.
pub const SSHD_MARKER: &str = "/etc/smolvm/sshd";

/// Where the guest agent is installed inside the root filesystem.
pub const AGENT_PATH: &str = "/usr/local/sbin/smolvm-agent";

/// The guest's hostname, written to `/etc/hostname`.
pub const HOSTNAME: &str = "smolvm";

/// What `/etc/resolv.conf` holds until the guest agent writes the VM's name servers.
pub const RESOLV_CONF_PLACEHOLDER: &str =
    "# smolvm: the guest agent writes this VM's name servers here at boot.\n";

/// The ext4 volume label of the root filesystem.
pub const VOLUME_LABEL: &str = "smolvm-root";

/// Runs `mmdebstrap` to build a minimal Debian with `packages` into `dir`, passing each
/// line of its progress output to `on_line`.
pub fn bootstrap(
    dir: &Path,
    packages: &[String],
    sources: &Sources,
    on_line: impl FnMut(&str),
) -> Result<(), ImageError> {
    let mut cmd = tools::command(MMDEBSTRAP)?;
    cmd.args(["--variant=minbase", "--architectures=amd64"])
        .arg(format!("--include={}", packages.join(",")))
        .arg(DEBIAN_SUITE)
        .arg(dir)
        .args(&sources.lines);
    // mmdebstrap reads extra sources from standard input when it is not a terminal;
    // tools::command gives it /dev/null.
    tools::run_streaming(&mut cmd, on_line)
}

/// Installs the agent and sets up identity files; removes apt's caches to shrink the image.
pub fn configure(dir: &Path, agent: &[u8]) -> Result<(), ImageError> {
    write_file(dir, AGENT_PATH, agent, 0o755)?;
    write_file(
        dir,
        "/etc/hostname",
        format!("{HOSTNAME}\n").as_bytes(),
        0o644,
    )?;
    let hosts = format!(
        "127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
    );
    write_file(dir, "/etc/hosts", hosts.as_bytes(), 0o644)?;
    // mmdebstrap leaves the build host's resolv.conf behind; the guest's name servers
    // depend on its network and are written at boot.
    write_file(
        dir,
        "/etc/resolv.conf",
        RESOLV_CONF_PLACEHOLDER.as_bytes(),
        0o644,
    )?;
    // An empty machine-id: each guest gets its own identity at boot.
    write_file(dir, "/etc/machine-id", b"", 0o444)?;
    let dbus_id = dir.join("var/lib/dbus/machine-id");
    if dbus_id.symlink_metadata().is_ok() {
        std::fs::remove_file(&dbus_id).map_err(ImageError::io("cannot remove", &dbus_id))?;
    }
    let root_home = dir.join("root");
    std::fs::create_dir_all(&root_home).map_err(ImageError::io("cannot create", &root_home))?;
    set_mode(&root_home, 0o700)?;
    for cache in ["var/lib/apt/lists", "var/cache/apt"] {
        clear_files(&dir.join(cache))?;
    }
    remove_host_keys(dir)
}

/// Removes the SSH host keys `openssh-server`'s postinst generated: every VM of every image
/// would share them. An SSH image gets its own key, made on the host and pinned.
fn remove_host_keys(dir: &Path) -> Result<(), ImageError> {
    let ssh_dir = dir.join("etc/ssh");
    let Ok(entries) = std::fs::read_dir(&ssh_dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(ImageError::io("cannot remove", &path))?;
        }
    }
    let marker = dir.join(SSHD_MARKER.trim_start_matches('/'));
    if marker.symlink_metadata().is_ok() {
        std::fs::remove_file(&marker).map_err(ImageError::io("cannot remove", &marker))?;
    }
    Ok(())
}

/// Writes `rel` (an absolute path inside the root) with `mode`, replacing whatever was
/// there: a symlink is removed first, never followed out of the root.
fn write_file(root: &Path, rel: &str, data: &[u8], mode: u32) -> Result<(), ImageError> {
    let path = root.join(rel.trim_start_matches('/'));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(ImageError::io("cannot create", parent))?;
    }
    if path.symlink_metadata().is_ok() {
        std::fs::remove_file(&path).map_err(ImageError::io("cannot replace", &path))?;
    }
    std::fs::write(&path, data).map_err(ImageError::io("cannot write", &path))?;
    set_mode(&path, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(ImageError::io("cannot set permissions of", path))
}

/// Removes the regular files under `dir` (keeping directories such as `partial/`).
fn clear_files(dir: &Path) -> Result<(), ImageError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_dir {
            clear_files(&path)?;
        } else if entry.file_name() != "lock" {
            std::fs::remove_file(&path).map_err(ImageError::io("cannot remove", &path))?;
        }
    }
    Ok(())
}

/// Estimates the ext4 size in MiB needed to hold `dir`: its allocated blocks (hard links
/// counted once) plus room for the journal, inode tables and directories.
pub fn needed_mib(dir: &Path) -> Result<u64, ImageError> {
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut seen = HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        let entries =
            std::fs::read_dir(&current).map_err(ImageError::io("cannot list", &current))?;
        for entry in entries {
            let entry = entry.map_err(ImageError::io("cannot list", &current))?;
            let path = entry.path();
            let meta = path
                .symlink_metadata()
                .map_err(ImageError::io("cannot inspect", &path))?;
            if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            inodes += 1;
            bytes += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    let data_mib = bytes.div_ceil(1 << 20);
    // ~10% for ext4 metadata and block rounding, 256 bytes per inode, 64 MiB for the
    // journal and the rest.
    Ok(data_mib + data_mib / 10 + (inodes * 256).div_ceil(1 << 20) + 64)
}

/// Turns `dir` into a raw ext4 image of `size_mib` MiB at `image`.
pub fn make_ext4(dir: &Path, image: &Path, size_mib: u64) -> Result<(), ImageError> {
    let needed = needed_mib(dir)?;
    if needed > size_mib {
        return Err(ImageError::RootfsTooSmall {
            needed_mib: needed,
            size_mib,
        });
    }
    let mut cmd = tools::command(MKFS_EXT4)?;
    cmd.args(["-q", "-F", "-L", VOLUME_LABEL, "-d"])
        .arg(dir)
        .arg(image)
        .arg(format!("{size_mib}M"));
    tools::run(&mut cmd).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configure_installs_agent_and_identity_without_following_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("var/lib/apt/lists/partial")).unwrap();
        std::fs::write(root.join("var/lib/apt/lists/deb_Packages"), b"x").unwrap();
        std::fs::write(root.join("var/lib/apt/lists/lock"), b"").unwrap();
        std::fs::write(&outside, b"host file").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("etc/hosts")).unwrap();
        std::fs::create_dir_all(root.join("etc/ssh/sshd_config.d")).unwrap();
        for key in [
            "ssh_host_ed25519_key",
            "ssh_host_ed25519_key.pub",
            "ssh_host_rsa_key",
        ] {
            std::fs::write(root.join("etc/ssh").join(key), b"key").unwrap();
        }
        std::fs::write(root.join("etc/ssh/sshd_config"), b"# config").unwrap();

        configure(&root, b"agent").unwrap();

        assert_eq!(std::fs::read(&outside).unwrap(), b"host file");
        assert!(std::fs::read_to_string(root.join("etc/hosts"))
            .unwrap()
            .contains("127.0.1.1\tsmolvm"));
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "smolvm\n"
        );
        let agent = root.join("usr/local/sbin/smolvm-agent");
        assert_eq!(std::fs::read(&agent).unwrap(), b"agent");
        assert_eq!(
            std::fs::metadata(&agent).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        assert_eq!(std::fs::read(root.join("etc/machine-id")).unwrap(), b"");
        assert_eq!(
            std::fs::read_to_string(root.join("etc/resolv.conf")).unwrap(),
            RESOLV_CONF_PLACEHOLDER
        );
        assert!(root.join("root").is_dir());
        assert!(!root.join("var/lib/apt/lists/deb_Packages").exists());
        assert!(root.join("var/lib/apt/lists/partial").is_dir());
        assert!(root.join("var/lib/apt/lists/lock").exists());
        let mut left: Vec<_> = std::fs::read_dir(root.join("etc/ssh"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["sshd_config", "sshd_config.d"]);
        assert!(!root.join("etc/smolvm/sshd").exists());
    }

    #[test]
    fn needed_size_counts_contents() {
        let tmp = tempfile::tempdir().unwrap();
        let empty = needed_mib(tmp.path()).unwrap();
        assert!((64..70).contains(&empty), "{empty}");
        std::fs::write(tmp.path().join("big"), vec![1u8; 20 << 20]).unwrap();
        std::fs::hard_link(tmp.path().join("big"), tmp.path().join("link")).unwrap();
        let with_file = needed_mib(tmp.path()).unwrap();
        assert!((84..95).contains(&with_file), "{with_file}");
    }

    #[test]
    fn too_small_disk_is_reported_before_mkfs() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("big"), vec![1u8; 20 << 20]).unwrap();
        let err = make_ext4(tmp.path(), &tmp.path().join("img"), 32).unwrap_err();
        assert!(
            matches!(err, ImageError::RootfsTooSmall { size_mib: 32, .. }),
            "{err}"
        );
    }

    #[test]
    fn small_directory_becomes_an_ext4_image() {
        if let Err(e) = tools::find(MKFS_EXT4) {
            panic!("this test needs mkfs.ext4 (e2fsprogs; run scripts/install-deps): {e}");
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dir");
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(dir.join("etc/hostname"), b"smolvm\n").unwrap();
        let image = tmp.path().join("rootfs.ext4");
        make_ext4(&dir, &image, 80).unwrap();
        let data = std::fs::read(&image).unwrap();
        assert_eq!(data.len(), 80 << 20);
        // ext4 superblock magic at 1024 + 0x38, volume label at 1024 + 0x78.
        assert_eq!(&data[1024 + 0x38..1024 + 0x3a], &[0x53, 0xef]);
        assert!(data[1024 + 0x78..].starts_with(VOLUME_LABEL.as_bytes()));
    }
}

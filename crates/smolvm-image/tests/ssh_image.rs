//! SSH images derived from the real default image (built beforehand by
//! `target/release/smolvm image build`), into a temporary images directory: the files in the
//! ext4 image, their modes, the pinned host key, idempotence, growth and the refusals.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use smolvm_image::ssh::{AUTHORIZED_KEYS_PATH, GUEST_ROOT_HOME, GUEST_SSH_DIR};
use smolvm_image::{build_ssh_image, ensure_ssh_key, ImageError, KNOWN_HOSTS_FILE};

/// A temporary images directory whose `default` holds links to the real default image.
fn images_with_default() -> tempfile::TempDir {
    let real = smolvm_image::default_images_dir().join("default");
    let base =
        smolvm_image::open(&smolvm_image::default_images_dir(), "default").unwrap_or_else(|e| {
            panic!("{e}\nbuild the default image first: target/release/smolvm image build")
        });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("default");
    std::fs::create_dir(&dir).unwrap();
    for file in ["vmlinux", "initrd.cpio", "rootfs.ext4", "manifest.json"] {
        if std::fs::hard_link(real.join(file), dir.join(file)).is_err() {
            std::os::unix::fs::symlink(real.join(file), dir.join(file)).unwrap();
        }
    }
    assert!(base.rootfs.is_file());
    tmp
}

fn user_key(tmp: &Path) -> (PathBuf, String) {
    let (_, public) = ensure_ssh_key(&tmp.join("keys")).unwrap();
    let text = std::fs::read_to_string(&public).unwrap();
    (public, text.trim().to_string())
}

fn debugfs(image: &Path, request: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .env("DEBUGFS_PAGER", "__none__")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .expect("run debugfs");
    assert!(out.status.success(), "debugfs -R {request:?}");
    out.stdout
}

fn cat(image: &Path, path: &str) -> String {
    String::from_utf8(debugfs(image, &format!("cat {path}"))).unwrap()
}

/// `(type, mode, uid, gid)` of `path` in the ext4 `image`.
fn stat(image: &Path, path: &str) -> (String, u32, u32, u32) {
    let text = String::from_utf8_lossy(&debugfs(image, &format!("stat {path}"))).into_owned();
    let words: Vec<&str> = text.split_whitespace().collect();
    let after = |label: &str| {
        let i = words
            .iter()
            .position(|w| *w == label)
            .unwrap_or_else(|| panic!("{path}: no {label} in {text:?}"));
        words[i + 1].to_string()
    };
    (
        after("Type:"),
        u32::from_str_radix(&after("Mode:"), 8).unwrap(),
        after("User:").parse().unwrap(),
        after("Group:").parse().unwrap(),
    )
}

fn fsck_clean(image: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn {}: {}",
        image.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

fn public_of(private_key_text: &str, tmp: &Path) -> String {
    let path = tmp.join("dumped_host_key");
    std::fs::write(&path, private_key_text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(&path)
        .output()
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn derived_image_holds_the_keys_with_their_modes_and_is_stable() {
    let images = images_with_default();
    let dir = images.path();
    let (public_path, key) = user_key(dir);

    let started = Instant::now();
    let image = build_ssh_image(
        dir,
        "default",
        "sshbox",
        &public_path.display().to_string(),
        None,
    )
    .unwrap();
    eprintln!("derived in {:.2} s", started.elapsed().as_secs_f64());
    let rootfs = &image.rootfs;
    assert_eq!(image.dir, dir.join("sshbox"));

    // The files, their contents and modes, all root's.
    assert_eq!(cat(rootfs, AUTHORIZED_KEYS_PATH), format!("{key}\n"));
    assert_eq!(
        cat(rootfs, "/etc/ssh/sshd_config.d/smolvm.conf"),
        smolvm_image::ssh::SSHD_CONFIG
    );
    assert!(
        cat(rootfs, "/etc/ssh/sshd_config.d/smolvm.conf").contains("PasswordAuthentication no\n")
    );
    for (path, kind, mode) in [
        (GUEST_ROOT_HOME, "directory", 0o700),
        (GUEST_SSH_DIR, "directory", 0o700),
        (AUTHORIZED_KEYS_PATH, "regular", 0o600),
        ("/etc/ssh/ssh_host_ed25519_key", "regular", 0o600),
        ("/etc/ssh/ssh_host_ed25519_key.pub", "regular", 0o644),
        ("/etc/ssh/sshd_config.d/smolvm.conf", "regular", 0o644),
        ("/etc/smolvm/sshd", "regular", 0o644),
    ] {
        assert_eq!(stat(rootfs, path), (kind.to_string(), mode, 0, 0), "{path}");
    }
    fsck_clean(rootfs);

    // known_hosts pins the host key that is in the image.
    let known_hosts = std::fs::read_to_string(image.dir.join(KNOWN_HOSTS_FILE)).unwrap();
    let host_public = known_hosts
        .strip_prefix("smolvm-sshbox ")
        .unwrap_or_else(|| panic!("{known_hosts:?}"))
        .trim()
        .to_string();
    assert!(host_public.starts_with("ssh-ed25519 AAAA"), "{host_public}");
    assert_eq!(known_hosts.lines().count(), 1);
    let private = cat(rootfs, "/etc/ssh/ssh_host_ed25519_key");
    assert!(private.contains("OPENSSH PRIVATE KEY"));
    assert_eq!(public_of(&private, dir), host_public);
    assert!(cat(rootfs, "/etc/ssh/ssh_host_ed25519_key.pub").starts_with(&host_public));
    let ssh = image
        .manifest
        .ssh
        .clone()
        .expect("manifest records the SSH part");
    assert_eq!(ssh.base, "default");
    assert_eq!(ssh.host_key, host_public);
    assert_eq!(ssh.authorized_key, key);
    assert_eq!(ssh.host_key_alias, "smolvm-sshbox");

    // A normal image to the store: listed, opened, checksums right, read-only rootfs.
    let names: Vec<String> = smolvm_image::list(dir)
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["default", "sshbox"]);
    let opened = smolvm_image::open(dir, "sshbox").unwrap();
    opened.verify().unwrap();
    // The root filesystem holds the private host key: the owner's only.
    assert_eq!(std::fs::metadata(rootfs).unwrap().mode() & 0o777, 0o400);
    assert_eq!(std::fs::metadata(&image.dir).unwrap().mode() & 0o777, 0o700);
    let hint = smolvm_image::ssh_command_hint(&image, Path::new("/k"), "127.0.0.1", 22);
    assert!(hint.contains("HostKeyAlias=smolvm-sshbox"), "{hint}");

    // The same call again: the same image, untouched.
    let mtime = std::fs::metadata(rootfs).unwrap().mtime();
    let again = build_ssh_image(dir, "default", "sshbox", &key, None).unwrap();
    assert_eq!(again.manifest, image.manifest);
    assert_eq!(std::fs::metadata(rootfs).unwrap().mtime(), mtime);
    assert_eq!(
        std::fs::read_to_string(again.dir.join(KNOWN_HOSTS_FILE)).unwrap(),
        known_hosts
    );

    // Smaller than the base: refused, the image stays.
    let base_mib = std::fs::metadata(dir.join("default/rootfs.ext4"))
        .unwrap()
        .len()
        >> 20;
    let err = build_ssh_image(dir, "default", "sshbox", &key, Some(base_mib - 1)).unwrap_err();
    assert!(matches!(err, ImageError::InvalidRootfsSize { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("at least {base_mib} MiB")),
        "{err}"
    );
    assert!(err.is_usage());
    assert_eq!(
        smolvm_image::open(dir, "sshbox").unwrap().manifest,
        image.manifest
    );

    // Bigger, with another key: rebuilt, grown, clean, and the host key is kept.
    let other =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFd4pUpYtFzs2D2xMkdoQ8bp6cxxwXYCBGFULVgmyrpP other";
    let started = Instant::now();
    let grown = build_ssh_image(dir, "default", "sshbox", other, Some(base_mib + 512)).unwrap();
    eprintln!(
        "derived with growth to {} MiB in {:.2} s",
        base_mib + 512,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        std::fs::metadata(&grown.rootfs).unwrap().len(),
        (base_mib + 512) << 20
    );
    fsck_clean(&grown.rootfs);
    assert_eq!(
        cat(&grown.rootfs, AUTHORIZED_KEYS_PATH),
        format!("{other}\n")
    );
    assert_eq!(
        std::fs::read_to_string(grown.dir.join(KNOWN_HOSTS_FILE)).unwrap(),
        known_hosts
    );
    assert_eq!(grown.manifest.rootfs_size_mib, base_mib + 512);
    let dumpe2fs = Command::new("dumpe2fs")
        .arg("-h")
        .arg(&grown.rootfs)
        .output()
        .unwrap();
    let header = String::from_utf8_lossy(&dumpe2fs.stdout);
    let blocks: u64 = header
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        blocks * 4096,
        (base_mib + 512) << 20,
        "filesystem fills the file"
    );

    // Nothing but the images and their locks is left in the images directory.
    let mut left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    left.sort();
    assert_eq!(left, ["default", "keys", "sshbox"]);
}

#[test]
fn concurrent_builds_of_one_name_make_one_image() {
    let images = images_with_default();
    let dir = images.path();
    let (_, key) = user_key(dir);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| s.spawn(|| build_ssh_image(dir, "default", "twin", &key, None)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let images: Vec<_> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(images[0].manifest, images[1].manifest);
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".build-") || n.contains(".old-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn refusals_say_what_to_do() {
    let images = images_with_default();
    let dir = images.path();
    let (_, key) = user_key(dir);

    let empty = tempfile::tempdir().unwrap();
    let err = build_ssh_image(empty.path(), "default", "box", &key, None).unwrap_err();
    assert!(matches!(err, ImageError::NotFound { .. }), "{err}");
    assert!(
        err.to_string().contains("smolvm image build default"),
        "{err}"
    );

    let err = build_ssh_image(dir, "default", "default", &key, None).unwrap_err();
    assert!(matches!(err, ImageError::InvalidBase { .. }), "{err}");

    let err = build_ssh_image(dir, "default", "bad/name", &key, None).unwrap_err();
    assert!(matches!(err, ImageError::InvalidName { .. }), "{err}");

    let err = build_ssh_image(dir, "default", "box", "ssh-ed25519 AAAA", None).unwrap_err();
    assert!(matches!(err, ImageError::InvalidSshKey { .. }), "{err}");

    // An SSH image is no base, and a plain image is never overwritten.
    build_ssh_image(dir, "default", "box", &key, None).unwrap();
    let err = build_ssh_image(dir, "box", "box2", &key, None).unwrap_err();
    assert!(err.to_string().contains("is an SSH image itself"), "{err}");
    std::fs::create_dir(dir.join("plain")).unwrap();
    for file in ["vmlinux", "initrd.cpio", "rootfs.ext4", "manifest.json"] {
        std::fs::hard_link(dir.join("default").join(file), dir.join("plain").join(file)).unwrap();
    }
    let err = build_ssh_image(dir, "default", "plain", &key, None).unwrap_err();
    assert!(matches!(err, ImageError::NotAnSshImage { .. }), "{err}");
    assert!(dir.join("plain/rootfs.ext4").is_file());

    // A base made before openssh-server was in the image: rebuild it.
    let old = dir.join("old");
    std::fs::create_dir_all(old.join("root/etc")).unwrap();
    for file in ["vmlinux", "initrd.cpio"] {
        std::fs::hard_link(dir.join("default").join(file), old.join(file)).unwrap();
    }
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(old.join("root"))
        .arg(old.join("rootfs.ext4"))
        .arg("16M")
        .status()
        .unwrap();
    assert!(status.success());
    let mut manifest = smolvm_image::open(dir, "default").unwrap().manifest;
    manifest.files.rootfs.size = 16 << 20;
    manifest.save(&old).unwrap();
    let err = build_ssh_image(dir, "old", "box3", &key, None).unwrap_err();
    assert!(
        err.to_string()
            .contains("no SSH server (/usr/sbin/sshd; made by an older smolvm): rebuild it with `smolvm image build old`"),
        "{err}"
    );
}

//! A disk's format is pinned when the VM is made and never probed again: a guest that can
//! write a raw disk (`--disk-mode shared --rootfs RAW`) and writes a qcow2 header onto it,
//! naming a host file as its backing file, must never get QEMU (or `qemu-img`) to open that
//! file: not on the next start, not in a snapshot.

mod common;

use common::*;
use smolvm::{DiskMode, Paths, VmConfig};

/// A qcow2 (version 2) header whose backing file is `backing`, for a disk of `size` bytes; its
/// tables point at the end of a 1 GiB disk, where the root file system holds only zeros, so
/// QEMU would take every cluster for unallocated and read the backing file.
fn qcow2_header(backing: &str, size: u64) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    let end = 1u64 << 30;
    h[0..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&2u32.to_be_bytes());
    h[8..16].copy_from_slice(&256u64.to_be_bytes()); // backing file name offset
    h[16..20].copy_from_slice(&(backing.len() as u32).to_be_bytes());
    h[20..24].copy_from_slice(&16u32.to_be_bytes()); // 64 KiB clusters
    h[24..32].copy_from_slice(&size.to_be_bytes());
    h[36..40].copy_from_slice(&1u32.to_be_bytes()); // L1 entries
    h[40..48].copy_from_slice(&(end - (64 << 10)).to_be_bytes()); // L1 table
    h[48..56].copy_from_slice(&(end - (128 << 10)).to_be_bytes()); // refcount table
    h[56..60].copy_from_slice(&1u32.to_be_bytes());
    h[256..256 + backing.len()].copy_from_slice(backing.as_bytes());
    h
}

#[test]
fn a_qcow2_header_a_guest_writes_onto_its_raw_disk_is_never_followed() {
    let work = smolvm_testing::short_tempdir();
    // The host file the guest will name: the test's own, so nothing real is at stake.
    let secret = work.path().join("host-secret");
    std::fs::write(&secret, "HOST-SECRET ".repeat(8192)).unwrap();
    // A raw root file system of the VM's own, written in place (shared mode).
    let raw = work.path().join("disk.raw");
    let image_rootfs = Paths::from_env().images_dir.join("default/rootfs.ext4");
    let cp = std::process::Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(&image_rootfs)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(cp.success(), "copying {}", image_rootfs.display());
    let size = std::fs::metadata(&raw).unwrap().len();
    assert_eq!(size, 1 << 30, "the test's header assumes a 1 GiB image");
    let vm = boot(VmConfig {
        disk_mode: DiskMode::Shared,
        rootfs_path: Some(raw.clone()),
        ..small()
    });

    // As root in the guest: a qcow2 header on sector 0 (ext4 leaves its first KiB unused).
    let header = qcow2_header(secret.to_str().unwrap(), 64 << 20);
    // Octal escapes: the guest's /bin/sh printf knows no \x.
    let escaped: String = header.iter().map(|b| format!("\\{b:03o}")).collect();
    sh(
        &vm,
        &format!(
            "printf '{escaped}' | dd of=/dev/vda bs=512 count=1 conv=notrunc,fsync 2>/dev/null && sync"
        ),
    );
    let magic = "head -c 4 /dev/vda | od -An -c | tr -d ' \\n'";
    assert_eq!(sh(&vm, magic), "QFI373");
    assert_eq!(
        std::fs::read(&raw).unwrap()[..4],
        *b"QFI\xfb",
        "the header is on the host file"
    );
    // The guest "reboots"; the next start must read the disk as the raw disk it was made as.
    vm.stop(true).unwrap();
    start(&vm);
    assert_eq!(sh(&vm, magic), "QFI373", "the guest sees its own bytes");
    assert_eq!(
        sh(&vm, "blockdev --getsize64 /dev/vda").trim(),
        size.to_string(),
        "the disk's own size, not the header's"
    );
    assert!(!sh(&vm, "head -c 65536 /dev/vda").contains("HOST-SECRET"));

    // A snapshot of it is a qcow2 smolvm wrote, linking nothing the guest named.
    let saved = vm.snapshot("hdr-attack").unwrap();
    let chain = smolvm::disk::backing_chain(&saved.disk()).unwrap();
    assert_eq!(chain.len(), 1, "{chain:?}");
    for entry in std::fs::read_dir(&saved.dir).unwrap().flatten() {
        assert!(
            !smolvm::disk::same_file(&entry.path(), &secret),
            "{} is the host file",
            entry.path().display()
        );
    }
    vm.delete().unwrap();
    runtime().remove_snapshot("hdr-attack").unwrap();
}

#[test]
fn an_image_root_file_system_cannot_be_a_shared_disk() {
    let image_rootfs = Paths::from_env().images_dir.join("default/rootfs.ext4");
    let before = runtime().list().unwrap().len();
    let e = runtime()
        .create(VmConfig {
            disk_mode: DiskMode::Shared,
            rootfs_path: Some(image_rootfs),
            ..small()
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rootfs_path") && e.contains("image store"),
        "{e}"
    );
    assert_eq!(runtime().list().unwrap().len(), before, "nothing was made");
}

//! `smolvm create --from-snapshot NAME` with every other option: each is honoured or refused
//! (exit 2, naming the option and its value), by the runtime's rules (see
//! `smolvm::SnapshotOverrides`); a refusal leaves no VM row and no VM directory. One snapshot
//! (of a small VM on user-mode networking, with an environment variable) serves the file.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::*;
use smolvm::{NetworkMode, VmConfig};

/// The file's snapshot: its name (the VM it was taken from is gone).
fn snapshot() -> &'static str {
    static NAME: OnceLock<&'static str> = OnceLock::new();
    NAME.get_or_init(|| {
        let vm = boot(VmConfig {
            network: NetworkMode::User,
            env_vars: [("KEPT".to_string(), "from-source".to_string())].into(),
            ..small()
        });
        sh(&vm, "echo saved > /var/tmp/mark");
        vm.snapshot("fs").expect("snapshot");
        vm.delete().unwrap();
        "fs"
    })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A state directory of its own that sees the file's snapshots (a link to them) and holds
/// no VM, so a refusal can be checked to leave nothing, while other tests make VMs.
fn empty_home() -> &'static PathBuf {
    static HOME: OnceLock<PathBuf> = OnceLock::new();
    HOME.get_or_init(|| {
        snapshot();
        let home = state_dir().join("refusals");
        std::fs::create_dir_all(&home).unwrap();
        std::os::unix::fs::symlink(state_dir().join("snapshots"), home.join("snapshots")).unwrap();
        home
    })
}

fn smolvm_in(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin())
        .args(args)
        .env("SMOLVM_HOME", home)
        .output()
        .expect("run smolvm")
}

/// No VM is recorded and no VM directory exists in `home`.
fn nothing_in(home: &std::path::Path) {
    let out = smolvm_in(home, &["ls", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().map(|a| a.len()), Some(0), "VMs left: {v}");
    let left: Vec<_> = std::fs::read_dir(home.join("vms"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "VM directories left: {left:?}");
}

#[test]
fn options_a_restored_vm_cannot_have_are_refused_naming_them_and_leave_nothing() {
    let home = empty_home();
    let file = state_dir().join("some-file");
    std::fs::write(&file, b"x").unwrap();
    let file = file.display().to_string();
    // (flags, the option named, the value named)
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (vec!["--cpus", "2"], "vcpu_count", "2"),
        (vec!["--memory", "1024"], "mem_size_mib", "1024"),
        (vec!["--image", "other"], "image", "other"),
        (vec!["--boot-args", "loglevel=7"], "boot_args", "loglevel=7"),
        (vec!["--disk-size", "4096"], "disk_size_mib", "4096"),
        (vec!["--disk-mode", "shared"], "disk_mode", "shared"),
        (vec!["--disk", &file], "disk_path", &file),
        (vec!["--kernel", &file], "kernel_path", &file),
        (vec!["--initrd", &file], "initrd_path", &file),
        (vec!["--rootfs", &file], "rootfs_path", &file),
        (vec!["--cold"], "snapshot", "false"),
        // Taken on user mode: its saved state holds slirp's.
        (vec!["--network", "none"], "network", "none"),
        // Honoured options with values no VM may have: the usual errors.
        (vec!["--name", "Not An Id"], "vm_id", "Not An Id"),
        (vec!["--env", "1X=y"], "env_vars", "1X"),
        (
            vec!["--network", "carrier-pigeon"],
            "network",
            "carrier-pigeon",
        ),
        (vec!["--egress", "maybe"], "egress", "maybe"),
        (
            vec!["--network", "user", "--allow", "203.0.113.0/24"],
            "allow_egress",
            "203.0.113.0/24",
        ),
        (
            vec!["--network", "user", "--deny", "203.0.113.0/24"],
            "deny_egress",
            "203.0.113.0/24",
        ),
    ];
    for (flags, option, value) in cases {
        let mut args = vec!["create", "--from-snapshot", snapshot()];
        args.extend(&flags);
        let out = smolvm_in(home, &args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(option), "{flags:?}: {option} not in {err}");
        assert!(err.contains(value), "{flags:?}: {value} not in {err}");
        nothing_in(home);
    }
    // A snapshot that does not exist: named, nothing made.
    let out = smolvm_in(home, &["create", "--from-snapshot", "nope", "--cpus", "1"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("nope"), "{}", text(&out.stderr));
    nothing_in(home);
}

#[test]
fn the_snapshots_own_values_and_the_honoured_options_apply() {
    let snap = snapshot();
    // The snapshot's own shape, image and mode are accepted as they are.
    let out = cli(&[
        "create",
        "--from-snapshot",
        snap,
        "--name",
        "fs-copy",
        "--env",
        "ADDED=yes",
        "--env",
        "KEPT=overridden",
        "--retain-disk",
        "--network",
        "user",
        "--egress",
        "deny",
        "--cpus",
        "1",
        "--memory",
        "256",
        "--image",
        "default",
        "--disk-mode",
        "isolated",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "fs-copy");
    let vm = runtime().get("fs-copy").unwrap();
    let rec = vm.info().unwrap();
    assert_eq!(rec.base, Some(smolvm::Base::snapshot(snap)));
    assert_eq!(sh(&vm, "cat /var/tmp/mark"), "saved\n");
    // The environment is merged: the given variables over the saved guest's.
    assert_eq!(
        sh(&vm, "echo $ADDED $KEPT"),
        "yes overridden\n",
        "the given variables apply"
    );
    assert_eq!(rec.config.network, NetworkMode::User);
    assert_eq!(rec.config.egress, smolvm::EgressDefault::Deny);
    assert!(rec.config.retain_disk_on_delete);
    // --retain-disk is honoured: the disk outlives the VM.
    let out = cli(&["rm", "fs-copy"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("disk retained at"), "{err}");
    let disks = runtime().paths().disks_dir();
    let kept = disks.join("fs-copy.qcow2");
    assert!(err.contains(&kept.display().to_string()), "{err}");
    // It depends on nothing of the snapshot's: the layers were flattened into it.
    let chain = smolvm::disk::backing_chain(&kept).unwrap();
    assert!(
        chain
            .iter()
            .all(|(p, _)| !p.starts_with(state_dir().join("snapshots"))),
        "{chain:?}"
    );
    for f in std::fs::read_dir(&disks).unwrap().flatten() {
        if f.file_name().to_string_lossy().starts_with("fs-copy") {
            std::fs::remove_file(f.path()).unwrap();
        }
    }
}

#[test]
fn without_options_a_restored_vm_keeps_the_snapshots_network_and_environment() {
    let snap = snapshot();
    let out = cli(&["create", "--from-snapshot", snap, "--no-start"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    let vm = runtime().get(&id).unwrap();
    assert_eq!(vm.info().unwrap().state, smolvm::VmState::Created);
    start(&vm);
    let rec = vm.info().unwrap();
    assert_eq!(rec.config.network, NetworkMode::User);
    assert_eq!(rec.ip, Some([10, 0, 2, 15].into()));
    assert!(!rec.config.retain_disk_on_delete);
    assert_eq!(sh(&vm, "echo $KEPT"), "from-source\n");
    let (id, dir) = (vm.id().to_string(), vm.dir().to_path_buf());
    vm.delete().unwrap();
    assert_gone(&id, &dir);
}

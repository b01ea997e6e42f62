//! The VM lifecycle with real VMs: stop and start keep the disk, persistent environment,
//! disk modes, retained disks, disk size, reconnecting from another process, and delete
//! leaving nothing behind.

mod common;

use std::collections::BTreeMap;

use common::{assert_gone, boot, cli, runtime, sh, small, start};
use smolvm::{DiskMode, ExecOptions, VmConfig, VmState};

/// A value no shell quoting mistake survives.
const NASTY: &str = "it's \"$HOME\" `id` $(id) \\ \n new line; rm -rf / #";

#[test]
fn stop_and_start_keep_the_disk_and_the_environment() {
    let mut env = BTreeMap::new();
    env.insert("GREETING".to_string(), NASTY.to_string());
    env.insert(
        "SECRET_TOKEN".to_string(),
        "sk-never-in-the-db-4711".to_string(),
    );
    let vm = boot(VmConfig {
        env_vars: env,
        ..small()
    });
    let id = vm.id().to_string();

    // Set at create time, seen by every command, exactly, without any shell involved.
    let out = vm
        .exec(&ExecOptions::argv(["printenv", "GREETING"]))
        .unwrap();
    assert_eq!(out.stdout, format!("{NASTY}\n").as_bytes());
    // Login shells get them from the seeds' profile script.
    assert_eq!(sh(&vm, "sh -lc 'printf %s \"$GREETING\"'"), NASTY);
    assert!(sh(&vm, "cat /etc/profile.d/smolvm_env.sh").contains("GREETING"));
    // A per-command value overrides; set and unset change what later commands see.
    let out = vm
        .exec(&ExecOptions::argv(["printenv", "GREETING"]).env("GREETING", "override"))
        .unwrap();
    assert_eq!(out.stdout, b"override\n");
    let mut more = BTreeMap::new();
    more.insert("DEBUG".to_string(), "1".to_string());
    let now = vm.set_env_vars(&more, true).unwrap();
    assert_eq!(now.len(), 3, "{now:?}");
    let now = vm.unset_env_vars(&["SECRET_TOKEN".to_string()]).unwrap();
    assert!(!now.contains_key("SECRET_TOKEN"));
    assert_eq!(sh(&vm, "echo $DEBUG${SECRET_TOKEN:-unset}"), "1unset\n");
    let bad = vm.set_env_vars(&[("A-B".to_string(), "x".to_string())].into(), true);
    assert!(bad.unwrap_err().to_string().contains("env_vars"));

    // Values never reach the state database. (Read by another process: opening and closing
    // the database file in this one would drop SQLite's POSIX locks on it.)
    let db = runtime().paths().db_path();
    let dump = std::process::Command::new("sh")
        .arg("-c")
        .arg("cat \"$1\" \"$1-wal\" 2>/dev/null")
        .arg("sh")
        .arg(&db)
        .output()
        .unwrap();
    assert!(dump.stdout.len() > 4096, "read the database");
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(!text.contains("sk-never-in-the-db-4711"));
    assert!(!text.contains("rm -rf"));

    sh(&vm, "echo kept > $HOME/data.txt");
    vm.stop(true).unwrap();
    assert_eq!(vm.info().unwrap().state, VmState::Stopped);
    vm.stop(true).unwrap(); // stopping a stopped VM is fine
    assert!(common::processes_mentioning(vm.dir()).is_empty());
    for sock in ["api.sock", "agent.sock", "qmp.sock", "console.sock"] {
        assert!(!vm.dir().join(sock).exists(), "{sock} left after stop");
    }

    start(&vm);
    assert_eq!(sh(&vm, "cat $HOME/data.txt"), "kept\n");
    assert_eq!(
        sh(
            &vm,
            "printf '%s|%s|%s' \"$GREETING\" \"$DEBUG\" \"${SECRET_TOKEN:-}\""
        ),
        format!("{NASTY}|1|")
    );
    // Starting a running VM does nothing.
    assert!(vm.start().unwrap().already_running);

    let dir = vm.dir().to_path_buf();
    assert_eq!(vm.delete().unwrap(), None);
    assert_gone(&id, &dir);
}

#[test]
fn isolated_vms_do_not_see_each_others_writes_and_disks_can_be_bigger() {
    let a = boot(small());
    let b = boot(VmConfig {
        disk_size_mib: Some(1536),
        ..small()
    });
    sh(&a, "echo from-a > $HOME/mine");
    assert_eq!(
        sh(&b, "cat $HOME/mine 2>/dev/null || echo absent"),
        "absent\n"
    );
    // The guest sees the disk size asked for, and its root filesystem fills it.
    let sectors: u64 = sh(&b, "cat /sys/block/vda/size").trim().parse().unwrap();
    assert_eq!(sectors * 512, 1536 << 20);
    let root_kib: u64 = sh(&b, "df -k --output=size / | tail -1")
        .trim()
        .parse()
        .unwrap();
    assert!(
        root_kib > 1300 * 1024,
        "root filesystem not grown: {root_kib} KiB"
    );
    let a_kib: u64 = sh(&a, "df -k --output=size / | tail -1")
        .trim()
        .parse()
        .unwrap();
    assert!(a_kib < 1100 * 1024, "{a_kib}");
    for vm in [a, b] {
        let (id, dir) = (vm.id().to_string(), vm.dir().to_path_buf());
        vm.delete().unwrap();
        assert_gone(&id, &dir);
    }
}

#[test]
fn a_retained_disk_boots_again_with_its_data() {
    let vm = boot(VmConfig {
        retain_disk_on_delete: true,
        ..small()
    });
    sh(&vm, "echo survived > $HOME/keep.txt");
    let (id, dir) = (vm.id().to_string(), vm.dir().to_path_buf());
    let disk = vm.delete().unwrap().expect("disk retained");
    assert_gone(&id, &dir);
    assert!(disk.is_file() && disk.starts_with(runtime().paths().disks_dir()));
    // It builds on its own link to the image's root file system, beside it.
    let chain = smolvm::disk::backing_chain(&disk).unwrap();
    assert_eq!(chain.len(), 2, "{chain:?}");
    assert_eq!(chain[1].0, disk.with_extension("rootfs"));

    let again = boot(VmConfig {
        disk_path: Some(disk.clone()),
        ..small()
    });
    assert_eq!(sh(&again, "cat $HOME/keep.txt"), "survived\n");
    // A disk booted in place belongs to the user: deleting this VM keeps it.
    assert_eq!(again.delete().unwrap(), None);
    assert!(disk.is_file());
    std::fs::remove_file(&disk).unwrap();
    let _ = std::fs::remove_file(disk.with_extension("json"));
    // Its link goes with a gc 10 minutes on (a fresh one may be a disk's being made).
    let report = runtime().gc().unwrap();
    assert!(disk.with_extension("rootfs").exists(), "{report:?}");
    std::fs::remove_file(disk.with_extension("rootfs")).unwrap();
}

#[test]
fn a_shared_disk_runs_one_vm_at_a_time_and_keeps_its_writes() {
    let shared = VmConfig {
        disk_mode: DiskMode::Shared,
        ..small()
    };
    let a = boot(shared.clone());
    sh(&a, "echo shared-data > $HOME/shared.txt");
    let b = runtime().create(shared.clone()).unwrap();
    assert_eq!(a.info().unwrap().disk_path, b.info().unwrap().disk_path);
    let err = b.start().unwrap_err().to_string();
    assert!(err.contains("in use"), "{err}");
    assert_eq!(
        a.info().unwrap().state,
        VmState::Running,
        "A must be untouched"
    );
    a.stop(true).unwrap();
    start(&b);
    assert_eq!(sh(&b, "cat $HOME/shared.txt"), "shared-data\n");
    let disk = b.info().unwrap().disk_path;
    for vm in [a, b] {
        vm.delete().unwrap();
    }
    // The shared disk outlives its VMs (that is what it is for), on its own link to the
    // image's root file system.
    assert!(disk.is_file());
    let chain = smolvm::disk::backing_chain(&disk).unwrap();
    assert_eq!(chain[1].0, disk.with_extension("rootfs"), "{chain:?}");
}

#[test]
fn reconnect_from_another_process_through_the_cli() {
    let name = format!("ws-{}", std::process::id());
    let out = cli(&[
        "create",
        "--name",
        &name,
        "--cpus",
        "1",
        "--memory",
        "256",
        "--env",
        "FROM_CLI=yes",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), name);
    // The CLI process is gone; this process finds the VM by id and uses it.
    let vm = runtime().get(&name).unwrap();
    assert_eq!(vm.info().unwrap().state, VmState::Running);
    assert_eq!(
        sh(&vm, "echo $FROM_CLI; hostname"),
        format!("yes\n{name}\n")
    );

    let out = cli(&["exec", &name, "--", "sh", "-c", "echo via-cli"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "via-cli\n");
    let ls: serde_json::Value = serde_json::from_slice(&cli(&["ls", "--json"]).stdout).unwrap();
    let me = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == name.as_str())
        .expect("listed");
    assert_eq!(me["state"], "running");
    let inspect: serde_json::Value =
        serde_json::from_slice(&cli(&["inspect", &name]).stdout).unwrap();
    assert_eq!(inspect["vm"]["config"]["vcpu_count"], 1);
    assert_eq!(inspect["env_names"][0], "FROM_CLI");
    assert_eq!(inspect["vm"]["config"]["env_vars"]["FROM_CLI"], "");

    for _ in 0..2 {
        let out = cli(&["stop", &name]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(vm.info().unwrap().state, VmState::Stopped);
    assert!(cli(&["start", &name]).status.success());
    assert_eq!(sh(&vm, "echo $FROM_CLI"), "yes\n");
    let out = cli(&["env", &name, "NEW=1", "--unset", "FROM_CLI"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "NEW=1\n");

    let dir = vm.dir().to_path_buf();
    assert!(cli(&["rm", &name]).status.success());
    assert_gone(&name, &dir);
    assert_eq!(cli(&["inspect", &name]).status.code(), Some(3));
    assert_eq!(cli(&["stop", &name]).status.code(), Some(3));
    assert!(cli(&["rm", "-f", &name]).status.success());
}

#[test]
fn bad_configs_name_the_field_and_create_nothing() {
    // A state directory of its own, so VMs of the other tests do not blur the count.
    let rt = smolvm::Runtime::with_paths(smolvm::Paths {
        state_dir: common::state_dir().join("bad"),
        images_dir: runtime().paths().images_dir.clone(),
    })
    .unwrap();
    let cases: Vec<(VmConfig, &str)> = vec![
        (
            VmConfig {
                disk_mode: DiskMode::Shared,
                retain_disk_on_delete: true,
                ..small()
            },
            "retain_disk_on_delete",
        ),
        (
            VmConfig {
                kernel_path: Some("/nonexistent/vmlinux".into()),
                ..small()
            },
            "kernel_path",
        ),
        (
            VmConfig {
                disk_size_mib: Some(16),
                ..small()
            },
            "disk_size_mib",
        ),
        (
            VmConfig {
                env_vars: [("1BAD".to_string(), String::new())].into(),
                ..small()
            },
            "env_vars",
        ),
        (
            VmConfig {
                vm_id: Some("Not_Valid".into()),
                ..small()
            },
            "vm_id",
        ),
    ];
    for (cfg, field) in cases {
        let err = rt.create(cfg).unwrap_err().to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
    assert!(rt.list().unwrap().is_empty());
    let dirs = std::fs::read_dir(rt.paths().vms_dir()).unwrap().count();
    assert_eq!(dirs, 0, "VM directories left");
    let out = cli(&["create", "--disk-mode", "nfs"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("disk_mode"));
}

#[test]
fn two_starts_of_one_vm_at_once_boot_it_once() {
    let vm = runtime().create(small()).unwrap();
    let starts: Vec<_> = (0..2)
        .map(|_| {
            let vm = vm.clone();
            std::thread::spawn(move || vm.start())
        })
        .collect();
    let results: Vec<_> = starts.into_iter().map(|h| h.join().unwrap()).collect();
    let booted = results
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|t| !t.already_running))
        .count();
    assert_eq!(booted, 1, "{results:?}");
    for r in &results {
        if let Err(e) = r {
            assert!(e.to_string().contains("starting"), "{e}");
        }
    }
    // One supervisor and one QEMU.
    assert_eq!(common::processes_mentioning(vm.dir()).len(), 2);
    assert_eq!(sh(&vm, "echo once"), "once\n");
    let (id, dir) = (vm.id().to_string(), vm.dir().to_path_buf());
    vm.delete().unwrap();
    assert_gone(&id, &dir);
}

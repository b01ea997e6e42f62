//! Eight VMs created and started at once, from threads of one process and from four
//! processes: all succeed, with unique ids, directories and disks, and no "database is
//! locked".

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::{assert_gone, runtime, serial, sh, small};
use smolvm::{Vm, VmState};

const CHILD: &str = "SMOLVM_TEST_CHILD";

// One burst of eight VMs at a time (`serial()`): two bursts at once would only measure
// the host.

/// Checks the VMs are distinct and all answer as themselves, then deletes them.
fn check_and_delete(vms: Vec<Vm>) {
    assert_eq!(vms.len(), 8);
    let ids: BTreeSet<_> = vms.iter().map(|v| v.id().to_string()).collect();
    let dirs: BTreeSet<_> = vms.iter().map(|v| v.dir().to_path_buf()).collect();
    let disks: BTreeSet<_> = vms.iter().map(|v| v.info().unwrap().disk_path).collect();
    assert_eq!((ids.len(), dirs.len(), disks.len()), (8, 8, 8));
    for vm in &vms {
        assert_eq!(vm.info().unwrap().state, VmState::Running);
        assert_eq!(sh(vm, "hostname"), format!("{}\n", vm.id()));
    }
    let handles: Vec<_> = vms
        .into_iter()
        .map(|vm| {
            std::thread::spawn(move || {
                let (id, dir) = (vm.id().to_string(), vm.dir().to_path_buf());
                vm.delete().unwrap();
                (id, dir)
            })
        })
        .collect();
    for h in handles {
        let (id, dir) = h.join().unwrap();
        assert_gone(&id, &dir);
    }
}

#[test]
fn eight_vms_start_at_once_from_threads_of_one_process() {
    let _serial = serial();
    let rt = runtime();
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let rt = rt.clone();
            std::thread::spawn(move || {
                let vm = rt.create(small())?;
                vm.start().map(|_| vm)
            })
        })
        .collect();
    let vms: Vec<Vm> = handles
        .into_iter()
        .map(|h| h.join().unwrap().expect("create and start"))
        .collect();
    check_and_delete(vms);
}

#[test]
fn eight_vms_start_at_once_from_four_processes() {
    let _serial = serial();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..4)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "child_starts_two_vms",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                ])
                .env(CHILD, "1")
                .env(common::INHERIT_STATE, common::state_dir())
                .output()
        })
        .map(|o| o.unwrap())
        .collect();
    let rt = runtime();
    let mut vms = Vec::new();
    for out in children {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in stdout.lines() {
            if let Some(id) = line.strip_prefix("STARTED ") {
                vms.push(rt.get(id).unwrap());
            }
        }
    }
    check_and_delete(vms);
}

/// Run as a child process by the test above: starts two VMs from two threads and leaves
/// them running.
#[test]
#[ignore = "run in child processes by eight_vms_start_at_once_from_four_processes"]
fn child_starts_two_vms() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let rt = runtime();
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let rt = rt.clone();
            std::thread::spawn(move || {
                let vm = rt.create(small()).unwrap();
                vm.start().unwrap();
                vm.id().to_string()
            })
        })
        .collect();
    for h in handles {
        println!("STARTED {}", h.join().unwrap());
    }
}

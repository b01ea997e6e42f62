//! Crash safety: SIGKILL of the client, the supervisor or QEMU, alone or all at once,
//! leaves state that the supervisor or `smolvm gc` repairs, and `smolvm ls` tells the truth.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use common::{assert_gone, cli, poll_until, processes_mentioning, runtime, secs, serial};
use smolvm::VmState;

// These tests run `gc`, which acts on every VM of the state directory: one at a time
// (`serial()`).

fn kill9(pid: u32) {
    // SAFETY: plain kill(2).
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

/// Starts `smolvm run -- sleep 600` (an ephemeral VM owned by that client) and waits until
/// its VM runs; returns the client, the VM's id and directory.
fn run_client() -> (Child, String, PathBuf) {
    let before: Vec<String> = ids();
    let child = Command::new(common::bin())
        .args([
            "run", "--cpus", "1", "--memory", "256", "--", "sleep", "600",
        ])
        .env("SMOLVM_HOME", common::state_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut found = None;
    poll_until(secs(120), "the run client's VM to be running", || {
        found = runtime().list().unwrap().into_iter().find(|v| {
            !before.contains(&v.record.id)
                && v.record.state == VmState::Running
                && v.record.owner.is_some_and(|o| o.pid == child.id())
        });
        found.is_some()
    });
    let rec = found.unwrap().record;
    // The command itself runs in the guest (`slee[p]` keeps this probe from matching itself).
    let vm = runtime().get(&rec.id).unwrap();
    poll_until(secs(60), "`sleep 600` to run in the guest", || {
        vm.exec(&smolvm::ExecOptions::shell(
            "cat /proc/[0-9]*/cmdline | tr '\\0' ' ' | grep -q 'slee[p] 600'",
        ))
        .is_ok_and(|out| out.exit_code == Some(0))
    });
    (child, rec.id, rec.dir)
}

fn ids() -> Vec<String> {
    runtime()
        .list()
        .unwrap()
        .into_iter()
        .map(|v| v.record.id)
        .collect()
}

fn pid_of(id: &str, which: &str) -> u32 {
    let rec = runtime().get(id).unwrap().info().unwrap();
    match which {
        "supervisor" => rec.supervisor_pid.unwrap(),
        _ => rec.qemu_pid.unwrap(),
    }
}

fn gc_clean() {
    let out = cli(&["gc", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn killing_the_client_deletes_its_vm() {
    let _serial = serial();
    let (mut client, id, dir) = run_client();
    kill9(client.id());
    let _ = client.wait();
    // The supervisor notices its owner is gone and deletes the VM by itself.
    poll_until(secs(20), "the orphaned VM to be deleted", || {
        !dir.exists() && processes_mentioning(&dir).is_empty()
    });
    gc_clean();
    assert_gone(&id, &dir);
}

#[test]
fn killing_qemu_or_the_supervisor_under_run_leaves_nothing() {
    let _serial = serial();
    for victim in ["qemu", "supervisor"] {
        let (mut client, id, dir) = run_client();
        kill9(pid_of(&id, victim));
        // The client sees the VM die, reports it and deletes the VM.
        let status = client.wait().unwrap();
        assert_eq!(status.code(), Some(1), "{victim}");
        gc_clean();
        assert_gone(&id, &dir);
    }
}

#[test]
fn killing_everything_at_once_is_repaired_by_gc() {
    let _serial = serial();
    let (mut client, id, dir) = run_client();
    let sup = pid_of(&id, "supervisor");
    let qemu = pid_of(&id, "qemu");
    for pid in [client.id(), sup, qemu] {
        kill9(pid);
    }
    let _ = client.wait();
    // A process that is dying loses its command line (with its memory) before it closes
    // its files, and the VM's lock goes only with the last descriptor: wait for both.
    poll_until(secs(10), "the processes to die", || {
        processes_mentioning(&dir).is_empty() && !smolvm::supervisor::is_running(&dir)
    });
    // `ls` never shows a dead VM as running.
    let ls: serde_json::Value = serde_json::from_slice(&cli(&["ls", "--json"]).stdout).unwrap();
    if let Some(v) = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == id.as_str())
    {
        assert_ne!(v["state"], "running", "{v}");
    }
    gc_clean();
    assert_gone(&id, &dir);
}

#[test]
fn a_persistent_vm_whose_supervisor_died_shows_error_and_gc_repairs_it() {
    let _serial = serial();
    let vm = common::fresh_vm();
    let sup = vm.info().unwrap().supervisor_pid.unwrap();
    kill9(sup);
    poll_until(secs(10), "QEMU to follow its supervisor", || {
        processes_mentioning(vm.dir()).is_empty()
    });
    // The lock goes with the last process holding it; allow the kernel a moment.
    poll_until(secs(5), "the VM to show as error", || {
        vm.info().unwrap().state == VmState::Error
    });
    let info = vm.info().unwrap();
    assert!(info.error.unwrap().contains("supervisor"), "reason given");
    let out = cli(&["gc", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["removed_files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().ends_with("api.sock")),
        "{report}"
    );
    assert!(
        report["marked_error"].as_array().unwrap().is_empty(),
        "already marked by ls: {report}"
    );
    for sock in ["api.sock", "agent.sock", "qmp.sock", "console.sock"] {
        assert!(!vm.dir().join(sock).exists(), "{sock}");
    }
    // A persistent VM keeps its disk and row: it can boot again.
    common::start(&vm);
    assert_eq!(common::sh(&vm, "echo back"), "back\n");
    let (id, dir) = (vm.id().to_string(), vm.dir().to_path_buf());
    vm.delete().unwrap();
    assert_gone(&id, &dir);
}

#[test]
fn a_second_supervisor_for_a_running_vm_is_refused() {
    let _serial = serial();
    let vm = common::shared_vm();
    let out = Command::new(common::bin())
        .arg("__supervise")
        .arg(vm.dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("another supervisor"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(vm.info().unwrap().state, VmState::Running);
    assert_eq!(common::sh(vm, "echo still"), "still\n");
}

#[test]
fn gc_removes_orphan_directories_and_their_processes() {
    let _serial = serial();
    let dir = runtime().paths().vms_dir().join("vm-orphan01");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("disk.qcow2"), b"half made").unwrap();
    // A process that names the directory, as a stray QEMU would.
    // One process (no child that would outlive it), holding none of the test's pipes.
    let mut stray = Command::new("python3")
        .args(["-c", "import time; time.sleep(600)"])
        .arg(dir.join("agent.sock"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // `spawn` returns once the child has left the parent's memory, but the kernel fills in
    // the new program's command line a moment later: until then it names nothing.
    let stray_pid = stray.id();
    poll_until(secs(10), "the stray's command line", || {
        processes_mentioning(&dir).contains(&stray_pid)
    });
    let out = cli(&["gc", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["killed_processes"].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert!(!dir.exists());
    let status = stray.wait().unwrap();
    assert!(!status.success());
    // A second pass has nothing left to do with it.
    let out = cli(&["gc", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["removed_dirs"].as_array().unwrap().is_empty(),
        "{report}"
    );
}

#[test]
fn gc_running_beside_creates_and_deletes_breaks_none_of_them() {
    let _serial = serial();
    // `smolvm gc` in a loop, as a user (or a cron job) may run it while an agent works.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looping = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut passes = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = cli(&["gc", "--json"]);
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                passes += 1;
            }
            passes
        })
    };
    let rt = runtime();
    for i in 0..20 {
        let retain = i % 4 == 0;
        let vm = rt
            .create(smolvm::VmConfig {
                retain_disk_on_delete: retain,
                ..common::small()
            })
            .unwrap_or_else(|e| panic!("create {i} beside gc: {e}"));
        let disk = vm.info().unwrap().disk_path;
        assert!(disk.is_file(), "create {i}: its disk");
        let (id, dir) = (vm.id().to_string(), vm.dir().to_path_buf());
        let kept = vm
            .delete()
            .unwrap_or_else(|e| panic!("delete {i} beside gc: {e}"));
        assert_gone(&id, &dir);
        if let Some(kept) = kept {
            assert!(retain);
            assert!(
                smolvm::disk::backing_chain(&kept).is_ok(),
                "{i}: kept disk readable"
            );
            std::fs::remove_file(&kept).unwrap();
            let _ = std::fs::remove_file(kept.with_extension("json"));
            let _ = std::fs::remove_file(kept.with_extension("rootfs"));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let passes = looping.join().unwrap();
    assert!(passes >= 2, "gc ran {passes} times");
}

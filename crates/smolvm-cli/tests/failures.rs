//! A VM that dies under a command gives the host an error promptly, never a hang. Each
//! test boots its own VM.

mod common;

use std::time::{Duration, Instant};

use smolvm::{ExecOptions, VmState};

#[test]
fn qemu_killed_gives_an_error_not_a_hang() {
    let vm = common::fresh_vm();
    let qemu = vm.info().unwrap().qemu_pid.expect("qemu pid recorded");
    let runner = {
        let vm = vm.clone();
        std::thread::spawn(move || vm.exec(&ExecOptions::argv(["sleep", "600"])))
    };
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    // SAFETY: plain kill(2) of the QEMU process we started.
    unsafe {
        libc::kill(qemu as i32, libc::SIGKILL);
    }
    let res = runner.join().unwrap();
    assert!(res.is_err(), "exec survived QEMU's death: {res:?}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    let msg = res.unwrap_err().to_string();
    assert!(msg.contains(vm.id()), "{msg}");
    // The supervisor records the death; the VM is never shown as running.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = vm.info().unwrap();
        if info.state == VmState::Error {
            assert!(info.error.unwrap_or_default().contains("signal 9"));
            break;
        }
        assert!(Instant::now() < deadline, "state still {:?}", info.state);
        std::thread::sleep(Duration::from_millis(100));
    }
    let err = vm.exec(&ExecOptions::argv(["true"])).unwrap_err();
    assert!(err.to_string().contains("error"), "{err}");
    vm.delete().unwrap();
    assert!(!vm.dir().exists());
}

#[test]
fn agent_killed_in_the_guest_gives_an_error_not_a_hang() {
    let vm = common::fresh_vm();
    let t = Instant::now();
    // The agent's server is the child of PID 1 running PID 1's binary; kill it from inside
    // the guest, with this very command still waiting for its result.
    let res = vm.exec(
        &ExecOptions::shell(
            "for p in $(ps -o pid= --ppid 1); do \
               [ \"$(readlink /proc/$p/exe)\" = \"$(readlink /proc/1/exe)\" ] && kill -9 $p; \
             done; sleep 600",
        )
        .timeout(Duration::from_secs(120)),
    );
    assert!(res.is_err(), "exec survived the agent's death: {res:?}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    let err = vm.exec(&ExecOptions::argv(["true"])).unwrap_err();
    assert!(!err.to_string().is_empty());
    vm.delete().unwrap();
}

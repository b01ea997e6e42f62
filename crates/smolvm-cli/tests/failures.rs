//! A VM that dies under a command gives the host an error, never a hang: the command would
//! run for 600 s, the call must return (with an error) long before. Each test boots its own
//! VM.

mod common;

use std::time::Duration;

use common::{poll_until, secs};
use smolvm::{ExecOptions, VmState};
use smolvm_testing::finishes_within;

#[test]
fn qemu_killed_gives_an_error_not_a_hang() {
    let vm = common::fresh_vm();
    let qemu = vm.info().unwrap().qemu_pid.expect("qemu pid recorded");
    let (tx, rx) = std::sync::mpsc::channel();
    let runner = {
        let vm = vm.clone();
        std::thread::spawn(move || {
            let res = vm.exec(&ExecOptions::shell("touch /tmp/started; sleep 600"));
            let _ = tx.send(());
            res
        })
    };
    poll_until(secs(60), "the long command to start in the guest", || {
        vm.exec(&ExecOptions::argv(["test", "-e", "/tmp/started"]))
            .is_ok_and(|out| out.exit_code == Some(0))
    });
    assert!(rx.try_recv().is_err(), "the long command ended by itself");
    // SAFETY: plain kill(2) of the QEMU process we started.
    unsafe {
        libc::kill(qemu as i32, libc::SIGKILL);
    }
    let res = finishes_within(secs(120), "the exec after QEMU's death", move || {
        runner.join().unwrap()
    });
    assert!(res.is_err(), "exec survived QEMU's death: {res:?}");
    let msg = res.unwrap_err().to_string();
    assert!(msg.contains(vm.id()), "{msg}");
    // The supervisor records the death; the VM is never shown as running.
    poll_until(secs(30), "the VM to show as error", || {
        vm.info().unwrap().state == VmState::Error
    });
    let reason = vm.info().unwrap().error.unwrap_or_default();
    assert!(reason.contains("signal 9"), "{reason}");
    let err = vm.exec(&ExecOptions::argv(["true"])).unwrap_err();
    assert!(err.to_string().contains("error"), "{err}");
    vm.delete().unwrap();
    assert!(!vm.dir().exists());
}

#[test]
fn agent_killed_in_the_guest_gives_an_error_not_a_hang() {
    let vm = common::fresh_vm();
    // The agent's server is the child of PID 1 running PID 1's binary; kill it from inside
    // the guest, with this very command still waiting for its result. Its own timeout
    // (300 s) is past the deadline here: an exec that only ends by timing out fails.
    let res = {
        let vm = vm.clone();
        finishes_within(secs(120), "the exec after the agent's death", move || {
            vm.exec(
                &ExecOptions::shell(
                    "for p in $(ps -o pid= --ppid 1); do \
                       [ \"$(readlink /proc/$p/exe)\" = \"$(readlink /proc/1/exe)\" ] && kill -9 $p; \
                     done; sleep 600",
                )
                .timeout(Duration::from_secs(300)),
            )
        })
    };
    assert!(res.is_err(), "exec survived the agent's death: {res:?}");
    let err = vm.exec(&ExecOptions::argv(["true"])).unwrap_err();
    assert!(!err.to_string().is_empty());
    vm.delete().unwrap();
}

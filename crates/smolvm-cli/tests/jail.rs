//! What confines QEMU today (issue 15, in part): its own seccomp filter (`-sandbox`),
//! `no_new_privs`, no core files and a bounded number of open files. (It still runs as the
//! caller's user; the unprivileged jail is the rest of issue 15.)

mod common;

use common::*;

fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

#[test]
fn qemu_runs_under_seccomp_without_new_privileges_or_core_files() {
    let vm = fresh_vm();
    let qemu = vm
        .info()
        .unwrap()
        .qemu_pid
        .expect("a running VM has a QEMU");
    assert_eq!(status_field(qemu, "NoNewPrivs"), "1");
    assert_eq!(status_field(qemu, "Seccomp"), "2", "filter mode");
    let limits = std::fs::read_to_string(format!("/proc/{qemu}/limits")).unwrap();
    let limit = |name: &str| -> Vec<String> {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in limits"))[name.len()..]
            .split_whitespace()
            .take(2)
            .map(str::to_string)
            .collect()
    };
    assert_eq!(limit("Max core file size"), ["0", "0"]);
    assert_eq!(limit("Max open files"), ["4096", "4096"]);
    // The sandbox lets it do its work: a command, a pause and a resume.
    assert_eq!(sh(&vm, "echo ok").trim(), "ok");
    vm.pause().unwrap();
    vm.resume().unwrap();
    assert_eq!(sh(&vm, "echo still").trim(), "still");
    vm.delete().unwrap();
}

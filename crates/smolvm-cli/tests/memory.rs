//! Memory a guest frees goes back to the host where QEMU can take it (free page reporting),
//! with real VMs: a cold-booted VM's QEMU shrinks after its guest frees 200 MiB; a VM resumed
//! from a template (whose RAM QEMU cannot discard) is told not to report at all.

mod common;

use common::{boot, poll_until, secs, sh, small};
use smolvm::VmConfig;

/// Where the guest kernel keeps its free page reporting threshold.
const ORDER: &str = "cat /sys/module/page_reporting/parameters/page_reporting_order";

/// QEMU's resident memory in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024
}

#[test]
fn a_cold_vm_gives_freed_memory_back() {
    let vm = boot(VmConfig {
        mem_size_mib: 512,
        snapshot: false,
        ..small()
    });
    let qemu = vm.info().unwrap().qemu_pid.unwrap();
    let order: u32 = sh(&vm, ORDER).trim().parse().unwrap();
    assert!(order < 11, "reporting is off in a cold VM (order {order})");
    sh(&vm, "python3 -c 'b = bytearray(200*1024*1024)'");
    let high = rss_mib(qemu);
    // The guest reports freed blocks about 2 s after they are freed (a failed wait leaves
    // the VM to the test process's clean-up).
    poll_until(
        secs(30),
        &format!("QEMU's RSS ({high} MiB) to drop by 100 MiB after the guest freed 200 MiB"),
        || rss_mib(qemu) + 100 <= high,
    );
    vm.delete().unwrap();
}

#[test]
fn a_vm_resumed_from_a_template_is_told_not_to_report() {
    let vm = boot(small());
    let restored = vm.info().unwrap().base;
    let order = sh(&vm, ORDER);
    vm.delete().unwrap();
    assert!(
        matches!(restored, Some(smolvm::Base::Template { .. })),
        "booted cold: {restored:?}"
    );
    assert_eq!(order.trim(), "11");
}

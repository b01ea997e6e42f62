//! Guest time with real VMs: every VM gets a real clocksource for its accelerator (never a
//! ticking jiffies clock), `smolvm inspect` shows it, and an idle guest keeps the host's
//! time.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{boot, cli, sh, small};
use smolvm::VmConfig;

/// Two vCPUs: the shape where the guest kernel, unable to verify the TSC across CPUs under
/// TCG, used to fall back to `refined-jiffies`.
fn two_vcpus(snapshot: bool) -> VmConfig {
    VmConfig {
        vcpu_count: 2,
        snapshot,
        ..small()
    }
}

/// The clocksource a guest must end up with on `accelerator`.
fn expected_clocksource(accelerator: &str) -> &'static str {
    match accelerator {
        "kvm" => "kvm-clock",
        _ => "tsc",
    }
}

#[test]
fn every_vm_gets_a_real_clocksource_and_inspect_shows_it() {
    for snapshot in [false, true] {
        let vm = boot(two_vcpus(snapshot));
        let rec = vm.info().unwrap();
        let accel = rec.accelerator.map(|a| a.to_string()).unwrap_or_default();
        let in_guest = sh(
            &vm,
            "cat /sys/devices/system/clocksource/clocksource0/current_clocksource",
        );
        let out = cli(&["inspect", vm.id()]);
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let shown = v["guest"]["clocksource"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let cmdline = sh(&vm, "cat /proc/cmdline");
        vm.delete().unwrap();
        let how = if snapshot { "resumed" } else { "cold" };
        assert!(
            !shown.contains("jiffies") && !in_guest.contains("jiffies"),
            "{how} VM under {accel} ticks on {in_guest:?} (inspect: {shown:?}); cmdline {cmdline}"
        );
        assert_eq!(
            shown,
            in_guest.trim(),
            "{how}: inspect and the guest disagree"
        );
        assert_eq!(
            shown,
            expected_clocksource(&accel),
            "{how} VM under {accel}; cmdline {cmdline}"
        );
    }
}

/// Host time now, in seconds since the epoch.
fn host_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn an_idle_guest_keeps_the_hosts_time_within_half_a_second() {
    let vm = boot(two_vcpus(true));
    std::thread::sleep(Duration::from_secs(60));
    // The guest's reading lies between the host's readings before and after the command.
    let before = host_now();
    let guest = sh(&vm, "date +%s.%N");
    let after = host_now();
    vm.delete().unwrap();
    let guest: f64 = guest.trim().parse().unwrap();
    let off = if guest < before {
        guest - before
    } else if guest > after {
        guest - after
    } else {
        0.0
    };
    assert!(
        off.abs() < 0.5,
        "after 60 s idle the guest's clock is {off:+.3} s off the host's \
         (guest {guest:.3}, host {before:.3}..{after:.3})"
    );
}

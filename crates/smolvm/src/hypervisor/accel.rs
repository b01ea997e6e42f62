//! Honest accelerator detection: KVM only when `/dev/kvm` opens *and* the CPU has VMX/SVM
//! and the KVM module is not PVM (which cannot run a stock guest kernel).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Which accelerator runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's software emulation (seconds to boot, much slower).
    Tcg,
    /// No virtual machine at all: the fake monitor of the test lane runs the agent as a
    /// host process.
    None,
}

impl Accelerator {
    /// Every accelerator.
    pub const ALL: [Accelerator; 3] = [Accelerator::Kvm, Accelerator::Tcg, Accelerator::None];

    /// Lowercase name (`kvm`, `tcg`).
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
            Accelerator::None => "none",
        }
    }
}

impl std::fmt::Display for Accelerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of detection, with the reasons.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccelReport {
    /// What will be used.
    pub accelerator: Accelerator,
    /// Whether KVM is usable.
    pub kvm_usable: bool,
    /// Why KVM is or is not used, in a sentence.
    pub reason: String,
    /// Host TSC rate in kHz, read from /proc/cpuinfo.
    pub tsc_khz: Option<u64>,
}

impl AccelReport {
    /// What the fake monitor reports: no accelerator, since no VM runs.
    pub fn fake() -> AccelReport {
        AccelReport {
            accelerator: Accelerator::None,
            kvm_usable: false,
            reason: "SMOLVM_VMM=fake: no VM runs; the agent runs as a host process".into(),
            tsc_khz: None,
        }
    }
}

/// Detects the accelerator. `SMOLVM_ACCEL=tcg` forces software emulation;
/// `SMOLVM_ACCEL=kvm` is honoured only when KVM is usable.
pub fn detect() -> AccelReport {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let tsc_khz = tsc_khz_from_cpuinfo(&cpuinfo);
    let (kvm_usable, why) = kvm_status(&cpuinfo);
    let forced = std::env::var("SMOLVM_ACCEL").ok();
    let (accelerator, reason) = match (forced.as_deref(), kvm_usable) {
        (Some("tcg"), _) => (
            Accelerator::Tcg,
            "SMOLVM_ACCEL=tcg forces software emulation".to_string(),
        ),
        (_, true) => (Accelerator::Kvm, why),
        (_, false) => (
            Accelerator::Tcg,
            format!("{why}; using QEMU TCG software emulation (slow)"),
        ),
    };
    AccelReport {
        accelerator,
        kvm_usable,
        reason,
        tsc_khz,
    }
}

fn kvm_status(cpuinfo: &str) -> (bool, String) {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return (
            false,
            "/dev/kvm is PVM (kvm_pvm module), a nested hypervisor that cannot run a stock guest kernel".into(),
        );
    }
    let has_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !has_virt {
        return (
            false,
            "the CPU shows neither vmx nor svm (no hardware virtualization; enable it in firmware or nested virtualization)".into(),
        );
    }
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => (true, "/dev/kvm opens and the CPU has hardware virtualization".into()),
        Err(e) => (
            false,
            format!("/dev/kvm cannot be opened ({e}); load kvm_intel/kvm_amd or add yourself to the kvm group"),
        ),
    }
}

/// Reads the TSC rate from the first `cpu MHz` line (under TCG the guest reads the host TSC).
pub fn tsc_khz_from_cpuinfo(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    if mhz.is_finite() && mhz > 1.0 && mhz < 100_000.0 {
        Some((mhz * 1000.0).round() as u64)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_parsing() {
        assert_eq!(
            tsc_khz_from_cpuinfo("cpu MHz\t\t: 2596.132\n"),
            Some(2_596_132)
        );
        assert_eq!(tsc_khz_from_cpuinfo("nothing"), None);
        assert_eq!(tsc_khz_from_cpuinfo("cpu MHz : nan"), None);
    }

    #[test]
    fn detection_names_a_reason() {
        let r = detect();
        assert!(!r.reason.is_empty());
        if Path::new("/sys/module/kvm_pvm").exists() {
            assert_eq!(r.accelerator, Accelerator::Tcg);
        }
    }
}

//! Building a [`LaunchSpec`] and starting a supervisor with it: the one recipe shared by a
//! VM's start (`Vm::start`) and a template's build (`snapshot::template`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::{NetworkMode, VmConfig};
use crate::error::{io_err, Error, Result};
use crate::hypervisor::{AccelReport, Accelerator, LaunchSpec, VmmKind};
use crate::supervisor::files;
use crate::supervisor::spawn::{LaunchError, Launched};

/// How much longer than the agent's own ready timeout a client waits for the supervisor's
/// word (it needs the time to spawn, connect and report).
pub(crate) const SUPERVISOR_SLACK: Duration = Duration::from_secs(30);

/// Seconds to wait for a VM's agent: `SMOLVM_READY_TIMEOUT`, or 30 under KVM (and for the
/// fake monitor), 120 under TCG.
pub(crate) fn ready_timeout_secs(accel: Accelerator) -> u64 {
    std::env::var("SMOLVM_READY_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(match accel {
            Accelerator::Kvm | Accelerator::None => 30,
            Accelerator::Tcg => 120,
        })
}

/// What runs a machine on this host: the monitor and, for QEMU, the accelerator it found.
#[derive(Debug, Clone)]
pub(crate) struct Host {
    pub vmm: VmmKind,
    pub accel: AccelReport,
}

impl Host {
    /// The monitor `SMOLVM_VMM` names, with its accelerator.
    pub(crate) fn detect() -> Result<Host> {
        let vmm = VmmKind::from_env()?;
        let accel = match vmm {
            VmmKind::Qemu => crate::hypervisor::detect_accelerator(),
            VmmKind::Fake => {
                tracing::warn!(
                    "SMOLVM_VMM=fake: no VM runs and nothing is isolated; commands run on this host"
                );
                AccelReport::fake()
            }
        };
        Ok(Host { vmm, accel })
    }
}

/// The machine of a VM config, booting cold, without network, from the given boot files
/// (kernel, initramfs) and disk, recording into the given state (database, directory); the
/// caller sets what differs (network, restore, template output).
pub(crate) fn machine(
    id: &str,
    config: &VmConfig,
    boot: (&Path, &Path),
    disk: (PathBuf, crate::disk::DiskFormat),
    host: &Host,
    state: (&Path, &Path),
) -> LaunchSpec {
    LaunchSpec {
        id: id.to_string(),
        vcpus: config.vcpu_count,
        mem_mib: config.mem_size_mib,
        kernel: boot.0.to_path_buf(),
        initrd: boot.1.to_path_buf(),
        disk: disk.0,
        disk_format: disk.1.as_str().into(),
        extra_boot_args: config.boot_args.clone(),
        guest_net: None,
        network: NetworkMode::None,
        vmm: host.vmm,
        accelerator: host.accel.accelerator,
        tsc_khz: host.accel.tsc_khz,
        db_path: state.0.to_path_buf(),
        ready_timeout_secs: ready_timeout_secs(host.accel.accelerator),
        state_dir: state.1.to_path_buf(),
        lock_disk: true,
        nat: None,
        restrict_user_net: false,
        unplugged_nic: false,
        restore: None,
        template_out: None,
    }
}

/// Writes `spec` into `dir` and starts its supervisor with the held VM `lock`; waits until
/// it reports ready, failed, or the ready timeout (plus slack) passes.
pub(crate) fn start(
    dir: &Path,
    spec: &LaunchSpec,
    lock: std::fs::File,
    t0: Instant,
) -> std::result::Result<Launched, LaunchError> {
    write_spec(dir, spec).map_err(LaunchError::Spawn)?;
    let deadline = t0 + Duration::from_secs(spec.ready_timeout_secs) + SUPERVISOR_SLACK;
    crate::supervisor::spawn::launch(dir, lock, deadline)
}

fn write_spec(dir: &Path, spec: &LaunchSpec) -> Result<()> {
    let path = dir.join(files::SPEC);
    let json = serde_json::to_vec_pretty(spec).map_err(|e| Error::Io {
        context: format!("encoding {}", path.display()),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&path, json).map_err(io_err(format!("writing {}", path.display())))
}

impl LaunchError {
    /// Why, in a sentence.
    pub(crate) fn reason(self) -> String {
        match self {
            LaunchError::Failed(reason) => reason,
            LaunchError::TimedOut => "timed out waiting for the supervisor".into(),
            LaunchError::Vanished(tail) => {
                format!("the supervisor exited before the VM was ready: {tail}")
            }
            LaunchError::Spawn(e) => e.to_string(),
        }
    }
}

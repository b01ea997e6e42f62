//! Hypervisor backends behind one trait. QEMU `microvm` is the one we build and test;
//! a Firecracker backend fits the same trait.

pub mod accel;
pub mod qemu;
pub mod qmp;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use accel::{detect as detect_accelerator, AccelReport, Accelerator};

use crate::config::NetworkMode;
use crate::error::Result;

/// Everything a backend needs to launch one VM. Written by the client to the VM's
/// directory as `spec.json` and read by the supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// VM id (also the guest hostname).
    pub id: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub mem_mib: u32,
    /// Uncompressed kernel (ELF vmlinux).
    pub kernel: PathBuf,
    /// Initramfs holding the agent as /init.
    pub initrd: PathBuf,
    /// Root disk (qcow2 overlay).
    pub disk: PathBuf,
    /// Format of the root disk (`qcow2` or `raw`).
    pub disk_format: String,
    /// Extra kernel arguments from the user.
    pub extra_boot_args: Option<String>,
    /// The guest's network configuration, passed on the kernel command line
    /// (`smolvm.ip=... smolvm.gw=...`, see [`smolvm_protocol::boot`]); the agent applies it at
    /// boot. `None`: the guest configures no interface besides loopback.
    #[serde(default)]
    pub guest_net: Option<smolvm_protocol::boot::GuestNet>,
    /// Networking mode.
    pub network: NetworkMode,
    /// Accelerator to use.
    pub accelerator: Accelerator,
    /// Host TSC rate in kHz (passed to the guest under TCG).
    pub tsc_khz: Option<u64>,
    /// The state database, where the supervisor records the VM's end.
    pub db_path: PathBuf,
    /// Seconds to wait for the agent handshake.
    pub ready_timeout_secs: u64,
    /// The state directory (the supervisor deletes an ephemeral VM whose owner died).
    pub state_dir: PathBuf,
    /// Hold the disk's lock while running (false only for images marked shareable).
    pub lock_disk: bool,
    /// `nat` networking: the TAP the supervisor creates before QEMU starts (QEMU attaches
    /// to it by name), the guest's address and its egress rules.
    #[serde(default)]
    pub nat: Option<crate::network::NatPlan>,
    /// `user` networking with egress denied: QEMU's `restrict=on` (no guest traffic out).
    #[serde(default)]
    pub restrict_user_net: bool,
    /// A network device with nothing behind it: a VM restored from a state saved with a
    /// network device (devices must match) that gets no network.
    #[serde(default)]
    pub unplugged_nic: bool,
    /// Resume from a saved state instead of booting the kernel.
    #[serde(default)]
    pub restore: Option<RestoreFrom>,
    /// Make a template: boot, wait for the agent, save the VM's state into this directory
    /// (see [`crate::snapshot`]) and end, recording nothing in the state database.
    #[serde(default)]
    pub template_out: Option<PathBuf>,
}

impl LaunchSpec {
    /// Whether QEMU can give the guest's freed memory back to the host. Not in a VM resumed
    /// from a template: its RAM is a private copy-on-write map of the template's file, and
    /// QEMU discards file-backed RAM only by punching holes in the file, which it refuses
    /// for a file opened read-only ("Discarding RAM with readonly files is not supported";
    /// read-write, it would punch them into the template every VM shares).
    pub fn can_discard_ram(&self) -> bool {
        self.template_out.is_some() || self.restore.as_ref().is_none_or(|r| r.ram.is_none())
    }
}

/// A saved state to resume from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreFrom {
    /// The migration stream (RAM and device state).
    pub memory: PathBuf,
    /// The kernel command line the saved VM booted with (the restored one must match it).
    pub cmdline: String,
    /// A template's RAM file, mapped copy-on-write instead of loading RAM from `memory`
    /// (which then holds the device state only).
    #[serde(default)]
    pub ram: Option<PathBuf>,
}

/// Host-side endpoints a backend wires the VM to; the supervisor listens on each.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// Unix socket the agent's virtio-serial port connects to.
    pub agent: PathBuf,
    /// Unix socket the guest's serial console connects to.
    pub console: PathBuf,
    /// Unix socket the backend's control channel (QMP) connects to.
    pub control: PathBuf,
}

/// A hypervisor backend: turns a launch spec into the process that runs the VM.
pub trait Backend: Send + Sync {
    /// Short name, e.g. `qemu-microvm`.
    fn name(&self) -> &'static str;
    /// The command that runs the VM; its endpoints connect to the given sockets.
    fn command(&self, spec: &LaunchSpec, endpoints: &Endpoints) -> Result<std::process::Command>;
}

//! Virtual machine monitors behind one contract, [`Vmm`]: launch a machine from a
//! [`LaunchSpec`], then pause, resume, save its state to a file, load it from one, quit and
//! kill it. The supervisor drives a machine only through this trait; what a backend speaks
//! to its process (QEMU's monitor, QMP) stays inside the backend.
//!
//! Two backends: [`qemu::QemuVmm`] (QEMU `microvm` under KVM or TCG, the product) and
//! [`fake::FakeVmm`] (the real guest agent run as a host process, no isolation at all; the
//! fast test lane selects it with `SMOLVM_VMM=fake`).

pub mod accel;
pub mod fake;
pub mod jail;
pub mod qemu;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use accel::{detect as detect_accelerator, AccelReport, Accelerator};

use crate::config::NetworkMode;
use crate::error::{Error, Result};

/// Which monitor runs a VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmmKind {
    /// QEMU `microvm` (KVM, or TCG where KVM is unusable).
    #[default]
    Qemu,
    /// No VM: the guest agent runs as a process of the host's user, commands run on the
    /// host. For the fast test lane only; it isolates nothing.
    Fake,
}

impl VmmKind {
    /// The environment variable that picks the monitor (`qemu`, the default, or `fake`).
    pub const ENV: &'static str = "SMOLVM_VMM";

    /// The monitor `SMOLVM_VMM` names; unset means QEMU.
    pub fn from_env() -> Result<VmmKind> {
        match std::env::var(Self::ENV) {
            Err(_) => Ok(VmmKind::Qemu),
            Ok(v) => v.parse(),
        }
    }

    /// Lowercase name (`qemu`, `fake`).
    pub fn as_str(self) -> &'static str {
        match self {
            VmmKind::Qemu => "qemu",
            VmmKind::Fake => "fake",
        }
    }

    /// Whether a machine of this kind can save and load its state (templates, snapshots,
    /// fork and pause need it).
    pub fn can_save(self) -> bool {
        self == VmmKind::Qemu
    }
}

impl std::str::FromStr for VmmKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<VmmKind> {
        match s {
            "qemu" => Ok(VmmKind::Qemu),
            "fake" => Ok(VmmKind::Fake),
            other => Err(Error::InvalidConfig {
                field: Self::ENV,
                value: other.to_string(),
                allowed: "`qemu` (the default) or `fake` (the test lane's host-process stand-in)"
                    .into(),
            }),
        }
    }
}

impl std::fmt::Display for VmmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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
    /// The monitor that runs it.
    #[serde(default)]
    pub vmm: VmmKind,
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

/// Host-side files a machine is wired to: the supervisor reads the agent and keeps the logs.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// Unix socket the agent's virtio-serial port connects to.
    pub agent: PathBuf,
    /// Unix socket the guest's serial console connects to.
    pub console: PathBuf,
    /// Unix socket the backend's control channel (QMP) connects to.
    pub control: PathBuf,
    /// Where the guest's console output is kept (capped).
    pub console_log: PathBuf,
    /// Where the monitor's own output goes (the supervisor's log).
    pub log: PathBuf,
}

impl Endpoints {
    /// The endpoints inside a VM's directory.
    pub fn in_dir(dir: &Path) -> Endpoints {
        use crate::supervisor::files;
        Endpoints {
            agent: dir.join(files::AGENT_SOCK),
            console: dir.join(files::CONSOLE_SOCK),
            control: dir.join(files::QMP_SOCK),
            console_log: dir.join(files::CONSOLE_LOG),
            log: dir.join(files::SUPERVISOR_LOG),
        }
    }

    /// The sockets, for removal when the machine is gone.
    pub fn sockets(&self) -> [&Path; 3] {
        [&self.agent, &self.console, &self.control]
    }
}

/// Where a saved machine's RAM goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SavedRam {
    /// Into the state file with the devices (a snapshot: loads anywhere).
    InStream,
    /// Left in the shared file that backs it (a template: VMs resumed from it map that file).
    InSharedFile,
}

/// One running machine and everything that can be done to it. Every method has a deadline
/// inside; none waits forever on the machine.
///
/// The life of a machine: [`Vmm::launch`], then [`Vmm::connect`]; for a spec with
/// `restore`, [`Vmm::load`] then [`Vmm::resume`]; then [`Vmm::agent`] gives the stream
/// the guest agent answers on. [`Vmm::exit_signal`] can be raced against any of these: a
/// machine that dies mid-way ends them.
#[allow(async_fn_in_trait)] // the supervisor drives its one machine on a single thread
pub trait Vmm: Sized {
    /// Short name, e.g. `qemu-microvm`.
    const NAME: &'static str;

    /// Starts the machine's process for `spec`, wired to `endpoints`.
    fn launch(spec: &LaunchSpec, endpoints: &Endpoints) -> Result<Self>;

    /// The pid of the machine's process (QEMU's, or the fake's agent).
    fn pid(&self) -> u32;

    /// Connects the host's side: the console and the control channel.
    async fn connect(&mut self) -> Result<()>;

    /// Loads a saved state into a machine launched with `restore`; it is paused after.
    async fn load(&mut self, from: &RestoreFrom) -> Result<()>;

    /// The connected stream of the guest agent's port.
    async fn agent(&mut self) -> Result<tokio::net::UnixStream>;

    /// Freezes the guest.
    async fn pause(&mut self) -> Result<()>;

    /// Lets a paused (or just loaded) guest run.
    async fn resume(&mut self) -> Result<()>;

    /// Writes the state of a paused machine to `memory`, a new file only the owner reads.
    async fn save(&mut self, memory: &Path, ram: SavedRam) -> Result<()>;

    /// Watches for the end of the machine's process (cancel-safe, usable while any other
    /// method runs).
    fn exit_signal(&self) -> ExitSignal;

    /// Ends the machine: asks its process to quit, then kills it (bounded).
    async fn quit(&mut self);

    /// Kills the machine's process at once and reaps it.
    async fn kill(&mut self);

    /// The last lines the monitor wrote (for a failure message).
    fn last_words(&self) -> String;
}

/// The tail of a log file, its last lines joined by ` | ` (for one-line error messages).
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Says how a monitor process ended.
pub(crate) fn describe_exit(
    what: &str,
    status: std::io::Result<std::process::ExitStatus>,
) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("{what} exited with code {c}"),
            (_, Some(sig)) => format!("{what} was killed by signal {sig}"),
            _ => format!("{what} exited"),
        },
        Err(e) => format!("lost track of {what}: {e}"),
    }
}

/// The most files a monitor process may have open (QEMU needs a few dozen: its disks, sockets,
/// TAP, eventfds per vCPU and queue).
pub(crate) const MONITOR_MAX_FILES: libc::rlim_t = 4096;

/// A monitor's process, waited for by a task of its own: anything can watch for its end
/// ([`ExitSignal`]) while the machine is being driven.
pub(crate) struct MonitorProcess {
    pid: u32,
    signal_tx: tokio::sync::mpsc::UnboundedSender<i32>,
    exited: tokio::sync::watch::Receiver<Option<String>>,
}

/// Resolves when a machine's process has ended, with how it ended. Cheap to clone; owns
/// nothing of the machine.
#[derive(Clone)]
pub struct ExitSignal(tokio::sync::watch::Receiver<Option<String>>);

impl ExitSignal {
    /// Waits until the process has ended; says how.
    pub async fn wait(&mut self) -> String {
        match self.0.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or_default(),
            Err(_) => "the machine's process was lost".into(),
        }
    }

    /// How it ended, if it has.
    pub fn ended(&self) -> Option<String> {
        self.0.borrow().clone()
    }
}

impl MonitorProcess {
    /// Spawns `cmd`: its output goes to `log`, it is killed when its supervisor dies.
    pub(crate) fn spawn(
        mut cmd: std::process::Command,
        log: &Path,
        what: &'static str,
    ) -> Result<MonitorProcess> {
        use std::os::unix::process::CommandExt;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(crate::error::io_err(format!("opening {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(crate::error::io_err("duplicating the log handle"))?;
        let my_pid = std::process::id() as i32;
        let jailed = jail::enabled();
        cmd.stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // The machine dies with its supervisor, whatever kills the supervisor.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != my_pid {
                    return Err(std::io::Error::other("supervisor exited during spawn"));
                }
                // Nothing it runs gains privileges; it writes no core file (a core of a VM
                // holds the guest's memory) and opens a bounded number of files.
                if !jailed {
                    return Ok(());
                }
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let no_core = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                let files = libc::rlimit {
                    rlim_cur: MONITOR_MAX_FILES,
                    rlim_max: MONITOR_MAX_FILES,
                };
                if libc::setrlimit(libc::RLIMIT_CORE, &no_core) != 0
                    || libc::setrlimit(libc::RLIMIT_NOFILE, &files) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .map_err(crate::error::io_err(format!("starting {what}")))?;
        let pid = child.id().unwrap_or(0);
        let (signal_tx, mut signal_rx) = tokio::sync::mpsc::unbounded_channel::<i32>();
        let (exit_tx, exited) = tokio::sync::watch::channel(None);
        // Signals go through this task, which alone reaps the child: a signal can never
        // reach a process that reused the pid.
        tokio::spawn(async move {
            let status = loop {
                tokio::select! {
                    s = child.wait() => break s,
                    Some(sig) = signal_rx.recv() => {
                        if sig == libc::SIGKILL {
                            let _ = child.start_kill();
                        } else if let Some(pid) = child.id() {
                            // SAFETY: kill(2) on our child, not reaped yet.
                            unsafe { libc::kill(pid as i32, sig) };
                        }
                    }
                }
            };
            let _ = exit_tx.send(Some(describe_exit(what, status)));
        });
        Ok(MonitorProcess {
            pid,
            signal_tx,
            exited,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    pub(crate) fn exit_signal(&self) -> ExitSignal {
        ExitSignal(self.exited.clone())
    }

    /// Waits at most `limit` for the process to end by itself; whether it did.
    pub(crate) async fn ended_within(&self, limit: std::time::Duration) -> bool {
        tokio::time::timeout(limit, self.exit_signal().wait())
            .await
            .is_ok()
    }

    /// Sends the process a signal, if it still runs.
    pub(crate) fn signal(&self, sig: i32) {
        let _ = self.signal_tx.send(sig);
    }

    /// Kills the process (if it still runs) and waits until it is reaped.
    pub(crate) async fn kill(&self) {
        self.signal(libc::SIGKILL);
        self.exit_signal().wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monitor_is_named_or_refused_naming_what_is_allowed() {
        assert_eq!("qemu".parse::<VmmKind>().unwrap(), VmmKind::Qemu);
        assert_eq!("fake".parse::<VmmKind>().unwrap(), VmmKind::Fake);
        let e = "firecracker".parse::<VmmKind>().unwrap_err().to_string();
        assert!(
            e.contains("SMOLVM_VMM") && e.contains("firecracker") && e.contains("qemu"),
            "{e}"
        );
        assert!(VmmKind::Qemu.can_save() && !VmmKind::Fake.can_save());
    }

    #[tokio::test]
    async fn a_monitor_process_is_watched_signalled_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut cmd = std::process::Command::new("sh");
        cmd.args([
            "-c",
            "trap 'echo got TERM; exit 7' TERM; echo started; while :; do sleep 0.05; done",
        ]);
        let p = MonitorProcess::spawn(cmd, &log, "the test monitor").unwrap();
        assert!(p.pid() > 0);
        assert!(p.exit_signal().ended().is_none());
        assert!(!p.ended_within(std::time::Duration::from_millis(100)).await);
        // The trap is set once it says so.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while log_tail(&log, 1) != "started" {
            assert!(
                std::time::Instant::now() < deadline,
                "the monitor never started"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        p.signal(libc::SIGTERM);
        let how = p.exit_signal().wait().await;
        assert_eq!(how, "the test monitor exited with code 7");
        assert_eq!(log_tail(&log, 6), "started | got TERM");
        // Signals after the end reach nothing; kill returns at once.
        p.kill().await;
    }

    #[tokio::test]
    async fn a_killed_monitor_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("600");
        let p = MonitorProcess::spawn(cmd, &dir.path().join("log"), "sleep").unwrap();
        p.kill().await;
        assert_eq!(
            p.exit_signal().ended().as_deref(),
            Some("sleep was killed by signal 9")
        );
    }
}

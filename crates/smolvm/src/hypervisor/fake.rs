//! The fake monitor: no virtual machine at all. The real guest agent (`smolvm-agent
//! --listen-unix`) runs as a process of the host's user, and the supervisor talks to it over
//! the same Unix socket a QEMU guest's agent port would use. Everything above the monitor
//! (the supervisor, its API, the runtime's lifecycle, env, files, forwards, gc) runs as it
//! does with QEMU, in milliseconds instead of seconds: the fast test lane.
//!
//! It isolates nothing (commands run on the host) and saves no state: pause, save and load
//! are refused with [`Error::Unsupported`]. It is picked only by `SMOLVM_VMM=fake`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixStream;

use crate::error::{Error, Result};
use crate::hypervisor::{
    log_tail, Endpoints, ExitSignal, LaunchSpec, MonitorProcess, RestoreFrom, SavedRam, Vmm,
};

/// Longest the agent may take to listen on its socket.
const LISTEN: Duration = Duration::from_secs(10);
/// Longest the agent may take to exit on SIGTERM before it is killed.
const QUIT: Duration = Duration::from_secs(2);
/// Rounds of killing what the agent left behind (each round reaches one generation).
const SWEEP_ROUNDS: usize = 50;

/// The agent run as a host process.
pub struct FakeVmm {
    process: MonitorProcess,
    agent_sock: PathBuf,
    log: PathBuf,
}

/// The agent binary the fake runs: `SMOLVM_AGENT_BIN`, else `smolvm-agent` beside this
/// program, else the static build in the same cargo target directory.
pub fn agent_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SMOLVM_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let mut looked = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        looked.push(dir.join("smolvm-agent"));
        for profile in ["release", "debug"] {
            looked.push(
                dir.join("..")
                    .join("x86_64-unknown-linux-gnu")
                    .join(profile)
                    .join("smolvm-agent"),
            );
        }
    }
    looked
        .into_iter()
        .find(|p| p.is_file())
        .ok_or(Error::MissingBinary {
            binary: "smolvm-agent",
            purpose: "that the fake monitor runs (beside `smolvm`, or its static build)",
            hint: "build it with `cargo build -p smolvm-agent`, or point SMOLVM_AGENT_BIN at one",
        })
}

impl FakeVmm {
    /// Kills whatever the agent's commands left running. The supervisor is their subreaper
    /// (set at launch), so every orphan of the agent's tree becomes its child; it kills its
    /// children, generation by generation, and reaps them.
    fn sweep_orphans(&self) {
        let me = std::process::id();
        for _ in 0..SWEEP_ROUNDS {
            let orphans = children_of(me);
            if orphans.is_empty() {
                return;
            }
            for pid in orphans {
                // SAFETY: plain syscalls on pids that are our own children (not reaped yet,
                // so the numbers cannot have been reused).
                unsafe {
                    libc::kill(-(pid as i32), libc::SIGKILL);
                    libc::kill(pid as i32, libc::SIGKILL);
                    libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
                }
            }
        }
        tracing::warn!("processes of the fake VM kept appearing; some may be left");
    }
}

/// The pids whose parent is `parent` (from /proc).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    // Fields after the command name, which may hold spaces and parens.
                    let rest = s.get(s.rfind(')')? + 2..)?.to_string();
                    rest.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

impl Vmm for FakeVmm {
    const NAME: &'static str = "fake";

    fn launch(spec: &LaunchSpec, ep: &Endpoints) -> Result<FakeVmm> {
        if spec.restore.is_some() || spec.template_out.is_some() {
            return Err(Error::unsupported_by(
                Self::NAME,
                "resume a saved state or make a template",
            ));
        }
        // The agent's environment store, standing in for the guest's root.
        let root = ep.agent.with_file_name("fake-root");
        std::fs::create_dir_all(&root)
            .map_err(crate::error::io_err(format!("creating {}", root.display())))?;
        // SAFETY: prctl with constant arguments.
        unsafe {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1);
        }
        let mut cmd = std::process::Command::new(agent_binary()?);
        cmd.arg("--listen-unix")
            .arg(&ep.agent)
            .arg("--root")
            .arg(&root);
        let _ = std::fs::remove_file(&ep.agent);
        let process = MonitorProcess::spawn(cmd, &ep.console_log, "the fake VM's agent")?;
        Ok(FakeVmm {
            process,
            agent_sock: ep.agent.clone(),
            log: ep.console_log.clone(),
        })
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    async fn connect(&mut self) -> Result<()> {
        Ok(())
    }

    async fn load(&mut self, _from: &RestoreFrom) -> Result<()> {
        Err(Error::unsupported_by(Self::NAME, "load a saved state"))
    }

    async fn agent(&mut self) -> Result<UnixStream> {
        let deadline = tokio::time::Instant::now() + LISTEN;
        loop {
            match UnixStream::connect(&self.agent_sock).await {
                Ok(s) => return Ok(s),
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => {
                    return Err(crate::error::io_err(format!(
                        "connecting to the fake VM's agent at {}",
                        self.agent_sock.display()
                    ))(e))
                }
            }
        }
    }

    async fn pause(&mut self) -> Result<()> {
        Err(Error::unsupported_by(Self::NAME, "pause a VM"))
    }

    async fn resume(&mut self) -> Result<()> {
        Err(Error::unsupported_by(Self::NAME, "resume a VM"))
    }

    async fn save(&mut self, _memory: &Path, _ram: SavedRam) -> Result<()> {
        Err(Error::unsupported_by(Self::NAME, "save a VM's state"))
    }

    fn exit_signal(&self) -> ExitSignal {
        self.process.exit_signal()
    }

    async fn quit(&mut self) {
        if self.process.exit_signal().ended().is_none() {
            self.process.signal(libc::SIGTERM);
            if !self.process.ended_within(QUIT).await {
                self.process.kill().await;
            }
        }
        self.sweep_orphans();
    }

    async fn kill(&mut self) {
        self.process.kill().await;
        self.sweep_orphans();
    }

    fn last_words(&self) -> String {
        log_tail(&self.log, 6)
    }
}

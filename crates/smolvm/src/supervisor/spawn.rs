//! The client's half of starting a supervisor: spawn `smolvm __supervise DIR` with the VM's
//! lock, read its start-up events and wait (bounded) until it reports ready or failed.

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use smolvm_protocol::HelloReply;

use super::{files, StartupEvent};
use crate::error::{io_err, Error};

/// A supervisor that reported ready.
pub(crate) struct Launched {
    /// When QEMU was running, from the start of the call.
    pub qemu_started: Option<Duration>,
    /// The agent's handshake answer.
    pub hello: HelloReply,
}

/// Why a supervisor did not become ready. It has been killed in every case.
pub(crate) enum LaunchError {
    /// It reported a failure (and recorded it).
    Failed(String),
    /// It said nothing within the deadline.
    TimedOut,
    /// It exited without a word; the tail of its log.
    Vanished(String),
    /// It could not be spawned.
    Spawn(Error),
}

/// Spawns the supervisor of the VM in `dir`, handing it `lock` (the VM's held lock), and
/// waits until `deadline` for it to be ready.
pub(crate) fn launch(
    dir: &Path,
    lock: std::fs::File,
    deadline: Instant,
) -> std::result::Result<Launched, LaunchError> {
    let t0 = Instant::now();
    let bin = super::supervisor_binary().map_err(LaunchError::Spawn)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(files::SUPERVISOR_LOG))
        .map_err(|e| LaunchError::Spawn(io_err("opening supervisor.log")(e)))?;
    let mut cmd = Command::new(&bin);
    let lock_fd = std::os::fd::AsRawFd::as_raw_fd(&lock);
    cmd.arg("__supervise")
        .arg(dir)
        .env(super::LOCK_FD_ENV, lock_fd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    // SAFETY: setsid and fcntl are async-signal-safe. The supervisor gets its own session so
    // a Ctrl-C in the caller's terminal does not reach it, and inherits the held lock
    // (close-on-exec is cleared in the child's own descriptor table only, so children
    // spawned by other threads never see it).
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if libc::fcntl(lock_fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    // Our descriptor closes; the lock stays with the supervisor's copy.
    drop(lock);
    let mut child = spawned.map_err(|e| {
        LaunchError::Spawn(io_err(format!("starting the supervisor {}", bin.display()))(e))
    })?;
    let sup_pid = child.id();
    let stdout = child.stdout.take();
    // Reap the supervisor whenever it ends, so no zombie outlives it.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    let (tx, rx) = mpsc::channel::<StartupEvent>();
    if let Some(out) = stdout {
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out)
                .lines()
                .map_while(|l| l.ok())
                .take(16)
            {
                if let Ok(ev) = serde_json::from_str::<StartupEvent>(&line) {
                    if tx.send(ev).is_err() {
                        break;
                    }
                }
            }
        });
    }
    let kill = || {
        // SAFETY: plain kill(2) of our own child's pid.
        unsafe {
            libc::kill(sup_pid as i32, libc::SIGKILL);
        }
    };
    let mut qemu_started = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(StartupEvent::Started { .. }) => qemu_started = Some(t0.elapsed()),
            Ok(StartupEvent::Ready { hello }) => {
                return Ok(Launched {
                    qemu_started,
                    hello,
                })
            }
            Ok(StartupEvent::Failed { reason }) => {
                kill();
                return Err(LaunchError::Failed(reason));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                kill();
                return Err(LaunchError::TimedOut);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                kill();
                let tail = std::fs::read_to_string(dir.join(files::SUPERVISOR_LOG))
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .join(" | ");
                return Err(LaunchError::Vanished(tail));
            }
        }
    }
}

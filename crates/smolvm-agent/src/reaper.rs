//! PID 1 after boot: reaps every zombie (orphans are re-parented to it), watches the server
//! process, and powers the machine off when the server dies or a power-off is requested.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::mounts;

/// How long processes get to exit after SIGTERM on a graceful power-off.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for SIGKILLed processes to be reaped.
const KILL_GRACE: Duration = Duration::from_millis(500);

/// The signals PID 1 handles synchronously (blocked, then taken with `sigwait`).
fn handled() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.add(Signal::SIGPWR);
    set
}

/// Blocks the signals PID 1 waits for. Call before forking, so no SIGCHLD is lost.
pub fn block_signals() {
    if let Err(e) = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&handled()), None) {
        tracing::warn!("cannot block signals: {}", e.desc());
    }
}

/// Unblocks every signal (in the forked server, which must not inherit PID 1's mask).
pub fn unblock_signals() {
    if let Err(e) = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None) {
        tracing::warn!("cannot unblock signals: {}", e.desc());
    }
}

/// PID 1's loop: reap zombies; power off when `server` exits or SIGPWR arrives.
pub fn supervise(server: Pid) -> ! {
    let set = handled();
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => reap(server),
            Ok(Signal::SIGPWR) => power_off_gracefully(),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("sigwait failed: {}", e.desc());
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reaps every child that has exited.
fn reap(server: Pid) {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return,
            Ok(status) if status.pid() == Some(server) => server_died(status),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exit status {code}"),
        WaitStatus::Signaled(_, sig, _) => format!("killed by {}", sig.as_str()),
        other => format!("{other:?}"),
    }
}

/// The server is gone: nothing can reach this guest any more. Reboot, which ends QEMU
/// (run with `-no-reboot`), so the host sees an error instead of a silent hang.
fn server_died(status: WaitStatus) -> ! {
    tracing::error!("server exited ({}), powering off", describe(status));
    nix::unistd::sync();
    finish(RebootMode::RB_AUTOBOOT)
}

/// Powers off at once after a fatal boot error.
pub fn power_off(reason: &str) -> ! {
    tracing::error!("{reason}; powering off");
    nix::unistd::sync();
    finish(RebootMode::RB_POWER_OFF)
}

/// SIGPWR: ask every process to stop, then kill the rest, flush, remount / read-only and
/// power off.
fn power_off_gracefully() -> ! {
    tracing::info!("power-off requested");
    signal_all_and_reap(Signal::SIGTERM, TERM_GRACE);
    signal_all_and_reap(Signal::SIGKILL, KILL_GRACE);
    mounts::quiesce_root();
    finish(RebootMode::RB_POWER_OFF)
}

/// Sends `sig` to every process but PID 1 and reaps them until none is left or `grace` passed.
fn signal_all_and_reap(sig: Signal, grace: Duration) {
    if nix::unistd::getpid().as_raw() != 1 {
        return;
    }
    let _ = kill(Pid::from_raw(-1), sig);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(10)),
            Err(Errno::ECHILD) => return,
            _ => {}
        }
    }
}

/// Reboots or powers off. Should that fail, exiting makes the kernel panic, which (with
/// `panic=-1` or `reboot=t` and `-no-reboot`) still ends the VM.
fn finish(mode: RebootMode) -> ! {
    let err = match reboot(mode) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    tracing::error!("reboot failed: {}", err.desc());
    std::process::exit(1)
}

//! PID 1: boots the guest from the initramfs into the root disk, then forks the server and
//! becomes the reaper. Each step logs one line with the milliseconds since the agent started.

use std::fs::OpenOptions;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::unistd::{fork, ForkResult};
use smolvm_protocol::boot::GuestNet;

use crate::cli::Options;
use crate::cmdline::BootParams;
use crate::error::{AgentError, Result};
use crate::server::{self, Endpoint, ServerConfig};
use crate::shutdown::OnShutdown;
use crate::{grow, handshake, logging, modules, mounts, net, reaper, sshd};

/// How long to wait for the root device to appear.
const ROOT_WAIT: Duration = Duration::from_secs(5);
/// Interval between looks for it.
const ROOT_POLL: Duration = Duration::from_millis(5);

/// Runs the guest's init. Never returns: PID 1 must not exit.
pub fn run(opts: &Options) -> ! {
    let start = Instant::now();
    attach_console();
    // /proc is needed to read the command line, and so the log level; mount first, log after.
    let early = mounts::mount_early();
    let params = BootParams::from_proc();
    logging::init(opts.log.as_deref().or(params.log.as_deref()));
    reaper::block_signals();
    if let Err(e) = early.and_then(|()| boot(&params, start)) {
        reaper::power_off(&format!("boot failed: {e}"));
    }
    let mut net = guest_net(&params);
    // The network is configured while the server starts (bringing the interface up and
    // writing to the root disk take a while under emulation); the server's first answer to
    // the host waits for it, so a ready guest always has its network.
    let gate = net.as_ref().and_then(|_| boot_gate());
    if gate.is_none() {
        // Nothing to wait on: configure it before the server starts.
        if let Some(net) = net.take() {
            configure_network(&net, start);
        }
    }
    let cfg = ServerConfig {
        apply_identity: opts.apply_identity,
        state_root: opts.state_root.clone(),
        on_shutdown: OnShutdown::PowerOff,
    };
    // SAFETY: PID 1 has a single thread here (no runtime exists yet), so the child may run
    // arbitrary code.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            if let Some((read_end, write_end)) = gate {
                drop(write_end);
                handshake::set_boot_gate(read_end);
            }
            reaper::unblock_signals();
            std::process::exit(server::run(Endpoint::Port(None), cfg));
        }
        Ok(ForkResult::Parent { child }) => {
            step(start, format_args!("started the server (pid {child})"));
            if let Some(net) = net {
                configure_network(&net, start);
            }
            // Closing the write end lets the server answer the host.
            drop(gate);
            // After the server: reading sshd from the disk must not hold up readiness.
            if let Some(pid) = sshd::start_if_enabled() {
                step(start, format_args!("started sshd (pid {pid})"));
            }
            reaper::supervise(child)
        }
        Err(e) => reaper::power_off(&format!("cannot fork the server: {}", e.desc())),
    }
}

fn step(start: Instant, what: std::fmt::Arguments<'_>) {
    tracing::info!(
        "{what} (+{} ms, {} ms since boot)",
        start.elapsed().as_millis(),
        handshake::boot_ms()
    );
}

/// The boot steps after /dev, /proc and /sys are mounted.
fn boot(params: &BootParams, start: Instant) -> Result<()> {
    step(start, format_args!("mounted /dev, /proc, /sys"));
    let loaded = modules::load_all();
    step(start, format_args!("loaded {loaded} kernel modules"));
    wait_for(&params.root, ROOT_WAIT)?;
    mounts::mount_root(
        &params.root,
        &params.root_fstype,
        params.root_flags.as_deref(),
    )?;
    step(
        start,
        format_args!("mounted {} on {}", params.root, mounts::NEW_ROOT),
    );
    grow::grow_root(
        &params.root,
        &params.root_fstype,
        params.root_flags.as_deref(),
        mounts::NEW_ROOT,
    );
    mounts::switch_root()?;
    mounts::mount_late()?;
    step(
        start,
        format_args!("switched root; mounted /dev/pts, /dev/shm, /tmp, /run"),
    );
    if let Err(e) = handshake::set_hostname(&params.hostname) {
        tracing::warn!("cannot set hostname {}: {e}", params.hostname);
    }
    if let Err(e) = net::bring_up_loopback() {
        tracing::warn!("{e}");
    }
    step(start, format_args!("hostname {}, lo up", params.hostname));
    Ok(())
}

/// The network configuration on the kernel command line; `None` without `smolvm.ip`, and
/// (logged) when a parameter is malformed.
fn guest_net(params: &BootParams) -> Option<GuestNet> {
    match params.guest_net() {
        Ok(net) => net,
        Err(e) => {
            tracing::warn!("network not configured: {e}");
            None
        }
    }
}

/// A close-on-exec pipe (read end, write end) for the server to wait on; `None` (logged)
/// when the kernel refuses one.
fn boot_gate() -> Option<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors into a two-element array.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc != 0 {
        tracing::warn!(
            "cannot make a pipe ({}); configuring the network before starting the server",
            nix::errno::Errno::last()
        );
        return None;
    }
    // SAFETY: both descriptors are fresh and ours alone.
    Some(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Configures the first Ethernet interface and `/etc/resolv.conf` as `net` says. Never
/// fatal: commands reach the guest through the agent channel whatever happens to its
/// network, so a failure is logged and boot goes on.
fn configure_network(net: &GuestNet, start: Instant) {
    let t = Instant::now();
    match net::configure_ethernet(net) {
        Ok((name, waited)) => step(
            start,
            format_args!(
                "{name}: {}/{} mtu {}, default via {} (found after {} us, configured in {} us)",
                net.addr,
                net.prefix,
                net.mtu,
                net.gateway,
                waited.as_micros(),
                (t.elapsed() - waited).as_micros()
            ),
        ),
        Err(e) => tracing::warn!("network not configured: {e}"),
    }
    if !net.dns.is_empty() {
        match net::write_resolv_conf(Path::new(net::RESOLV_CONF), &net.dns) {
            Ok(()) => tracing::debug!("wrote {} ({:?})", net::RESOLV_CONF, net.dns),
            Err(e) => tracing::warn!("name servers not configured: {e}"),
        }
    }
}

/// Waits for `device` to appear, polling (there is no udev to tell us).
fn wait_for(device: &str, wait: Duration) -> Result<()> {
    let start = Instant::now();
    while !Path::new(device).exists() {
        if start.elapsed() >= wait {
            return Err(AgentError::RootDeviceMissing {
                device: device.to_owned(),
                waited_ms: wait.as_millis() as u64,
            });
        }
        std::thread::sleep(ROOT_POLL);
    }
    Ok(())
}

/// Gives PID 1 a stdin, stdout and stderr on /dev/console when the kernel could not (an
/// initramfs without a /dev/console node), so the log reaches the console.
fn attach_console() {
    // SAFETY: F_GETFD only inspects the descriptor table.
    let missing: Vec<i32> = (0..3)
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1)
        .collect();
    if missing.is_empty() {
        return;
    }
    let _ = mounts::mount_dev();
    let Ok(console) = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console")
    else {
        return;
    };
    let fd = console.into_raw_fd();
    for target in missing {
        if target != fd {
            // SAFETY: both descriptors are valid; dup2 replaces a closed descriptor.
            unsafe { libc::dup2(fd, target) };
        }
    }
    if fd > 2 {
        // SAFETY: `fd` is ours and no longer needed.
        unsafe { libc::close(fd) };
    }
}

//! The per-VM supervisor process: spawns QEMU as its child, owns the agent channel, serves
//! the VM's API socket and records the VM's end in the state database. It outlives the
//! client that started it; `stop` (or QEMU dying) ends it.

pub mod agent_link;
pub mod api;
pub mod console;
pub mod forward;
pub mod owner;
pub mod saved;
pub mod spawn;
pub mod stale;

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use smolvm_protocol::{HelloReply, VmStatus};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::error::{io_err, Error, Result};
use crate::hypervisor::qemu::QemuMicrovm;
use crate::hypervisor::qmp::Qmp;
use crate::hypervisor::{Backend, Endpoints, LaunchSpec};
use crate::store::{Store, VmState};

/// Lines the supervisor writes to its stdout while starting, one JSON object per line;
/// the client that spawned it reads them to time the phases.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartupEvent {
    /// QEMU is running.
    Started {
        /// QEMU's pid.
        qemu_pid: u32,
    },
    /// The agent handshake completed.
    Ready {
        /// The agent's answer.
        hello: HelloReply,
    },
    /// Starting failed.
    Failed {
        /// Why.
        reason: String,
    },
}

/// File names inside a VM's directory.
pub mod files {
    /// Launch spec written by the client.
    pub const SPEC: &str = "spec.json";
    /// The VM's API socket.
    pub const API_SOCK: &str = "api.sock";
    /// Socket QEMU's agent port connects to.
    pub const AGENT_SOCK: &str = "agent.sock";
    /// Socket QEMU's serial console connects to.
    pub const CONSOLE_SOCK: &str = "console.sock";
    /// Socket QEMU's monitor connects to.
    pub const QMP_SOCK: &str = "qmp.sock";
    /// Guest console output.
    pub const CONSOLE_LOG: &str = "console.log";
    /// The supervisor's own log (and QEMU's stderr).
    pub const SUPERVISOR_LOG: &str = "supervisor.log";
    /// Held locked by the running supervisor.
    pub const LOCK: &str = "supervisor.lock";
    /// Environment changes made while the VM was not running, applied at its next boot
    /// (mode 0600).
    pub const PENDING_ENV: &str = "env.pending";
}

/// Entry point of `smolvm __supervise DIR`. Returns the process exit code.
pub fn main(vm_dir: &Path) -> i32 {
    let spec = match read_spec(vm_dir) {
        Ok(spec) => spec,
        Err(e) => {
            emit(&StartupEvent::Failed {
                reason: e.to_string(),
            });
            return 1;
        }
    };
    // One supervisor per VM: hold an exclusive lock for the whole life of this process
    // (released only after the runtime is gone, so "not running" means "exiting at most").
    // `Vm::start` takes it before spawning us and hands it over.
    let _lock = match inherited_lock(vm_dir).map_or_else(|| take_lock(vm_dir, &spec.id), Ok) {
        Ok(l) => l,
        Err(e) => {
            emit(&StartupEvent::Failed {
                reason: e.to_string(),
            });
            return 1;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            emit(&StartupEvent::Failed {
                reason: format!("cannot start the supervisor runtime: {e}"),
            });
            return 1;
        }
    };
    let result = rt.block_on(run(vm_dir, &spec));
    drop(rt);
    // QEMU is gone (or going: killed when the runtime dropped it): the VM's TAP and rules go.
    // (Already done when the VM was deleted here: its TAP is gone then.)
    if let Some(nat) = spec
        .nat
        .as_ref()
        .filter(|n| crate::network::tap::exists(&n.tap))
    {
        if let Err(e) = crate::network::teardown(&nat.tap) {
            tracing::error!(error = %e, "could not remove the VM's network (`smolvm gc` retries)");
        }
    }
    match result {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "supervisor failed");
            // Record the failure ourselves: the client that started us may be gone.
            if let Ok(store) = Store::open(&spec.db_path) {
                let _ = store.set_state(&spec.id, VmState::Error, Some(&e.to_string()));
            }
            emit(&StartupEvent::Failed {
                reason: e.to_string(),
            });
            1
        }
    }
}

fn read_spec(vm_dir: &Path) -> Result<LaunchSpec> {
    let spec_path = vm_dir.join(files::SPEC);
    serde_json::from_slice(
        &std::fs::read(&spec_path).map_err(io_err(format!("reading {}", spec_path.display())))?,
    )
    .map_err(|e| Error::StartFailed {
        id: vm_dir.display().to_string(),
        reason: format!("bad launch spec: {e}"),
    })
}

/// Whether a supervisor currently runs the VM in `vm_dir` (it holds the VM's lock for its
/// whole life; the kernel releases it however the process ends, so this never lies). Only
/// asks: taking nothing, it never makes a concurrent [`try_lock`] fail.
pub fn is_running(vm_dir: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(vm_dir.join(files::LOCK)) else {
        return false;
    };
    let mut query = whole_file_lock(libc::F_WRLCK);
    // SAFETY: F_OFD_GETLK on a descriptor we own only fills `query`, which outlives the call.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut query) };
    if rc != 0 {
        // Not knowing, say "running": callers then leave the VM's files alone.
        tracing::warn!(
            dir = %vm_dir.display(),
            "cannot query the VM's lock: {}",
            std::io::Error::last_os_error()
        );
        return true;
    }
    query.l_type != libc::F_UNLCK as libc::c_short
}

/// A lock request covering the whole file, for the open-file-description (`F_OFD_*`) locks
/// that guard a VM: owned by the open file (passed on with its descriptor, dropped when its
/// last descriptor closes), and testable without taking them.
fn whole_file_lock(kind: libc::c_int) -> libc::flock {
    // SAFETY: `flock` is plain data, for which all zeroes (the whole file, pid 0 as OFD
    // locks require) is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl
}

/// Environment variable naming the descriptor of the VM's lock, already held, that the
/// starting client hands to the supervisor.
pub const LOCK_FD_ENV: &str = "SMOLVM_SUPERVISOR_LOCK_FD";

/// Opens the VM's lock file and takes its lock without waiting. `None` when a supervisor
/// (or a start, delete or fork in progress) holds it. The lock is an exclusive OFD lock on
/// the returned file: closing every descriptor of it releases the lock; nothing unlocks it
/// explicitly.
pub(crate) fn try_lock(vm_dir: &Path) -> Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    let lock_path = vm_dir.join(files::LOCK);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(format!("opening {}", lock_path.display())))?;
    let request = whole_file_lock(libc::F_WRLCK);
    // SAFETY: F_OFD_SETLK on a descriptor we own reads `request`, which outlives the call.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &request) };
    if rc == 0 {
        return Ok(Some(f));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(None),
        _ => Err(io_err(format!("locking {}", lock_path.display()))(e)),
    }
}

/// How long a client retries the VM's lock before taking it for held: a process that
/// another thread of ours is spawning holds copies of our descriptors (a lock we just let
/// go among them) until its `exec`, a few milliseconds.
pub(crate) const LOCK_RETRY: Duration = Duration::from_secs(1);

/// [`try_lock`], retried for up to `wait` (see [`LOCK_RETRY`]).
pub(crate) fn lock_within(vm_dir: &Path, wait: Duration) -> Result<Option<std::fs::File>> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(f) = try_lock(vm_dir)? {
            return Ok(Some(f));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The lock handed over by the client that spawned us, if it is really this VM's lock.
fn inherited_lock(vm_dir: &Path) -> Option<std::fs::File> {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::MetadataExt;
    let fd: i32 = std::env::var(LOCK_FD_ENV).ok()?.parse().ok()?;
    std::env::remove_var(LOCK_FD_ENV);
    if fd < 3 {
        return None;
    }
    // SAFETY: F_GETFD only checks that the descriptor is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the descriptor is open and nothing else in this process owns it.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    // Keep it from QEMU and anything else we spawn.
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    let ours = std::fs::metadata(vm_dir.join(files::LOCK)).ok()?;
    let given = f.metadata().ok()?;
    (ours.ino() == given.ino() && ours.dev() == given.dev()).then_some(f)
}

/// Takes the VM's supervisor lock, or says another supervisor has it.
fn take_lock(vm_dir: &Path, id: &str) -> Result<std::fs::File> {
    try_lock(vm_dir)?.ok_or_else(|| Error::BadState {
        id: id.to_string(),
        state: "running".into(),
        hint: "another supervisor already runs this VM".into(),
    })
}

fn emit(ev: &StartupEvent) {
    if let Ok(line) = serde_json::to_string(ev) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Points stdout at /dev/null so the client's pipe closes once start-up is reported.
fn detach_stdout() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto fd 1 with a valid open fd.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
}

fn bind(path: &Path) -> Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(io_err(format!("listening on {}", path.display())))
}

async fn accept(l: &UnixListener, what: &str, timeout: Duration) -> Result<UnixStream> {
    match tokio::time::timeout(timeout, l.accept()).await {
        Ok(Ok((s, _))) => Ok(s),
        Ok(Err(e)) => Err(io_err(format!("accepting QEMU's {what} connection"))(e)),
        Err(_) => Err(Error::Timeout {
            what: format!("QEMU to connect its {what}"),
            secs: Some(timeout.as_secs_f64()),
        }),
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(6).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

fn describe_exit(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("QEMU exited with code {c}"),
            (_, Some(sig)) => format!("QEMU was killed by signal {sig}"),
            _ => "QEMU exited".into(),
        },
        Err(e) => format!("lost track of QEMU: {e}"),
    }
}

async fn run(vm_dir: &Path, spec: &LaunchSpec) -> Result<()> {
    // One running VM per writable disk (unless its image is marked shareable).
    let _disk_lock = if spec.lock_disk {
        Some(crate::disk::lock(&spec.disk)?)
    } else {
        None
    };

    let ep = Endpoints {
        agent: vm_dir.join(files::AGENT_SOCK),
        console: vm_dir.join(files::CONSOLE_SOCK),
        control: vm_dir.join(files::QMP_SOCK),
    };
    let agent_l = bind(&ep.agent)?;
    let console_l = bind(&ep.console)?;
    let qmp_l = bind(&ep.control)?;
    let api_path = vm_dir.join(files::API_SOCK);

    // The TAP must exist before QEMU attaches to it; removed in `main` when we end.
    if let Some(nat) = &spec.nat {
        crate::network::setup(nat)?;
    }

    let backend = QemuMicrovm;
    let mut cmd = backend.command(spec, &ep)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(vm_dir.join(files::SUPERVISOR_LOG))
        .map_err(io_err("opening supervisor.log"))?;
    let log2 = log
        .try_clone()
        .map_err(io_err("duplicating the log handle"))?;
    let my_pid = std::process::id() as i32;
    cmd.stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // QEMU dies with its supervisor, whatever kills the supervisor.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != my_pid {
                return Err(std::io::Error::other("supervisor exited during spawn"));
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .map_err(io_err("starting qemu-system-x86_64"))?;
    let qemu_pid = child.id().unwrap_or(0);
    emit(&StartupEvent::Started { qemu_pid });

    let boot = async {
        let console = accept(&console_l, "serial console", Duration::from_secs(10)).await?;
        tokio::spawn(console::capture(console, vm_dir.join(files::CONSOLE_LOG)));
        let qmp_stream = accept(&qmp_l, "monitor", Duration::from_secs(10)).await?;
        let mut qmp = Qmp::negotiate(qmp_stream, Duration::from_secs(10)).await?;
        if let Some(r) = &spec.restore {
            if r.ram.is_some() {
                saved::ignore_shared_ram(&mut qmp, true).await?;
                saved::start_load(&mut qmp, &r.memory).await?;
            }
            // The saved VM was paused when its state was written; it is again once loaded.
            saved::await_load(&mut qmp).await?;
            saved::resume(&mut qmp).await?;
            tracing::info!(
                ms = started.elapsed().as_millis() as u64,
                "state loaded; resumed"
            );
        }
        let agent = accept(&agent_l, "agent port", Duration::from_secs(10)).await?;
        // A restored guest first sends what its saved session had not yet passed on.
        let link =
            agent_link::AgentLink::spawn(stale::SkipStale::new(agent, spec.restore.is_some()));
        let handshake = async {
            tokio::time::timeout(
                Duration::from_secs(spec.ready_timeout_secs),
                link.handshake(&spec.id, spec.can_discard_ram()),
            )
            .await
            .map_err(|_| Error::ReadyTimeout {
                id: spec.id.clone(),
                secs: spec.ready_timeout_secs,
                accel: spec.accelerator.to_string(),
                console: vm_dir.join(files::CONSOLE_LOG),
            })?
        };
        // A restored guest still has the saved VM's network: give it this VM's (the Hello
        // gives it its clock, entropy and hostname). Both at once: the agent serves them on
        // two threads, and the guest has the vCPUs for it.
        let renumber = async {
            match (&spec.restore, &spec.guest_net) {
                (Some(_), Some(net)) => {
                    // The user's kernel arguments win, as they do at a cold boot.
                    let args = spec.extra_boot_args.as_deref().unwrap_or("");
                    match net.overridden_by(args) {
                        Ok(net) => link.network(&net).await,
                        Err(e) => {
                            tracing::warn!("network not configured: {e}");
                            Ok(())
                        }
                    }
                }
                _ => Ok(()),
            }
        };
        // While the guest renumbers itself, a throwaway command runs: a resumed QEMU has
        // translated none of the guest code a command needs yet (fork, exec, the dynamic
        // loader), which under TCG costs more than the command itself; done here, beside
        // the renumbering, the user's first command finds it done. (Without a network to
        // set there is nothing to overlap it with, and it would only move the cost.)
        let prewarm = async {
            if spec.restore.is_some()
                && spec.guest_net.is_some()
                && spec.accelerator == crate::hypervisor::Accelerator::Tcg
            {
                let argv = smolvm_protocol::Command::Argv(vec!["true".into()]);
                if let Err(e) = link.run_quiet(argv, Duration::from_secs(10)).await {
                    tracing::debug!("warming up the resumed guest: {e}");
                }
            }
        };
        // Each one's end goes in the debug timeline (which one the VM waited for).
        let timed = |what: &'static str, t0: std::time::Instant| {
            tracing::debug!(ms = t0.elapsed().as_millis() as u64, "{what} done");
        };
        let t0 = std::time::Instant::now();
        let (hello, renumbered, ()) = tokio::join!(
            async {
                let r = handshake.await;
                timed("handshake", t0);
                r
            },
            async {
                let r = renumber.await;
                timed("network", t0);
                r
            },
            async {
                prewarm.await;
                timed("warm-up command", t0)
            },
        );
        let hello = hello?;
        renumbered?;
        // Variables given at create time are applied before anyone can run a command.
        if let Some(update) = crate::env::read_pending(vm_dir) {
            link.env(update).await?;
            let _ = std::fs::remove_file(vm_dir.join(files::PENDING_ENV));
        }
        Ok::<_, Error>((qmp, link, hello))
    };
    let phase = if spec.restore.is_some() {
        "loading the saved state"
    } else {
        "booting"
    };
    let exited = |status| Error::StartFailed {
        id: spec.id.clone(),
        reason: format!(
            "{} while {phase}: {}",
            describe_exit(status),
            log_tail(&vm_dir.join(files::SUPERVISOR_LOG))
        ),
    };
    let (mut qmp, link, hello) = tokio::select! {
        r = boot => match r {
            Ok(v) => v,
            Err(e) => {
                // A broken monitor or agent socket usually means QEMU quit: its own words
                // (in the log) say more.
                if let Ok(status) = tokio::time::timeout(Duration::from_millis(500), child.wait()).await {
                    return Err(exited(status));
                }
                return Err(e);
            }
        },
        status = child.wait() => return Err(exited(status)),
    };
    tracing::info!(id = %spec.id, ms = started.elapsed().as_millis() as u64, "agent ready");
    if let Some(out) = &spec.template_out {
        // A template: save the booted, idle guest and end. First, what every first command
        // needs (the shell, the C library, coreutils) is read into the guest's page cache,
        // so VMs resumed from it do not wait on their disk for it.
        if let Err(e) = link
            .run_quiet(
                smolvm_protocol::Command::Shell(TEMPLATE_WARMUP.into()),
                Duration::from_secs(30),
            )
            .await
        {
            tracing::warn!("warming the template's page cache failed: {e}");
        }
        // A short pause lets the streams' closing frames cross, so the saved session has
        // none in flight.
        tokio::time::sleep(Duration::from_millis(50)).await;
        saved::pause(&mut qmp).await?;
        // Its RAM is the shared file `ram`: only device state goes in the stream.
        saved::ignore_shared_ram(&mut qmp, true).await?;
        saved::save(&mut qmp, &out.join(crate::snapshot::files::MEMORY)).await?;
        shutdown(&mut child, &mut qmp, &link, 0).await;
        tracing::info!(ms = started.elapsed().as_millis() as u64, "template saved");
        emit(&StartupEvent::Ready { hello });
        return Ok(());
    }
    let api_l = bind(&api_path)?;
    let store = Store::open(&spec.db_path)?;
    store.set_running(
        &spec.id,
        std::process::id(),
        qemu_pid,
        spec.accelerator.as_str(),
    )?;
    tracing::info!(id = %spec.id, "recorded as running");
    // The VM's recorded port forwards come back with it.
    let forwards = forward::Forwards::new(&spec.id, link.clone(), Store::open(&spec.db_path)?);
    if let Err(e) = forwards.restore() {
        tracing::warn!("could not read the VM's port forwards: {e}");
    }
    emit(&StartupEvent::Ready {
        hello: hello.clone(),
    });
    detach_stdout();

    let (stop_tx, mut stop_rx) = mpsc::channel(4);
    let (control_tx, mut control_rx) = mpsc::channel::<api::ControlRequest>(4);
    let mut paused = false;
    let shared = Arc::new(api::Shared {
        control_tx,
        link: link.clone(),
        status: VmStatus {
            qemu_pid,
            accelerator: spec.accelerator.to_string(),
            ready: true,
            guest: Some(hello),
        },
        stop_tx,
        forwards,
    });
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io_err("installing SIGTERM handler"))?;
    let mut watch = tokio::time::interval(RECORD_POLL);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut owner = owner::OwnerWatch::default();

    let end = loop {
        tokio::select! {
            conn = api_l.accept() => {
                if let Ok((s, _)) = conn {
                    tokio::spawn(api::handle(s, shared.clone()));
                }
            }
            status = child.wait() => {
                let why = describe_exit(status);
                tracing::warn!(%why, "QEMU ended");
                break End::State(VmState::Error, Some(why), None);
            }
            Some((what, done)) = control_rx.recv() => {
                let r = control(&mut qmp, &mut paused, what, spec, &store).await;
                let _ = done.send(r.map_err(Error::into_wire));
            }
            req = stop_rx.recv() => {
                let (graceful_ms, done) = match req {
                    Some(r) => (r.0, Some(r.1)),
                    None => (0, None),
                };
                // A paused guest cannot shut itself down.
                let graceful_ms = if paused { 0 } else { graceful_ms };
                shutdown(&mut child, &mut qmp, &link, graceful_ms).await;
                break End::State(VmState::Stopped, None, done);
            }
            _ = sigterm.recv() => {
                shutdown(&mut child, &mut qmp, &link, 0).await;
                break End::State(VmState::Stopped, None, None);
            }
            // The owner's exit wakes us at once; the record is looked at now and then
            // (deleted behind our back, or the owner let go of the VM).
            _ = async { tokio::select! { _ = watch.tick() => {}, _ = owner.exited() => {} } } => {
                let rec = store.get(&spec.id);
                if let Ok(Some(r)) = &rec {
                    owner.follow(r.owner);
                }
                match rec {
                    // Deleted behind our back (e.g. `smolvm rm` of a VM it could not reach).
                    Ok(None) => {
                        shutdown(&mut child, &mut qmp, &link, 0).await;
                        break End::Gone;
                    }
                    // An ephemeral VM whose owner died goes with it.
                    Ok(Some(rec)) if rec.owner.is_some_and(|o| !o.alive()) => {
                        tracing::warn!(id = %spec.id, "owner process is gone; deleting the VM");
                        shutdown(&mut child, &mut qmp, &link, 0).await;
                        break End::Delete(Box::new(rec));
                    }
                    _ => {}
                }
            }
        }
    };
    for p in [&api_path, &ep.agent, &ep.console, &ep.control] {
        let _ = std::fs::remove_file(p);
    }
    match end {
        End::State(state, reason, done) => {
            let _ = store.set_state(&spec.id, state, reason.as_deref());
            if let Some(done) = done {
                // Exit only once the stop requester has its reply (or after a short wait).
                let (replied_tx, replied_rx) = tokio::sync::oneshot::channel();
                if done.send(replied_tx).is_ok() {
                    let _ = tokio::time::timeout(Duration::from_millis(500), replied_rx).await;
                }
            }
        }
        End::Gone => {}
        End::Delete(rec) => {
            drop(_disk_lock);
            if let Err(e) = crate::cleanup::remove_vm(&spec.state_dir, &store, &rec) {
                tracing::error!(error = %e, "could not delete the VM after its owner died");
            }
        }
    }
    Ok(())
}

/// Carries out a pause, resume or snapshot request on the running VM.
async fn control(
    qmp: &mut Qmp,
    paused: &mut bool,
    what: api::Control,
    spec: &LaunchSpec,
    store: &Store,
) -> Result<()> {
    match what {
        api::Control::Pause => {
            if !*paused {
                saved::pause(qmp).await?;
                *paused = true;
                store.set_state(&spec.id, VmState::Paused, None)?;
            }
        }
        api::Control::Resume => {
            if *paused {
                saved::resume(qmp).await?;
                *paused = false;
                store.set_state(&spec.id, VmState::Running, None)?;
            }
        }
        api::Control::Snapshot(dir) => {
            // Frozen while memory and disk are saved, so the two agree.
            if !*paused {
                saved::pause(qmp).await?;
            }
            let saved = async {
                saved::ignore_shared_ram(qmp, false).await?;
                saved::save(qmp, &dir.join(crate::snapshot::files::MEMORY)).await?;
                saved::copy_disk(&spec.disk, &dir.join(crate::snapshot::files::DISK)).await
            }
            .await;
            if !*paused {
                saved::resume(qmp).await?;
            }
            saved?;
        }
    }
    Ok(())
}

/// What a template runs before it is saved: its network device is brought up (opening it
/// fills its receive ring; a resumed VM then only sets its address), and the programs a
/// first command most likely uses are read into the page cache.
const TEMPLATE_WARMUP: &str = "ip link set eth0 up 2>/dev/null; \
     for p in /bin/bash /bin/sh /usr/bin/env /bin/true /bin/echo /bin/cat \
     /usr/bin/python3; do [ -x $p ] && cat $p >/dev/null; done; echo warm >/dev/null; true";

/// How often the supervisor checks that its VM's record still exists (and who owns it). An
/// owner's exit is seen at once through a pidfd, and whatever deletes a VM it cannot reach
/// kills its processes; this is only a safety net, so it runs rarely: every wakeup costs
/// the host CPU time (about 4 ms of it on our nested development hosts).
const RECORD_POLL: Duration = Duration::from_secs(60);

/// How the supervisor's main loop ended.
enum End {
    /// Record this state (and reason); tell a stop requester when done.
    State(
        VmState,
        Option<String>,
        Option<tokio::sync::oneshot::Sender<tokio::sync::oneshot::Sender<()>>>,
    ),
    /// The VM's row was deleted: nothing to record.
    Gone,
    /// The owner died: delete the VM.
    Delete(Box<crate::store::VmRecord>),
}

/// Ends QEMU: with a grace period, ask the agent for a clean shutdown (processes ended,
/// disks flushed, root unmounted, power off) and wait for QEMU to exit; then QMP `quit`;
/// then SIGKILL. Each step has a deadline.
async fn shutdown(
    child: &mut tokio::process::Child,
    qmp: &mut Qmp,
    link: &agent_link::AgentLink,
    graceful_ms: u64,
) {
    if graceful_ms > 0 {
        let grace = Duration::from_millis(graceful_ms);
        let clean = async {
            tokio::time::timeout(grace, link.shutdown())
                .await
                .ok()?
                .ok()?;
            tokio::time::timeout(grace, child.wait()).await.ok()
        };
        if clean.await.is_some() {
            return;
        }
        tracing::warn!("the guest did not shut down within {graceful_ms} ms; quitting QEMU");
    }
    let _ = qmp.execute("quit", None, Duration::from_millis(500)).await;
    if tokio::time::timeout(Duration::from_secs(2), child.wait())
        .await
        .is_err()
    {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

/// The supervisor binary chosen by an embedding program (see [`set_supervisor_binary`]).
static EMBEDDED_BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Tells the runtime where the `smolvm` binary is when the running program is not it
/// (the Python package ships one inside itself). `SMOLVM_BIN` still wins. Only the first
/// call counts.
pub fn set_supervisor_binary(path: PathBuf) {
    let _ = EMBEDDED_BINARY.set(path);
}

/// Where the `smolvm` binary that hosts the supervisor lives: `SMOLVM_BIN`, this program if
/// it is `smolvm`, the one an embedding program named, a `smolvm` beside this program, or
/// `smolvm` on `PATH`.
pub fn supervisor_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SMOLVM_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = EMBEDDED_BINARY.get() {
        if std::env::current_exe().is_ok_and(|e| e.file_name().is_some_and(|n| n == "smolvm")) {
            // This program is smolvm itself: fall through and use it.
        } else if p.is_file() {
            return Ok(p.clone());
        }
    }
    if let Ok(exe) = std::env::current_exe() {
        if exe.file_name().is_some_and(|n| n == "smolvm") {
            return Ok(exe);
        }
        if let Some(sib) = exe.parent().map(|d| d.join("smolvm")) {
            if sib.is_file() {
                return Ok(sib);
            }
        }
    }
    crate::util::which("smolvm").ok_or(Error::MissingBinary {
        binary: "smolvm",
        purpose: "that runs VM supervisors",
        hint: "put it on PATH or set SMOLVM_BIN",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vm_lock_is_exclusive_and_asking_about_it_takes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_running(dir.path()), "no lock file: not running");
        let held = try_lock(dir.path()).unwrap().expect("a free lock is taken");
        assert!(is_running(dir.path()));
        assert!(
            try_lock(dir.path()).unwrap().is_none(),
            "a second taker fails"
        );
        drop(held);
        // Probes never stand in a taker's way. (A process that another test's thread forks
        // holds copies of our descriptors until its `exec`: wait that out, bounded.)
        let released = |dir: &Path| {
            let deadline = Instant::now() + Duration::from_secs(2);
            while is_running(dir) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            !is_running(dir)
        };
        for _ in 0..20 {
            assert!(released(dir.path()));
            let held = try_lock(dir.path())
                .unwrap()
                .expect("a probe held the lock");
            assert!(is_running(dir.path()));
            drop(held);
        }
    }

    #[test]
    fn the_vm_lock_goes_with_its_descriptor_to_a_child_and_is_released_when_it_exits() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let held = try_lock(dir.path()).unwrap().unwrap();
        let fd = held.as_raw_fd();
        // SAFETY: clears close-on-exec on a descriptor we own, as `spawn` does.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
        let mut child = std::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .unwrap();
        drop(held);
        assert!(is_running(dir.path()), "the child's copy keeps the lock");
        child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while is_running(dir.path()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!is_running(dir.path()), "released when the child exits");
    }
}

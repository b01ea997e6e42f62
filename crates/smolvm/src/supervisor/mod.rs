//! The per-VM supervisor process (`smolvm __supervise DIR`): it runs the VM's machine
//! through the [`crate::hypervisor::Vmm`] contract, owns the agent channel, serves the VM's
//! API socket and records the VM's end in the state database. It outlives the client that
//! started it; `stop` (or the machine ending) ends it.
//!
//! By job: `lock` (the VM's lock, shared with the client side), `boot` (launch, connect,
//! restore, handshake, renumber, pending env), `event_loop` (serving until the end),
//! `shutdown`, `template` (the save-and-exit mode), `events` (start-up lines to the client),
//! `record` (the state database off the event loop), `spawn` (the client's half of starting
//! one), `binary` (finding the program that hosts it).

pub mod agent_link;
pub mod api;
mod binary;
mod boot;
pub mod console;
mod event_loop;
mod events;
pub mod forward;
mod lock;
pub mod owner;
mod record;
mod shutdown;
pub mod spawn;
pub mod stale;
mod template;

use std::path::Path;

pub use binary::{set_supervisor_binary, supervisor_binary};
pub use events::StartupEvent;
pub use lock::{is_running, LOCK_FD_ENV};
pub(crate) use lock::{lock_within, try_lock, LOCK_RETRY};

use crate::error::{io_err, Error, Result};
use crate::hypervisor::fake::FakeVmm;
use crate::hypervisor::qemu::QemuVmm;
use crate::hypervisor::{LaunchSpec, Vmm, VmmKind};
use crate::store::{Store, VmState};
use events::emit;

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
        Err(e) => return failed(&e),
    };
    // One supervisor per VM: hold an exclusive lock for the whole life of this process
    // (released only after the runtime is gone, so "not running" means "exiting at most").
    // `Vm::start` takes it before spawning us and hands it over.
    let _lock =
        match lock::inherited_lock(vm_dir).map_or_else(|| lock::take_lock(vm_dir, &spec.id), Ok) {
            Ok(l) => l,
            Err(e) => return failed(&e),
        };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return failed(&io_err("starting the supervisor's runtime")(e)),
    };
    let result = rt.block_on(async {
        match spec.vmm {
            VmmKind::Qemu => supervise::<QemuVmm>(vm_dir, &spec).await,
            VmmKind::Fake => supervise::<FakeVmm>(vm_dir, &spec).await,
        }
    });
    drop(rt);
    // The machine is gone (or going: killed when the runtime dropped it): the VM's TAP and
    // rules go. (Already done when the VM was deleted here: its TAP is gone then.)
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
            if spec.template_out.is_none() {
                if let Ok(store) = Store::open(&spec.db_path) {
                    let _ = store.set_state(&spec.id, VmState::Error, Some(&e.to_string()));
                }
            }
            failed(&e)
        }
    }
}

/// Reports a failure to start on the start-up channel; the exit code.
fn failed(e: &Error) -> i32 {
    emit(&StartupEvent::Failed {
        reason: e.to_string(),
    });
    1
}

/// The supervisor's two modes: a template is made and saved; a VM is run until it ends.
async fn supervise<V: Vmm>(vm_dir: &Path, spec: &LaunchSpec) -> Result<()> {
    match &spec.template_out {
        Some(out) => template::make::<V>(vm_dir, spec, out).await,
        None => event_loop::run::<V>(vm_dir, spec).await,
    }
}

/// Holds the VM's disk lock while it runs (one running VM per writable disk), unless its
/// image is marked shareable.
fn lock_disk(spec: &LaunchSpec) -> Result<Option<crate::disk::DiskLock>> {
    if spec.lock_disk {
        Ok(Some(crate::disk::lock(&spec.disk)?))
    } else {
        Ok(None)
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

//! A running VM's supervisor after boot: it records the VM as running, serves the API
//! socket, carries out pause, resume, snapshot and stop on the machine, and watches for the
//! machine's end, SIGTERM, its owner's exit and its record's removal; then it records how
//! the VM ended.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smolvm_protocol::VmStatus;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use super::boot::{boot, Booted};
use super::events::{detach_stdout, emit, StartupEvent};
use super::record::Record;
use super::shutdown::shutdown;
use super::{api, files, forward, owner};
use crate::error::{io_err, Result};
use crate::hypervisor::{Endpoints, LaunchSpec, SavedRam, Vmm};
use crate::store::{VmRecord, VmState};

/// How often the supervisor checks that its VM's record still exists (and who owns it). An
/// owner's exit is seen at once through a pidfd, and whatever deletes a VM it cannot reach
/// kills its processes; this is only a safety net, so it runs rarely: every wakeup costs
/// the host CPU time (about 4 ms of it on our nested development hosts).
const RECORD_POLL: Duration = Duration::from_secs(60);

/// How long a stopped supervisor waits for its stop requester to have the reply.
const REPLY_WAIT: Duration = Duration::from_millis(500);

/// How the main loop ended.
enum End {
    /// Record this state (and reason); tell a stop requester when done.
    State(
        VmState,
        Option<String>,
        Option<oneshot::Sender<oneshot::Sender<()>>>,
    ),
    /// The VM's row was deleted: nothing to record.
    Gone,
    /// The owner died: delete the VM.
    Delete(Box<VmRecord>),
}

/// Boots the VM of `spec` and supervises it until it ends.
pub(super) async fn run<V: Vmm>(vm_dir: &Path, spec: &LaunchSpec) -> Result<()> {
    let started = Instant::now();
    // One running VM per writable disk (unless its image is marked shareable).
    let disk_lock = super::lock_disk(spec)?;
    // The TAP must exist before the machine attaches to it; removed by `main` when we end.
    if let Some(nat) = &spec.nat {
        crate::network::setup(nat)?;
    }
    let Booted {
        mut vmm,
        link,
        hello,
    } = boot::<V>(vm_dir, spec, started, |qemu_pid| {
        emit(&StartupEvent::Started { qemu_pid })
    })
    .await?;
    tracing::info!(id = %spec.id, ms = started.elapsed().as_millis() as u64, "agent ready");
    let api_path = vm_dir.join(files::API_SOCK);
    let _ = std::fs::remove_file(&api_path);
    let api_l = UnixListener::bind(&api_path)
        .map_err(io_err(format!("listening on {}", api_path.display())))?;
    let record = Record::open(&spec.db_path, &spec.id)?;
    record
        .set_running(std::process::id(), vmm.pid(), spec.accelerator)
        .await?;
    tracing::info!(id = %spec.id, "recorded as running");
    // The VM's recorded port forwards come back with it.
    let forwards = forward::Forwards::new(&spec.id, link.clone(), record.clone());
    if let Err(e) = forwards.restore().await {
        tracing::warn!("could not read the VM's port forwards: {e}");
    }
    emit(&StartupEvent::Ready {
        hello: hello.clone(),
    });
    detach_stdout();

    let (stop_tx, stop_rx) = mpsc::channel(4);
    let (control_tx, control_rx) = mpsc::channel::<api::ControlRequest>(4);
    let shared = Arc::new(api::Shared {
        control_tx,
        link: link.clone(),
        status: VmStatus {
            qemu_pid: vmm.pid(),
            accelerator: spec.accelerator.to_string(),
            ready: true,
            guest: Some(hello),
        },
        stop_tx,
        forwards,
    });
    let mut machine = Machine {
        vmm: &mut vmm,
        link: &link,
        spec,
        record: &record,
        paused: false,
    };
    let end = machine.serve(api_l, shared, stop_rx, control_rx).await?;
    for p in Endpoints::in_dir(vm_dir).sockets() {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::remove_file(&api_path);
    // (Deleting the VM may rewrite a retained disk, which needs its lock.)
    drop(disk_lock);
    finish(end, &record, spec).await;
    Ok(())
}

/// What the loop acts on.
struct Machine<'a, V> {
    vmm: &'a mut V,
    link: &'a super::agent_link::AgentLink,
    spec: &'a LaunchSpec,
    record: &'a Record,
    paused: bool,
}

impl<V: Vmm> Machine<'_, V> {
    async fn serve(
        &mut self,
        api_l: UnixListener,
        shared: Arc<api::Shared>,
        mut stop_rx: mpsc::Receiver<api::StopRequest>,
        mut control_rx: mpsc::Receiver<api::ControlRequest>,
    ) -> Result<End> {
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(io_err("installing SIGTERM handler"))?;
        let mut watch = tokio::time::interval(RECORD_POLL);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut owner = owner::OwnerWatch::default();
        let mut exit = self.vmm.exit_signal();
        loop {
            tokio::select! {
                conn = api_l.accept() => {
                    if let Ok((s, _)) = conn {
                        tokio::spawn(api::handle(s, shared.clone()));
                    }
                }
                why = exit.wait() => {
                    tracing::warn!(%why, "the machine ended");
                    return Ok(End::State(VmState::Error, Some(why), None));
                }
                Some((what, done)) = control_rx.recv() => {
                    let r = self.control(what).await;
                    let _ = done.send(r.map_err(crate::error::Error::into_wire));
                }
                req = stop_rx.recv() => {
                    let (graceful_ms, done) = match req {
                        Some(r) => (r.0, Some(r.1)),
                        None => (0, None),
                    };
                    // A paused guest cannot shut itself down.
                    let graceful_ms = if self.paused { 0 } else { graceful_ms };
                    shutdown(self.vmm, self.link, graceful_ms).await;
                    return Ok(End::State(VmState::Stopped, None, done));
                }
                _ = sigterm.recv() => {
                    shutdown(self.vmm, self.link, 0).await;
                    return Ok(End::State(VmState::Stopped, None, None));
                }
                // The owner's exit wakes us at once; the record is looked at now and then
                // (deleted behind our back, or the owner let go of the VM).
                _ = async { tokio::select! { _ = watch.tick() => {}, _ = owner.exited() => {} } } => {
                    if let Some(end) = self.look_at_record(&mut owner).await {
                        return Ok(end);
                    }
                }
            }
        }
    }

    /// Whether the VM's record says to end: deleted, or owned by a process that is gone.
    async fn look_at_record(&mut self, owner: &mut owner::OwnerWatch) -> Option<End> {
        let rec = self.record.get().await;
        if let Ok(Some(r)) = &rec {
            owner.follow(r.owner);
        }
        match rec {
            // Deleted behind our back (e.g. `smolvm rm` of a VM it could not reach).
            Ok(None) => {
                shutdown(self.vmm, self.link, 0).await;
                Some(End::Gone)
            }
            // An ephemeral VM whose owner died goes with it.
            Ok(Some(rec)) if rec.owner.is_some_and(|o| !o.alive()) => {
                tracing::warn!(id = %self.spec.id, "owner process is gone; deleting the VM");
                shutdown(self.vmm, self.link, 0).await;
                Some(End::Delete(Box::new(rec)))
            }
            _ => None,
        }
    }

    /// Carries out a pause, resume or snapshot request.
    async fn control(&mut self, what: api::Control) -> Result<()> {
        match what {
            api::Control::Pause => {
                if !self.paused {
                    self.vmm.pause().await?;
                    self.paused = true;
                    self.record.set_state(VmState::Paused, None).await?;
                }
            }
            api::Control::Resume => {
                if self.paused {
                    self.vmm.resume().await?;
                    self.paused = false;
                    self.record.set_state(VmState::Running, None).await?;
                }
            }
            api::Control::Snapshot(dir) => {
                // Frozen while memory and disk are saved, so the two agree.
                if !self.paused {
                    self.vmm.pause().await?;
                }
                let saved = async {
                    self.vmm
                        .save(
                            &dir.join(crate::snapshot::files::MEMORY),
                            SavedRam::InStream,
                        )
                        .await?;
                    crate::disk::copy_for_snapshot(
                        &self.spec.disk,
                        self.spec.disk_format.parse()?,
                        &dir.join(crate::snapshot::files::DISK),
                    )
                    .await
                }
                .await;
                if !self.paused {
                    self.vmm.resume().await?;
                }
                saved?;
            }
        }
        Ok(())
    }
}

/// Records how the VM ended (or deletes it).
async fn finish(end: End, record: &Record, spec: &LaunchSpec) {
    match end {
        End::State(state, reason, done) => {
            let _ = record.set_state(state, reason).await;
            if let Some(done) = done {
                // Exit only once the stop requester has its reply (or after a short wait).
                let (replied_tx, replied_rx) = oneshot::channel();
                if done.send(replied_tx).is_ok() {
                    let _ = tokio::time::timeout(REPLY_WAIT, replied_rx).await;
                }
            }
        }
        End::Gone => {}
        End::Delete(rec) => {
            if let Err(e) = record.remove_vm(spec.state_dir.clone(), *rec).await {
                tracing::error!(error = %e, "could not delete the VM after its owner died");
            }
        }
    }
}

//! Bringing a machine up to a ready agent: launch it, connect to it, load its saved state
//! (a restore), then the agent handshake, beside which a restored guest is renumbered and
//! warmed up; finally the environment changes made while the VM was stopped.

use std::path::Path;
use std::time::{Duration, Instant};

use smolvm_protocol::HelloReply;

use super::agent_link::AgentLink;
use super::{files, stale};
use crate::error::{Error, Result};
use crate::hypervisor::{Accelerator, Endpoints, LaunchSpec, Vmm};

/// A machine whose agent answered.
pub(super) struct Booted<V> {
    pub vmm: V,
    pub link: AgentLink,
    pub hello: HelloReply,
}

/// Longest the throwaway warm-up command of a resumed guest may take.
const WARMUP: Duration = Duration::from_secs(10);

/// Launches the machine of `spec` and waits (bounded) until its agent has answered and its
/// pending environment is applied. A machine that ends meanwhile fails the boot with its
/// own last words.
pub(super) async fn boot<V: Vmm>(
    vm_dir: &Path,
    spec: &LaunchSpec,
    started: Instant,
    on_launched: impl FnOnce(u32),
) -> Result<Booted<V>> {
    let ep = Endpoints::in_dir(vm_dir);
    let mut vmm = V::launch(spec, &ep)?;
    on_launched(vmm.pid());
    let mut exit = vmm.exit_signal();
    let phase = if spec.restore.is_some() {
        "loading the saved state"
    } else {
        "booting"
    };
    let exited = |vmm: &V, how: String| Error::StartFailed {
        id: spec.id.clone(),
        reason: format!("{how} while {phase}: {}", vmm.last_words()),
    };
    let up = tokio::select! {
        r = bring_up(&mut vmm, vm_dir, spec, started) => r,
        how = exit.wait() => return Err(exited(&vmm, how)),
    };
    match up {
        Ok((link, hello)) => Ok(Booted { vmm, link, hello }),
        Err(e) => {
            // A broken monitor or agent socket usually means the machine quit: its own
            // words (in the log) say more.
            match tokio::time::timeout(Duration::from_millis(500), exit.wait()).await {
                Ok(how) => Err(exited(&vmm, how)),
                Err(_) => {
                    vmm.kill().await;
                    Err(e)
                }
            }
        }
    }
}

async fn bring_up<V: Vmm>(
    vmm: &mut V,
    vm_dir: &Path,
    spec: &LaunchSpec,
    started: Instant,
) -> Result<(AgentLink, HelloReply)> {
    vmm.connect().await?;
    if let Some(r) = &spec.restore {
        vmm.load(r).await?;
        // The saved VM was paused when its state was written; it is again once loaded.
        vmm.resume().await?;
        tracing::info!(
            ms = started.elapsed().as_millis() as u64,
            "state loaded; resumed"
        );
    }
    let agent = vmm.agent().await?;
    // A restored guest first sends what its saved session had not yet passed on.
    let link = AgentLink::spawn(stale::SkipStale::new(agent, spec.restore.is_some()));
    let hello = greet(&link, vm_dir, spec).await?;
    // Variables given at create time are applied before anyone can run a command.
    if let Some(update) = crate::env::read_pending(vm_dir) {
        link.env(update).await?;
        let _ = std::fs::remove_file(vm_dir.join(files::PENDING_ENV));
    }
    Ok((link, hello))
}

/// The handshake, and beside it (a restored guest still has the saved VM's network) the
/// renumbering and, under TCG, a warm-up command. Each one's end goes in the debug timeline.
async fn greet(link: &AgentLink, vm_dir: &Path, spec: &LaunchSpec) -> Result<HelloReply> {
    let t0 = Instant::now();
    let timed = |what: &'static str| {
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "{what} done");
    };
    let (hello, renumbered, ()) = tokio::join!(
        async {
            let r = handshake(link, vm_dir, spec).await;
            timed("handshake");
            r
        },
        async {
            let r = renumber(link, spec).await;
            timed("network");
            r
        },
        async {
            prewarm(link, spec).await;
            timed("warm-up command")
        },
    );
    renumbered?;
    hello
}

async fn handshake(link: &AgentLink, vm_dir: &Path, spec: &LaunchSpec) -> Result<HelloReply> {
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
}

/// Gives a restored guest this VM's network (the Hello gives it its clock, entropy and
/// hostname). The agent serves it on a second thread, beside the handshake.
async fn renumber(link: &AgentLink, spec: &LaunchSpec) -> Result<()> {
    let (Some(_), Some(net)) = (&spec.restore, &spec.guest_net) else {
        return Ok(());
    };
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

/// While the guest renumbers itself, a throwaway command runs: a resumed QEMU has
/// translated none of the guest code a command needs yet (fork, exec, the dynamic loader),
/// which under TCG costs more than the command itself; done here, beside the renumbering,
/// the user's first command finds it done. (Without a network to set there is nothing to
/// overlap it with, and it would only move the cost.)
async fn prewarm(link: &AgentLink, spec: &LaunchSpec) {
    if spec.restore.is_some() && spec.guest_net.is_some() && spec.accelerator == Accelerator::Tcg {
        let argv = smolvm_protocol::Command::Argv(vec!["true".into()]);
        if let Err(e) = link.run_quiet(argv, WARMUP).await {
            tracing::debug!("warming up the resumed guest: {e}");
        }
    }
}

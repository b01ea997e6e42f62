//! The template mode of a supervisor: boot, wait for the agent, warm the page cache, save
//! the idle guest's state into the template's build directory and end, recording nothing in
//! the state database. `snapshot::template` drives it.

use std::path::Path;
use std::time::{Duration, Instant};

use super::boot::{boot, Booted};
use super::events::{emit, StartupEvent};
use super::shutdown::shutdown;
use crate::error::Result;
use crate::hypervisor::{LaunchSpec, SavedRam, Vmm};

/// What a template runs before it is saved: its network device is brought up (opening it
/// fills its receive ring; a resumed VM then only sets its address), and the programs a
/// first command most likely uses are read into the page cache.
const TEMPLATE_WARMUP: &str = "ip link set eth0 up 2>/dev/null; \
     for p in /bin/bash /bin/sh /usr/bin/env /bin/true /bin/echo /bin/cat \
     /usr/bin/python3; do [ -x $p ] && cat $p >/dev/null; done; echo warm >/dev/null; true";

/// Longest the warm-up may take.
const WARMUP_LIMIT: Duration = Duration::from_secs(30);

/// Boots the template's machine and saves it into `out`.
pub(super) async fn make<V: Vmm>(vm_dir: &Path, spec: &LaunchSpec, out: &Path) -> Result<()> {
    let started = Instant::now();
    let _disk_lock = super::lock_disk(spec)?;
    let Booted {
        mut vmm,
        link,
        hello,
    } = boot::<V>(vm_dir, spec, started, |qemu_pid| {
        emit(&StartupEvent::Started { qemu_pid })
    })
    .await?;
    tracing::info!(ms = started.elapsed().as_millis() as u64, "agent ready");
    // What every first command needs (the shell, the C library, coreutils) is read into the
    // guest's page cache, so VMs resumed from the template do not wait on their disk for it.
    if let Err(e) = link
        .run_quiet(
            smolvm_protocol::Command::Shell(TEMPLATE_WARMUP.into()),
            WARMUP_LIMIT,
        )
        .await
    {
        tracing::warn!("warming the template's page cache failed: {e}");
    }
    // A short pause lets the streams' closing frames cross, so the saved session has none
    // in flight.
    tokio::time::sleep(Duration::from_millis(50)).await;
    vmm.pause().await?;
    // Its RAM is the shared file `ram`: only device state goes in the stream.
    vmm.save(
        &out.join(crate::snapshot::files::MEMORY),
        SavedRam::InSharedFile,
    )
    .await?;
    shutdown(&mut vmm, &link, 0).await;
    tracing::info!(ms = started.elapsed().as_millis() as u64, "template saved");
    emit(&StartupEvent::Ready { hello });
    Ok(())
}

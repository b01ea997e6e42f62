//! Saving and loading a VM's state through QEMU's monitor: the migration stream written to
//! a file (`migrate file:PATH`) and read back by a new QEMU started with `-incoming`
//! (DESIGN.md §4). Every wait is bounded. Used only by [`super::QemuVmm`].

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use super::qmp::Qmp;
use crate::error::{io_err, Error, Result};

/// Longest a save or a load of the state may take.
const TRANSFER_LIMIT: Duration = Duration::from_secs(120);
/// Longest one monitor command may take.
const QMP_CALL: Duration = Duration::from_secs(10);
/// How often the migration's progress is polled.
const POLL: Duration = Duration::from_millis(2);

/// Freezes the vCPUs.
pub async fn pause(qmp: &mut Qmp) -> Result<()> {
    qmp.execute("stop", None, QMP_CALL).await.map(|_| ())
}

/// Lets the vCPUs run again (after a pause, a save, or a load).
pub async fn resume(qmp: &mut Qmp) -> Result<()> {
    qmp.execute("cont", None, QMP_CALL).await.map(|_| ())
}

/// Writes the state of a paused VM (RAM and devices) to `memory`, a new file only the
/// owner can read. QEMU flushes the disks as part of it.
pub async fn save(qmp: &mut Qmp, memory: &Path) -> Result<()> {
    // QEMU creates the file; make it private first (it holds the guest's memory).
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(memory)
            .map_err(io_err(format!("creating {}", memory.display())))?;
    }
    qmp.execute(
        "migrate",
        Some(json!({ "uri": format!("file:{}", memory.display()) })),
        QMP_CALL,
    )
    .await?;
    wait_migration(qmp, "saving the VM's state").await
}

/// Whether the next save or load skips RAM held in a shared file (`x-ignore-shared`): on
/// for templates (their RAM stays in its file; VMs resumed from one map it), off for
/// snapshots (their RAM goes in the stream, to load anywhere).
pub async fn ignore_shared_ram(qmp: &mut Qmp, on: bool) -> Result<()> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": on }] })),
        QMP_CALL,
    )
    .await
    .map(|_| ())
}

/// Starts loading device state from `memory` into a VM started with `-incoming defer`.
pub async fn start_load(qmp: &mut Qmp, memory: &Path) -> Result<()> {
    qmp.execute(
        "migrate-incoming",
        Some(json!({ "uri": format!("file:{}", memory.display()) })),
        QMP_CALL,
    )
    .await
    .map(|_| ())
}

/// Waits for a load started with `-incoming` to finish; the VM is then paused.
pub async fn await_load(qmp: &mut Qmp) -> Result<()> {
    wait_migration(qmp, "loading the saved state").await
}

async fn wait_migration(qmp: &mut Qmp, what: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + TRANSFER_LIMIT;
    loop {
        let info = qmp.execute("query-migrate", None, QMP_CALL).await?;
        match info.get("status").and_then(|s| s.as_str()) {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                let why = info
                    .get("error-desc")
                    .and_then(|d| d.as_str())
                    .unwrap_or("no reason given");
                return Err(Error::Snapshot(format!("{what} failed: {why}")));
            }
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_string(),
                secs: Some(TRANSFER_LIMIT.as_secs_f64()),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

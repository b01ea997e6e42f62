//! Ending a machine: with a grace period, the agent is asked for a clean shutdown
//! (processes ended, disks flushed, root unmounted, power off) and the machine is given
//! that long to end; then the monitor is told to quit; then its process is killed. Each step
//! has a deadline.

use std::time::Duration;

use super::agent_link::AgentLink;
use crate::hypervisor::Vmm;

/// Ends the machine; `graceful_ms == 0` skips the guest's clean shutdown.
pub(super) async fn shutdown<V: Vmm>(vmm: &mut V, link: &AgentLink, graceful_ms: u64) {
    if graceful_ms > 0 {
        let grace = Duration::from_millis(graceful_ms);
        let mut exit = vmm.exit_signal();
        let clean = async {
            tokio::time::timeout(grace, link.shutdown())
                .await
                .ok()?
                .ok()?;
            tokio::time::timeout(grace, exit.wait()).await.ok()
        };
        if clean.await.is_none() {
            tracing::warn!("the guest did not shut down within {graceful_ms} ms; quitting");
        }
    }
    // Also after a clean power-off: the monitor then has nothing left to do, and the fake
    // one sweeps what the agent's commands left.
    vmm.quit().await;
}

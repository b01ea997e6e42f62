//! What a starting supervisor tells the client that spawned it: one JSON object per line
//! on its stdout, then stdout goes to /dev/null.

use std::io::Write;

use serde::{Deserialize, Serialize};
use smolvm_protocol::HelloReply;

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

/// Writes one start-up event line.
pub(crate) fn emit(ev: &StartupEvent) {
    if let Ok(line) = serde_json::to_string(ev) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Points stdout at /dev/null so the client's pipe closes once start-up is reported.
pub(crate) fn detach_stdout() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto fd 1 with a valid open fd.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
}

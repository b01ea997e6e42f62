//! A `Shutdown` stream: the host asks the guest to end cleanly.
//!
//! The agent answers `Ok`, closes the stream, and ends the whole session gracefully (every
//! frame queued so far, the `Ok` among them, is written out before the yamux `GoAway`; the
//! session's other streams end and their process groups are killed, as when a host
//! disconnects). Only then does it act:
//!
//! - as the server forked by our PID 1 (a normal guest), it sends SIGPWR to PID 1, which
//!   terminates every process (SIGTERM, then SIGKILL), flushes and remounts `/` read-only and
//!   powers off; QEMU, run with `-no-reboot`, then exits;
//! - otherwise (`--serve`, `--listen-unix`) the server process exits with status 0.

use std::sync::Arc;

use smolvm_protocol::GuestMessage;

use crate::request::{close, send, Transport};
use crate::server::Context;

/// What the server does once a `Shutdown` request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnShutdown {
    /// Ask PID 1 (the agent as init) for a clean power-off with SIGPWR.
    PowerOff,
    /// Exit the server process with status 0.
    Exit,
}

/// Serves a stream whose first frame was `Shutdown`.
pub async fn handle(mut transport: Transport, ctx: Arc<Context>) {
    tracing::info!("shutdown requested by the host");
    if let Err(e) = send(&mut transport, &GuestMessage::Ok).await {
        tracing::warn!("cannot answer the shutdown request ({e}); shutting down anyway");
    }
    close(&mut transport).await;
    ctx.request_shutdown();
}

/// Acts on a shutdown once the session is closed; returns the server's exit code.
pub fn finish(on: OnShutdown) -> i32 {
    match on {
        OnShutdown::Exit => {
            tracing::info!("shut down; exiting");
            0
        }
        OnShutdown::PowerOff => power_off(),
    }
}

/// Asks PID 1 for a clean power-off and waits for it to end this process. Returns only when
/// the signal cannot be sent; the server then exits, which makes PID 1 reboot (QEMU exits
/// under `-no-reboot`), so the VM ends either way.
fn power_off() -> i32 {
    tracing::info!("asking PID 1 to power off");
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(1, libc::SIGPWR) } != 0 {
        tracing::error!("cannot signal PID 1: {}", std::io::Error::last_os_error());
        return 0;
    }
    loop {
        // PID 1 terminates this process along with every other.
        nix::unistd::pause();
    }
}

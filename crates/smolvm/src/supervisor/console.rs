//! Captures the guest's serial console into a size-capped log file.

use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Most bytes of console output kept per boot; the rest is dropped (the guest is hostile
/// and must not fill the host's disk).
pub const MAX_CONSOLE_LOG: u64 = 4 << 20;

/// Copies console output to `path` until the guest goes away.
pub async fn capture(mut stream: UnixStream, path: PathBuf) {
    let mut file = match tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await
    {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot open console log");
            // Keep draining so the guest's console never blocks.
            let mut buf = [0u8; 8192];
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            return;
        }
    };
    let mut written = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let mut buf = vec![0u8; 16 * 1024];
    let mut capped = false;
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if capped {
            continue;
        }
        let room = MAX_CONSOLE_LOG.saturating_sub(written) as usize;
        let take = n.min(room);
        if file.write_all(&buf[..take]).await.is_err() {
            capped = true;
            continue;
        }
        written += take as u64;
        if take < n {
            let _ = file
                .write_all(b"\n[smolvm: console log truncated at 4 MiB]\n")
                .await;
            capped = true;
        }
    }
    let _ = file.flush().await;
}

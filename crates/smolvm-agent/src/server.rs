//! The agent server: where the protocol is served (the virtio port in a guest, a Unix socket
//! in development), one yamux session at a time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UnixListener;

use crate::error::{AgentError, Result};
use crate::splitter::Splitter;
use crate::{handshake, mux, port, request};

/// Settings shared by every request of the server.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// Whether `Hello` may set the clock, hostname and entropy pool.
    pub apply_identity: bool,
}

/// Where to serve.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// The virtio-serial port: this device, or the one named `org.smolvm.agent`.
    Port(Option<PathBuf>),
    /// A Unix socket at this path.
    Unix(PathBuf),
}

/// Shortest session that is not followed by a pause before the next one.
const SESSION_BACKOFF: Duration = Duration::from_millis(50);

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Runs the server on a single-threaded runtime until it fails; returns the exit code.
pub fn run(endpoint: Endpoint, cfg: ServerConfig) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return 1;
        }
    };
    let cfg = Arc::new(cfg);
    let result = runtime.block_on(async move {
        match endpoint {
            Endpoint::Port(device) => serve_port(device, cfg).await,
            Endpoint::Unix(path) => serve_unix(&path, cfg).await,
        }
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e}");
            1
        }
    }
}

/// Serves one session on `io` and logs how it ended.
async fn serve_session<T>(io: T, cfg: &Arc<ServerConfig>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let result = mux::serve(io, |stream| request::handle(stream, Arc::clone(cfg))).await;
    match result {
        Ok(()) => tracing::debug!("host closed the session"),
        Err(e) => tracing::warn!("{}", AgentError::from(e)),
    }
}

/// Serves on the virtio port. When the host side closes (its supervisor went away, or it
/// disconnects before a snapshot), the session ends and a fresh one starts once it reopens.
async fn serve_port(device: Option<PathBuf>, cfg: Arc<ServerConfig>) -> Result<()> {
    let device = match device {
        Some(device) => device,
        None => port::find_agent_port(port::PORT_WAIT).await?,
    };
    let port = port::Port::open(&device)?;
    tracing::info!(
        "serving on {} ({} ms since boot)",
        device.display(),
        handshake::boot_ms()
    );
    serve_byte_stream(port.io(), || port.wait_host_connected(), &cfg).await
}

/// Serves consecutive host sessions over one byte stream that outlives them (the port):
/// `host_ready` waits until a host is there; the [`Splitter`] tells sessions apart when the
/// host reconnects without the guest noticing.
async fn serve_byte_stream<T, W, Fut>(
    io: T,
    mut host_ready: W,
    cfg: &Arc<ServerConfig>,
) -> Result<()>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    W: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut splitter = Splitter::new(io);
    loop {
        host_ready().await?;
        tracing::debug!("host connected");
        splitter.next_session();
        let started = Instant::now();
        serve_session(splitter.session(), cfg).await;
        // A session that fails at once (e.g. the host reconnecting in a loop) must not
        // turn this into a busy loop.
        if !splitter.was_cut() && started.elapsed() < SESSION_BACKOFF {
            tokio::time::sleep(SESSION_BACKOFF).await;
        }
    }
}

/// Serves on a Unix socket, one connection (one session) at a time.
async fn serve_unix(path: &Path, cfg: Arc<ServerConfig>) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| AgentError::io(format!("listen on {}", path.display()), e))?;
    tracing::info!("listening on {}", path.display());
    loop {
        match listener.accept().await {
            Ok((conn, _)) => serve_session(conn, &cfg).await,
            Err(e) => {
                tracing::warn!("accept on {} failed: {e}", path.display());
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use bytes::Bytes;
    use futures::{SinkExt, StreamExt};
    use serde_bytes::ByteBuf;
    use smolvm_protocol::{codec, decode, encode, GuestMessage, Hello, HostMessage};
    use tokio::io::DuplexStream;
    use tokio_util::codec::Framed;
    use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

    use super::*;

    /// A host session over `port` that opens one stream, handshakes, and then vanishes
    /// without closing anything (as a crashed supervisor, or a snapshot's old host, would).
    async fn handshake_and_vanish(port: &mut DuplexStream) -> GuestMessage {
        let mut conn =
            yamux::Connection::new(port.compat(), yamux::Config::default(), yamux::Mode::Client);
        let stream = poll_fn(|cx| conn.poll_new_outbound(cx)).await.unwrap();
        let mut framed = Framed::new(stream.compat(), codec());
        let hello = HostMessage::Hello(Hello {
            protocol_version: smolvm_protocol::PROTOCOL_VERSION,
            host_time_unix_ns: 0,
            hostname: String::new(),
            entropy: ByteBuf::new(),
        });
        let talk = async {
            framed
                .send(Bytes::from(encode(&hello).unwrap()))
                .await
                .unwrap();
            decode::<GuestMessage>(&framed.next().await.unwrap().unwrap()).unwrap()
        };
        tokio::select! {
            reply = talk => reply,
            _ = poll_fn(|cx| conn.poll_next_inbound(cx)) => panic!("session ended early"),
        }
    }

    #[tokio::test]
    async fn a_host_reconnecting_unnoticed_gets_a_fresh_session() {
        let (mut host, guest) = tokio::io::duplex(1 << 20);
        let cfg = Arc::new(ServerConfig::default());
        let server =
            tokio::spawn(async move { serve_byte_stream(guest, || async { Ok(()) }, &cfg).await });
        for _ in 0..3 {
            let reply =
                tokio::time::timeout(Duration::from_secs(10), handshake_and_vanish(&mut host))
                    .await
                    .expect("the agent answered in time");
            assert!(matches!(reply, GuestMessage::Hello(_)), "{reply:?}");
        }
        server.abort();
    }
}

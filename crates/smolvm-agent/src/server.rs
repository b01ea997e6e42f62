//! The agent server: where the protocol is served (the virtio port in a guest, a Unix socket
//! in development), one yamux session at a time, and the state its requests share (the
//! persistent environment, whether a shutdown was asked for).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::env::EnvStore;
use crate::error::{AgentError, Result};
use crate::shutdown::{self, OnShutdown};
use crate::splitter::Splitter;
use crate::{handshake, mux, port, request};

/// Settings of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Whether `Hello` may set the clock, hostname and entropy pool, and `Network` the
    /// network.
    pub apply_identity: bool,
    /// Directory the persistent environment's files live under (`/` in a guest); a
    /// `Network` request also looks for `sys/class/net` and writes `etc/resolv.conf` there.
    pub state_root: PathBuf,
    /// What to do once a `Shutdown` request was answered.
    pub on_shutdown: OnShutdown,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            apply_identity: false,
            state_root: PathBuf::from("/"),
            on_shutdown: OnShutdown::Exit,
        }
    }
}

/// What every request of the server can reach: its settings and shared state.
#[derive(Debug)]
pub struct Context {
    /// The settings.
    pub cfg: ServerConfig,
    /// The persistent environment, merged into every exec.
    pub env: EnvStore,
    /// Set once a `Shutdown` request was answered.
    shutdown: watch::Sender<bool>,
}

impl Context {
    /// The server's state, with the persistent environment read from `cfg.state_root`.
    pub fn new(cfg: ServerConfig) -> Self {
        let env = EnvStore::load(&cfg.state_root);
        Self {
            cfg,
            env,
            shutdown: watch::Sender::new(false),
        }
    }

    /// Ends the current session (after flushing what its streams queued) and then the
    /// server, which does what [`ServerConfig::on_shutdown`] says.
    pub fn request_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Whether a shutdown was asked for.
    pub fn shutdown_requested(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves once a shutdown is asked for.
    async fn shutdown_asked(&self) {
        let mut rx = self.shutdown.subscribe();
        if rx.wait_for(|&asked| asked).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Where to serve.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// The virtio-serial port: this device, or the one named `org.smolvm.agent`.
    Port(Option<PathBuf>),
    /// A Unix socket at this path.
    Unix(PathBuf),
}

/// How long an idle blocking thread of the server lives.
const BLOCKING_KEEP_ALIVE: Duration = Duration::from_secs(365 * 24 * 3600);

/// Shortest session that is not followed by a pause before the next one.
const SESSION_BACKOFF: Duration = Duration::from_millis(50);

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Runs the server on a single-threaded runtime until it fails or a `Shutdown` request ends
/// it; returns the exit code (after a shutdown as PID 1's server, it does not return).
pub fn run(endpoint: Endpoint, cfg: ServerConfig) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // Idle blocking threads stay: one made at boot is still there in every VM resumed
        // from a snapshot of this one, which then does not make its own.
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return 1;
        }
    };
    let ctx = Arc::new(Context::new(cfg));
    let on_shutdown = ctx.cfg.on_shutdown;
    let result = runtime.block_on(async move {
        // The blocking thread requests such as `Network` use, made now, while booting.
        let _ = tokio::task::spawn_blocking(|| ()).await;
        match endpoint {
            Endpoint::Port(device) => serve_port(device, ctx).await,
            Endpoint::Unix(path) => serve_unix(&path, ctx).await,
        }
    });
    match result {
        Ok(()) => shutdown::finish(on_shutdown),
        Err(e) => {
            tracing::error!("{e}");
            1
        }
    }
}

/// Serves one session on `io` and logs how it ended.
async fn serve_session<T>(io: T, ctx: &Arc<Context>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let stop = ctx.shutdown_asked();
    let result = mux::serve(io, stop, |stream| request::handle(stream, Arc::clone(ctx))).await;
    match result {
        Ok(()) if ctx.shutdown_requested() => tracing::info!("session closed for shutdown"),
        Ok(()) => tracing::debug!("host closed the session"),
        Err(e) => tracing::warn!("{}", AgentError::from(e)),
    }
}

/// Serves on the virtio port. When the host side closes (its supervisor went away, or it
/// disconnects before a snapshot), the session ends and a fresh one starts once it reopens.
///
/// Returns `Ok` after a session ended by a `Shutdown` request.
async fn serve_port(device: Option<PathBuf>, ctx: Arc<Context>) -> Result<()> {
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
    serve_byte_stream(port.io(), || port.wait_host_connected(), &ctx).await
}

/// Serves consecutive host sessions over one byte stream that outlives them (the port):
/// `host_ready` waits until a host is there; the [`Splitter`] tells sessions apart when the
/// host reconnects without the guest noticing.
async fn serve_byte_stream<T, W, Fut>(io: T, mut host_ready: W, ctx: &Arc<Context>) -> Result<()>
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
        serve_session(splitter.session(), ctx).await;
        if ctx.shutdown_requested() {
            return Ok(());
        }
        // A session that fails at once (e.g. the host reconnecting in a loop) must not
        // turn this into a busy loop.
        if !splitter.was_cut() && started.elapsed() < SESSION_BACKOFF {
            tokio::time::sleep(SESSION_BACKOFF).await;
        }
    }
}

/// Serves on a Unix socket, one connection (one session) at a time. Returns `Ok` (and
/// removes the socket) after a session ended by a `Shutdown` request.
async fn serve_unix(path: &Path, ctx: Arc<Context>) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| AgentError::io(format!("listen on {}", path.display()), e))?;
    tracing::info!("listening on {}", path.display());
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                serve_session(conn, &ctx).await;
                if ctx.shutdown_requested() {
                    let _ = std::fs::remove_file(path);
                    return Ok(());
                }
            }
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
    use smolvm_protocol::{codec, decode, encode, EnvUpdate, GuestMessage, Hello, HostMessage};
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
            free_page_reporting: false,
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

    fn hello() -> HostMessage {
        HostMessage::Hello(Hello {
            protocol_version: smolvm_protocol::PROTOCOL_VERSION,
            host_time_unix_ns: 0,
            hostname: String::new(),
            entropy: ByteBuf::new(),
            free_page_reporting: false,
        })
    }

    /// The request stream `i` of [`open_at_once`] carries.
    fn request(i: usize) -> HostMessage {
        match i {
            0 => hello(),
            2 => HostMessage::Env(EnvUpdate::default()),
            _ => HostMessage::Ping(i as u64),
        }
    }

    /// A host session over `port` that opens `streams` streams at once (a Hello on stream
    /// 1, then pings and an environment read) and sends every request before reading any
    /// answer, as a host does that does not wait for the handshake. yamux writes the frames
    /// of different streams in no fixed order: with `last_first` the frames of the last
    /// stream reach the wire first and those of stream 1 last. Returns the answers, in
    /// stream order; the session is left open.
    async fn open_at_once(
        port: &mut DuplexStream,
        streams: usize,
        last_first: bool,
    ) -> Vec<GuestMessage> {
        let mut conn =
            yamux::Connection::new(port.compat(), yamux::Config::default(), yamux::Mode::Client);
        let mut framed = Vec::new();
        for _ in 0..streams {
            let stream = poll_fn(|cx| conn.poll_new_outbound(cx)).await.unwrap();
            framed.push(Framed::new(stream.compat(), codec()));
        }
        let mut order: Vec<usize> = (0..streams).collect();
        if last_first {
            order.reverse();
        }
        for i in order {
            framed[i]
                .send(Bytes::from(encode(&request(i)).unwrap()))
                .await
                .unwrap();
            // One poll of the connection writes what the stream queued.
            poll_fn(|cx| {
                let _ = conn.poll_next_inbound(cx);
                std::task::Poll::Ready(())
            })
            .await;
        }
        let talk = async {
            let mut replies = Vec::new();
            for f in &mut framed {
                replies.push(decode::<GuestMessage>(&f.next().await.unwrap().unwrap()).unwrap());
            }
            replies
        };
        // The connection makes progress only while it is polled.
        let drive = async {
            while poll_fn(|cx| conn.poll_next_inbound(cx)).await.is_some() {}
            panic!("session ended early");
        };
        tokio::select! {
            replies = talk => replies,
            () = drive => unreachable!(),
        }
    }

    fn assert_answered(replies: &[GuestMessage]) {
        for (i, reply) in replies.iter().enumerate() {
            let ok = match i {
                0 => matches!(reply, GuestMessage::Hello(_)),
                2 => matches!(reply, GuestMessage::Env(_)),
                _ => matches!(reply, GuestMessage::Pong(n) if *n == i as u64),
            };
            assert!(ok, "stream {} answered {reply:?}", 2 * i + 1);
        }
    }

    /// Serves the guest end of a fresh byte stream; returns the host end.
    fn serve_duplex() -> (
        DuplexStream,
        tokio::task::JoinHandle<Result<()>>,
        tempfile::TempDir,
    ) {
        let (host, guest) = tokio::io::duplex(1 << 20);
        let state = tempfile::tempdir().unwrap();
        let ctx = Arc::new(Context::new(ServerConfig {
            state_root: state.path().to_owned(),
            ..ServerConfig::default()
        }));
        let server =
            tokio::spawn(async move { serve_byte_stream(guest, || async { Ok(()) }, &ctx).await });
        (host, server, state)
    }

    async fn answered_in_time(port: &mut DuplexStream, streams: usize, last_first: bool) {
        let replies = tokio::time::timeout(
            Duration::from_secs(5),
            open_at_once(port, streams, last_first),
        )
        .await
        .unwrap_or_else(|_| {
            panic!("{streams} streams (last first: {last_first}) not all answered in time")
        });
        assert_answered(&replies);
    }

    #[tokio::test]
    async fn every_stream_a_first_session_opens_at_once_is_served() {
        for streams in [2, 4] {
            for last_first in [false, true] {
                let (mut host, server, _state) = serve_duplex();
                answered_in_time(&mut host, streams, last_first).await;
                server.abort();
            }
        }
    }

    #[tokio::test]
    async fn every_stream_a_new_session_opens_at_once_is_served() {
        for streams in [2, 3, 4] {
            for last_first in [false, true] {
                let (mut host, server, _state) = serve_duplex();
                let reply =
                    tokio::time::timeout(Duration::from_secs(5), handshake_and_vanish(&mut host))
                        .await
                        .expect("the agent answered in time");
                assert!(matches!(reply, GuestMessage::Hello(_)), "{reply:?}");
                // Sessions that leave streams open are followed by fresh ones too.
                for _ in 0..2 {
                    answered_in_time(&mut host, streams, last_first).await;
                }
                server.abort();
            }
        }
    }

    #[tokio::test]
    async fn a_host_reconnecting_unnoticed_gets_a_fresh_session() {
        let (mut host, guest) = tokio::io::duplex(1 << 20);
        let state = tempfile::tempdir().unwrap();
        let ctx = Arc::new(Context::new(ServerConfig {
            state_root: state.path().to_owned(),
            ..ServerConfig::default()
        }));
        let server =
            tokio::spawn(async move { serve_byte_stream(guest, || async { Ok(()) }, &ctx).await });
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

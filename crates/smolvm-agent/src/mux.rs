//! Driving a yamux session. A yamux `Connection` only makes progress while it is polled, so
//! one loop polls it for inbound streams and hands each to its own task.

use std::future::{poll_fn, Future};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio_util::compat::TokioAsyncReadCompatExt;
use yamux::{Config, Connection, ConnectionError, Mode};

/// Streams one session may hold open at once (yamux's default).
const MAX_STREAMS: usize = 512;
/// Receive window every stream starts with; yamux wants the connection cap to cover them all.
const STREAM_WINDOW: usize = 256 * 1024;

/// The agent's yamux settings: yamux's defaults, with the connection-wide receive window
/// capped at the smallest value yamux allows (the host only sends small stdin frames).
fn config() -> Config {
    let mut cfg = Config::default();
    cfg.set_max_num_streams(MAX_STREAMS);
    cfg.set_max_connection_receive_window(Some(MAX_STREAMS * STREAM_WINDOW));
    cfg
}

/// Serves one yamux session (we are the server; the host is the client) over `io` until the
/// host closes it or it fails. Each inbound stream goes to `on_stream` in a task of its own;
/// tasks still running when the session ends are aborted.
pub async fn serve<T, F, Fut>(io: T, mut on_stream: F) -> Result<(), ConnectionError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(yamux::Stream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conn = Connection::new(io.compat(), config(), Mode::Server);
    let mut tasks = JoinSet::new();
    let result = loop {
        tokio::select! {
            next = poll_fn(|cx| conn.poll_next_inbound(cx)) => match next {
                Some(Ok(stream)) => {
                    tasks.spawn(on_stream(stream));
                }
                Some(Err(e)) => break Err(e),
                None => break Ok(()),
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        tracing::error!("a request handler panicked");
                    }
                }
            }
        }
    };
    tasks.shutdown().await;
    result
}

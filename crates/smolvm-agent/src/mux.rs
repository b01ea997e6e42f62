//! Driving a yamux session. A yamux `Connection` only makes progress while it is polled, so
//! one loop polls it for inbound streams and hands each to its own task.

use std::future::{poll_fn, Future};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio_util::compat::TokioAsyncReadCompatExt;
use yamux::{Config, Connection, ConnectionError, Mode};

/// Streams one session may hold open at once (yamux's default).
const MAX_STREAMS: usize = 512;
/// Receive window every stream starts with; yamux wants the connection cap to cover them all.
const STREAM_WINDOW: usize = 256 * 1024;
/// Longest wait for the connection to write what its streams queued when the agent ends the
/// session itself.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The agent's yamux settings: yamux's defaults, with the connection-wide receive window
/// capped at the smallest value yamux allows (the host only sends small stdin frames).
fn config() -> Config {
    let mut cfg = Config::default();
    cfg.set_max_num_streams(MAX_STREAMS);
    cfg.set_max_connection_receive_window(Some(MAX_STREAMS * STREAM_WINDOW));
    cfg
}

/// Serves one yamux session (we are the server; the host is the client) over `io` until the
/// host closes it, it fails, or `stop` resolves. Each inbound stream goes to `on_stream` in a
/// task of its own; tasks still running when the session ends are aborted.
///
/// On `stop` the session is closed gracefully: every frame the streams queued so far (e.g.
/// the answer to the request that asked for the stop) is written out before the yamux
/// `GoAway`, within [`CLOSE_WAIT`].
pub async fn serve<T, S, F, Fut>(io: T, stop: S, mut on_stream: F) -> Result<(), ConnectionError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    S: Future<Output = ()>,
    F: FnMut(yamux::Stream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conn = Connection::new(io.compat(), config(), Mode::Server);
    let mut tasks = JoinSet::new();
    let mut stop = std::pin::pin!(stop);
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
            () = &mut stop => {
                let close = poll_fn(|cx| conn.poll_close(cx));
                break match tokio::time::timeout(CLOSE_WAIT, close).await {
                    Ok(closed) => closed,
                    Err(_) => {
                        tracing::warn!(
                            "the host did not take the session's last frames within {} ms",
                            CLOSE_WAIT.as_millis()
                        );
                        Ok(())
                    }
                };
            }
        }
    };
    tasks.shutdown().await;
    result
}

//! A `Connect` stream: a tunnel from the host to a TCP port on the guest's loopback (what
//! port forwards ride on; no network device is involved).
//!
//! The agent connects to `127.0.0.1:PORT`, then `[::1]:PORT`, within [`CONNECT_TIMEOUT`],
//! and answers `Ok` or `Error(reason)`. After `Ok` the stream stops carrying frames: it is
//! the connection's bytes, both ways, until both sides have closed. When one side ends its
//! half (EOF), the other side's write half is shut down, so half-closed protocols work.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use smolvm_protocol::{ErrorKind, GuestMessage, WireError};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{refuse, send, Transport};

/// Longest wait for the guest's service to accept the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Size of each direction's copy buffer (the yamux stream window bounds what is in flight).
const COPY_BUF: usize = 64 * 1024;

/// Serves a stream whose first frame was `Connect { port }`.
pub async fn handle(transport: Transport, port: u16) {
    if port == 0 {
        let why = WireError::new(ErrorKind::InvalidInput, "cannot connect to port 0");
        return refuse(transport, why).await;
    }
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, dial(port)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(why)) => return refuse(transport, why).await,
        Err(_) => {
            let why = WireError::new(
                ErrorKind::Timeout,
                format!(
                    "port {port} in the guest did not accept the connection within {} s",
                    CONNECT_TIMEOUT.as_secs()
                ),
            );
            return refuse(transport, why).await;
        }
    };
    let _ = tcp.set_nodelay(true);
    let mut transport = transport;
    if send(&mut transport, &GuestMessage::Ok).await.is_err() {
        return;
    }
    // From here on the stream is raw bytes. Whatever the host sent after its request is
    // already in the codec's read buffer: hand it to the service first.
    let parts = transport.into_parts();
    let mut io = parts.io;
    let mut tcp = tcp;
    if !parts.read_buf.is_empty() && tcp.write_all(&parts.read_buf).await.is_err() {
        return;
    }
    match tokio::io::copy_bidirectional_with_sizes(&mut io, &mut tcp, COPY_BUF, COPY_BUF).await {
        Ok((to_guest, to_host)) => {
            tracing::debug!(port, to_guest, to_host, "tunnel closed");
        }
        Err(e) => tracing::debug!(port, "tunnel ended: {e}"),
    }
}

/// Connects to the port on IPv4 loopback, then IPv6 loopback; the error names both tries.
async fn dial(port: u16) -> Result<TcpStream, WireError> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let first = match TcpStream::connect(v4).await {
        Ok(s) => return Ok(s),
        Err(e) => e,
    };
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    match TcpStream::connect(v6).await {
        Ok(s) => Ok(s),
        Err(second) => Err(WireError::new(
            ErrorKind::NotFound,
            format!(
                "nothing accepts connections on port {port} in the guest ({v4}: {first}; {v6}: {second})"
            ),
        )),
    }
}

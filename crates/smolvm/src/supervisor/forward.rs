//! Port forwards served by the supervisor: one TCP listener on the host per forward; each
//! connection it accepts becomes a `Connect` tunnel through the agent channel to a port on
//! the guest's loopback, so forwards work in every network mode, `none` included.
//!
//! Forwards are recorded in the state database; the supervisor re-establishes the VM's
//! recorded forwards each time the VM starts, and its listeners end with it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use smolvm_protocol::ForwardInfo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::agent_link::AgentLink;
use super::record::Record;
use crate::error::{Error, ErrorKind, Result};

/// Connections one forward serves at once; more are closed as they come.
pub const MAX_CONNECTIONS_PER_FORWARD: usize = 128;

/// Connections all forwards of a VM serve at once. Each is a yamux stream, and the session
/// allows 256: the rest stay free for commands, files and control requests.
pub const MAX_CONNECTIONS: usize = 192;

/// Size of each direction's copy buffer.
const COPY_BUF: usize = 64 * 1024;

/// Pending connections the kernel queues for a forward's listener.
const BACKLOG: u32 = 128;

/// The host address forwards listen on unless told otherwise.
pub const DEFAULT_BIND: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Aborts a task when dropped (a forward's accept loop, and with it its connections).
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl AbortOnDrop {
    /// Aborts the task and waits until it is gone (its listener closed).
    async fn stop(mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// A forward being served.
struct Active {
    info: ForwardInfo,
    task: AbortOnDrop,
}

/// The VM's forwards: the live listeners and their records.
pub struct Forwards {
    vm_id: String,
    link: AgentLink,
    record: Record,
    active: Mutex<BTreeMap<(IpAddr, u16), Active>>,
    total: Arc<Semaphore>,
}

impl Forwards {
    /// Forwards of the VM `vm_id`, tunnelled over `link`, recorded through `record` (whose
    /// SQLite calls run in the blocking pool, not on the thread that relays the VM's requests).
    pub(super) fn new(vm_id: &str, link: AgentLink, record: Record) -> Forwards {
        Forwards {
            vm_id: vm_id.to_string(),
            link,
            record,
            active: Mutex::new(BTreeMap::new()),
            total: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        }
    }

    fn active(&self) -> MutexGuard<'_, BTreeMap<(IpAddr, u16), Active>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-establishes the VM's recorded forwards (at start). Those that cannot be bound
    /// (their port taken meanwhile) stay recorded and are returned with the reason.
    pub async fn restore(&self) -> Result<Vec<(ForwardInfo, Error)>> {
        let recorded = self.record.call(|s, id| s.forwards(id)).await?;
        let mut failed = Vec::new();
        for info in recorded {
            let res = info
                .host_addr
                .parse::<IpAddr>()
                .map_err(|_| {
                    Error::forward(
                        ErrorKind::InvalidInput,
                        format!(
                            "recorded host address {:?} is not an IP address",
                            info.host_addr
                        ),
                    )
                })
                .and_then(|addr| {
                    let listener = listen(SocketAddr::new(addr, info.host_port))?;
                    self.serve(addr, info.clone(), listener);
                    Ok(())
                });
            if let Err(e) = res {
                tracing::warn!(
                    host = %format!("{}:{}", info.host_addr, info.host_port),
                    guest_port = info.guest_port,
                    "could not re-establish a port forward: {e}"
                );
                failed.push((info, e));
            }
        }
        Ok(failed)
    }

    /// Forwards a host port (`None` or 0: a free one) on `bind` (`None`: 127.0.0.1) to
    /// `guest_port`, records it, and returns it with the real host port. Exposing what is
    /// already forwarded returns the existing forward.
    pub async fn expose(
        &self,
        guest_port: u16,
        host_port: Option<u16>,
        bind: Option<&str>,
    ) -> Result<ForwardInfo> {
        if guest_port == 0 {
            return Err(Error::forward(
                ErrorKind::InvalidInput,
                "guest port 0 cannot be forwarded (ports are 1-65535)",
            ));
        }
        let addr = match bind {
            None => DEFAULT_BIND,
            Some(b) => b.parse::<IpAddr>().map_err(|_| {
                Error::forward(
                    ErrorKind::InvalidInput,
                    format!(
                        "bind address {b:?} is not an IP address (e.g. 127.0.0.1, ::1, 0.0.0.0)"
                    ),
                )
            })?,
        };
        let host_port = host_port.unwrap_or(0);
        if host_port != 0 {
            if let Some(a) = self.active().get(&(addr, host_port)) {
                if a.info.guest_port == guest_port {
                    return Ok(a.info.clone());
                }
                return Err(Error::forward(
                    ErrorKind::Busy,
                    format!(
                        "host port {} already forwards to guest port {} of VM {}; remove it first \
                     with `smolvm port {} --rm {host_port}`",
                        show(addr, host_port),
                        a.info.guest_port,
                        self.vm_id,
                        self.vm_id
                    ),
                ));
            }
        }
        let listener = listen(SocketAddr::new(addr, host_port))?;
        let port = listener
            .local_addr()
            .map_err(|e| {
                Error::forward(
                    ErrorKind::Io,
                    format!("the new listener has no address: {e}"),
                )
            })?
            .port();
        let info = ForwardInfo {
            host_addr: addr.to_string(),
            host_port: port,
            guest_port,
        };
        // Recorded already (it could not be re-established at start, its port then taken):
        // serve it again; otherwise record it.
        let recorded = self.record.call(|s, id| s.forwards(id)).await?;
        match recorded
            .iter()
            .find(|f| f.host_addr == info.host_addr && f.host_port == port)
        {
            Some(f) if f.guest_port == guest_port => {}
            Some(f) => {
                return Err(Error::forward(
                    ErrorKind::Busy,
                    format!(
                        "host port {} is recorded as a forward to guest port {} of VM {}; remove \
                     it first with `smolvm port {} --rm {port}`",
                        show(addr, port),
                        f.guest_port,
                        self.vm_id,
                        self.vm_id
                    ),
                ))
            }
            None => {
                let row = info.clone();
                self.record
                    .call(move |s, id| s.add_forward(id, &row))
                    .await?
            }
        }
        if !addr.is_loopback() {
            tracing::warn!(
                host = %show(addr, port),
                "port forward listens on a non-loopback address, as asked: other machines may reach guest port {guest_port}"
            );
        }
        self.serve(addr, info.clone(), listener);
        Ok(info)
    }

    /// Stops serving the forwards on `host_port` (every address) and forgets them; returns
    /// once their listeners are closed. Their open connections are closed too.
    pub async fn unexpose(&self, host_port: u16) -> Result<()> {
        let removed: Vec<Active> = {
            let mut active = self.active();
            let keys: Vec<_> = active
                .keys()
                .filter(|(_, p)| *p == host_port)
                .copied()
                .collect();
            keys.iter().filter_map(|k| active.remove(k)).collect()
        };
        let removed_live = removed.len();
        for a in removed {
            a.task.stop().await;
        }
        let removed_rows = self
            .record
            .call(move |s, id| s.remove_forwards(id, host_port))
            .await?;
        if removed_live == 0 && removed_rows == 0 {
            return Err(Error::forward(
                ErrorKind::NotFound,
                format!(
                    "VM {} has no forward on host port {host_port} (see `smolvm port {}`)",
                    self.vm_id, self.vm_id
                ),
            ));
        }
        Ok(())
    }

    /// The forwards served now.
    pub fn list(&self) -> Vec<ForwardInfo> {
        self.active().values().map(|a| a.info.clone()).collect()
    }

    /// Starts serving `listener` for `info`.
    fn serve(&self, addr: IpAddr, info: ForwardInfo, listener: TcpListener) {
        let task = tokio::spawn(accept_loop(
            listener,
            info.guest_port,
            self.link.clone(),
            self.total.clone(),
        ));
        self.active().insert(
            (addr, info.host_port),
            Active {
                info,
                task: AbortOnDrop(Some(task)),
            },
        );
    }
}

/// `addr:port`, with brackets for IPv6.
fn show(addr: IpAddr, port: u16) -> String {
    SocketAddr::new(addr, port).to_string()
}

/// Binds a listener (address reuse on, so a port whose old connections linger in
/// TIME_WAIT can be bound again at once; a port another socket listens on is still refused).
fn listen(at: SocketAddr) -> Result<TcpListener> {
    let fail = |e: std::io::Error| {
        let what = show(at.ip(), at.port());
        match e.kind() {
            std::io::ErrorKind::AddrInUse => Error::forward(
                ErrorKind::Busy,
                format!(
                    "host port {what} is already in use (by another program or forward); \
                     choose another host port, or leave it out to get a free one"
                ),
            ),
            std::io::ErrorKind::PermissionDenied => Error::forward(
                ErrorKind::Refused,
                format!(
                    "not allowed to listen on {what} (ports below 1024 need root or \
                     CAP_NET_BIND_SERVICE)"
                ),
            ),
            std::io::ErrorKind::AddrNotAvailable => Error::forward(
                ErrorKind::InvalidInput,
                format!(
                    "cannot listen on {what}: {} is not an address of this host",
                    at.ip()
                ),
            ),
            _ => Error::forward(ErrorKind::Io, format!("cannot listen on {what}: {e}")),
        }
    };
    let sock = if at.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(fail)?;
    sock.set_reuseaddr(true).map_err(fail)?;
    sock.bind(at).map_err(fail)?;
    sock.listen(BACKLOG).map_err(fail)
}

/// Accepts connections until aborted; dropping it (abort) closes every connection.
async fn accept_loop(
    listener: TcpListener,
    guest_port: u16,
    link: AgentLink,
    total: Arc<Semaphore>,
) {
    let mine = Arc::new(Semaphore::new(MAX_CONNECTIONS_PER_FORWARD));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let permits = (mine.clone().try_acquire_owned(), total.clone().try_acquire_owned());
                    let (Ok(a), Ok(b)) = permits else {
                        tracing::warn!(%peer, guest_port, "too many connections through port forwards; closing this one");
                        continue;
                    };
                    conns.spawn(tunnel(tcp, link.clone(), guest_port, [a, b]));
                }
                Err(e) => {
                    // E.g. out of file descriptors: do not spin.
                    tracing::warn!(guest_port, "accepting a forwarded connection failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Carries one connection: opens a tunnel to the guest port, then copies both ways until
/// both sides have closed. When the guest refuses, the connection is closed.
async fn tunnel(
    mut tcp: TcpStream,
    link: AgentLink,
    guest_port: u16,
    _permits: [OwnedSemaphorePermit; 2],
) {
    let _ = tcp.set_nodelay(true);
    let (mut io, early) = match link.connect_tcp(guest_port).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(guest_port, "forwarded connection closed: {e}");
            close_gracefully(tcp).await;
            return;
        }
    };
    if !early.is_empty() && tcp.write_all(&early).await.is_err() {
        return;
    }
    if let Err(e) =
        tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut io, COPY_BUF, COPY_BUF).await
    {
        tracing::debug!(guest_port, "forwarded connection ended: {e}");
    }
}

/// Closes a connection with a FIN rather than a reset: closing a socket with unread data
/// makes the kernel send RST, so end our half, then read and drop what the client sends
/// until it closes too (bounded in time and bytes).
async fn close_gracefully(mut tcp: TcpStream) {
    let _ = tcp.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut left = 1usize << 20;
        while left > 0 {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), drain).await;
}

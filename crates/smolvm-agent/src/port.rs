//! The virtio-serial port that carries the agent channel: finding it, and async I/O on it.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use smolvm_protocol::AGENT_PORT_NAME;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

use crate::error::{AgentError, Result};

/// How long to wait for the port to appear after the virtio drivers are loaded.
pub const PORT_WAIT: Duration = Duration::from_secs(5);
/// Where the kernel lists virtio-serial ports.
const SYS_PORTS: &str = "/sys/class/virtio-ports";
/// Interval between looks for the port.
const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// Upper bound between checks for the host side of the port to open.
const CONNECT_RECHECK: Duration = Duration::from_millis(50);

/// Finds the device of the port named `name`: `sys/<dir>/name` holds the name and the
/// device is `dev/<dir>`. Ports whose device node is not there yet are skipped.
fn lookup(sys: &Path, dev: &Path, name: &str) -> Option<PathBuf> {
    for entry in fs::read_dir(sys).ok()?.flatten() {
        let Ok(found) = fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if found.trim_end_matches('\n') == name {
            let device = dev.join(entry.file_name());
            if device.exists() {
                return Some(device);
            }
        }
    }
    None
}

/// Waits (bounded) for the agent's port to appear and returns its device path.
pub async fn find_agent_port(wait: Duration) -> Result<PathBuf> {
    let start = Instant::now();
    loop {
        if let Some(device) = lookup(Path::new(SYS_PORTS), Path::new("/dev"), AGENT_PORT_NAME) {
            return Ok(device);
        }
        if start.elapsed() >= wait {
            return Err(AgentError::AgentPortMissing {
                name: AGENT_PORT_NAME,
                waited_ms: wait.as_millis() as u64,
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Whether the other end of the port is closed (virtio ports report `POLLHUP` while the
/// host side is not connected, and reads then return end-of-file).
fn hung_up(fd: &OwnedFd) -> io::Result<bool> {
    let mut fds = [PollFd::new(
        fd.as_fd(),
        PollFlags::POLLIN | PollFlags::POLLOUT,
    )];
    poll(&mut fds, PollTimeout::ZERO)?;
    Ok(fds[0]
        .revents()
        .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)))
}

/// An open virtio-serial port (or any pollable character device, socket or pipe).
pub struct Port {
    fd: Arc<AsyncFd<OwnedFd>>,
}

impl Port {
    /// Opens the device non-blocking and registers it with the runtime.
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| AgentError::io(format!("open {}", path.display()), e))?;
        Self::from_fd(OwnedFd::from(file))
            .map_err(|e| AgentError::io(format!("poll {}", path.display()), e))
    }

    /// Registers an open, non-blocking descriptor with the runtime.
    fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: the `OwnedFd` stays open, and refers to the same file, for as long as the
        // `AsyncFd` that owns it lives.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(Self { fd: Arc::new(fd) })
    }

    /// A handle for one session's I/O on the port.
    pub fn io(&self) -> PortIo {
        PortIo {
            fd: Arc::clone(&self.fd),
        }
    }

    /// Waits until the host side of the port is open.
    pub async fn wait_host_connected(&self) -> Result<()> {
        loop {
            let hup =
                hung_up(self.fd.get_ref()).map_err(|e| AgentError::io("poll the agent port", e))?;
            if !hup {
                return Ok(());
            }
            // The driver wakes pollers when the host opens the port; the timeout is a safety net.
            let _ = tokio::time::timeout(CONNECT_RECHECK, async {
                if let Ok(mut guard) = self.fd.ready(Interest::READABLE | Interest::WRITABLE).await
                {
                    guard.clear_ready();
                }
            })
            .await;
        }
    }
}

/// `AsyncRead + AsyncWrite` over the port for one session.
pub struct PortIo {
    fd: Arc<AsyncFd<OwnedFd>>,
}

impl AsyncRead for PortIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from))
            {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PortIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(io::Error::from))
            {
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {
                    // A virtio port whose host side closed never becomes writable again.
                    if hung_up(self.fd.get_ref())? {
                        return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                    }
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn lookup_matches_the_name_and_needs_the_device_node() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let dev = dir.path().join("dev");
        for (port, name) in [
            ("vport0p0", "org.other\n"),
            ("vport0p1", "org.smolvm.agent\n"),
        ] {
            fs::create_dir_all(sys.join(port)).unwrap();
            fs::write(sys.join(port).join("name"), name).unwrap();
        }
        fs::create_dir_all(&dev).unwrap();
        assert_eq!(lookup(&sys, &dev, AGENT_PORT_NAME), None);
        fs::write(dev.join("vport0p1"), "").unwrap();
        assert_eq!(
            lookup(&sys, &dev, AGENT_PORT_NAME),
            Some(dev.join("vport0p1"))
        );
        assert_eq!(
            lookup(&dir.path().join("none"), &dev, AGENT_PORT_NAME),
            None
        );
    }

    #[tokio::test]
    async fn port_io_round_trips_over_a_socket() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let port = Port::from_fd(OwnedFd::from(a)).unwrap();
        port.wait_host_connected().await.unwrap();
        let mut io = port.io();
        let mut peer = tokio::net::UnixStream::from_std({
            b.set_nonblocking(true).unwrap();
            b
        })
        .unwrap();
        let big = vec![7u8; 1 << 20];
        let writer = tokio::spawn(async move {
            io.write_all(&big).await.unwrap();
            io
        });
        let mut got = vec![0u8; 1 << 20];
        peer.read_exact(&mut got).await.unwrap();
        assert!(got.iter().all(|&b| b == 7));
        let mut io = writer.await.unwrap();
        peer.write_all(b"ping").await.unwrap();
        let mut four = [0u8; 4];
        io.read_exact(&mut four).await.unwrap();
        assert_eq!(&four, b"ping");
        drop(peer);
        assert_eq!(io.read(&mut four).await.unwrap(), 0);
    }
}

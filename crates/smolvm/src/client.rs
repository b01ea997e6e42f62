//! Blocking client for a VM's API socket (used by the CLI, the Rust API and Python).

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smolvm_protocol::{
    read_frame, write_frame, ApiReply, ApiRequest, EnvUpdate, ExecRequest, ExitStatus, ForwardInfo,
    GuestMessage, HostMessage, VmStatus, MAX_CHUNK,
};

use crate::error::{Error, Result};

/// A chunk of process output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Cancels a running command from another thread (Ctrl-C in an SDK, a dropped stream).
/// Cancelling closes the command's connection; the supervisor then kills the process and
/// its group in the guest, so nothing is left running.
#[derive(Clone, Default)]
pub struct CancelToken {
    inner: Arc<CancelInner>,
}

#[derive(Default)]
struct CancelInner {
    cancelled: AtomicBool,
    conn: Mutex<Option<UnixStream>>,
}

impl std::fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelToken")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl CancelToken {
    /// A token not yet cancelled.
    pub fn new() -> CancelToken {
        CancelToken::default()
    }

    /// Cancels the command using this token (now, or as soon as it starts).
    pub fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::SeqCst);
        if let Some(s) = self.conn().as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Option<UnixStream>> {
        self.inner
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Ties the token to a command's connection; false when it is already cancelled.
    fn attach(&self, s: &UnixStream) -> bool {
        let mut conn = self.conn();
        *conn = s.try_clone().ok();
        !self.is_cancelled()
    }
}

/// Talks to one VM's supervisor.
#[derive(Debug, Clone)]
pub struct ApiClient {
    id: String,
    socket: PathBuf,
}

impl ApiClient {
    /// A client for the VM `id` whose API socket is at `socket`.
    pub fn new(id: &str, socket: &Path) -> ApiClient {
        ApiClient {
            id: id.to_string(),
            socket: socket.to_path_buf(),
        }
    }

    fn gone(&self, reason: impl Into<String>) -> Error {
        Error::VmGone {
            id: self.id.clone(),
            reason: reason.into(),
        }
    }

    fn connect(&self) -> Result<UnixStream> {
        UnixStream::connect(&self.socket).map_err(|e| {
            self.gone(format!(
                "its supervisor is not reachable at {} ({e})",
                self.socket.display()
            ))
        })
    }

    fn request(&self, req: &ApiRequest, timeout: Duration) -> Result<ApiReply> {
        let mut s = self.connect()?;
        s.set_read_timeout(Some(timeout)).ok();
        write_frame(&mut s, req).map_err(|e| self.gone(e.to_string()))?;
        match read_frame::<_, ApiReply>(&mut s) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(self.gone("the supervisor closed the connection")),
            Err(smolvm_protocol::ProtocolError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(Error::Timeout {
                    what: "the VM's supervisor".into(),
                    secs: timeout.as_secs_f64(),
                })
            }
            Err(e) => Err(Error::Protocol {
                peer: "supervisor",
                source: e,
            }),
        }
    }

    /// The supervisor's view of the VM.
    pub fn status(&self) -> Result<VmStatus> {
        match self.request(&ApiRequest::Status, Duration::from_secs(5))? {
            ApiReply::Status(s) => Ok(s),
            ApiReply::Error(e) => Err(Error::Agent(e)),
            _ => Err(self.gone("unexpected reply to status")),
        }
    }

    /// Stops the VM; returns once QEMU has exited.
    pub fn stop(&self, graceful: Duration) -> Result<()> {
        let req = ApiRequest::Stop {
            graceful_ms: graceful.as_millis() as u64,
        };
        match self.request(&req, graceful + Duration::from_secs(10))? {
            ApiReply::Ok => Ok(()),
            ApiReply::Error(e) => Err(Error::Agent(e)),
            _ => Err(self.gone("unexpected reply to stop")),
        }
    }

    /// Pauses, resumes or snapshots the VM (`req` is `Pause`, `Resume` or `Snapshot`).
    pub fn control(&self, req: &ApiRequest) -> Result<()> {
        match self.request(req, Duration::from_secs(160))? {
            ApiReply::Ok => Ok(()),
            ApiReply::Error(e) => Err(Error::Snapshot(e)),
            _ => Err(self.gone("unexpected reply to a pause, resume or snapshot")),
        }
    }

    /// Changes (or, with an empty update, reads) the guest's persistent environment.
    pub fn env(&self, update: EnvUpdate) -> Result<Vec<(String, String)>> {
        match self.request(&ApiRequest::Env(update), Duration::from_secs(20))? {
            ApiReply::Env(vars) => Ok(vars),
            ApiReply::Error(e) => Err(Error::Agent(e)),
            _ => Err(self.gone("unexpected reply to an environment request")),
        }
    }

    /// Asks the supervisor to forward a host port to `guest_port` (see
    /// [`crate::Vm::expose_local`]).
    pub fn expose(
        &self,
        guest_port: u16,
        host_port: Option<u16>,
        bind: Option<String>,
    ) -> Result<ForwardInfo> {
        let req = ApiRequest::Expose {
            guest_port,
            host_port,
            bind,
        };
        match self.request(&req, Duration::from_secs(10))? {
            ApiReply::Forward(info) => Ok(info),
            ApiReply::Error(e) => Err(Error::Forward(e)),
            _ => Err(self.gone("unexpected reply to a port forward request")),
        }
    }

    /// Asks the supervisor to remove the forwards on `host_port`.
    pub fn unexpose(&self, host_port: u16) -> Result<()> {
        match self.request(&ApiRequest::Unexpose { host_port }, Duration::from_secs(10))? {
            ApiReply::Ok => Ok(()),
            ApiReply::Error(e) => Err(Error::Forward(e)),
            _ => Err(self.gone("unexpected reply to a port forward removal")),
        }
    }

    /// The forwards the supervisor serves now.
    pub fn forwards(&self) -> Result<Vec<ForwardInfo>> {
        match self.request(&ApiRequest::Forwards, Duration::from_secs(5))? {
            ApiReply::Forwards(list) => Ok(list),
            ApiReply::Error(e) => Err(Error::Forward(e)),
            _ => Err(self.gone("unexpected reply to a port forward listing")),
        }
    }

    /// Runs a process, feeding `stdin` if given and handing output chunks to `sink` as they
    /// arrive. `deadline` bounds the whole wait (the agent enforces the command's own timeout).
    pub fn exec(
        &self,
        req: ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        deadline: Option<Duration>,
        cancel: Option<&CancelToken>,
        sink: &mut dyn FnMut(OutputStream, &[u8]),
    ) -> Result<ExitStatus> {
        let mut s = self.connect()?;
        if cancel.is_some_and(|c| !c.attach(&s)) {
            return Err(Error::Cancelled);
        }
        s.set_read_timeout(deadline).ok();
        write_frame(&mut s, &ApiRequest::Exec(req)).map_err(|e| self.gone(e.to_string()))?;
        let writer = match stdin {
            Some(mut input) => {
                let mut w = s.try_clone().map_err(|e| self.gone(e.to_string()))?;
                Some(std::thread::spawn(move || {
                    let mut buf = vec![0u8; MAX_CHUNK];
                    loop {
                        match input.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                let msg = HostMessage::Stdin(buf[..n].to_vec().into());
                                if write_frame(&mut w, &msg).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = write_frame(&mut w, &HostMessage::StdinEof);
                }))
            }
            None => None,
        };
        let result = loop {
            match read_frame::<_, GuestMessage>(&mut s) {
                Ok(Some(GuestMessage::Stdout(b))) => sink(OutputStream::Stdout, &b),
                Ok(Some(GuestMessage::Stderr(b))) => sink(OutputStream::Stderr, &b),
                Ok(Some(GuestMessage::Started { .. })) | Ok(Some(GuestMessage::Pong(_))) => {}
                Ok(Some(GuestMessage::Exited(st))) => break Ok(st),
                Ok(Some(GuestMessage::Error(e))) => {
                    break Err(if e.contains("went away") {
                        self.gone(e)
                    } else {
                        Error::Agent(e)
                    })
                }
                Ok(Some(GuestMessage::Hello(_) | GuestMessage::Env(_) | GuestMessage::Ok)) => {
                    break Err(self.gone("unexpected message on an exec stream"))
                }
                Ok(None) => {
                    break Err(self.gone("the supervisor closed the connection mid-command"))
                }
                Err(smolvm_protocol::ProtocolError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break Err(Error::Timeout {
                        what: "the command's result".into(),
                        secs: deadline.map(|d| d.as_secs_f64()).unwrap_or(0.0),
                    })
                }
                Err(e) => {
                    break Err(Error::Protocol {
                        peer: "supervisor",
                        source: e,
                    })
                }
            }
        };
        let _ = s.shutdown(std::net::Shutdown::Both);
        let result = match (result, cancel) {
            (Err(_), Some(c)) if c.is_cancelled() => Err(Error::Cancelled),
            (r, _) => r,
        };
        // The stdin feeder may be blocked reading a terminal; it ends on its own once its
        // next write fails, so it is not joined.
        drop(writer);
        result
    }
}

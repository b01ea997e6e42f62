//! Blocking client for a VM's API socket (used by the CLI, the Rust API and Python).

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smolvm_protocol::{
    read_frame, write_frame, ApiHello, ApiHelloReply, ApiReply, ApiRequest, EnvUpdate, ExecRequest,
    ExitStatus, ForwardInfo, GuestMessage, HostMessage, ProtocolError, VmStatus, WireError,
    API_MAGIC, API_VERSION, MAX_CHUNK,
};

use crate::error::{Error, ErrorKind, Result};

/// What a request is about, which decides the error a failure becomes (with its kind).
#[derive(Debug, Clone, Copy)]
enum Domain {
    /// Commands, the environment, status, stop: the guest agent's errors.
    Guest,
    /// Port forwards.
    Forward,
    /// Pause, resume, snapshot.
    Control,
}

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

    /// The error a [`WireError`] from the supervisor becomes, chosen by its kind (and, for
    /// the kinds that belong to what was asked, by the request's domain); never by its text.
    fn wire_error(&self, e: WireError, domain: Domain) -> Error {
        let WireError { kind, message } = e;
        match (kind, domain) {
            (ErrorKind::GuestGone, _) => self.gone(message),
            // Only the monitor refuses this way (the fake one saves no state).
            (ErrorKind::Unsupported, Domain::Control) => Error::Unsupported(message),
            (ErrorKind::Timeout, _) => Error::Timeout {
                what: message,
                secs: None,
            },
            (
                ErrorKind::NotFound
                | ErrorKind::InvalidInput
                | ErrorKind::Refused
                | ErrorKind::Busy
                | ErrorKind::Io
                | ErrorKind::Unsupported,
                Domain::Guest,
            ) => Error::Agent { kind, message },
            (
                ErrorKind::NotFound
                | ErrorKind::InvalidInput
                | ErrorKind::Refused
                | ErrorKind::Busy
                | ErrorKind::Io
                | ErrorKind::Unsupported,
                Domain::Forward,
            ) => Error::Forward { kind, message },
            (
                ErrorKind::NotFound
                | ErrorKind::InvalidInput
                | ErrorKind::Refused
                | ErrorKind::Busy
                | ErrorKind::Io,
                Domain::Control,
            ) => Error::Snapshot(message),
        }
    }

    /// The error for a read from the supervisor that failed (`waited`: the read's limit).
    fn read_failed(&self, e: ProtocolError, what: &str, waited: Option<Duration>) -> Error {
        match e {
            ProtocolError::Io(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Error::Timeout {
                    what: what.into(),
                    secs: waited.map(|d| d.as_secs_f64()),
                }
            }
            e => Error::Protocol {
                peer: "supervisor",
                source: e,
            },
        }
    }

    /// Connects, says hello and sends `req` (without waiting in between), then reads the
    /// supervisor's hello: a supervisor of another API version is refused here with
    /// [`Error::ApiVersion`], before anything of the request is read as a reply.
    fn open(&self, req: &ApiRequest, timeout: Option<Duration>) -> Result<UnixStream> {
        let mut s = self.connect()?;
        s.set_read_timeout(timeout).ok();
        let hello = ApiHello {
            magic: API_MAGIC,
            api_version: API_VERSION,
        };
        let sent = write_frame(&mut s, &hello).and_then(|()| write_frame(&mut s, req));
        let mismatch = |supervisor| Error::ApiVersion {
            id: self.id.clone(),
            supervisor,
            client: API_VERSION,
        };
        match read_frame::<_, ApiHelloReply>(&mut s) {
            Ok(Some(r)) if r.magic == API_MAGIC => {
                if r.api_version != API_VERSION {
                    return Err(mismatch(r.api_version));
                }
                if let Some(e) = r.refused {
                    return Err(self.wire_error(e, Domain::Guest));
                }
            }
            // No hello came back: a supervisor from before API versions, which answers a
            // hello as a request it cannot decode.
            Ok(Some(_)) | Err(ProtocolError::Decode(_)) => return Err(mismatch(0)),
            Ok(None) => return Err(self.gone("the supervisor closed the connection")),
            Err(e) => return Err(self.read_failed(e, "the VM's supervisor to answer", timeout)),
        }
        sent.map_err(|e| self.gone(e.to_string()))?;
        Ok(s)
    }

    fn request(&self, req: &ApiRequest, timeout: Duration) -> Result<ApiReply> {
        let mut s = self.open(req, Some(timeout))?;
        match read_frame::<_, ApiReply>(&mut s) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(self.gone("the supervisor closed the connection")),
            Err(e) => Err(self.read_failed(e, "the VM's supervisor", Some(timeout))),
        }
    }

    /// The supervisor's view of the VM.
    pub fn status(&self) -> Result<VmStatus> {
        match self.request(&ApiRequest::Status, Duration::from_secs(5))? {
            ApiReply::Status(s) => Ok(s),
            ApiReply::Error(e) => Err(self.wire_error(e, Domain::Guest)),
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
            ApiReply::Error(e) => Err(self.wire_error(e, Domain::Guest)),
            _ => Err(self.gone("unexpected reply to stop")),
        }
    }

    /// Pauses, resumes or snapshots the VM (`req` is `Pause`, `Resume` or `Snapshot`).
    pub fn control(&self, req: &ApiRequest) -> Result<()> {
        match self.request(req, Duration::from_secs(160))? {
            ApiReply::Ok => Ok(()),
            ApiReply::Error(e) => Err(self.wire_error(e, Domain::Control)),
            _ => Err(self.gone("unexpected reply to a pause, resume or snapshot")),
        }
    }

    /// Changes (or, with an empty update, reads) the guest's persistent environment.
    pub fn env(&self, update: EnvUpdate) -> Result<Vec<(String, String)>> {
        match self.request(&ApiRequest::Env(update), Duration::from_secs(20))? {
            ApiReply::Env(vars) => Ok(vars),
            ApiReply::Error(e) => Err(self.wire_error(e, Domain::Guest)),
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
            ApiReply::Error(e) => Err(self.wire_error(e, Domain::Forward)),
            _ => Err(self.gone("unexpected reply to a port forward request")),
        }
    }

    /// Asks the supervisor to remove the forwards on `host_port`.
    pub fn unexpose(&self, host_port: u16) -> Result<()> {
        match self.request(&ApiRequest::Unexpose { host_port }, Duration::from_secs(10))? {
            ApiReply::Ok => Ok(()),
            ApiReply::Error(e) => Err(self.wire_error(e, Domain::Forward)),
            _ => Err(self.gone("unexpected reply to a port forward removal")),
        }
    }

    /// The forwards the supervisor serves now.
    pub fn forwards(&self) -> Result<Vec<ForwardInfo>> {
        match self.request(&ApiRequest::Forwards, Duration::from_secs(5))? {
            ApiReply::Forwards(list) => Ok(list),
            ApiReply::Error(e) => Err(self.wire_error(e, Domain::Forward)),
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
        if cancel.is_some_and(CancelToken::is_cancelled) {
            return Err(Error::Cancelled);
        }
        let mut s = self.open(&ApiRequest::Exec(req), deadline)?;
        if cancel.is_some_and(|c| !c.attach(&s)) {
            let _ = s.shutdown(std::net::Shutdown::Both);
            return Err(Error::Cancelled);
        }
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
                Ok(Some(GuestMessage::Error(e))) => break Err(self.wire_error(e, Domain::Guest)),
                Ok(Some(GuestMessage::Hello(_) | GuestMessage::Env(_) | GuestMessage::Ok)) => {
                    break Err(self.gone("unexpected message on an exec stream"))
                }
                Ok(None) => {
                    break Err(self.gone("the supervisor closed the connection mid-command"))
                }
                Err(e) => break Err(self.read_failed(e, "the command's result", deadline)),
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    use smolvm_protocol::{encode, ErrorKind};

    use super::*;

    /// A real supervisor socket that reads one frame (the client's first) and answers it with
    /// `answers`, raw frames, then closes; returns the frame it read.
    fn supervisor(
        answers: Vec<Vec<u8>>,
    ) -> (
        tempfile::TempDir,
        ApiClient,
        std::thread::JoinHandle<Vec<u8>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut len = [0u8; 4];
            std::io::Read::read_exact(&mut s, &mut len).unwrap();
            let mut first = vec![0u8; u32::from_le_bytes(len) as usize];
            std::io::Read::read_exact(&mut s, &mut first).unwrap();
            for a in answers {
                s.write_all(&(a.len() as u32).to_le_bytes()).unwrap();
                s.write_all(&a).unwrap();
            }
            first
        });
        (dir, ApiClient::new("vm1", &path), server)
    }

    fn hello_reply(api_version: u32, refused: Option<WireError>) -> Vec<u8> {
        encode(&ApiHelloReply {
            magic: API_MAGIC,
            api_version,
            refused,
        })
        .unwrap()
    }

    /// A supervisor from before API versions (generation 5) decodes the hello as a request,
    /// fails, and answers as it answered any bad request: `ApiReply::Error(String)`, tag 2
    /// then the text. The client names both versions.
    #[test]
    fn a_supervisor_from_before_api_versions_is_named_as_such() {
        let mut old_reply = vec![2u8, 12];
        old_reply.extend_from_slice(b"bad request:");
        let (_dir, client, server) = supervisor(vec![old_reply]);
        let err = client.status().unwrap_err();
        assert!(
            matches!(
                err,
                Error::ApiVersion {
                    supervisor: 0,
                    client: API_VERSION,
                    ..
                }
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains("API version 0"), "{text}");
        assert!(
            text.contains(&format!("this smolvm speaks {API_VERSION}")),
            "{text}"
        );
        // What the old supervisor read was our hello, frozen bytes.
        let first = server.join().unwrap();
        assert_eq!(first, vec![b's', b'm', b'v', b'A', API_VERSION as u8]);
    }

    /// A supervisor that speaks another version answers the hello with its own and a
    /// refusal; the client's error names both versions, for every kind of request.
    #[test]
    fn a_supervisor_of_another_version_is_refused_with_both_versions() {
        for other in [API_VERSION + 1, API_VERSION + 40] {
            let refusal = WireError::new(ErrorKind::Refused, "another version");
            let (_dir, client, server) = supervisor(vec![hello_reply(other, Some(refusal))]);
            let err = client
                .exec(
                    ExecRequest {
                        command: smolvm_protocol::Command::Shell("true".into()),
                        env: Vec::new(),
                        cwd: None,
                        stdin: false,
                        timeout_ms: None,
                        max_output_bytes: 0,
                    },
                    None,
                    Some(Duration::from_secs(30)),
                    None,
                    &mut |_, _| {},
                )
                .unwrap_err();
            match &err {
                Error::ApiVersion {
                    id,
                    supervisor,
                    client,
                } => {
                    assert_eq!(
                        (id.as_str(), *supervisor, *client),
                        ("vm1", other, API_VERSION)
                    );
                }
                e => panic!("expected an API version error, got {e:?}"),
            }
            assert!(
                err.to_string().contains(&format!(
                    "speaks API version {other}, this smolvm speaks {API_VERSION}"
                )),
                "{err}"
            );
            server.join().unwrap();
        }
    }

    /// Each kind a supervisor answers becomes the error of its kind for the request asked,
    /// whatever its text says.
    #[test]
    fn kinds_become_error_variants_without_reading_the_text() {
        type Ask = fn(&ApiClient) -> Error;
        type Want = fn(&Error) -> bool;
        let cases: Vec<(ErrorKind, Ask, Want)> = vec![
            (
                ErrorKind::GuestGone,
                |c| c.env(EnvUpdate::default()).unwrap_err(),
                |e| matches!(e, Error::VmGone { id, .. } if id == "vm1"),
            ),
            (
                ErrorKind::Timeout,
                |c| c.control(&ApiRequest::Pause).unwrap_err(),
                |e| matches!(e, Error::Timeout { secs: None, .. }),
            ),
            (
                ErrorKind::Busy,
                |c| c.expose(80, Some(8080), None).unwrap_err(),
                |e| {
                    matches!(
                        e,
                        Error::Forward {
                            kind: ErrorKind::Busy,
                            ..
                        }
                    )
                },
            ),
            (
                ErrorKind::NotFound,
                |c| c.unexpose(8080).unwrap_err(),
                |e| {
                    matches!(
                        e,
                        Error::Forward {
                            kind: ErrorKind::NotFound,
                            ..
                        }
                    )
                },
            ),
            (
                ErrorKind::InvalidInput,
                |c| c.env(EnvUpdate::default()).unwrap_err(),
                |e| {
                    matches!(
                        e,
                        Error::Agent {
                            kind: ErrorKind::InvalidInput,
                            ..
                        }
                    )
                },
            ),
            (
                ErrorKind::Unsupported,
                |c| c.control(&ApiRequest::Resume).unwrap_err(),
                |e| matches!(e, Error::Unsupported(_)),
            ),
            (
                ErrorKind::Refused,
                |c| c.control(&ApiRequest::Pause).unwrap_err(),
                |e| matches!(e, Error::Snapshot(_)),
            ),
        ];
        for (kind, ask, want) in cases {
            // The text says "went away" every time: it must not matter.
            let reply = encode(&ApiReply::Error(WireError::new(
                kind,
                "the guest agent went away",
            )))
            .unwrap();
            let (_dir, client, server) = supervisor(vec![hello_reply(API_VERSION, None), reply]);
            let err = ask(&client);
            assert!(want(&err), "{kind}: {err:?}");
            server.join().unwrap();
        }
    }
}

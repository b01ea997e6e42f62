//! The supervisor's one connection to the guest agent: a yamux session (host side in client
//! mode) over the virtio-serial socket, driven by one task, from which request streams open.

use std::future::poll_fn;
use std::task::Poll;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use smolvm_protocol::boot::GuestNet;
use smolvm_protocol::{
    decode, encode, EnvUpdate, GuestMessage, Hello, HelloReply, HostMessage, PROTOCOL_VERSION,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::Framed;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use crate::error::{Error, ErrorKind, Result};

/// A framed request stream to the agent.
pub type AgentStream = Framed<Compat<yamux::Stream>, tokio_util::codec::LengthDelimitedCodec>;

type OpenReply = oneshot::Sender<std::result::Result<yamux::Stream, String>>;

/// Handle for opening streams on the agent session.
#[derive(Clone)]
pub struct AgentLink {
    open_tx: mpsc::Sender<OpenReply>,
    closed: watch::Receiver<Option<String>>,
}

/// The most characters of any text field of the guest's handshake answer the host keeps.
const MAX_HELLO_TEXT: usize = 256;

/// The guest's handshake answer with its text fields made safe to keep and show: the guest
/// chose them, so they are cut to [`MAX_HELLO_TEXT`] characters and lose control characters.
fn bounded(mut reply: HelloReply) -> HelloReply {
    for field in [
        &mut reply.agent_version,
        &mut reply.kernel_release,
        &mut reply.hostname,
        &mut reply.clocksource,
    ] {
        *field = field
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_HELLO_TEXT)
            .collect();
    }
    reply
}

impl AgentLink {
    /// Starts driving a yamux session over `io` (the agent port's socket).
    pub fn spawn<T>(io: T) -> AgentLink
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (open_tx, mut open_rx) = mpsc::channel::<OpenReply>(64);
        let (closed_tx, closed) = watch::channel(None);
        tokio::spawn(async move {
            let mut cfg = yamux::Config::default();
            cfg.set_max_num_streams(256);
            let mut conn = yamux::Connection::new(io.compat(), cfg, yamux::Mode::Client);
            let mut pending: Option<OpenReply> = None;
            let mut requests_open = true;
            let reason = poll_fn(|cx| {
                loop {
                    if pending.is_none() && requests_open {
                        match open_rx.poll_recv(cx) {
                            Poll::Ready(Some(r)) => pending = Some(r),
                            Poll::Ready(None) => requests_open = false,
                            Poll::Pending => {}
                        }
                    }
                    let Some(_) = pending.as_ref() else { break };
                    match conn.poll_new_outbound(cx) {
                        Poll::Ready(res) => {
                            if let Some(reply) = pending.take() {
                                let _ = reply.send(res.map_err(|e| e.to_string()));
                            }
                        }
                        Poll::Pending => break,
                    }
                }
                loop {
                    match conn.poll_next_inbound(cx) {
                        // The agent never opens streams; refuse any it does.
                        Poll::Ready(Some(Ok(stream))) => drop(stream),
                        Poll::Ready(Some(Err(e))) => {
                            return Poll::Ready(format!("agent connection failed: {e}"))
                        }
                        Poll::Ready(None) => {
                            return Poll::Ready("agent connection closed".to_string())
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                }
            })
            .await;
            tracing::warn!(%reason, "agent session ended");
            if let Some(reply) = pending.take() {
                let _ = reply.send(Err(reason.clone()));
            }
            let _ = closed_tx.send(Some(reason));
            // Answer any later open requests with the reason instead of hanging them.
            while let Some(r) = open_rx.recv().await {
                let _ = r.send(Err("agent session has ended".into()));
            }
        });
        AgentLink { open_tx, closed }
    }

    /// Why the session ended, if it has.
    pub fn closed_reason(&self) -> Option<String> {
        self.closed.borrow().clone()
    }

    /// Opens a new framed stream to the agent.
    pub async fn open(&self) -> Result<AgentStream> {
        let (tx, rx) = oneshot::channel();
        let gone = |r: String| {
            Error::agent(
                ErrorKind::GuestGone,
                format!("cannot reach the guest agent: {r}"),
            )
        };
        self.open_tx
            .send(tx)
            .await
            .map_err(|_| gone("agent session has ended".into()))?;
        let stream = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .map_err(|_| Error::Timeout {
                what: "a new agent stream".into(),
                secs: Some(10.0),
            })?
            .map_err(|_| gone("agent session has ended".into()))?
            .map_err(gone)?;
        Ok(Framed::new(stream.compat(), smolvm_protocol::codec()))
    }

    /// Performs the versioned handshake; the VM is ready when it returns.
    /// `free_page_reporting`: whether the guest should report freed pages (see [`Hello`]).
    pub async fn handshake(&self, hostname: &str, free_page_reporting: bool) -> Result<HelloReply> {
        let mut s = self.open().await?;
        let mut entropy = vec![0u8; 64];
        crate::util::random_bytes(&mut entropy);
        let hello = HostMessage::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            host_time_unix_ns: crate::util::now_unix_ns(),
            hostname: hostname.to_string(),
            entropy: entropy.into(),
            free_page_reporting,
        });
        send(&mut s, &hello).await?;
        match recv(&mut s).await? {
            Some(GuestMessage::Hello(reply)) => {
                if reply.protocol_version != PROTOCOL_VERSION {
                    return Err(Error::agent(ErrorKind::Refused, format!(
                        "the image's agent speaks protocol {} but this smolvm speaks {}; rebuild the image with `smolvm image build --force`",
                        reply.protocol_version, PROTOCOL_VERSION
                    )));
                }
                Ok(bounded(reply))
            }
            Some(GuestMessage::Error(e)) => Err(from_agent(e)),
            Some(other) => Err(Error::agent(
                ErrorKind::Io,
                format!("unexpected handshake reply: {}", describe(&other)),
            )),
            None => Err(Error::agent(
                ErrorKind::GuestGone,
                "agent closed the handshake stream",
            )),
        }
    }
}

impl AgentLink {
    /// Changes (or, with an empty update, reads) the guest's persistent environment.
    pub async fn env(&self, update: EnvUpdate) -> Result<Vec<(String, String)>> {
        let mut s = self.open().await?;
        let to = "an environment update";
        match ask(&mut s, &HostMessage::Env(update), ENV_REPLY, to).await? {
            GuestMessage::Env(vars) => Ok(vars),
            GuestMessage::Error(e) => Err(from_agent(e)),
            other => Err(unexpected(&other, to)),
        }
    }

    /// Gives the guest a new network identity (`Network`, protocol generation 4): the agent
    /// configures its first Ethernet interface as `net` says, replacing the addresses,
    /// routes and neighbours it had, and writes `/etc/resolv.conf` when `net` names DNS
    /// servers. For a guest restored from a snapshot, whose network is the snapshot's.
    pub async fn network(&self, net: &GuestNet) -> Result<()> {
        let mut s = self.open().await?;
        let to = "a network change";
        match ask(
            &mut s,
            &HostMessage::Network(net.clone()),
            NETWORK_REPLY,
            to,
        )
        .await?
        {
            GuestMessage::Ok => Ok(()),
            GuestMessage::Error(e) => Err(from_agent(e)),
            other => Err(unexpected(&other, to)),
        }
    }

    /// Opens a tunnel to `port` on the guest's loopback (`Connect`). Returns the raw stream
    /// and the bytes the guest already sent past its `Ok` (the codec may have read them
    /// along with it; they belong to the connection and go first).
    pub async fn connect_tcp(&self, port: u16) -> Result<(Compat<yamux::Stream>, bytes::BytesMut)> {
        let mut s = self.open().await?;
        let to = format!("a connect to guest port {port}");
        match ask(&mut s, &HostMessage::Connect { port }, CONNECT_REPLY, &to).await? {
            GuestMessage::Ok => {
                let parts = s.into_parts();
                Ok((parts.io, parts.read_buf))
            }
            GuestMessage::Error(e) => Err(Error::Forward {
                kind: e.kind,
                message: e.message,
            }),
            other => Err(unexpected(&other, &to)),
        }
    }

    /// Runs a command in the guest and waits (at most `limit`) for it to end, discarding its
    /// output; returns its exit code. For the supervisor's own use (warming a guest).
    pub async fn run_quiet(
        &self,
        command: smolvm_protocol::Command,
        limit: Duration,
    ) -> Result<Option<i32>> {
        let line = match &command {
            smolvm_protocol::Command::Shell(l) => l.clone(),
            smolvm_protocol::Command::Argv(a) => a.join(" "),
        };
        let mut s = self.open().await?;
        let req = smolvm_protocol::ExecRequest {
            command,
            env: Vec::new(),
            cwd: None,
            stdin: false,
            timeout_ms: Some(limit.as_millis() as u64),
            max_output_bytes: 0,
        };
        send(&mut s, &HostMessage::Exec(req)).await?;
        let wait = async {
            loop {
                match recv(&mut s).await? {
                    Some(GuestMessage::Exited(st)) => return Ok(st.code),
                    Some(GuestMessage::Error(e)) => return Err(from_agent(e)),
                    Some(_) => continue,
                    None => {
                        return Err(Error::agent(
                            ErrorKind::GuestGone,
                            "agent closed the stream before the command ended",
                        ))
                    }
                }
            }
        };
        tokio::time::timeout(limit + Duration::from_secs(5), wait)
            .await
            .map_err(|_| Error::Timeout {
                what: format!("the guest to run {line:?}"),
                secs: Some(limit.as_secs_f64()),
            })?
    }

    /// Asks the guest to shut down cleanly; returns once the agent accepted.
    pub async fn shutdown(&self) -> Result<()> {
        let mut s = self.open().await?;
        send(&mut s, &HostMessage::Shutdown).await?;
        match recv(&mut s).await? {
            Some(GuestMessage::Ok) => Ok(()),
            Some(GuestMessage::Error(e)) => Err(from_agent(e)),
            _ => Err(Error::agent(
                ErrorKind::Refused,
                "the agent did not accept the shutdown",
            )),
        }
    }
}

/// Longest wait for the agent's answer to a `Connect` (it gives up dialling after 5 s;
/// the rest is slack for a busy, software-emulated guest).
const CONNECT_REPLY: Duration = Duration::from_secs(15);

/// Longest wait for the agent's answer to a `Network` (it gives up after 5 s; the rest is
/// slack for a busy, software-emulated guest).
const NETWORK_REPLY: Duration = Duration::from_secs(10);

/// Longest wait for the agent to answer an environment update.
const ENV_REPLY: Duration = Duration::from_secs(10);

/// A short name for a guest message (never its contents, which may be huge or hostile).
fn describe(m: &GuestMessage) -> &'static str {
    match m {
        GuestMessage::Hello(_) => "Hello",
        GuestMessage::Started { .. } => "Started",
        GuestMessage::Stdout(_) => "Stdout",
        GuestMessage::Stderr(_) => "Stderr",
        GuestMessage::Exited(_) => "Exited",
        GuestMessage::Error(_) => "Error",
        GuestMessage::Pong(_) => "Pong",
        GuestMessage::Env(_) => "Env",
        GuestMessage::Ok => "Ok",
    }
}

/// Sends `msg` on `s` and waits at most `limit` for the agent's one answer to it (`to` says
/// what it answers, for the errors): a timeout, or a stream closed without an answer, is
/// an error; any message, the agent's own `Error` included, is the caller's to judge.
async fn ask(
    s: &mut AgentStream,
    msg: &HostMessage,
    limit: Duration,
    to: &str,
) -> Result<GuestMessage> {
    send(s, msg).await?;
    tokio::time::timeout(limit, recv(s))
        .await
        .map_err(|_| Error::Timeout {
            what: format!("the guest agent to answer {to}"),
            secs: Some(limit.as_secs_f64()),
        })??
        .ok_or_else(|| {
            Error::agent(
                ErrorKind::GuestGone,
                format!("agent closed the stream without answering {to}"),
            )
        })
}

/// The error for an answer that makes no sense to `to`.
fn unexpected(reply: &GuestMessage, to: &str) -> Error {
    Error::agent(
        ErrorKind::Io,
        format!("unexpected reply to {to}: {}", describe(reply)),
    )
}

/// An error the agent answered, with the kind it gave.
fn from_agent(e: smolvm_protocol::WireError) -> Error {
    Error::Agent {
        kind: e.kind,
        message: e.message,
    }
}

/// Sends one message on an agent stream.
pub async fn send(s: &mut AgentStream, msg: &HostMessage) -> Result<()> {
    let bytes = encode(msg).map_err(|source| Error::Protocol {
        peer: "guest agent",
        source,
    })?;
    s.send(bytes::Bytes::from(bytes)).await.map_err(|e| {
        Error::agent(
            ErrorKind::GuestGone,
            format!("sending to the agent failed: {e}"),
        )
    })
}

/// Receives one message from an agent stream (`None` at end of stream). Everything the
/// guest sends is decoded with bounds; garbage is an error, never a panic.
pub async fn recv(s: &mut AgentStream) -> Result<Option<GuestMessage>> {
    match s.next().await {
        None => Ok(None),
        Some(Err(e)) => Err(Error::agent(
            ErrorKind::GuestGone,
            format!("reading from the agent failed: {e}"),
        )),
        Some(Ok(bytes)) => decode(&bytes).map(Some).map_err(|source| Error::Protocol {
            peer: "guest agent",
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guests_handshake_text_is_cut_and_cleaned() {
        let r = bounded(HelloReply {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "1\u{1b}[2J".into(),
            kernel_release: "k".repeat(10_000),
            hostname: "h\n".into(),
            boot_ms: 1,
            clocksource: "tsc".into(),
        });
        assert_eq!(r.agent_version, "1[2J");
        assert_eq!(r.kernel_release.len(), MAX_HELLO_TEXT);
        assert_eq!(r.hostname, "h");
        assert_eq!(r.clocksource, "tsc");
    }
}

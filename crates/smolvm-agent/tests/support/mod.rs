//! Test harness: runs the agent binary with `--listen-unix` in a temporary directory and
//! talks to it as the host does (yamux client, length-prefixed postcard frames).

#![allow(dead_code)]

use std::collections::VecDeque;
use std::future::poll_fn;
use std::path::PathBuf;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde_bytes::ByteBuf;
use smolvm_protocol::{
    codec, decode, encode, Command, EnvUpdate, ExecRequest, ExitStatus, GuestMessage, Hello,
    HostMessage, WireError, PROTOCOL_VERSION,
};
use smolvm_testing::poll_until_async;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// Longest any single wait in a test may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A running agent (killed when dropped).
pub struct Agent {
    pub socket: PathBuf,
    /// Its `--root`: where it keeps the persistent environment.
    pub root: PathBuf,
    pub child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// An agent with a fresh state root of its own.
    pub async fn start() -> Self {
        Self::start_in(None).await
    }

    /// An agent keeping its state under `root` (`None`: a fresh directory of its own).
    pub async fn start_in(root: Option<&std::path::Path>) -> Self {
        Self::start_with(root, &[]).await
    }

    /// An agent keeping its state under `root` (`None`: a fresh directory of its own), with
    /// `extra` arguments on its command line.
    pub async fn start_with(root: Option<&std::path::Path>, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let root = match root {
            Some(root) => root.to_owned(),
            None => {
                let root = dir.path().join("root");
                std::fs::create_dir(&root).expect("state root");
                root
            }
        };
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_smolvm-agent"))
            .arg("--listen-unix")
            .arg(&socket)
            .arg("--root")
            .arg(&root)
            .arg("--log")
            .arg("warn")
            .args(extra)
            .kill_on_drop(true)
            .spawn()
            .expect("start the agent");
        // The socket file appears at bind(), a moment before listen(): probe with connects.
        poll_until_async(PATIENCE, "the agent to listen on its socket", || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        })
        .await;
        Self {
            socket,
            root,
            child,
            _dir: dir,
        }
    }

    /// Waits for the agent process to exit on its own.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("the agent exits in time")
            .expect("wait for the agent")
    }

    pub async fn connect(&self) -> Client {
        let conn = UnixStream::connect(&self.socket).await.expect("connect");
        Client::new(conn)
    }
}

type OpenReply = oneshot::Sender<yamux::Result<yamux::Stream>>;

/// The host's side of a yamux session; a task drives the connection.
pub struct Client {
    opens: mpsc::Sender<OpenReply>,
    driver: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Client {
    pub fn new(io: UnixStream) -> Self {
        let mut conn =
            yamux::Connection::new(io.compat(), yamux::Config::default(), yamux::Mode::Client);
        let (opens, mut requests) = mpsc::channel::<OpenReply>(16);
        let driver = tokio::spawn(async move {
            let mut waiting: VecDeque<OpenReply> = VecDeque::new();
            poll_fn(|cx| {
                while let Poll::Ready(Some(reply)) = requests.poll_recv(cx) {
                    waiting.push_back(reply);
                }
                while !waiting.is_empty() {
                    match conn.poll_new_outbound(cx) {
                        Poll::Ready(result) => {
                            if let Some(reply) = waiting.pop_front() {
                                let _ = reply.send(result);
                            }
                        }
                        Poll::Pending => break,
                    }
                }
                loop {
                    match conn.poll_next_inbound(cx) {
                        Poll::Ready(Some(Ok(_unexpected))) => continue,
                        Poll::Ready(_) => return Poll::Ready(()),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            })
            .await
        });
        Self { opens, driver }
    }

    pub async fn open(&self) -> Req {
        let (tx, rx) = oneshot::channel();
        self.opens.send(tx).await.expect("driver alive");
        let stream = rx.await.expect("driver replied").expect("open stream");
        Req {
            framed: Framed::new(stream.compat(), codec()),
        }
    }

    /// Runs a request to its end.
    pub async fn exec(&self, req: ExecRequest) -> Outcome {
        let mut r = self.open().await;
        r.send(&HostMessage::Exec(req)).await;
        r.collect().await
    }

    /// Sends an environment update on a stream of its own; returns the one answer.
    pub async fn env(&self, update: EnvUpdate) -> GuestMessage {
        let mut r = self.open().await;
        r.send(&HostMessage::Env(update)).await;
        let reply = r.recv().await.expect("env reply");
        assert_eq!(r.recv().await, None, "the stream ends after the answer");
        reply
    }

    /// The persistent environment (an empty update).
    pub async fn env_now(&self) -> Vec<(String, String)> {
        match self.env(EnvUpdate::default()).await {
            GuestMessage::Env(vars) => vars,
            other => panic!("expected the environment, got {other:?}"),
        }
    }

    pub async fn handshake(&self) -> GuestMessage {
        let mut r = self.open().await;
        r.send(&hello(PROTOCOL_VERSION)).await;
        r.recv().await.expect("hello reply")
    }
}

pub type Framing = Framed<Compat<yamux::Stream>, LengthDelimitedCodec>;

/// One stream.
pub struct Req {
    pub framed: Framing,
}

impl Req {
    pub async fn send(&mut self, msg: &HostMessage) {
        self.send_raw(encode(msg).expect("encode")).await;
    }

    pub async fn send_raw(&mut self, payload: Vec<u8>) {
        tokio::time::timeout(PATIENCE, self.framed.send(Bytes::from(payload)))
            .await
            .expect("send in time")
            .expect("send");
    }

    /// The next message, or `None` at the end of the stream.
    pub async fn recv(&mut self) -> Option<GuestMessage> {
        recv(&mut self.framed).await
    }

    pub async fn collect(&mut self) -> Outcome {
        collect_from(&mut self.framed).await
    }

    pub fn split(self) -> (SplitSink<Framing, Bytes>, SplitStream<Framing>) {
        self.framed.split()
    }
}

pub async fn recv<S>(framed: &mut S) -> Option<GuestMessage>
where
    S: futures::Stream<Item = std::io::Result<bytes::BytesMut>> + Unpin,
{
    let frame = tokio::time::timeout(PATIENCE, framed.next())
        .await
        .expect("reply in time")?;
    let frame = frame.ok()?;
    Some(decode(&frame).expect("decodable reply"))
}

/// What an exec stream delivered.
#[derive(Debug, Default)]
pub struct Outcome {
    pub pid: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: Option<ExitStatus>,
    pub error: Option<WireError>,
    /// Messages that arrived after the last one (must stay empty).
    pub after_end: usize,
}

impl Outcome {
    pub fn exit(&self) -> ExitStatus {
        self.exit
            .unwrap_or_else(|| panic!("no exit status; outcome: {self:?}"))
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

pub async fn collect_from<S>(framed: &mut S) -> Outcome
where
    S: futures::Stream<Item = std::io::Result<bytes::BytesMut>> + Unpin,
{
    let mut out = Outcome::default();
    while let Some(msg) = recv(framed).await {
        if out.exit.is_some() || out.error.is_some() {
            out.after_end += 1;
            continue;
        }
        match msg {
            GuestMessage::Started { pid } => out.pid = Some(pid),
            GuestMessage::Stdout(b) => out.stdout.extend_from_slice(&b),
            GuestMessage::Stderr(b) => out.stderr.extend_from_slice(&b),
            GuestMessage::Exited(s) => out.exit = Some(s),
            GuestMessage::Error(e) => out.error = Some(e),
            other => panic!("unexpected message on an exec stream: {other:?}"),
        }
    }
    out
}

pub fn hello(version: u32) -> HostMessage {
    HostMessage::Hello(Hello {
        protocol_version: version,
        // 0: the agent must leave this machine's clock alone (it would anyway without
        // --apply-identity).
        host_time_unix_ns: 0,
        hostname: String::new(),
        entropy: ByteBuf::from(vec![0x5a; 32]),
        free_page_reporting: false,
    })
}

pub fn shell(line: &str) -> ExecRequest {
    ExecRequest {
        command: Command::Shell(line.into()),
        env: vec![],
        cwd: None,
        stdin: false,
        timeout_ms: None,
        max_output_bytes: 16 << 20,
    }
}

/// An update that sets these variables.
pub fn env_set(pairs: &[(&str, &str)]) -> EnvUpdate {
    EnvUpdate {
        set: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..EnvUpdate::default()
    }
}

/// Owned name-value pairs.
pub fn pairs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn argv(args: &[&str]) -> ExecRequest {
    ExecRequest {
        command: Command::Argv(args.iter().map(|s| s.to_string()).collect()),
        ..shell("")
    }
}

/// Live (not zombie) processes whose process group is `pgid`.
pub fn live_group_members(pgid: u32) -> Vec<u32> {
    smolvm_testing::processes_in_group(pgid)
}

/// Waits until no live process is left in the group (failing after `within`).
pub async fn wait_group_gone(pgid: u32, within: Duration) {
    poll_until_async(
        within,
        &format!("the processes of group {pgid} to be gone"),
        || live_group_members(pgid).is_empty(),
    )
    .await;
}

//! The messages. Host-to-guest and guest-to-host enums are kept apart so neither side can
//! be handed a message meant for the other direction.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// What kind of failure a [`WireError`] reports. The receiver chooses its error type by the
/// kind, never by the message's text. Variants are only ever appended (a peer that does not
/// know a kind fails to decode the message, which is a protocol generation mismatch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Something the request names does not exist (a program, a directory, a forward).
    NotFound,
    /// The request itself is wrong (a malformed message, a bad name or value); sending it
    /// again unchanged fails again.
    InvalidInput,
    /// A wait ran out of time.
    Timeout,
    /// The guest (its agent, its QEMU) went away or stopped answering.
    GuestGone,
    /// The peer will not do it (another protocol or API version, a VM that is stopping).
    Refused,
    /// What the request needs is taken (a host port, a snapshot in use).
    Busy,
    /// An I/O operation or a host resource failed.
    Io,
    /// The peer cannot do this at all (a feature it lacks).
    Unsupported,
}

impl ErrorKind {
    /// The kind's name as written in logs and docs (`not found`, `invalid input`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Timeout => "timeout",
            ErrorKind::GuestGone => "guest gone",
            ErrorKind::Refused => "refused",
            ErrorKind::Busy => "busy",
            ErrorKind::Io => "i/o",
            ErrorKind::Unsupported => "unsupported",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error sent across a process boundary (agent to supervisor, supervisor to client):
/// its kind, for the receiver to act on, and a message written for a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// What kind of failure it is.
    pub kind: ErrorKind,
    /// What happened, for a user (the receiver may put it inside its own message).
    pub message: String,
}

impl WireError {
    /// An error of this kind with this message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> WireError {
        WireError {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for WireError {
    /// The message alone (the kind is for programs).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for WireError {}

/// First frame of every connection to a supervisor's API socket (before the
/// [`ApiRequest`]). Its layout is frozen: every API version, past and future, encodes it the
/// same way, so two versions can always tell each other theirs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiHello {
    /// Always [`API_MAGIC`](crate::API_MAGIC): it tells a hello from anything else (its
    /// first byte is no valid request tag of the unversioned API that came before).
    pub magic: [u8; 4],
    /// The API version the client speaks.
    pub api_version: u32,
}

/// The supervisor's answer to an [`ApiHello`]. Frozen like the hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiHelloReply {
    /// Always [`API_MAGIC`](crate::API_MAGIC).
    pub magic: [u8; 4],
    /// The API version the supervisor speaks.
    pub api_version: u32,
    /// Why the supervisor will not serve this connection (another API version, or a first
    /// frame that is no hello; kind [`ErrorKind::Refused`] or [`ErrorKind::InvalidInput`]);
    /// it closes the connection after this reply. `None`: the request follows.
    pub refused: Option<WireError>,
}

/// First message on the agent's handshake stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol generation the host speaks.
    pub protocol_version: u32,
    /// Host wall-clock time, nanoseconds since the Unix epoch; the agent sets its clock from it.
    pub host_time_unix_ns: u64,
    /// Hostname the guest should take (empty: keep the current one).
    pub hostname: String,
    /// Fresh host randomness the agent mixes into the guest's entropy pool.
    pub entropy: ByteBuf,
    /// Whether the guest should report the pages it frees (virtio-balloon free page
    /// reporting), so the host can take them back. Off where the host cannot discard guest
    /// memory (a VM whose RAM is a copy-on-write map of its template's file). Generation 5.
    pub free_page_reporting: bool,
}

/// The agent's answer to [`Hello`]; the VM is ready once the host has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// Protocol generation the agent speaks.
    pub protocol_version: u32,
    /// Version of the agent binary.
    pub agent_version: String,
    /// `uname -r` of the guest kernel.
    pub kernel_release: String,
    /// The guest's hostname.
    pub hostname: String,
    /// Milliseconds from kernel start to the agent serving (guest `CLOCK_BOOTTIME`).
    pub boot_ms: u64,
    /// The guest kernel's current clocksource (`tsc`, `kvm-clock`; `refined-jiffies` or
    /// `jiffies` means a clock that ticks and drifts). Generation 5.
    pub clocksource: String,
}

/// What to execute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A shell command line, run as `/bin/bash -c LINE` (`/bin/sh -c LINE` in a guest
    /// without bash).
    Shell(String),
    /// A program and its arguments, executed directly (no shell).
    Argv(Vec<String>),
}

/// A request to run one process in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The command.
    pub command: Command,
    /// Extra environment variables, applied over the agent's base environment.
    pub env: Vec<(String, String)>,
    /// Working directory (default `/root`).
    pub cwd: Option<String>,
    /// Whether the host will send stdin; otherwise stdin is `/dev/null`.
    pub stdin: bool,
    /// Kill the whole process group after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Stop forwarding a stream after this many bytes (the rest is drained and dropped).
    pub max_output_bytes: u64,
}

/// Host-to-guest messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMessage {
    /// Opens the handshake stream.
    Hello(Hello),
    /// Opens an exec stream.
    Exec(ExecRequest),
    /// Bytes for the process's stdin.
    Stdin(ByteBuf),
    /// Closes the process's stdin.
    StdinEof,
    /// Sends a signal to the process group (e.g. 9 to cancel).
    Signal(i32),
    /// Liveness probe; answered with [`GuestMessage::Pong`].
    Ping(u64),
    /// Changes the guest's persistent environment (seen by every later command); answered
    /// with [`GuestMessage::Env`]. An empty update just reads it.
    Env(EnvUpdate),
    /// Asks the guest to shut down cleanly (stop processes, flush, unmount, power off);
    /// answered with [`GuestMessage::Ok`] before it goes.
    Shutdown,
    /// Opens a tunnel to a TCP port on the guest's loopback (generation 3): the agent
    /// connects to `127.0.0.1:port` (then `[::1]:port`) and answers [`GuestMessage::Ok`] or
    /// [`GuestMessage::Error`]. After `Ok` the stream carries raw bytes both ways, no more
    /// frames, until either side closes its half.
    Connect {
        /// The guest port (1-65535).
        port: u16,
    },
    /// Gives the guest a new network identity (generation 4): the agent sets this address,
    /// prefix, gateway, MTU and DNS on its first Ethernet interface, replacing what it had,
    /// and forgets the neighbours it knew. Sent to a guest restored from a snapshot, whose
    /// kernel command line still names the snapshot's network. Answered with
    /// [`GuestMessage::Ok`] or [`GuestMessage::Error`].
    Network(crate::boot::GuestNet),
}

/// A change to the guest's persistent environment, applied in order: `clear`, `unset`, `set`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EnvUpdate {
    /// Remove every variable first.
    pub clear: bool,
    /// Names to remove.
    pub unset: Vec<String>,
    /// Variables to set (name, value).
    pub set: Vec<(String, String)>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExitStatus {
    /// Exit code, when it exited normally.
    pub code: Option<i32>,
    /// Signal number, when a signal ended it.
    pub signal: Option<i32>,
    /// Whether the agent killed it because its timeout passed.
    pub timed_out: bool,
    /// Whether stdout went past the cap and was cut.
    pub stdout_truncated: bool,
    /// Whether stderr went past the cap and was cut.
    pub stderr_truncated: bool,
    /// Wall time of the process inside the guest, in milliseconds.
    pub duration_ms: u64,
}

/// Guest-to-host messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestMessage {
    /// Answers [`HostMessage::Hello`].
    Hello(HelloReply),
    /// The process was started with this pid.
    Started {
        /// Guest pid (also its process-group id).
        pid: u32,
    },
    /// A chunk of stdout.
    Stdout(ByteBuf),
    /// A chunk of stderr.
    Stderr(ByteBuf),
    /// The process ended; last message on an exec stream.
    Exited(ExitStatus),
    /// The request failed; last message on the stream. Generation 6: a kind and a message
    /// (was a bare message).
    Error(WireError),
    /// Answers [`HostMessage::Ping`].
    Pong(u64),
    /// The persistent environment after an [`HostMessage::Env`], sorted by name.
    Env(Vec<(String, String)>),
    /// The request was accepted (answers [`HostMessage::Shutdown`] and
    /// [`HostMessage::Connect`]).
    Ok,
}

/// Client-to-supervisor requests (first frame on an API socket connection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiRequest {
    /// Run a process; the connection then carries [`HostMessage`] stdin/signal frames from
    /// the client and [`GuestMessage`] frames back, ending with `Exited` or `Error`.
    Exec(ExecRequest),
    /// Report the VM's status.
    Status,
    /// Shut the VM down and end the supervisor.
    Stop {
        /// How long to wait for a clean guest shutdown before killing QEMU.
        graceful_ms: u64,
    },
    /// Change or read the guest's persistent environment; answered with [`ApiReply::Env`].
    Env(EnvUpdate),
    /// Forward a host TCP port to a guest port through the agent channel (no network device
    /// needed); answered with [`ApiReply::Forward`]. The supervisor records it and keeps it
    /// until it is removed or the VM is deleted.
    Expose {
        /// The guest port (1-65535), on the guest's loopback.
        guest_port: u16,
        /// The host port; `None` or 0 picks a free one.
        host_port: Option<u16>,
        /// The host address to listen on; `None` is 127.0.0.1.
        bind: Option<String>,
    },
    /// Remove the VM's forwards on this host port; answered with [`ApiReply::Ok`].
    Unexpose {
        /// The host port.
        host_port: u16,
    },
    /// List the forwards the supervisor serves now; answered with [`ApiReply::Forwards`].
    Forwards,
    /// Freeze the VM's vCPUs (generation 4); answered with [`ApiReply::Ok`]. Commands wait
    /// until it is resumed.
    Pause,
    /// Let a paused VM run again; answered with [`ApiReply::Ok`].
    Resume,
    /// Save the VM's memory, device state and disk into `dir` (a new, private directory the
    /// client made), then let the VM go on as it was; answered with [`ApiReply::Ok`].
    Snapshot {
        /// The directory to write into.
        dir: String,
    },
}

/// Supervisor-to-client replies for requests other than exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiReply {
    /// Answer to [`ApiRequest::Status`].
    Status(VmStatus),
    /// The request was carried out.
    Ok,
    /// The request failed. Generation 6: a kind and a message (was a bare message).
    Error(WireError),
    /// Answer to [`ApiRequest::Env`]: the guest's persistent environment, sorted by name.
    Env(Vec<(String, String)>),
    /// Answer to [`ApiRequest::Expose`]: the forward as established.
    Forward(ForwardInfo),
    /// Answer to [`ApiRequest::Forwards`].
    Forwards(Vec<ForwardInfo>),
}

/// One port forward: connections to `host_addr:host_port` on the host reach
/// `127.0.0.1:guest_port` in the guest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ForwardInfo {
    /// The host address listened on (e.g. `127.0.0.1`).
    pub host_addr: String,
    /// The host port.
    pub host_port: u16,
    /// The guest port.
    pub guest_port: u16,
}

impl ForwardInfo {
    /// The host side as `addr:port` (`[addr]:port` for IPv6), as clients connect to it.
    pub fn host(&self) -> String {
        if self.host_addr.contains(':') {
            format!("[{}]:{}", self.host_addr, self.host_port)
        } else {
            format!("{}:{}", self.host_addr, self.host_port)
        }
    }
}

impl std::fmt::Display for ForwardInfo {
    /// `127.0.0.1:8080 -> guest:80`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> guest:{}", self.host(), self.guest_port)
    }
}

/// What the supervisor knows about its VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Pid of the QEMU process.
    pub qemu_pid: u32,
    /// Accelerator in use (`kvm` or `tcg`).
    pub accelerator: String,
    /// Whether the agent handshake has completed.
    pub ready: bool,
    /// The agent's handshake answer, once ready.
    pub guest: Option<HelloReply>,
}

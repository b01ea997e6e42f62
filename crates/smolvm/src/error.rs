//! The one error type of the runtime crate. Every message says what went wrong and, where
//! the user can act on it, what to do.

use std::path::PathBuf;

pub use smolvm_protocol::ErrorKind;
use smolvm_protocol::WireError;

/// Errors from the smolvm runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is outside what is allowed. Nothing was created.
    #[error("invalid {field}: {value:?} ({allowed})")]
    InvalidConfig {
        /// The field's name, as the user spells it.
        field: &'static str,
        /// The value given.
        value: String,
        /// What is allowed.
        allowed: String,
    },
    /// No VM has this id.
    #[error("no VM named {0:?} (see `smolvm ls`)")]
    VmNotFound(String),
    /// A VM with this id already exists.
    #[error("a VM named {0:?} already exists (choose another --name, or `smolvm rm {0}`)")]
    VmExists(String),
    /// The VM is not in a state where the operation makes sense.
    #[error("VM {id} is {state}: {hint}")]
    BadState {
        /// VM id.
        id: String,
        /// Its current state.
        state: String,
        /// What to do.
        hint: String,
    },
    /// The image pipeline failed or an image is missing.
    #[error(transparent)]
    Image(#[from] smolvm_image::ImageError),
    /// A host program we need is missing.
    #[error("{tool} not found on this host: install the Debian package `{package}` (apt-get install {package})")]
    MissingTool {
        /// Program name.
        tool: String,
        /// Debian package providing it.
        package: String,
    },
    /// The VM failed to start.
    #[error("VM {id} failed to start: {reason}")]
    StartFailed {
        /// VM id.
        id: String,
        /// Why, including the tail of the supervisor's log where useful.
        reason: String,
    },
    /// The VM did not become ready in time.
    #[error(
        "VM {id} did not become ready within {secs} s ({accel}); its console log is at {console}"
    )]
    ReadyTimeout {
        /// VM id.
        id: String,
        /// Seconds waited.
        secs: u64,
        /// Accelerator in use.
        accel: String,
        /// Path of the guest console log.
        console: PathBuf,
    },
    /// The VM (its QEMU, agent or supervisor) went away during an operation.
    #[error("VM {id} is gone: {reason}")]
    VmGone {
        /// VM id.
        id: String,
        /// What happened.
        reason: String,
    },
    /// The guest agent (or the VM's supervisor relaying a request to it) refused or failed
    /// a request; `kind` says what kind of failure, as the agent classified it.
    #[error("guest agent error: {message}")]
    Agent {
        /// What kind of failure.
        kind: ErrorKind,
        /// What happened.
        message: String,
    },
    /// A host or guest peer broke the protocol.
    #[error("protocol error talking to {peer}: {source}")]
    Protocol {
        /// Who we were talking to.
        peer: &'static str,
        /// The underlying error.
        #[source]
        source: smolvm_protocol::ProtocolError,
    },
    /// The state database failed.
    #[error("state database error ({context}): {source}")]
    Store {
        /// What we were doing.
        context: String,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// Filesystem or process I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing, with the path involved.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A wait ran out of time.
    #[error("timed out{} waiting for {what}", after(*.secs))]
    Timeout {
        /// What we waited for.
        what: String,
        /// Seconds waited; `None` when another process (the VM's supervisor) waited and
        /// `what` says how long.
        secs: Option<f64>,
    },
    /// A disk could not be made, found or used.
    #[error("disk: {0}")]
    Disk(String),
    /// The caller cancelled the command; it was killed in the guest.
    #[error("the command was cancelled; it was killed in the guest with its process group")]
    Cancelled,
    /// A file could not be copied into or out of the guest.
    #[error("guest file {path}: {reason}")]
    GuestFile {
        /// The path in the guest.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The QEMU monitor (QMP) failed.
    #[error("QEMU monitor error: {0}")]
    Qmp(String),
    /// A port forward could not be made, found or used (the message names the port).
    #[error("port forward: {message}")]
    Forward {
        /// What kind of failure (a port taken is `Busy`, a bad address `InvalidInput`, no
        /// such forward `NotFound`).
        kind: ErrorKind,
        /// What happened.
        message: String,
    },
    /// The VM's network (TAP device, address, nftables rules) could not be set up or removed.
    #[error("network: {0}")]
    Network(String),
    /// Saving or restoring a VM's state (a snapshot or a template) failed.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// The VM's monitor cannot do this (the fake test monitor saves no state and gives no
    /// network); the message names the monitor, what was asked and what can do it.
    #[error("{0}")]
    Unsupported(String),
    /// No snapshot has this name.
    #[error("no snapshot named {0:?} (see `smolvm snapshot ls`)")]
    SnapshotNotFound(String),

    // Added for issue 14 (typed VM records).
    /// A VM's row in the state database does not read (its config, state or another
    /// column); it is never replaced by defaults.
    #[error("the record of VM {id} is unreadable ({what}); remove it with `smolvm rm {id}`")]
    CorruptRecord {
        /// VM id.
        id: String,
        /// What does not read.
        what: String,
    },
    /// A snapshot cannot be removed while VMs build on it.
    #[error(
        "snapshot {name:?} is in use by {}: those VMs' disks build on it; delete them first",
        .users.join(", ")
    )]
    SnapshotInUse {
        /// The snapshot's name.
        name: String,
        /// The VMs whose disks build on it.
        users: Vec<String>,
    },
    /// A program smolvm runs (not a host tool from a Debian package) cannot be found.
    #[error("cannot find the `{binary}` binary {purpose}; {hint}")]
    MissingBinary {
        /// The program's name.
        binary: &'static str,
        /// What it is for.
        purpose: &'static str,
        /// How to provide it.
        hint: &'static str,
    },
    /// A VM's supervisor speaks another version of the client/supervisor API than this
    /// build (it was started by another smolvm, e.g. the one bundled with the Python SDK).
    #[error(
        "VM {id}'s supervisor speaks API version {supervisor}, this smolvm speaks {client}: \
         stop the VM (`smolvm stop {id}` stops it either way) and start it again with this \
         smolvm, or use the smolvm that started it{}",
        if *.supervisor == 0 { " (version 0: a supervisor from before API versions)" } else { "" }
    )]
    ApiVersion {
        /// VM id.
        id: String,
        /// The version the supervisor speaks (0: it predates versioning and sent no hello).
        supervisor: u32,
        /// The version this build speaks ([`smolvm_protocol::API_VERSION`]).
        client: u32,
    },
}

/// " after 2.0 s" for a known wait, "" otherwise.
fn after(secs: Option<f64>) -> String {
    secs.map(|s| format!(" after {s:.1} s")).unwrap_or_default()
}

/// Result alias for the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds an [`Error::Io`] with context; used as `.map_err(io_err("reading x"))`.
pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

impl Error {
    /// A guest agent error of this kind.
    pub(crate) fn agent(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error::Agent {
            kind,
            message: message.into(),
        }
    }

    /// What a monitor cannot do: "the VMM monitor cannot OPERATION; VMs run by QEMU can".
    pub(crate) fn unsupported_by(vmm: &str, operation: &str) -> Error {
        Error::Unsupported(format!(
            "the {vmm} monitor cannot {operation}; VMs run by QEMU can"
        ))
    }

    /// A port forward error of this kind.
    pub(crate) fn forward(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error::Forward {
            kind,
            message: message.into(),
        }
    }

    /// What kind of failure this is, as sent across a process boundary (see
    /// [`Error::into_wire`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidConfig { .. } => ErrorKind::InvalidInput,
            Error::VmNotFound(_) | Error::SnapshotNotFound(_) | Error::MissingBinary { .. } => {
                ErrorKind::NotFound
            }
            Error::VmExists(_) | Error::SnapshotInUse { .. } => ErrorKind::Busy,
            Error::BadState { .. } | Error::Cancelled | Error::ApiVersion { .. } => {
                ErrorKind::Refused
            }
            Error::Image(e) if e.is_usage() => ErrorKind::InvalidInput,
            Error::MissingTool { .. } | Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::CorruptRecord { .. } => ErrorKind::Io,
            Error::ReadyTimeout { .. } | Error::Timeout { .. } => ErrorKind::Timeout,
            Error::VmGone { .. } => ErrorKind::GuestGone,
            Error::Agent { kind, .. } | Error::Forward { kind, .. } => *kind,
            Error::Image(_)
            | Error::StartFailed { .. }
            | Error::Protocol { .. }
            | Error::Store { .. }
            | Error::Io { .. }
            | Error::Disk(_)
            | Error::GuestFile { .. }
            | Error::Qmp(_)
            | Error::Network(_)
            | Error::Snapshot(_) => ErrorKind::Io,
        }
    }

    /// The error as sent to a client: its kind, and a message the client puts in the error
    /// it makes of it. Variants the client makes again from the kind (a forward, a guest
    /// agent, a snapshot error, a VM gone, a timeout) send their own text without the prefix
    /// the client adds back.
    pub fn into_wire(self) -> WireError {
        let kind = self.kind();
        let message = match self {
            Error::Agent { message, .. } | Error::Forward { message, .. } => message,
            Error::Snapshot(message) => message,
            Error::VmGone { reason, .. } => reason,
            Error::Timeout {
                what,
                secs: Some(secs),
            } => format!("{what} (for {secs:.1} s)"),
            Error::Timeout { what, secs: None } => what,
            other => other.to_string(),
        };
        WireError { kind, message }
    }

    /// Whether this error is the user's input being wrong (CLI exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::InvalidConfig { .. } | Error::Image(smolvm_image::ImageError::NotFound { .. })
        ) || matches!(self, Error::Image(e) if e.is_usage())
    }

    /// Whether this error means the named VM does not exist (CLI exit code 3).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::VmNotFound(_))
    }
}

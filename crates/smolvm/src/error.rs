//! The one error type of the runtime crate. Every message says what went wrong and, where
//! the user can act on it, what to do.

use std::path::PathBuf;

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
    /// The guest agent reported an error for a request.
    #[error("guest agent error: {0}")]
    Agent(String),
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
    #[error("timed out after {secs:.1} s waiting for {what}")]
    Timeout {
        /// What we waited for.
        what: String,
        /// Seconds waited.
        secs: f64,
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
    #[error("port forward: {0}")]
    Forward(String),
    /// The VM's network (TAP device, address, nftables rules) could not be set up or removed.
    #[error("network: {0}")]
    Network(String),
    /// Saving or restoring a VM's state (a snapshot or a template) failed.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// The VM's monitor cannot do this (the fake test monitor saves no state).
    #[error("the {vmm} monitor cannot {operation}; VMs run by QEMU can")]
    Unsupported {
        /// The monitor's name.
        vmm: &'static str,
        /// What was asked of it.
        operation: &'static str,
    },
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
}

/// Result alias for the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds an [`Error::Io`] with context; used as `.map_err(io_err("reading x"))`.
pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

impl Error {
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

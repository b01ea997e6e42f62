//! The one error type of the agent.

use std::io;
use std::path::PathBuf;

use nix::errno::Errno;
use smolvm_protocol::{ErrorKind, WireError};

/// Everything that can go wrong in the agent, from booting the guest to running a command.
///
/// Variants that answer a request are sent to the host as a `WireError` (see
/// [`AgentError::to_wire`]): a kind the host acts on, and the message as-is, so their
/// messages are written for a user.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The command line of the agent binary was wrong.
    #[error("{0}\n\n{usage}", usage = crate::cli::USAGE)]
    Usage(String),
    /// A system call failed.
    #[error("{what}: {errno}", errno = .source.desc())]
    Sys {
        /// What we were doing.
        what: String,
        /// The error number it returned.
        #[source]
        source: Errno,
    },
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The host asked for a network but no Ethernet interface appeared.
    #[error(
        "no Ethernet interface (eth0, eth1, ...) appeared in {} within {waited_ms} ms; the VM \
         has no network device, or the initramfs lacks virtio_net",
        .dir.display()
    )]
    NoEthernet {
        /// Where we looked (`/sys/class/net`).
        dir: PathBuf,
        /// How long we waited.
        waited_ms: u64,
    },
    /// A network interface name the kernel would not take.
    #[error("invalid network interface name {0:?}: it must be 1 to 15 bytes without NUL")]
    InterfaceName(String),
    /// The root disk did not appear in time.
    #[error("root device {device} did not appear within {waited_ms} ms")]
    RootDeviceMissing {
        /// The device path we waited for.
        device: String,
        /// How long we waited.
        waited_ms: u64,
    },
    /// No virtio-serial port carries the agent's name.
    #[error("no virtio port named `{name}` appeared within {waited_ms} ms")]
    AgentPortMissing {
        /// The port name we looked for.
        name: &'static str,
        /// How long we waited.
        waited_ms: u64,
    },
    /// The root device does not hold an ext4 superblock we can read sizes from.
    #[error("{device} does not hold a usable ext4 superblock: {reason}")]
    Superblock {
        /// The device.
        device: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The yamux session with the host failed.
    #[error("agent session failed: {0}")]
    Session(#[from] yamux::ConnectionError),
    /// A message could not be framed, encoded or decoded.
    #[error(transparent)]
    Protocol(#[from] smolvm_protocol::ProtocolError),
    /// An exec request had an empty argument vector.
    #[error("empty command: argv needs at least the program name")]
    EmptyArgv,
    /// An argument contains a NUL byte.
    #[error("argument {index} contains a NUL byte")]
    NulInArgument {
        /// Position of the argument in argv.
        index: usize,
    },
    /// An environment variable name is not usable.
    #[error("invalid environment variable name {name:?}: names must be non-empty and contain neither `=` nor NUL")]
    InvalidEnvName {
        /// The offending name.
        name: String,
    },
    /// An environment variable value contains a NUL byte.
    #[error("environment variable {name} has a value containing a NUL byte")]
    NulInEnvValue {
        /// The variable's name.
        name: String,
    },
    /// A name given for the persistent environment is not a portable variable name.
    #[error(
        "invalid environment variable name {name:?}: a name is a letter or `_` followed by \
         letters, digits or `_`, at most {max} bytes"
    )]
    EnvNameNotAllowed {
        /// The offending name (shortened when long).
        name: String,
        /// The longest name allowed, in bytes.
        max: usize,
    },
    /// A value for the persistent environment is too long.
    #[error(
        "environment variable {name} has a {len}-byte value; at most {max} bytes are allowed \
         for this name (NAME=VALUE must stay within the kernel's 128 KiB limit for one variable)"
    )]
    EnvValueTooLong {
        /// The variable's name.
        name: String,
        /// Length of the value, in bytes.
        len: usize,
        /// The longest value allowed for this name, in bytes.
        max: usize,
    },
    /// The persistent environment would hold too many variables.
    #[error("the environment would hold {count} variables; at most {max} are allowed")]
    EnvTooManyVariables {
        /// How many it would hold.
        count: usize,
        /// The most allowed.
        max: usize,
    },
    /// The persistent environment would be too large in total.
    #[error(
        "the environment would take {size} bytes (NAME=VALUE plus one byte, summed over all \
         variables); at most {max} bytes are allowed"
    )]
    EnvTooLarge {
        /// Its size.
        size: usize,
        /// The largest size allowed.
        max: usize,
    },
    /// The requested working directory does not exist.
    #[error("working directory {} does not exist", .0.display())]
    CwdMissing(PathBuf),
    /// The requested working directory is not a directory.
    #[error("working directory {} is not a directory", .0.display())]
    CwdNotDirectory(PathBuf),
    /// The process could not be started.
    #[error("failed to start `{program}`: {reason}")]
    Spawn {
        /// The program we tried to run.
        program: String,
        /// The operating system's reason, e.g. "No such file or directory".
        reason: String,
        /// What kind of failure it was (`NotFound`: no such program).
        io_kind: io::ErrorKind,
    },
}

impl AgentError {
    /// What kind of failure this is, for the host.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AgentError::Usage(_)
            | AgentError::InterfaceName(_)
            | AgentError::EmptyArgv
            | AgentError::NulInArgument { .. }
            | AgentError::InvalidEnvName { .. }
            | AgentError::NulInEnvValue { .. }
            | AgentError::EnvNameNotAllowed { .. }
            | AgentError::EnvValueTooLong { .. }
            | AgentError::EnvTooManyVariables { .. }
            | AgentError::EnvTooLarge { .. }
            | AgentError::CwdNotDirectory(_) => ErrorKind::InvalidInput,
            AgentError::CwdMissing(_)
            | AgentError::NoEthernet { .. }
            | AgentError::RootDeviceMissing { .. }
            | AgentError::AgentPortMissing { .. } => ErrorKind::NotFound,
            AgentError::Spawn { io_kind, .. } => match io_kind {
                io::ErrorKind::NotFound => ErrorKind::NotFound,
                io::ErrorKind::PermissionDenied => ErrorKind::Refused,
                _ => ErrorKind::Io,
            },
            AgentError::Protocol(smolvm_protocol::ProtocolError::Decode(_))
            | AgentError::Protocol(smolvm_protocol::ProtocolError::InvalidBootParam { .. }) => {
                ErrorKind::InvalidInput
            }
            AgentError::Protocol(_)
            | AgentError::Sys { .. }
            | AgentError::Io { .. }
            | AgentError::Superblock { .. }
            | AgentError::Session(_) => ErrorKind::Io,
        }
    }

    /// The error as sent to the host: its kind and its message.
    pub fn to_wire(&self) -> WireError {
        WireError::new(self.kind(), self.to_string())
    }

    /// A failed system call, described by what we were doing.
    pub fn sys(what: impl Into<String>, source: Errno) -> Self {
        Self::Sys {
            what: what.into(),
            source,
        }
    }

    /// A failed I/O operation, described by what we were doing.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

/// The text of an I/O error without Rust's " (os error N)" suffix.
pub fn os_reason(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(code) => Errno::from_raw(code).desc().to_owned(),
        None => err.to_string(),
    }
}

/// Result type of the agent.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;

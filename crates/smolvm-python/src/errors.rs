//! Runtime errors as the exceptions of `smolvm.exceptions` (defined in Python so users can
//! subclass and import them without the native module).

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3::IntoPyObjectExt;
use smolvm::{Error, ErrorKind};

/// Raises the exception class `name` of `smolvm.exceptions` with `message` and keyword
/// attributes; falls back to `RuntimeError` if the module cannot be imported.
pub fn raise(py: Python<'_>, name: &str, message: String, attrs: &[(&str, PyObject)]) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let module = py.import("smolvm.exceptions")?;
        let class = module.getattr(name)?;
        let kwargs = PyDict::new(py);
        for (k, v) in attrs {
            kwargs.set_item(*k, v)?;
        }
        let exc = class.call((message.clone(),), Some(&kwargs))?;
        Ok(PyErr::from_value(exc))
    };
    build().unwrap_or_else(|e| PyRuntimeError::new_err(format!("{message} ({e})")))
}

fn obj<'py, T>(py: Python<'py>, v: T) -> PyObject
where
    T: IntoPyObject<'py>,
{
    v.into_bound_py_any(py)
        .map(Bound::unbind)
        .unwrap_or_else(|_| py.None())
}

/// The class of `smolvm.exceptions` each runtime error becomes. An exhaustive match: a new
/// variant of [`Error`] does not compile until it is given its class here.
pub fn class_of(err: &Error) -> &'static str {
    match err {
        Error::InvalidConfig { .. } => "ValidationError",
        Error::VmNotFound(_) => "VMNotFoundError",
        Error::VmExists(_) => "VMAlreadyExistsError",
        Error::BadState { .. } | Error::VmGone { .. } => "CommandExecutionUnavailableError",
        Error::Image(_) => "ImageError",
        Error::MissingTool { .. }
        | Error::MissingBinary { .. }
        | Error::Store { .. }
        | Error::Io { .. }
        | Error::Qmp(_)
        | Error::Disk(_)
        | Error::Unsupported(_)
        | Error::CorruptRecord { .. } => "HostError",
        Error::StartFailed { .. } => "VMStartError",
        Error::ReadyTimeout { .. } | Error::Timeout { .. } => "OperationTimeoutError",
        Error::Agent { kind, .. } => match kind {
            ErrorKind::InvalidInput => "ValidationError",
            ErrorKind::Timeout => "OperationTimeoutError",
            ErrorKind::GuestGone => "CommandExecutionUnavailableError",
            ErrorKind::NotFound
            | ErrorKind::Refused
            | ErrorKind::Busy
            | ErrorKind::Io
            | ErrorKind::Unsupported => "SmolVMError",
        },
        Error::Protocol { .. } | Error::Cancelled => "SmolVMError",
        Error::GuestFile { .. } => "FileTransferError",
        Error::Forward { .. } | Error::Network(_) => "NetworkError",
        Error::Snapshot(_) | Error::SnapshotInUse { .. } => "SnapshotError",
        Error::SnapshotNotFound(_) => "SnapshotNotFoundError",
        Error::ApiVersion { .. } => "APIVersionError",
    }
}

/// Converts a runtime error into the matching Python exception (class by [`class_of`]),
/// with the error's fields as attributes.
pub fn to_py(py: Python<'_>, err: Error) -> PyErr {
    let msg = err.to_string();
    let class = class_of(&err);
    let attrs: Vec<(&str, PyObject)> = match err {
        Error::InvalidConfig {
            field,
            value,
            allowed,
        } => vec![
            ("field", obj(py, field)),
            ("value", obj(py, value)),
            ("allowed", obj(py, allowed)),
        ],
        Error::VmNotFound(id) | Error::VmExists(id) => vec![("vm_id", obj(py, id))],
        Error::BadState { id, state, hint } => vec![
            ("vm_id", obj(py, id)),
            ("reason", obj(py, format!("the VM is {state}"))),
            ("remediation", obj(py, hint)),
        ],
        Error::VmGone { id, reason } => vec![("vm_id", obj(py, id)), ("reason", obj(py, reason))],
        Error::SnapshotNotFound(name) => vec![("name", obj(py, name))],
        Error::SnapshotInUse { name, users } => {
            vec![("name", obj(py, name)), ("users", obj(py, users))]
        }
        Error::StartFailed { id, .. } => vec![("vm_id", obj(py, id))],
        Error::ReadyTimeout { id, secs, .. } => vec![
            ("operation", obj(py, format!("boot of VM {id}"))),
            ("timeout_seconds", obj(py, secs as f64)),
        ],
        Error::Timeout { what, secs } => vec![
            ("operation", obj(py, what)),
            ("timeout_seconds", obj(py, secs)),
        ],
        Error::GuestFile { path, reason } => {
            vec![("path", obj(py, path)), ("reason", obj(py, reason))]
        }
        Error::Agent { kind, message } => match kind {
            ErrorKind::Timeout => vec![
                ("operation", obj(py, message)),
                ("timeout_seconds", py.None()),
            ],
            ErrorKind::GuestGone => vec![("reason", obj(py, message))],
            ErrorKind::NotFound
            | ErrorKind::InvalidInput
            | ErrorKind::Refused
            | ErrorKind::Busy
            | ErrorKind::Io
            | ErrorKind::Unsupported => vec![("kind", obj(py, kind.as_str()))],
        },
        Error::Forward { kind, .. } => vec![("kind", obj(py, kind.as_str()))],
        Error::ApiVersion {
            id,
            supervisor,
            client,
        } => vec![
            ("vm_id", obj(py, id)),
            ("supervisor_version", obj(py, supervisor)),
            ("client_version", obj(py, client)),
        ],
        Error::MissingBinary { binary, .. } => vec![("binary", obj(py, binary))],
        Error::Image(_)
        | Error::MissingTool { .. }
        | Error::Protocol { .. }
        | Error::Store { .. }
        | Error::Io { .. }
        | Error::Disk(_)
        | Error::Cancelled
        | Error::Qmp(_)
        | Error::Network(_)
        | Error::Unsupported(_)
        | Error::Snapshot(_) => Vec::new(),
        Error::CorruptRecord { id, what } => {
            vec![("vm_id", obj(py, id)), ("what", obj(py, what))]
        }
    };
    raise(py, class, msg, &attrs)
}

/// Converts an image-pipeline error.
pub fn image_to_py(py: Python<'_>, err: smolvm_image::ImageError) -> PyErr {
    to_py(py, Error::Image(err))
}

/// Adds `.map_py(py)` to runtime results.
pub trait MapPy<T> {
    /// Maps the error to its Python exception.
    fn map_py(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> MapPy<T> for smolvm::Result<T> {
    fn map_py(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// Every variant, made, and the class it must become.
    #[test]
    fn every_runtime_error_has_its_exception_class() {
        let io = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let agent = |kind| Error::Agent {
            kind,
            message: "m".into(),
        };
        let cases: Vec<(Error, &str)> = vec![
            (
                Error::InvalidConfig {
                    field: "vcpu_count",
                    value: "0".into(),
                    allowed: "1 to 32".into(),
                },
                "ValidationError",
            ),
            (Error::VmNotFound("a".into()), "VMNotFoundError"),
            (Error::VmExists("a".into()), "VMAlreadyExistsError"),
            (
                Error::BadState {
                    id: "a".into(),
                    state: "stopped".into(),
                    hint: "start it".into(),
                },
                "CommandExecutionUnavailableError",
            ),
            (
                Error::Image(smolvm_image::ImageError::NotFound {
                    name: "default".into(),
                    available: Vec::new(),
                }),
                "ImageError",
            ),
            (
                Error::MissingTool {
                    tool: "nft".into(),
                    package: "nftables".into(),
                },
                "HostError",
            ),
            (
                Error::StartFailed {
                    id: "a".into(),
                    reason: "r".into(),
                },
                "VMStartError",
            ),
            (
                Error::ReadyTimeout {
                    id: "a".into(),
                    secs: 1,
                    accel: "tcg".into(),
                    console: PathBuf::from("/c"),
                },
                "OperationTimeoutError",
            ),
            (
                Error::VmGone {
                    id: "a".into(),
                    reason: "r".into(),
                },
                "CommandExecutionUnavailableError",
            ),
            (agent(ErrorKind::NotFound), "SmolVMError"),
            (agent(ErrorKind::InvalidInput), "ValidationError"),
            (agent(ErrorKind::Timeout), "OperationTimeoutError"),
            (
                agent(ErrorKind::GuestGone),
                "CommandExecutionUnavailableError",
            ),
            (agent(ErrorKind::Refused), "SmolVMError"),
            (agent(ErrorKind::Busy), "SmolVMError"),
            (agent(ErrorKind::Io), "SmolVMError"),
            (agent(ErrorKind::Unsupported), "SmolVMError"),
            (
                Error::Protocol {
                    peer: "supervisor",
                    source: smolvm_protocol_error(),
                },
                "SmolVMError",
            ),
            (
                Error::Store {
                    context: "c".into(),
                    source: rusqlite_error(),
                },
                "HostError",
            ),
            (
                Error::Io {
                    context: "c".into(),
                    source: io(),
                },
                "HostError",
            ),
            (
                Error::Timeout {
                    what: "w".into(),
                    secs: Some(1.0),
                },
                "OperationTimeoutError",
            ),
            (
                Error::Timeout {
                    what: "w".into(),
                    secs: None,
                },
                "OperationTimeoutError",
            ),
            (Error::Disk("d".into()), "HostError"),
            (Error::Cancelled, "SmolVMError"),
            (
                Error::GuestFile {
                    path: "/p".into(),
                    reason: "r".into(),
                },
                "FileTransferError",
            ),
            (Error::Qmp("q".into()), "HostError"),
            (
                Error::Forward {
                    kind: ErrorKind::Busy,
                    message: "m".into(),
                },
                "NetworkError",
            ),
            (Error::Network("nat unavailable".into()), "NetworkError"),
            (Error::Snapshot("s".into()), "SnapshotError"),
            (Error::SnapshotNotFound("s".into()), "SnapshotNotFoundError"),
            (
                Error::SnapshotInUse {
                    name: "s".into(),
                    users: vec!["a".into()],
                },
                "SnapshotError",
            ),
            (
                Error::MissingBinary {
                    binary: "smolvm",
                    purpose: "p",
                    hint: "h",
                },
                "HostError",
            ),
            (
                Error::ApiVersion {
                    id: "a".into(),
                    supervisor: 0,
                    client: 1,
                },
                "APIVersionError",
            ),
            (
                Error::Unsupported("the fake monitor cannot pause a VM".into()),
                "HostError",
            ),
            (
                Error::CorruptRecord {
                    id: "a".into(),
                    what: "its config does not parse".into(),
                },
                "HostError",
            ),
        ];
        for (err, class) in &cases {
            assert_eq!(class_of(err), *class, "{err:?}");
        }
        // Every class named is one that `smolvm.exceptions` defines.
        let exceptions = include_str!("../python/smolvm/exceptions.py");
        for (_, class) in &cases {
            assert!(
                exceptions.contains(&format!("class {class}(")),
                "{class} is not defined in exceptions.py"
            );
        }
    }

    fn smolvm_protocol_error() -> smolvm_protocol::ProtocolError {
        smolvm_protocol::ProtocolError::TruncatedFrame
    }

    fn rusqlite_error() -> rusqlite::Error {
        rusqlite::Error::QueryReturnedNoRows
    }
}

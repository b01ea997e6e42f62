//! Runtime errors as the exceptions of `smolvm.exceptions` (defined in Python so users can
//! subclass and import them without the native module).

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3::IntoPyObjectExt;
use smolvm::Error;

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

/// Converts a runtime error into the matching Python exception.
pub fn to_py(py: Python<'_>, err: Error) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::InvalidConfig {
            field,
            value,
            allowed,
        } => raise(
            py,
            "ValidationError",
            msg,
            &[
                ("field", obj(py, field)),
                ("value", obj(py, value)),
                ("allowed", obj(py, allowed)),
            ],
        ),
        Error::VmNotFound(id) => raise(py, "VMNotFoundError", msg, &[("vm_id", obj(py, id))]),
        Error::VmExists(id) => raise(py, "VMAlreadyExistsError", msg, &[("vm_id", obj(py, id))]),
        Error::BadState { id, state, hint } => raise(
            py,
            "CommandExecutionUnavailableError",
            msg,
            &[
                ("vm_id", obj(py, id)),
                ("reason", obj(py, format!("the VM is {state}"))),
                ("remediation", obj(py, hint)),
            ],
        ),
        Error::VmGone { id, reason } => raise(
            py,
            "CommandExecutionUnavailableError",
            msg,
            &[("vm_id", obj(py, id)), ("reason", obj(py, reason))],
        ),
        Error::SnapshotNotFound(name) => {
            raise(py, "SnapshotNotFoundError", msg, &[("name", obj(py, name))])
        }
        Error::Snapshot(_) => raise(py, "SnapshotError", msg, &[]),
        Error::Image(_) => raise(py, "ImageError", msg, &[]),
        Error::MissingTool { .. } | Error::Store { .. } | Error::Io { .. } | Error::Qmp(_) => {
            raise(py, "HostError", msg, &[])
        }
        Error::Disk(_) => raise(py, "HostError", msg, &[]),
        Error::Forward(_) => raise(py, "NetworkError", msg, &[]),
        Error::StartFailed { id, .. } => raise(py, "VMStartError", msg, &[("vm_id", obj(py, id))]),
        Error::ReadyTimeout { id, secs, .. } => raise(
            py,
            "OperationTimeoutError",
            msg,
            &[
                ("operation", obj(py, format!("boot of VM {id}"))),
                ("timeout_seconds", obj(py, secs as f64)),
            ],
        ),
        Error::Timeout { what, secs } => raise(
            py,
            "OperationTimeoutError",
            msg,
            &[
                ("operation", obj(py, what)),
                ("timeout_seconds", obj(py, secs)),
            ],
        ),
        Error::GuestFile { path, reason } => raise(
            py,
            "FileTransferError",
            msg,
            &[("path", obj(py, path)), ("reason", obj(py, reason))],
        ),
        _ => raise(py, "SmolVMError", msg, &[]),
    }
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

//! `smolvm._native`: the smolvm runtime as a Python extension module (PyO3). The pure-Python
//! package `smolvm` around it gives the public API (`SmolVM`, `VM`, `VMConfig`, ...); this
//! module only converts types and errors, so the Rust runtime stays the one source of
//! behaviour.

mod config;
mod errors;
mod exec;
mod images;
mod vm;

use pyo3::prelude::*;

/// Tells the runtime where the `smolvm` binary that hosts VM supervisors is (the package
/// ships one); `SMOLVM_BIN` still wins.
#[pyfunction]
fn set_supervisor_binary(path: std::path::PathBuf) {
    smolvm::supervisor::set_supervisor_binary(path);
}

/// The version of the native module (the workspace's).
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<vm::Vm>()?;
    m.add_class::<exec::ExecStream>()?;
    m.add_function(wrap_pyfunction!(config::validate_config, m)?)?;
    m.add_function(wrap_pyfunction!(vm::list_vms, m)?)?;
    m.add_function(wrap_pyfunction!(vm::list_snapshots, m)?)?;
    m.add_function(wrap_pyfunction!(vm::open_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(vm::delete_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(set_supervisor_binary, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(images::default_images_dir, m)?)?;
    m.add_function(wrap_pyfunction!(images::ensure_ssh_key, m)?)?;
    m.add_function(wrap_pyfunction!(images::build_ssh_image, m)?)?;
    Ok(())
}

//! Where the `smolvm` binary that hosts supervisors (`smolvm __supervise DIR`) is found.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// The supervisor binary chosen by an embedding program (see [`set_supervisor_binary`]).
static EMBEDDED_BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Tells the runtime where the `smolvm` binary is when the running program is not it
/// (the Python package ships one inside itself). `SMOLVM_BIN` still wins. Only the first
/// call counts.
pub fn set_supervisor_binary(path: PathBuf) {
    let _ = EMBEDDED_BINARY.set(path);
}

/// Where the `smolvm` binary that hosts the supervisor lives: `SMOLVM_BIN`, this program if
/// it is `smolvm`, the one an embedding program named, a `smolvm` beside this program, or
/// `smolvm` on `PATH`.
pub fn supervisor_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SMOLVM_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = EMBEDDED_BINARY.get() {
        if std::env::current_exe().is_ok_and(|e| e.file_name().is_some_and(|n| n == "smolvm")) {
            // This program is smolvm itself: fall through and use it.
        } else if p.is_file() {
            return Ok(p.clone());
        }
    }
    if let Ok(exe) = std::env::current_exe() {
        if exe.file_name().is_some_and(|n| n == "smolvm") {
            return Ok(exe);
        }
        if let Some(sib) = exe.parent().map(|d| d.join("smolvm")) {
            if sib.is_file() {
                return Ok(sib);
            }
        }
    }
    crate::util::which("smolvm").ok_or(Error::MissingBinary {
        binary: "smolvm",
        purpose: "that runs VM supervisors",
        hint: "put it on PATH or set SMOLVM_BIN",
    })
}

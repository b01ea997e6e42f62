//! The smolvm runtime: runs untrusted code in hardware-isolated microVMs.
//!
//! ```no_run
//! use smolvm::{ExecOptions, Runtime, VmConfig};
//! let rt = Runtime::open()?;
//! let vm = rt.create(VmConfig::default())?;
//! vm.start()?;
//! let out = vm.exec(&ExecOptions::shell("echo hi"))?;
//! assert_eq!(out.stdout, b"hi\n");
//! vm.delete()?;
//! # Ok::<(), smolvm::Error>(())
//! ```

mod cleanup;
pub mod client;
pub mod config;
pub mod disk;
mod env;
pub mod error;
pub mod exec;
pub mod files;
mod forward;
mod gc;
pub mod hypervisor;
mod launch;
pub mod network;
pub mod paths;
pub mod snapshot;
pub mod store;
pub mod supervisor;
pub mod util;
mod vm;

pub use client::{CancelToken, OutputStream};
pub use config::{DiskMode, EgressDefault, NetworkMode, VmConfig};
pub use error::{Error, ErrorKind, Result};
pub use exec::{ExecOptions, ExecOutput};
pub use files::GuestFileInfo;
pub use forward::ForwardInfo;
pub use gc::GcReport;
pub use paths::Paths;
pub use smolvm_protocol::Command;
pub use snapshot::overrides::SnapshotOverrides;
pub use store::{Base, Owner, VmRecord, VmState};
pub use vm::{Runtime, StartTimings, Vm, VmInfo};

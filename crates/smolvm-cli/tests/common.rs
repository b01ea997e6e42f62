//! Shared set-up for the VM tests: a private state directory, the CLI binary as the
//! supervisor host, and one booted VM shared by the tests that only run commands in it.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use smolvm::{Paths, Runtime, Vm, VmConfig};

/// The smolvm binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_smolvm"))
}

/// A state directory private to this test process (kept short: socket paths are limited).
pub fn state_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = PathBuf::from(format!("/tmp/smolvm-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("create test state dir");
        // SAFETY: registering a plain extern "C" function; it removes the shared VM (if
        // any) and this directory when the test process exits.
        unsafe {
            libc::atexit(cleanup);
        }
        d
    })
}

/// A runtime on the private state directory, using the shared image store.
pub fn runtime() -> Runtime {
    std::env::set_var("SMOLVM_BIN", bin());
    let paths = Paths {
        state_dir: state_dir().clone(),
        images_dir: Paths::from_env().images_dir,
    };
    Runtime::with_paths(paths).expect("open runtime")
}

/// Boots a fresh VM (1 vCPU, 256 MiB keeps TCG boots quick on small hosts).
pub fn fresh_vm() -> Vm {
    let vm = runtime()
        .create(VmConfig {
            vcpu_count: 1,
            mem_size_mib: 256,
            ..Default::default()
        })
        .expect("create VM (is the default image built? run scripts/setup)");
    if let Err(e) = vm.start() {
        let log = std::fs::read_to_string(vm.console_log()).unwrap_or_default();
        let _ = vm.delete();
        panic!("VM failed to start: {e}\nconsole:\n{log}");
    }
    vm
}

static SHARED: OnceLock<Vm> = OnceLock::new();

extern "C" fn cleanup() {
    if let Some(vm) = SHARED.get() {
        let _ = vm.delete();
    }
    let _ = std::fs::remove_dir_all(state_dir());
}

/// One VM shared by every test in this binary; deleted when the test process exits
/// (see `cleanup`, registered with the state directory).
pub fn shared_vm() -> &'static Vm {
    SHARED.get_or_init(fresh_vm)
}

//! Shared set-up for the VM tests: a private state directory, the CLI binary as the
//! supervisor host, and one booted VM shared by the tests that only run commands in it.

#![allow(dead_code, unused_imports)]

use std::path::PathBuf;
use std::sync::OnceLock;

use smolvm::{Paths, Runtime, Vm, VmConfig};
pub use smolvm_testing::{
    assert_no_process_mentions, poll_for, poll_until, processes_mentioning, serial,
};

/// `n` seconds.
pub fn secs(n: u64) -> std::time::Duration {
    std::time::Duration::from_secs(n)
}

/// The smolvm binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_smolvm"))
}

/// Set in child test processes to share their parent's state directory (the parent
/// removes it).
pub const INHERIT_STATE: &str = "SMOLVM_TEST_STATE";

/// A state directory private to this test process (kept short: socket paths are limited).
pub fn state_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os(INHERIT_STATE) {
            return PathBuf::from(d);
        }
        let d = std::env::temp_dir().join(format!("smolvm-test-{}", std::process::id()));
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
    // Once, and not through the environment: `set_var` races with threads spawning processes.
    static BIN: std::sync::Once = std::sync::Once::new();
    BIN.call_once(|| smolvm::supervisor::set_supervisor_binary(bin()));
    let paths = Paths {
        state_dir: state_dir().clone(),
        images_dir: Paths::from_env().images_dir,
    };
    Runtime::with_paths(paths).expect("open runtime")
}

/// A small VM config: 1 vCPU and 256 MiB keep TCG boots quick on small hosts; no network
/// device (tests that need one say so: see tests/network.rs).
pub fn small() -> VmConfig {
    VmConfig {
        vcpu_count: 1,
        mem_size_mib: 256,
        network: smolvm::NetworkMode::None,
        ..Default::default()
    }
}

/// Creates and boots a VM from `config`; on failure prints its console and cleans up.
pub fn boot(config: VmConfig) -> Vm {
    let vm = runtime()
        .create(config)
        .expect("create VM (is the default image built? run scripts/setup)");
    start(&vm);
    vm
}

/// Starts `vm`, panicking with its console log when it fails.
pub fn start(vm: &Vm) {
    if let Err(e) = vm.start() {
        let log = std::fs::read_to_string(vm.console_log()).unwrap_or_default();
        let _ = vm.delete();
        panic!("VM failed to start: {e}\nconsole:\n{log}");
    }
}

/// Boots a fresh small VM.
pub fn fresh_vm() -> Vm {
    boot(small())
}

/// Runs a shell line in `vm`; returns its stdout, panicking on a non-zero exit.
pub fn sh(vm: &Vm, line: &str) -> String {
    let out = vm
        .exec(&smolvm::ExecOptions::shell(line))
        .unwrap_or_else(|e| panic!("exec {line:?}: {e}"));
    assert_eq!(
        out.exit_code,
        Some(0),
        "{line:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `smolvm` CLI on this test's state directory.
pub fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin())
        .args(args)
        .env("SMOLVM_HOME", state_dir())
        .output()
        .expect("run smolvm")
}

/// Asserts that nothing of the VM `id` (directory `dir`) is left: no process, no
/// directory (sockets, overlay), no row.
pub fn assert_gone(id: &str, dir: &std::path::Path) {
    assert_no_process_mentions(dir, &format!("processes of {id}"));
    assert!(!dir.exists(), "directory of {id} left: {}", dir.display());
    assert!(
        matches!(runtime().get(id), Err(smolvm::Error::VmNotFound(_))),
        "row of {id} left"
    );
}

static SHARED: OnceLock<Vm> = OnceLock::new();

extern "C" fn cleanup() {
    if let Some(vm) = SHARED.get() {
        let _ = vm.delete();
    }
    if std::env::var_os(INHERIT_STATE).is_none() {
        // Any VM a failed test left behind goes too: no process outlives the tests.
        if let Ok(rt) = std::panic::catch_unwind(runtime) {
            for v in rt.list().unwrap_or_default() {
                if let Ok(vm) = rt.get(&v.record.id) {
                    let _ = vm.delete();
                }
            }
        }
        let _ = std::fs::remove_dir_all(state_dir());
    }
}

/// One VM shared by every test in this binary; deleted when the test process exits
/// (see `cleanup`, registered with the state directory).
pub fn shared_vm() -> &'static Vm {
    SHARED.get_or_init(fresh_vm)
}

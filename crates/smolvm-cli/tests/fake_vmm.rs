//! The fast lane: the runtime's lifecycle, exec, env, files, forward, gc and concurrency
//! logic against the fake monitor (`SMOLVM_VMM=fake`), which runs the real guest agent as
//! a host process instead of booting a VM. Everything above the monitor is the real thing:
//! the client API, `smolvm __supervise`, its API socket, the agent protocol, SQLite. Each
//! test takes milliseconds, not a TCG boot; the real-VM files (lifecycle.rs, exec.rs, ...)
//! keep proving the same against QEMU.
//!
//! Needs the host build of `smolvm-agent` beside the `smolvm` binary under test
//! (`cargo build -p smolvm-agent`; `cargo test --workspace` builds it).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

use smolvm::{Error, ExecOptions, NetworkMode, Paths, Runtime, Vm, VmConfig, VmState};
use smolvm_testing::{poll_until, processes_mentioning, short_tempdir};

/// Sets the lane's environment once, before any test spawns a process (every test calls
/// this first, so no thread runs a child while the environment changes).
fn lane() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_smolvm"));
        let agent = bin.with_file_name("smolvm-agent");
        assert!(
            agent.is_file(),
            "the fast lane needs the agent built beside {}: run `cargo build -p smolvm-agent` \
             (or `cargo test --workspace`)",
            bin.display()
        );
        // SAFETY: runs once, while every other test thread waits in `call_once` above and
        // before any test has spawned a process.
        unsafe {
            std::env::set_var("SMOLVM_VMM", "fake");
            std::env::set_var("SMOLVM_BIN", &bin);
            std::env::set_var("SMOLVM_AGENT_BIN", &agent);
        }
    });
}

/// A runtime on a private state directory, and stand-in boot files (the fake boots none
/// of them; the runtime still checks they exist and makes the VM's overlay disk on the
/// root file system).
struct Lane {
    rt: Runtime,
    state: tempfile::TempDir,
    files: tempfile::TempDir,
}

impl Lane {
    fn new() -> Lane {
        lane();
        // Short paths: the VM's sockets live under the state directory.
        let state = short_tempdir();
        let files = tempfile::tempdir().unwrap();
        for (name, size) in [
            ("vmlinux", 4096),
            ("initrd.cpio", 4096),
            ("rootfs.ext4", 8 << 20),
        ] {
            let f = std::fs::File::create(files.path().join(name)).unwrap();
            f.set_len(size).unwrap();
        }
        let rt = Runtime::with_paths(Paths {
            state_dir: state.path().to_path_buf(),
            images_dir: files.path().join("images"),
        })
        .unwrap();
        Lane { rt, state, files }
    }

    fn config(&self) -> VmConfig {
        VmConfig {
            kernel_path: Some(self.files.path().join("vmlinux")),
            initrd_path: Some(self.files.path().join("initrd.cpio")),
            rootfs_path: Some(self.files.path().join("rootfs.ext4")),
            network: NetworkMode::None,
            ..Default::default()
        }
    }

    fn named(&self, id: &str) -> VmConfig {
        VmConfig {
            vm_id: Some(id.into()),
            ..self.config()
        }
    }

    fn started(&self, config: VmConfig) -> Vm {
        let vm = self.rt.create(config).unwrap();
        let t = vm.start().unwrap();
        assert_eq!(t.accelerator.as_str(), "none", "the fake monitor ran it");
        vm
    }

    /// Nothing of the VM is left: no row, no directory, no process naming it.
    fn assert_gone(&self, id: &str, dir: &Path) {
        poll_until(Duration::from_secs(10), "the VM's processes to end", || {
            processes_mentioning(dir).is_empty()
        });
        assert!(!dir.exists(), "{} is left", dir.display());
        assert!(matches!(self.rt.get(id), Err(Error::VmNotFound(_))));
    }
}

fn sh(vm: &Vm, line: &str) -> smolvm::ExecOutput {
    vm.exec(&ExecOptions::shell(line)).unwrap()
}

#[test]
fn a_vm_lives_through_create_start_exec_stop_start_and_delete() {
    let lane = Lane::new();
    let vm = lane.rt.create(lane.named("life")).unwrap();
    assert_eq!(vm.info().unwrap().state, VmState::Created);
    vm.start().unwrap();
    let rec = vm.info().unwrap();
    assert_eq!(rec.state, VmState::Running);
    assert!(rec.supervisor_pid.is_some() && rec.qemu_pid.is_some());
    assert_eq!(sh(&vm, "echo hello").stdout_text(), "hello\n");
    // Starting a running VM does nothing.
    assert!(vm.start().unwrap().already_running);
    vm.stop(true).unwrap();
    let rec = vm.info().unwrap();
    assert_eq!(rec.state, VmState::Stopped);
    assert!(rec.supervisor_pid.is_none());
    assert!(processes_mentioning(vm.dir()).is_empty());
    vm.start().unwrap();
    assert_eq!(sh(&vm, "echo again").stdout_text(), "again\n");
    let dir = vm.dir().to_path_buf();
    vm.delete().unwrap();
    lane.assert_gone("life", &dir);
}

#[test]
fn exec_reports_codes_streams_stdin_timeouts_and_caps() {
    let lane = Lane::new();
    let vm = lane.started(lane.config());
    let out = sh(&vm, "echo out; echo err >&2; exit 3");
    assert_eq!(out.exit_code, Some(3));
    assert_eq!(out.stdout_text(), "out\n");
    assert_eq!(out.stderr_text(), "err\n");
    let out = vm
        .exec(&ExecOptions::argv(["cat"]).stdin(b"piped".to_vec()))
        .unwrap();
    assert_eq!(out.stdout, b"piped");
    let out = vm
        .exec(&ExecOptions::shell("sleep 30").timeout(Duration::from_millis(300)))
        .unwrap();
    assert!(out.timed_out);
    assert_eq!(out.shell_code(), 124);
    let out = vm
        .exec(&ExecOptions::shell("head -c 100000 /dev/zero").max_output(1000))
        .unwrap();
    assert_eq!(out.stdout.len(), 1000);
    assert!(out.stdout_truncated);
    let out = vm
        .exec(&ExecOptions::shell("echo $A-$PWD").env("A", "x").cwd("/tmp"))
        .unwrap();
    assert_eq!(out.stdout_text(), "x-/tmp\n");
    vm.delete().unwrap();
}

#[test]
fn a_missing_program_is_an_error_of_the_command_not_of_the_vm() {
    let lane = Lane::new();
    let vm = lane.started(lane.config());
    let r = vm.exec(&ExecOptions::argv(["/nonexistent/program"]));
    assert!(r.is_err(), "{r:?}");
    // The VM is unharmed.
    assert_eq!(sh(&vm, "echo fine").stdout_text(), "fine\n");
    vm.delete().unwrap();
}

#[test]
fn env_given_at_create_is_there_at_boot_and_changes_persist_across_restarts() {
    let lane = Lane::new();
    let mut config = lane.config();
    config.env_vars = BTreeMap::from([("GREETING".to_string(), "hi".to_string())]);
    let vm = lane.started(config);
    assert_eq!(sh(&vm, "echo $GREETING").stdout_text(), "hi\n");
    let after = vm
        .set_env_vars(&BTreeMap::from([("B".into(), "two words".into())]), true)
        .unwrap();
    assert_eq!(after.get("B").map(String::as_str), Some("two words"));
    assert_eq!(after.get("GREETING").map(String::as_str), Some("hi"));
    vm.stop(true).unwrap();
    // Changed while stopped: applied at the next start.
    vm.unset_env_vars(&["GREETING".into()]).unwrap();
    vm.start().unwrap();
    assert_eq!(
        sh(&vm, "echo \"[$GREETING][$B]\"").stdout_text(),
        "[][two words]\n"
    );
    // A bad name is refused, naming it, and changes nothing.
    let bad = vm.set_env_vars(&BTreeMap::from([("1BAD".into(), "x".into())]), true);
    let msg = bad.unwrap_err().to_string();
    assert!(msg.contains("1BAD"), "{msg}");
    assert_eq!(vm.env_vars().unwrap().len(), 1);
    vm.delete().unwrap();
}

#[test]
fn files_go_in_and_out_with_their_mode() {
    let lane = Lane::new();
    let vm = lane.started(lane.config());
    let guest = lane.state.path().join("in-guest.bin");
    let guest = guest.to_str().unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    vm.write_file(guest, &data, Some(0o750)).unwrap();
    let info = vm.stat_file(guest).unwrap();
    assert_eq!(info.size, data.len() as u64);
    assert_eq!(info.mode & 0o777, 0o750);
    assert_eq!(vm.read_file(guest, 1 << 20).unwrap(), data);
    // A read past its cap is refused rather than cut.
    assert!(vm.read_file(guest, 10).is_err());
    let local = lane.files.path().join("back.bin");
    vm.download(guest, &local, 1 << 20).unwrap();
    assert_eq!(std::fs::read(&local).unwrap(), data);
    vm.delete().unwrap();
}

#[test]
fn a_forward_carries_bytes_both_ways_and_goes_with_its_vm() {
    let lane = Lane::new();
    let vm = lane.started(lane.config());
    // The "guest" port: a listener of this test, which the fake guest reaches on loopback.
    let server = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let guest_port = server.local_addr().unwrap().port();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = server.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf.map(|b| b.to_ascii_uppercase())).unwrap();
    });
    let fwd = vm.expose_local(guest_port, None, None).unwrap();
    assert_eq!(fwd.guest_port, guest_port);
    assert_eq!(vm.forwards().unwrap().len(), 1);
    let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, fwd.host_port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"hello").unwrap();
    let mut back = [0u8; 5];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"HELLO");
    echo.join().unwrap();
    let host_port = fwd.host_port;
    vm.delete().unwrap();
    // The host port is free again.
    TcpListener::bind((Ipv4Addr::LOCALHOST, host_port)).unwrap();
}

#[test]
fn the_fake_saves_nothing_and_says_so() {
    let lane = Lane::new();
    let vm = lane.started(lane.config());
    for (what, r) in [
        ("pause", vm.pause()),
        ("snapshot", vm.snapshot("s1").map(|_| ())),
    ] {
        // A typed refusal, across the supervisor's API, never recovered from text.
        match r {
            Err(Error::Unsupported(msg)) => {
                assert!(msg.contains("fake monitor cannot"), "{what}: {msg}")
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    // Refusing changed nothing.
    assert_eq!(vm.info().unwrap().state, VmState::Running);
    assert_eq!(sh(&vm, "echo still").stdout_text(), "still\n");
    assert!(lane.rt.snapshots().unwrap().is_empty());
    vm.delete().unwrap();
}

#[test]
fn a_vm_whose_machine_dies_is_recorded_as_error_and_starts_again() {
    let lane = Lane::new();
    let vm = lane.started(lane.config());
    let machine = vm.info().unwrap().qemu_pid.unwrap();
    // SAFETY: kill(2) on the fake machine's pid.
    unsafe { libc::kill(machine as i32, libc::SIGKILL) };
    poll_until(
        Duration::from_secs(10),
        "the VM to be recorded as error",
        || vm.info().unwrap().state == VmState::Error,
    );
    let rec = vm.info().unwrap();
    assert!(
        rec.error.as_deref().unwrap_or("").contains("signal 9"),
        "{rec:?}"
    );
    vm.start().unwrap();
    assert_eq!(sh(&vm, "echo back").stdout_text(), "back\n");
    vm.delete().unwrap();
}

#[test]
fn background_processes_of_a_stopped_vm_are_ended() {
    let lane = Lane::new();
    let vm = lane.started(lane.config());
    let marker = format!("smolvm-fast-{}", std::process::id());
    sh(
        &vm,
        &format!("(exec -a {marker} sleep 600) >/dev/null 2>&1 &"),
    );
    let running = || !processes_mentioning(&marker).is_empty();
    poll_until(Duration::from_secs(10), "the background process", running);
    vm.stop(true).unwrap();
    poll_until(
        Duration::from_secs(10),
        "the background process to end",
        || !running(),
    );
    vm.delete().unwrap();
}

#[test]
fn gc_repairs_a_vm_whose_supervisor_was_killed() {
    let lane = Lane::new();
    let vm = lane.started(lane.named("crashed"));
    let rec = vm.info().unwrap();
    let (sup, machine) = (rec.supervisor_pid.unwrap(), rec.qemu_pid.unwrap());
    // SAFETY: kill(2) on the supervisor's pid.
    unsafe { libc::kill(sup as i32, libc::SIGKILL) };
    // Its machine dies with it (parent-death signal).
    poll_until(
        Duration::from_secs(10),
        "the machine to die with it",
        || {
            !Path::new(&format!("/proc/{machine}")).exists()
                || std::fs::read_to_string(format!("/proc/{machine}/stat"))
                    .map(|s| s.contains(") Z"))
                    .unwrap_or(true)
        },
    );
    let report = lane.rt.gc().unwrap();
    assert!(
        report.marked_error.contains(&"crashed".to_string())
            || vm.info().unwrap().state == VmState::Error,
        "{report:?}"
    );
    assert!(
        lane.rt.gc().unwrap().is_clean(),
        "a second gc finds nothing"
    );
    vm.start().unwrap();
    assert_eq!(sh(&vm, "echo ok").stdout_text(), "ok\n");
    vm.delete().unwrap();
}

#[test]
fn eight_vms_started_at_once_from_threads_all_answer_and_all_go() {
    let lane = Lane::new();
    let vms: Vec<Vm> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let lane = &lane;
                s.spawn(move || {
                    let vm = lane.started(lane.named(&format!("par{i}")));
                    assert_eq!(
                        sh(&vm, &format!("echo {i}")).stdout_text(),
                        format!("{i}\n")
                    );
                    vm
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(lane.rt.list().unwrap().len(), 8);
    std::thread::scope(|s| {
        for vm in &vms {
            s.spawn(move || vm.delete().unwrap());
        }
    });
    assert!(lane.rt.list().unwrap().is_empty());
    for (i, vm) in vms.iter().enumerate() {
        lane.assert_gone(&format!("par{i}"), vm.dir());
    }
}

#[test]
fn a_network_is_refused_by_the_fake_naming_what_to_use() {
    let lane = Lane::new();
    for mode in [NetworkMode::Nat, NetworkMode::User] {
        let config = VmConfig {
            network: mode,
            ..lane.config()
        };
        let msg = lane.rt.create(config).unwrap_err().to_string();
        assert!(msg.contains("--network none"), "{msg}");
    }
    assert!(lane.rt.list().unwrap().is_empty(), "nothing was created");
}

#[test]
fn an_ephemeral_vm_goes_with_its_owner() {
    let lane = Lane::new();
    let vm = lane.rt.create(lane.named("owned")).unwrap();
    // The owner: a process of ours that we can end.
    let mut owner = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    vm.set_owner(smolvm::Owner::of(owner.id())).unwrap();
    vm.start().unwrap();
    assert_eq!(sh(&vm, "echo owned").stdout_text(), "owned\n");
    let dir = vm.dir().to_path_buf();
    owner.kill().unwrap();
    owner.wait().unwrap();
    poll_until(Duration::from_secs(20), "the VM to be deleted", || {
        matches!(lane.rt.get("owned"), Err(Error::VmNotFound(_)))
    });
    lane.assert_gone("owned", &dir);
}

//! Commands in a real VM (QEMU; TCG on hosts without usable KVM): output, exit codes,
//! streams, env, cwd, stdin, timeouts, caps, bytes, concurrency.

mod common;

use std::time::{Duration, Instant};

use common::shared_vm;
use smolvm::ExecOptions;

#[test]
fn echo() {
    let out = shared_vm()
        .exec(&ExecOptions::argv(["echo", "hello", "world"]))
        .unwrap();
    assert_eq!(out.stdout, b"hello world\n");
    assert_eq!(out.exit_code, Some(0));
    assert!(out.stderr.is_empty());
}

#[test]
fn exit_codes() {
    for code in [0, 1, 42] {
        let out = shared_vm()
            .exec(&ExecOptions::shell(format!("exit {code}")))
            .unwrap();
        assert_eq!(out.exit_code, Some(code));
        assert_eq!(out.shell_code(), code);
    }
}

#[test]
fn stderr_is_kept_apart() {
    let out = shared_vm()
        .exec(&ExecOptions::shell("echo out; echo err >&2; echo out2"))
        .unwrap();
    assert_eq!(out.stdout, b"out\nout2\n");
    assert_eq!(out.stderr, b"err\n");
}

#[test]
fn env_and_cwd() {
    let out = shared_vm()
        .exec(
            &ExecOptions::shell("printf '%s|' \"$GREETING\" \"$(pwd)\"")
                .env("GREETING", "hi there; $(not run)")
                .cwd("/tmp"),
        )
        .unwrap();
    assert_eq!(out.stdout_text(), "hi there; $(not run)|/tmp|");
    let out = shared_vm().exec(&ExecOptions::argv(["pwd"])).unwrap();
    assert_eq!(out.stdout, b"/root\n");
}

#[test]
fn missing_cwd_is_an_error() {
    let err = shared_vm()
        .exec(&ExecOptions::argv(["true"]).cwd("/does/not/exist"))
        .unwrap_err();
    assert!(err.to_string().contains("/does/not/exist"), "{err}");
}

#[test]
fn stdin_round_trip() {
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let out = shared_vm()
        .exec(&ExecOptions::argv(["cat"]).stdin(data.clone()))
        .unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data);
}

#[test]
fn timeout_kills_the_process_group() {
    let vm = shared_vm();
    // The command runs for 600 s unless its 2 s timeout ends it: it must come back long
    // before (how long it took is logged, not asserted).
    let t = Instant::now();
    let out = smolvm_testing::finishes_within(Duration::from_secs(120), "the exec", || {
        shared_vm()
            .exec(
                &ExecOptions::shell("sleep 600 & sleep 600 & echo started; wait")
                    .timeout(Duration::from_secs(2)),
            )
            .unwrap()
    });
    eprintln!("a 2 s timeout returned after {:?}", t.elapsed());
    assert!(out.timed_out, "{out:?}");
    assert_eq!(out.stdout, b"started\n");
    // Neither the shell nor its children survive.
    let ps = vm
        .exec(&ExecOptions::shell(
            "ps -eo comm= | grep -c '^sleep$' || true",
        ))
        .unwrap();
    assert_eq!(ps.stdout_text().trim(), "0", "sleep processes left behind");
}

#[test]
fn output_is_capped_and_marked_truncated() {
    let vm = shared_vm();
    let sup_pid = vm.info().unwrap().supervisor_pid.unwrap();
    let out = vm
        .exec(&ExecOptions::shell(
            "head -c 52428800 /dev/zero; echo done >&2",
        ))
        .unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(out.stdout.len() as u64, smolvm::exec::DEFAULT_MAX_OUTPUT);
    assert!(out.stdout_truncated);
    assert!(!out.stderr_truncated);
    assert_eq!(out.stderr, b"done\n");
    // The supervisor relays with bounded buffers: its peak memory stays far below 50 MiB.
    let status = std::fs::read_to_string(format!("/proc/{sup_pid}/status")).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(hwm_kib < 48 * 1024, "supervisor peak RSS {hwm_kib} KiB");
}

#[test]
fn non_utf8_output_is_kept_as_bytes() {
    let out = shared_vm()
        .exec(&ExecOptions::shell(r"printf '\377\376\000abc\200'"))
        .unwrap();
    assert_eq!(out.stdout, b"\xff\xfe\x00abc\x80");
}

#[test]
fn four_commands_at_once() {
    // A barrier: each command waits until all four have arrived. Run one after the
    // other, the first would wait in vain and time out.
    let vm = shared_vm();
    vm.exec(&ExecOptions::shell(
        "rm -rf /tmp/barrier && mkdir /tmp/barrier",
    ))
    .unwrap();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let vm = vm.clone();
            std::thread::spawn(move || {
                vm.exec(
                    &ExecOptions::shell(format!(
                        "touch /tmp/barrier/{i}; \
                         while [ $(ls /tmp/barrier | wc -l) -lt 4 ]; do sleep 0.05; done; echo {i}"
                    ))
                    .timeout(Duration::from_secs(60)),
                )
                .unwrap()
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let out = h.join().unwrap();
        assert!(!out.timed_out, "command {i} waited alone: not concurrent");
        assert_eq!(out.stdout_text(), format!("{i}\n"));
    }
}

#[test]
fn runs_in_the_guest_kernel() {
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let out = shared_vm()
        .exec(&ExecOptions::argv(["uname", "-r"]))
        .unwrap();
    let guest = out.stdout_text();
    assert!(!guest.trim().is_empty());
    assert_ne!(guest.trim(), host.trim(), "uname -r matches the host's");
    let hostname = shared_vm().exec(&ExecOptions::argv(["hostname"])).unwrap();
    assert_eq!(hostname.stdout_text().trim(), shared_vm().id());
}

#[test]
fn missing_program_is_an_error() {
    let err = shared_vm()
        .exec(&ExecOptions::argv(["/no/such/program"]))
        .unwrap_err();
    assert!(err.to_string().contains("/no/such/program"), "{err}");
}

//! The `smolvm` command line: a real VM for `run`, and bad input refused with exit code 2
//! and nothing left behind.

mod common;

use std::process::{Command, Output};

fn smolvm(home: &str, args: &[&str]) -> Output {
    let home = common::state_dir().join(home);
    Command::new(common::bin())
        .args(args)
        .env("SMOLVM_HOME", &home)
        .output()
        .expect("run smolvm")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn nothing_left_behind(home: &str) {
    let out = smolvm(home, &["ls", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().map(|a| a.len()), Some(0), "VMs left: {v}");
    let vms = common::state_dir().join(home).join("vms");
    let left: Vec<_> = std::fs::read_dir(&vms)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "VM directories left: {left:?}");
}

#[test]
fn run_prints_output_timings_and_exit_code() {
    let out = smolvm(
        "run",
        &[
            "run",
            "--cpus",
            "1",
            "--memory",
            "256",
            "--timings",
            "--",
            "sh",
            "-c",
            "echo hi; echo oops >&2; exit 42",
        ],
    );
    assert_eq!(out.status.code(), Some(42), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hi\n");
    let err = text(&out.stderr);
    assert!(err.contains("oops"), "{err}");
    for phase in [
        "create+start",
        "agent ready",
        "exec",
        "stop+delete",
        "total",
        "accelerator:",
    ] {
        assert!(err.contains(phase), "missing {phase} in {err}");
    }
    nothing_left_behind("run");
}

#[test]
fn bad_input_is_refused_with_exit_code_2() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["run", "--cpus", "0", "--", "true"],
            &["vcpu_count", "0", "between 1 and 32"],
        ),
        (
            &["run", "--cpus", "33", "--", "true"],
            &["vcpu_count", "33"],
        ),
        (
            &["run", "--memory", "64", "--", "true"],
            &["mem_size_mib", "64", "128"],
        ),
        (
            &["run", "--memory", "99999", "--", "true"],
            &["mem_size_mib", "99999"],
        ),
        (
            &["run", "--image", "no-such-image", "--", "true"],
            &["no-such-image", "smolvm image build"],
        ),
        (&["run", "--", ""], &["command"]),
        (
            &["run", "--network", "carrier-pigeon", "--", "true"],
            &["network", "carrier-pigeon", "none"],
        ),
        (&["run", "--timeout=-1", "--", "true"], &["--timeout", "-1"]),
        (
            &["run", "--timeout", "0", "--", "true"],
            &["--timeout", "0"],
        ),
    ];
    for (args, needles) in cases {
        let out = smolvm("bad", args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        for n in *needles {
            assert!(err.contains(n), "{args:?}: {n:?} not in {err:?}");
        }
    }
    let out = smolvm("bad", &["exec", "no-such-vm", "--", "true"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    nothing_left_behind("bad");
}

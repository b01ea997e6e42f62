//! A VM whose row in the state database does not read (here: its config) is never shown
//! with defaults: `smolvm ls` lists the other VMs and names it with how to remove it, every
//! command on it names it, and `smolvm rm` removes it whole.

mod common;

use std::process::{Command, Output};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn home() -> std::path::PathBuf {
    common::state_dir().join("records")
}

fn smolvm(args: &[&str]) -> Output {
    Command::new(common::bin())
        .args(args)
        .env("SMOLVM_HOME", home())
        .output()
        .expect("run smolvm")
}

fn ok(args: &[&str]) -> Output {
    let out = smolvm(args);
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    out
}

#[test]
fn ls_lists_the_others_and_names_a_corrupt_record_which_rm_removes() {
    for id in ["rec-good", "rec-bad"] {
        ok(&["create", "--no-start", "--network", "none", "--name", id]);
    }
    let db = rusqlite::Connection::open(home().join("smolvm.db")).unwrap();
    db.execute(
        "UPDATE vms SET config='{\"vcpu_count\": \"lots\"}' WHERE id='rec-bad'",
        [],
    )
    .unwrap();
    drop(db);

    let out = ok(&["ls"]);
    let (table, err) = (text(&out.stdout), text(&out.stderr));
    assert!(table.contains("rec-good"), "{table}");
    assert!(!table.contains("rec-bad"), "{table}");
    assert!(
        err.contains("rec-bad") && err.contains("config") && err.contains("smolvm rm rec-bad"),
        "{err}"
    );
    let out = ok(&["ls", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().map(|a| a.len()), Some(1), "{v}");

    for args in [&["inspect", "rec-bad"][..], &["start", "rec-bad"]] {
        let out = smolvm(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains("record of VM rec-bad is unreadable"), "{err}");
    }

    let dir = home().join("vms").join("rec-bad");
    assert!(dir.is_dir());
    ok(&["rm", "rec-bad"]);
    assert!(!dir.exists());
    let out = ok(&["ls"]);
    assert_eq!(text(&out.stderr), "");
    assert_eq!(smolvm(&["inspect", "rec-bad"]).status.code(), Some(3));
    ok(&["rm", "rec-good"]);
}

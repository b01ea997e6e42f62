//! SSH images with real VMs: `smolvm image ssh` derives an image from the default one, a VM
//! booted from its kernel and root filesystem runs sshd, and `ssh` logs in with the user's
//! key, trusting only the pinned host key: inside the guest over loopback, and from the host
//! through a forwarded port with the command line `ssh_command_hint` gives.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use common::*;

/// A temporary images directory whose `default` holds links to the default image.
fn images_with_default() -> tempfile::TempDir {
    let real_dir = smolvm_image::default_images_dir();
    smolvm_image::open(&real_dir, "default").unwrap_or_else(|e| {
        panic!("{e}\nbuild the default image first: target/release/smolvm image build")
    });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("default");
    std::fs::create_dir(&dir).unwrap();
    for file in ["vmlinux", "initrd.cpio", "rootfs.ext4", "manifest.json"] {
        let real = real_dir.join("default").join(file);
        if std::fs::hard_link(&real, dir.join(file)).is_err() {
            std::os::unix::fs::symlink(&real, dir.join(file)).unwrap();
        }
    }
    tmp
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `smolvm ARGS` with `input` on its standard input.
fn cli_with_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .env("SMOLVM_HOME", state_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run smolvm");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// Copies `data` to `path` in the VM `id` (mode 0600) through `smolvm exec -i`.
fn upload(id: &str, data: &[u8], path: &str) {
    let line = format!("umask 077 && cat > {path}");
    let out = cli_with_stdin(&["exec", id, "-i", "--", "sh", "-c", &line], data);
    ok(&out, &format!("upload to {path}"));
}

/// Runs a shell line in the VM `id`.
fn guest(id: &str, line: &str) -> Output {
    cli(&["exec", id, "--timeout", "120", "--", "sh", "-c", line])
}

/// The `ssh` line run inside the guest, with `known_hosts` at /tmp/kh.
fn ssh_line(alias: &str) -> String {
    format!(
        "ssh -i /tmp/k -o BatchMode=yes -o StrictHostKeyChecking=yes \
         -o UserKnownHostsFile=/tmp/kh -o HostKeyAlias={alias} -o ConnectTimeout=60 \
         root@127.0.0.1 echo ssh-ok"
    )
}

#[test]
fn ssh_with_the_users_key_and_the_pinned_host_key() {
    let images = images_with_default();
    let (private, public) = smolvm_image::ensure_ssh_key(&images.path().join("keys")).unwrap();
    let name = "ssh-test";

    // Derive through the CLI, into the temporary images directory.
    let started = std::time::Instant::now();
    let out = Command::new(bin())
        .args(["image", "ssh", name, "--key"])
        .arg(&public)
        .env("SMOLVM_HOME", state_dir())
        .env("SMOLVM_IMAGE_DIR", images.path())
        .output()
        .unwrap();
    let printed = ok(&out, "smolvm image ssh");
    eprintln!(
        "smolvm image ssh took {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let field = |key: &str| -> PathBuf {
        printed
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| PathBuf::from(v.trim()))
            .unwrap_or_else(|| panic!("no {key} in {printed:?}"))
    };
    let image_dir = images.path().join(name);
    assert_eq!(field("kernel"), image_dir.join("vmlinux"));
    assert_eq!(field("rootfs"), image_dir.join("rootfs.ext4"));
    let known_hosts = field("known_hosts");
    assert_eq!(known_hosts, image_dir.join("known_hosts"));

    // Boot it from its kernel and root filesystem (the initramfs is found beside the kernel).
    let id = format!("ssh-{}", std::process::id());
    let kernel = image_dir.join("vmlinux");
    let rootfs = image_dir.join("rootfs.ext4");
    let out = cli(&[
        "create",
        "--name",
        &id,
        "--cpus",
        "1",
        "--memory",
        "256",
        "--kernel",
        &kernel.display().to_string(),
        "--rootfs",
        &rootfs.display().to_string(),
    ]);
    if !out.status.success() {
        let log = cli(&["logs", &id]);
        panic!(
            "create failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&log.stdout)
        );
    }

    upload(&id, &std::fs::read(&private).unwrap(), "/tmp/k");
    upload(&id, &std::fs::read(&known_hosts).unwrap(), "/tmp/kh");
    // sshd writes its pid file once it listens.
    let out = guest(
        &id,
        "for i in $(seq 1 300); do [ -s /run/sshd.pid ] && exit 0; sleep 0.1; done; \
         cat /var/log/sshd.log; exit 1",
    );
    ok(&out, "waiting for sshd");

    let out = guest(&id, &ssh_line("smolvm-ssh-test"));
    let stdout = ok(&out, "ssh with the pinned host key");
    assert_eq!(stdout, "ssh-ok\n");

    // The configuration sshd runs with: keys only.
    let config = ok(&guest(&id, "sshd -T"), "sshd -T");
    for line in [
        "passwordauthentication no",
        "kbdinteractiveauthentication no",
        "permitrootlogin without-password",
        "hostkey /etc/ssh/ssh_host_ed25519_key",
    ] {
        assert!(config.lines().any(|l| l == line), "{line:?} not in sshd -T");
    }
    assert!(!config.contains("hostkey /etc/ssh/ssh_host_rsa_key"));

    // Pinning is real: another host key under the alias makes ssh refuse.
    let other = images.path().join("other");
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .status()
        .unwrap();
    assert!(status.success());
    let other_public = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let wrong = format!(
        "smolvm-ssh-test {}\n",
        other_public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    );
    upload(&id, wrong.as_bytes(), "/tmp/kh");
    let out = guest(&id, &ssh_line("smolvm-ssh-test"));
    assert_eq!(out.status.code(), Some(255), "ssh must fail");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ssh-ok"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Host key verification failed")
            || stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED"),
        "{stderr}"
    );
    // So does an unknown alias (nothing trusted on first use).
    upload(&id, &std::fs::read(&known_hosts).unwrap(), "/tmp/kh");
    let out = guest(&id, &ssh_line("smolvm-elsewhere"));
    assert_eq!(out.status.code(), Some(255), "ssh must fail");

    // From the host, through a forwarded port, with the command line smolvm suggests.
    let out = cli(&["port", &id, "22"]);
    let forward = ok(&out, "smolvm port ID 22");
    let port: u16 = forward
        .trim()
        .strip_prefix("127.0.0.1:")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{forward:?}"));
    let image = smolvm_image::open(images.path(), name).unwrap();
    let hint = smolvm_image::ssh_command_hint(&image, &private, "127.0.0.1", port);
    let line = format!(
        "{} echo host-ssh-ok",
        hint.replacen(
            "ssh ",
            "ssh -F /dev/null -o BatchMode=yes -o ConnectTimeout=60 ",
            1
        )
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(&line)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(ok(&out, &line), "host-ssh-ok\n");

    assert!(cli(&["rm", "-f", &id]).status.success());
}

#[test]
fn plain_images_have_no_host_keys_and_no_sshd() {
    let vm = fresh_vm();
    assert_eq!(
        sh(
            &vm,
            "ls /etc/ssh/ssh_host_* 2>/dev/null | wc -l; \
             [ -e /etc/smolvm/sshd ] && echo marker; \
             test -x /usr/sbin/sshd && echo installed; \
             pgrep -x sshd || echo not-running"
        ),
        "0\ninstalled\nnot-running\n"
    );
    vm.delete().unwrap();
}

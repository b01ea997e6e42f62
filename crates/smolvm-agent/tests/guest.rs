//! Checks against an agent running as PID 1 in a real guest booted by hand (the VM tests of
//! `smolvm-cli` run the same agent as PID 1 through the runtime). Ignored: run it with
//! `cargo test -p smolvm-agent --test guest -- --ignored`, with `SMOLVM_AGENT_GUEST_SOCKET`
//! naming the host end of the guest's agent port (a QEMU `-chardev socket,...,server=on`
//! path), e.g. when debugging an image by hand (see CONTRIBUTING.md). With
//! `SMOLVM_AGENT_GUEST_END=poweroff` it then sends SIGPWR to PID 1 (clean power-off), with
//! `=shutdown` it sends a `Shutdown` request (the same, asked through the protocol), with
//! `=crash` it kills the server (PID 1 then reboots, which ends QEMU under `-no-reboot`).
//!
//! It also counts its runs in the persistent environment (`GUEST_TEST_RUNS`), so booting the
//! same disk again shows that the environment survived the reboot.
//!
//! One test only, so that `SMOLVM_AGENT_GUEST_END` acts after the checks: QEMU serves one
//! connection at a time.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_bytes::ByteBuf;
use smolvm_protocol::{GuestMessage, Hello, HostMessage, PROTOCOL_VERSION};
use support::*;

const SOCKET_VAR: &str = "SMOLVM_AGENT_GUEST_SOCKET";

async fn guest() -> Client {
    let path = std::env::var(SOCKET_VAR).unwrap_or_else(|_| {
        panic!(
            "set {SOCKET_VAR} to the host end of a booted guest's agent port \
             (see CONTRIBUTING.md, \"Tests that do not run by default\")"
        )
    });
    let io = tokio::net::UnixStream::connect(&path)
        .await
        .unwrap_or_else(|e| panic!("connect to the guest's agent port {path}: {e}"));
    Client::new(io)
}

#[tokio::test]
#[ignore = "needs a guest booted by hand: set SMOLVM_AGENT_GUEST_SOCKET and run with --ignored"]
async fn guest_boots_hands_over_identity_and_runs_commands() {
    let client = guest().await;
    let now_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut r = client.open().await;
    r.send(&HostMessage::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        host_time_unix_ns: now_ns,
        hostname: "guest-test".into(),
        entropy: ByteBuf::from(vec![0x42; 64]),
        free_page_reporting: true,
    }))
    .await;
    let Some(GuestMessage::Hello(reply)) = r.recv().await else {
        panic!("expected a hello reply")
    };
    eprintln!("hello reply: {reply:?}");
    assert_eq!(reply.hostname, "guest-test");

    let out = client
        .exec(shell(
            "cat /proc/1/comm; hostname; date +%s; ls -d /dev/pts /dev/shm /dev/fd; \
             grep -E ' (/|/tmp|/run|/dev/pts|/dev/shm|/proc|/sys|/dev) ' /proc/mounts | cut -d' ' -f2,3; \
             cat /sys/class/net/lo/flags; ps -o pid=,rss=,comm= -p 1,$PPID",
        ))
        .await;
    eprintln!("{}", out.stdout_str());
    eprintln!("stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.exit().code, Some(0));
    let text = out.stdout_str();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("init"), "PID 1 is the agent, as /init");
    assert_eq!(lines.next(), Some("guest-test"));
    let guest_secs: u64 = lines.next().unwrap().parse().unwrap();
    assert!(
        guest_secs.abs_diff(now_ns / 1_000_000_000) < 30,
        "clock set from Hello"
    );
    assert!(text.contains("\n0x9\n"), "lo is up (IFF_UP | IFF_LOOPBACK)");
    for mount in [
        "/ ext4",
        "/tmp tmpfs",
        "/run tmpfs",
        "/dev/pts devpts",
        "/dev/shm tmpfs",
    ] {
        assert!(text.contains(mount), "{mount} missing");
    }

    // Timeouts kill the whole group in the guest too; PID 1 reaps the orphans.
    let mut req = shell("sleep 600 & sleep 600");
    req.timeout_ms = Some(500);
    let out = client.exec(req).await;
    assert!(out.exit().timed_out);
    let pgid = out.pid.unwrap();
    // Looks until the group is empty or PATIENCE has passed; the assertion below then says
    // what was left.
    let start = std::time::Instant::now();
    let out = loop {
        let out = client
            .exec(shell(&format!(
                "ps -e -o pgid=,stat=,comm= >/tmp/ps.txt && awk '$1 == {pgid}' /tmp/ps.txt"
            )))
            .await;
        assert_eq!(out.exit().code, Some(0), "ps works: {out:?}");
        if out.stdout_str().is_empty() || start.elapsed() > PATIENCE {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        out.stdout_str(),
        "",
        "no process (not even a zombie) left in the group"
    );

    // The persistent environment: kept on the root disk, seen by commands and login shells.
    let GuestMessage::Env(before) = client.env(Default::default()).await else {
        panic!("expected the environment")
    };
    eprintln!("persistent environment at start: {before:?}");
    let runs: u64 = before
        .iter()
        .find(|(k, _)| k == "GUEST_TEST_RUNS")
        .map_or(0, |(_, v)| v.parse().expect("a count"));
    let runs = (runs + 1).to_string();
    let reply = client
        .env(env_set(&[
            ("GUEST_TEST_RUNS", &runs),
            ("GUEST_QUOTE", "it's $HOME"),
        ]))
        .await;
    assert!(matches!(reply, GuestMessage::Env(_)), "{reply:?}");
    let out = client
        .exec(shell(
            "printf '%s|%s\\n' \"$GUEST_TEST_RUNS\" \"$GUEST_QUOTE\"; \
             env -i /bin/sh -lc 'printf \"%s|%s\\n\" \"$GUEST_TEST_RUNS\" \"$GUEST_QUOTE\"'; \
             stat -c %a /etc/smolvm/env /etc/profile.d/smolvm_env.sh; df -k / | tail -1",
        ))
        .await;
    eprintln!("{}", out.stdout_str());
    let text = out.stdout_str();
    let mut lines = text.lines();
    let expected = format!("{runs}|it's $HOME");
    assert_eq!(lines.next(), Some(expected.as_str()), "exec sees it");
    assert_eq!(lines.next(), Some(expected.as_str()), "login shell sees it");
    assert_eq!(lines.next(), Some("600"));
    assert_eq!(lines.next(), Some("600"));

    let Ok(how) = std::env::var("SMOLVM_AGENT_GUEST_END") else {
        return;
    };
    if how == "shutdown" {
        let mut r = client.open().await;
        r.send(&HostMessage::Shutdown).await;
        assert_eq!(r.recv().await, Some(GuestMessage::Ok));
        assert_eq!(r.recv().await, None, "the stream ends after Ok");
        return;
    }
    let line = match how.as_str() {
        "poweroff" => "kill -PWR 1; sleep 600",
        "crash" => "kill -KILL $PPID; sleep 600",
        other => panic!("unknown SMOLVM_AGENT_GUEST_END {other}"),
    };
    let mut r = client.open().await;
    r.send(&HostMessage::Exec(shell(line))).await;
    let Some(GuestMessage::Started { .. }) = r.recv().await else {
        panic!("expected Started");
    };
    let out = r.collect().await;
    assert!(
        out.exit.is_none() && out.error.is_none(),
        "the stream ends with the guest: {out:?}"
    );
}

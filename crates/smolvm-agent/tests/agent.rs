//! End-to-end tests of the agent server over `--listen-unix`: the same code path as in a
//! guest, with the commands running on this machine.

mod support;

use futures::SinkExt;
use serde_bytes::ByteBuf;
use smolvm_protocol::{
    encode, EnvUpdate, ErrorKind, GuestMessage, HostMessage, WireError, MAX_CHUNK, PROTOCOL_VERSION,
};
use support::*;

#[tokio::test]
async fn handshake_reports_the_agent_and_answers_pings() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let mut r = client.open().await;
    r.send(&hello(PROTOCOL_VERSION)).await;
    let Some(GuestMessage::Hello(reply)) = r.recv().await else {
        panic!("expected a hello reply");
    };
    assert_eq!(reply.protocol_version, PROTOCOL_VERSION);
    assert_eq!(reply.agent_version, env!("CARGO_PKG_VERSION"));
    let uname = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .unwrap();
    assert_eq!(
        reply.kernel_release,
        String::from_utf8_lossy(&uname.stdout).trim()
    );
    assert!(!reply.hostname.is_empty());
    assert!(reply.boot_ms > 0);
    // The handshake stream keeps answering pings.
    r.send(&HostMessage::Ping(7)).await;
    assert_eq!(r.recv().await, Some(GuestMessage::Pong(7)));
}

#[tokio::test]
async fn handshake_refuses_another_protocol_version() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let mut r = client.open().await;
    r.send(&hello(PROTOCOL_VERSION + 1)).await;
    assert_eq!(
        r.recv().await,
        Some(GuestMessage::Error(WireError::new(
            ErrorKind::Refused,
            format!(
                "protocol version mismatch: host speaks {}, agent speaks {PROTOCOL_VERSION}",
                PROTOCOL_VERSION + 1
            )
        )))
    );
    assert_eq!(r.recv().await, None, "the stream ends after the error");
}

#[tokio::test]
async fn ping_stream_answers_repeatedly() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let mut r = client.open().await;
    for n in [1, 2, u64::MAX] {
        r.send(&HostMessage::Ping(n)).await;
        assert_eq!(r.recv().await, Some(GuestMessage::Pong(n)));
    }
}

#[tokio::test]
async fn echo_through_shell_and_argv() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let out = client.exec(shell("echo hello; echo world")).await;
    assert_eq!(out.stdout_str(), "hello\nworld\n");
    assert_eq!(out.exit().code, Some(0));
    assert!(out.pid.is_some(), "Started comes first");
    assert_eq!(out.after_end, 0);

    // argv is not run through a shell: `$HOME` stays literal.
    let out = client.exec(argv(&["echo", "a b", "$HOME"])).await;
    assert_eq!(out.stdout_str(), "a b $HOME\n");
    assert_eq!(out.exit().code, Some(0));
}

#[tokio::test]
async fn exit_codes_and_signals() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    for code in [0, 1, 42] {
        let exit = client.exec(shell(&format!("exit {code}"))).await.exit();
        assert_eq!((exit.code, exit.signal), (Some(code), None));
        assert!(!exit.timed_out);
    }
    let exit = client.exec(shell("kill -TERM $$")).await.exit();
    assert_eq!((exit.code, exit.signal), (None, Some(15)));
}

#[tokio::test]
async fn stderr_is_kept_apart() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let out = client
        .exec(shell("echo out; echo err >&2; echo out2"))
        .await;
    assert_eq!(out.stdout_str(), "out\nout2\n");
    assert_eq!(out.stderr, b"err\n");
}

#[tokio::test]
async fn environment_and_working_directory() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let dir = tempfile::tempdir().unwrap();
    let mut req =
        shell("printf '%s|%s|%s|%s|%s' \"$FOO\" \"$HOME\" \"$TERM\" \"$PATH\" \"$(pwd)\"");
    req.env = vec![
        ("FOO".into(), "bar = baz".into()),
        ("TERM".into(), "xterm".into()),
    ];
    req.cwd = Some(dir.path().to_string_lossy().into_owned());
    let out = client.exec(req).await;
    assert_eq!(
        out.stdout_str(),
        format!(
            "bar = baz|/root|xterm|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|{}",
            dir.path().canonicalize().unwrap().display()
        )
    );
    // Nothing of the agent's own environment leaks through (the shell may add PWD, SHLVL, _).
    let out = client.exec(shell("env | cut -d= -f1")).await;
    let names: Vec<String> = out.stdout_str().lines().map(str::to_owned).collect();
    for base in ["HOME", "LANG", "LOGNAME", "PATH", "TERM", "USER"] {
        assert!(
            names.iter().any(|n| n == base),
            "{base} missing from {names:?}"
        );
    }
    for name in &names {
        assert!(
            ["HOME", "LANG", "LOGNAME", "PATH", "TERM", "USER", "PWD", "SHLVL", "_"]
                .contains(&name.as_str()),
            "unexpected variable {name}"
        );
    }
    // Default working directory.
    let out = client.exec(argv(&["pwd"])).await;
    let expected = if std::path::Path::new("/root").is_dir() {
        "/root\n"
    } else {
        "/\n"
    };
    assert_eq!(out.stdout_str(), expected);
}

#[tokio::test]
async fn bad_requests_get_errors() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let mut req = shell("true");
    req.cwd = Some("/no/such/dir".into());
    let out = client.exec(req).await;
    assert_eq!(
        out.error,
        Some(WireError::new(
            ErrorKind::NotFound,
            "working directory /no/such/dir does not exist"
        ))
    );
    assert_eq!(out.pid, None);

    let out = client.exec(argv(&["no-such-program-smolvm"])).await;
    assert_eq!(
        out.error,
        Some(WireError::new(
            ErrorKind::NotFound,
            "failed to start `no-such-program-smolvm`: No such file or directory"
        ))
    );

    let mut req = shell("true");
    req.cwd = Some("/etc/hostname".into());
    let out = client.exec(req).await;
    assert_eq!(out.error.unwrap().kind, ErrorKind::InvalidInput);

    let out = client.exec(argv(&[])).await;
    let e = out.error.unwrap();
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    assert!(e.message.contains("empty command"), "{e}");

    let mut req = shell("true");
    req.env = vec![("A=B".into(), "x".into())];
    let out = client.exec(req).await;
    let e = out.error.unwrap();
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    assert!(
        e.message.contains("invalid environment variable name"),
        "{e}"
    );
}

#[tokio::test]
async fn garbage_and_misplaced_first_frames_are_refused() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let mut r = client.open().await;
    r.send_raw(vec![0xff; 40]).await;
    let Some(GuestMessage::Error(e)) = r.recv().await else {
        panic!("expected an error");
    };
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    assert!(e.message.starts_with("malformed request"), "{e}");
    assert_eq!(r.recv().await, None);

    let mut r = client.open().await;
    r.send(&HostMessage::Stdin(ByteBuf::from(b"x".to_vec())))
        .await;
    let Some(GuestMessage::Error(e)) = r.recv().await else {
        panic!("expected an error");
    };
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    assert!(e.message.contains("unexpected first message Stdin"), "{e}");

    // The session survives all that.
    assert!(matches!(client.handshake().await, GuestMessage::Hello(_)));
}

#[tokio::test]
async fn stdin_round_trip() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let mut req = argv(&["cat"]);
    req.stdin = true;
    let r = client.open().await;
    let (mut tx, mut rx) = r.split();
    let input: Vec<u8> = (0..(1 << 20) + 123).map(|i| (i * 7 % 251) as u8).collect();
    let sent = input.clone();
    let writer = tokio::spawn(async move {
        tx.send(encode(&HostMessage::Exec(req)).unwrap().into())
            .await
            .unwrap();
        for chunk in sent.chunks(MAX_CHUNK) {
            let msg = HostMessage::Stdin(ByteBuf::from(chunk.to_vec()));
            tx.send(encode(&msg).unwrap().into()).await.unwrap();
        }
        tx.send(encode(&HostMessage::StdinEof).unwrap().into())
            .await
            .unwrap();
        tx // keep our side open until the end
    });
    let out = collect_from(&mut rx).await;
    let _tx = writer.await.unwrap();
    assert_eq!(out.exit().code, Some(0));
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input);
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let mut req = shell("sleep 600 & sleep 600");
    req.timeout_ms = Some(300);
    // The command runs 600 s: the exec comes back (within the client's patience) only
    // because the timeout ended it.
    let out = client.exec(req).await;
    let exit = out.exit();
    assert!(exit.timed_out);
    assert_eq!(exit.signal, Some(9));
    let pgid = out.pid.unwrap();
    wait_group_gone(pgid, PATIENCE).await;
}

#[tokio::test]
async fn output_past_the_cap_is_dropped_and_flagged() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let mut req = shell("head -c 5242880 /dev/zero; echo small >&2");
    req.max_output_bytes = 1 << 20;
    let out = client.exec(req).await;
    let exit = out.exit();
    assert_eq!(exit.code, Some(0), "the producer is not blocked by the cap");
    assert_eq!(out.stdout.len(), 1 << 20);
    assert!(exit.stdout_truncated);
    assert!(!exit.stderr_truncated);
    assert_eq!(out.stderr, b"small\n");
}

#[tokio::test]
async fn output_is_raw_bytes() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let out = client.exec(shell(r"printf '\377\376\000\001\n'")).await;
    assert_eq!(out.stdout, [0xff, 0xfe, 0x00, 0x01, b'\n']);
}

#[tokio::test]
async fn concurrent_execs_run_in_parallel() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    // Each run waits (up to 20 s) until all four have started: run one after another, the
    // first would wait alone and fail.
    let barrier = tempfile::tempdir().unwrap();
    let dir = barrier.path().display();
    let runs = (0..4).map(|i| {
        client.exec(shell(&format!(
            "touch {dir}/{i}; n=0; while [ $(ls {dir} | wc -l) -lt 4 ]; do \
               n=$((n+1)); [ $n -gt 400 ] && {{ echo alone; exit 1; }}; sleep 0.05; done; \
             echo {i}"
        )))
    });
    let outs = futures::future::join_all(runs).await;
    for (i, out) in outs.iter().enumerate() {
        assert_eq!(out.stdout_str(), format!("{i}\n"), "not concurrent");
        assert_eq!(out.exit().code, Some(0));
    }
}

#[tokio::test]
async fn closing_the_stream_kills_the_process() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let mut r = client.open().await;
    r.send(&HostMessage::Exec(shell("sleep 600 & sleep 600")))
        .await;
    let Some(GuestMessage::Started { pid }) = r.recv().await else {
        panic!("expected Started");
    };
    assert!(!live_group_members(pid).is_empty());
    drop(r);
    wait_group_gone(pid, PATIENCE).await;
}

#[tokio::test]
async fn dropping_the_session_kills_running_processes() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let mut r = client.open().await;
    r.send(&HostMessage::Exec(argv(&["sleep", "600"]))).await;
    let Some(GuestMessage::Started { pid }) = r.recv().await else {
        panic!("expected Started");
    };
    drop(client);
    wait_group_gone(pid, PATIENCE).await;
    // The agent accepts the next session.
    let client = agent.connect().await;
    assert!(matches!(client.handshake().await, GuestMessage::Hello(_)));
}

#[tokio::test]
async fn signals_reach_the_process_group() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let mut r = client.open().await;
    r.send(&HostMessage::Exec(argv(&["sleep", "600"]))).await;
    let Some(GuestMessage::Started { .. }) = r.recv().await else {
        panic!("expected Started");
    };
    r.send(&HostMessage::Signal(0)).await; // invalid: ignored
    r.send(&HostMessage::Signal(15)).await;
    let exit = r.collect().await.exit();
    assert_eq!(exit.signal, Some(15));
    assert!(!exit.timed_out);
}

#[tokio::test]
async fn background_process_holding_the_pipe_does_not_hang_the_exec() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    // The background job holds stdout for 600 s: the exec comes back (within the client's
    // patience) only if the agent does not wait for the pipe to close.
    let out = client.exec(shell("sleep 600 & echo done")).await;
    assert_eq!(out.stdout_str(), "done\n");
    assert_eq!(out.exit().code, Some(0));
    // The background process was left running (that is allowed); clean it up.
    let pgid = out.pid.unwrap();
    assert!(!live_group_members(pgid).is_empty());
    // SAFETY: signalling our own test's process group.
    unsafe { libc::kill(-(pgid as i32), libc::SIGKILL) };
}

#[tokio::test]
async fn garbage_on_the_connection_ends_only_that_session() {
    use tokio::io::AsyncWriteExt;
    let agent = Agent::start().await;
    let mut raw = tokio::net::UnixStream::connect(&agent.socket)
        .await
        .unwrap();
    raw.write_all(&[0xee; 4096]).await.unwrap();
    drop(raw);
    let client = agent.connect().await;
    assert!(matches!(client.handshake().await, GuestMessage::Hello(_)));
}

#[tokio::test]
async fn output_written_just_before_a_late_exit_is_delivered() {
    // Regression: the post-exit drain window must count from the exit, not from the start.
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let out = client
        .exec(shell("sleep 0.4; echo late; echo late-err >&2"))
        .await;
    assert_eq!(out.stdout_str(), "late\n");
    assert_eq!(out.stderr, b"late-err\n");
}

#[tokio::test]
async fn commands_get_default_signal_dispositions() {
    // The agent ignores SIGPIPE for itself; its commands must not inherit that.
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let out = client
        .exec(shell(
            "yes | head -c 1 >/dev/null; s=${PIPESTATUS[0]:-141}; echo $s",
        ))
        .await;
    assert_eq!(out.stderr, b"", "no 'Broken pipe' complaint from yes");
    // Killed by SIGPIPE (128+13), as with a default disposition; an ignored SIGPIPE
    // would make it complain and exit 1.
    assert_eq!(out.stdout_str(), "141\n");
}

// --- persistent environment (protocol generation 2) ---

const ENV_FILE: &str = "etc/smolvm/env";
const PROFILE_FILE: &str = "etc/profile.d/smolvm_env.sh";

/// Values that break naive quoting or parsing.
const NASTY: [(&str, &str); 9] = [
    ("QUOTES", "it's \"quoted\" '' '\\'' end'"),
    ("NEWLINES", "line one\nline two\n\n"),
    ("DOLLARS", "$HOME ${PATH} $(echo no) `echo no` $$"),
    ("BACKSLASH", "\\n \\ \\\\ \\'"),
    ("UNICODE", "ünïcödé ✓ 日本語 \u{1F980}"),
    ("SHELLY", "; rm -rf / & | > < * ? [a] ~ # ! {a,b}"),
    ("EMPTY", ""),
    ("DASH", "-n"),
    ("EQUALS", "a=b=c"),
];

#[tokio::test]
async fn env_set_read_unset_clear_round_trip() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    assert_eq!(client.env_now().await, []);
    assert_eq!(
        client
            .env(env_set(&[("B", "2"), ("A", "1"), ("C", "3")]))
            .await,
        GuestMessage::Env(pairs(&[("A", "1"), ("B", "2"), ("C", "3")])),
        "the whole environment, sorted by name"
    );
    assert_eq!(
        client.env_now().await,
        pairs(&[("A", "1"), ("B", "2"), ("C", "3")])
    );
    let update = EnvUpdate {
        clear: false,
        unset: vec!["A".into(), "NEVER_SET".into()],
        set: pairs(&[("B", "two"), ("D", "4")]),
    };
    assert_eq!(
        client.env(update).await,
        GuestMessage::Env(pairs(&[("B", "two"), ("C", "3"), ("D", "4")]))
    );
    // clear, then unset, then set.
    let update = EnvUpdate {
        clear: true,
        unset: vec!["E".into()],
        set: pairs(&[("E", "5")]),
    };
    assert_eq!(
        client.env(update).await,
        GuestMessage::Env(pairs(&[("E", "5")]))
    );
    assert!(agent.root.join(ENV_FILE).is_file());
    let clear = EnvUpdate {
        clear: true,
        ..EnvUpdate::default()
    };
    assert_eq!(client.env(clear).await, GuestMessage::Env(vec![]));
    assert!(!agent.root.join(ENV_FILE).exists(), "empty: files removed");
    assert!(!agent.root.join(PROFILE_FILE).exists());
}

#[tokio::test]
async fn execs_see_the_persistent_environment_under_their_own() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let mut update = env_set(&[("FOO", "persistent"), ("BAR", "kept"), ("LANG", "C")]);
    update.set.extend(pairs(&NASTY));
    assert!(matches!(client.env(update).await, GuestMessage::Env(_)));

    let mut req = shell("printf '%s|%s|%s|%s' \"$FOO\" \"$BAR\" \"$LANG\" \"$HOME\"");
    req.env = pairs(&[("FOO", "request wins")]);
    let out = client.exec(req).await;
    assert_eq!(out.exit().code, Some(0));
    assert_eq!(
        out.stdout_str(),
        "request wins|kept|C|/root",
        "base < persistent < request"
    );
    for (name, value) in NASTY {
        let out = client.exec(shell(&format!("printf %s \"${name}\""))).await;
        assert_eq!(out.stdout_str(), value, "{name}");
    }
    // A later change is seen by later commands.
    let unset = EnvUpdate {
        unset: vec!["FOO".into()],
        ..EnvUpdate::default()
    };
    assert!(matches!(client.env(unset).await, GuestMessage::Env(_)));
    let out = client.exec(shell("printf %s \"${FOO-unset}\"")).await;
    assert_eq!(out.stdout_str(), "unset");
}

#[tokio::test]
async fn bad_names_and_values_are_refused_and_change_nothing() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let before = env_set(&[("KEEP", "me")]);
    assert!(matches!(client.env(before).await, GuestMessage::Env(_)));
    let env_file = std::fs::read(agent.root.join(ENV_FILE)).unwrap();
    let profile = std::fs::read(agent.root.join(PROFILE_FILE)).unwrap();
    let long_name = "N".repeat(257);
    let huge = "v".repeat(128 * 1024);
    let bad_updates: Vec<(EnvUpdate, &str)> = vec![
        (env_set(&[("OK", "1"), ("1BAD", "x")]), "\"1BAD\""),
        (env_set(&[("A-B", "x")]), "\"A-B\""),
        (env_set(&[("A=B", "x")]), "\"A=B\""),
        (env_set(&[("", "x")]), "\"\""),
        (env_set(&[("SP ACE", "x")]), "\"SP ACE\""),
        (env_set(&[("ÄÖ", "x")]), "\"ÄÖ\""),
        (env_set(&[(&long_name, "x")]), "at most 256 bytes"),
        (env_set(&[("NUL", "a\0b")]), "NUL"),
        (env_set(&[("HUGE", &huge)]), "HUGE"),
        (
            EnvUpdate {
                clear: true,
                unset: vec!["$(reboot)".into()],
                set: vec![],
            },
            "\"$(reboot)\"",
        ),
    ];
    for (update, named) in bad_updates {
        let reply = client.env(update.clone()).await;
        let GuestMessage::Error(err) = reply else {
            panic!("{update:?} accepted: {reply:?}")
        };
        assert_eq!(err.kind, ErrorKind::InvalidInput, "{err}");
        let msg = err.message;
        assert!(msg.contains(named), "{msg:?} should name {named}");
        assert!(msg.len() < 400, "short message: {msg}");
    }
    assert_eq!(client.env_now().await, pairs(&[("KEEP", "me")]));
    assert_eq!(std::fs::read(agent.root.join(ENV_FILE)).unwrap(), env_file);
    assert_eq!(
        std::fs::read(agent.root.join(PROFILE_FILE)).unwrap(),
        profile
    );
    let out = client.exec(shell("printf %s \"${OK-unset}\"")).await;
    assert_eq!(out.stdout_str(), "unset");
}

#[tokio::test]
async fn concurrent_env_updates_all_land() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let names: Vec<String> = (0..24).map(|i| format!("V{i:02}")).collect();
    let updates = names.iter().map(|n| client.env(env_set(&[(n, n)])));
    for reply in futures::future::join_all(updates).await {
        assert!(matches!(reply, GuestMessage::Env(_)), "{reply:?}");
    }
    let now = client.env_now().await;
    assert_eq!(
        now,
        names
            .iter()
            .map(|n| (n.clone(), n.clone()))
            .collect::<Vec<_>>()
    );
    let restarted = {
        drop(client);
        drop(agent.child);
        Agent::start_in(Some(&agent.root)).await
    };
    assert_eq!(restarted.connect().await.env_now().await, now);
}

#[tokio::test]
async fn the_environment_survives_an_agent_restart() {
    let root = tempfile::tempdir().unwrap();
    let mut update = env_set(&[("SURVIVES", "yes")]);
    update.set.extend(pairs(&NASTY));
    let expected = {
        let agent = Agent::start_in(Some(root.path())).await;
        let GuestMessage::Env(vars) = agent.connect().await.env(update).await else {
            panic!("expected the environment")
        };
        vars
    }; // killed here
    let agent = Agent::start_in(Some(root.path())).await;
    let client = agent.connect().await;
    assert_eq!(client.env_now().await, expected);
    let out = client.exec(shell("printf %s \"$SURVIVES\"")).await;
    assert_eq!(out.stdout_str(), "yes");
    let out = client.exec(shell("printf %s \"$NEWLINES\"")).await;
    assert_eq!(out.stdout_str(), "line one\nline two\n\n");
}

#[tokio::test]
async fn the_profile_file_reproduces_the_values_under_sh() {
    use std::os::unix::fs::PermissionsExt;
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let long = "'\"$`\\\n".repeat(10_000);
    let mut update = env_set(&[("LONG", &long)]);
    update.set.extend(pairs(&NASTY));
    assert!(matches!(
        client.env(update.clone()).await,
        GuestMessage::Env(_)
    ));
    let file = agent.root.join(PROFILE_FILE);
    for path in [&file, &agent.root.join(ENV_FILE)] {
        let mode = std::fs::metadata(path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
    }
    for (name, value) in &update.set {
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(". \"$1\"; printf %s \"${name}\""))
            .arg("sh")
            .arg(&file)
            .env_clear()
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(out.stderr, b"");
        assert_eq!(String::from_utf8(out.stdout).unwrap(), *value, "{name}");
    }
}

// --- shutdown ---

#[tokio::test]
async fn shutdown_answers_ok_and_the_server_exits() {
    let mut agent = Agent::start().await;
    let client = agent.connect().await;
    let mut running = client.open().await;
    running
        .send(&HostMessage::Exec(argv(&["sleep", "600"])))
        .await;
    let Some(GuestMessage::Started { pid }) = running.recv().await else {
        panic!("expected Started");
    };
    let mut r = client.open().await;
    r.send(&HostMessage::Shutdown).await;
    assert_eq!(r.recv().await, Some(GuestMessage::Ok));
    assert_eq!(r.recv().await, None, "the stream ends after Ok");
    let status = agent.wait_exit(PATIENCE).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(!agent.socket.exists(), "the socket is removed");
    wait_group_gone(pid, PATIENCE).await;
}

#[tokio::test]
async fn shutdown_is_refused_after_the_first_frame() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let mut r = client.open().await;
    r.send(&HostMessage::Ping(1)).await;
    assert_eq!(r.recv().await, Some(GuestMessage::Pong(1)));
    r.send(&HostMessage::Shutdown).await;
    let Some(GuestMessage::Error(e)) = r.recv().await else {
        panic!("expected an error");
    };
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    assert!(e.message.contains("Shutdown"), "{e}");
    // Still serving.
    assert!(matches!(client.handshake().await, GuestMessage::Hello(_)));
}

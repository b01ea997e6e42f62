use serde_bytes::ByteBuf;

use super::*;

fn sample_exec() -> HostMessage {
    HostMessage::Exec(ExecRequest {
        command: Command::Argv(vec!["echo".into(), "hi".into()]),
        env: vec![("A".into(), "b".into())],
        cwd: Some("/tmp".into()),
        stdin: true,
        timeout_ms: Some(1500),
        max_output_bytes: 1024,
    })
}

#[test]
fn roundtrip_blocking_frames() {
    let msgs = vec![
        sample_exec(),
        HostMessage::Stdin(ByteBuf::from(vec![0, 255, 10])),
        HostMessage::StdinEof,
        HostMessage::Signal(9),
        HostMessage::Ping(7),
    ];
    let mut buf = Vec::new();
    for m in &msgs {
        write_frame(&mut buf, m).unwrap();
    }
    let mut r = &buf[..];
    let mut back = Vec::new();
    while let Some(m) = read_frame::<_, HostMessage>(&mut r).unwrap() {
        back.push(m);
    }
    assert_eq!(back, msgs);
}

/// Fails when the wire format changes: bump PROTOCOL_VERSION and update VERSIONING.md.
/// Later generations only append variants, so these encodings still hold.
#[test]
fn wire_format_snapshot_v2() {
    let bytes = encode(&sample_exec()).unwrap();
    assert_eq!(
        bytes,
        vec![
            1, 1, 2, 4, b'e', b'c', b'h', b'o', 2, b'h', b'i', 1, 1, b'A', 1, b'b', 1, 4, b'/',
            b't', b'm', b'p', 1, 1, 0xdc, 0x0b, 0x80, 0x08
        ]
    );
    let exited = encode(&GuestMessage::Exited(ExitStatus {
        code: Some(42),
        signal: None,
        timed_out: false,
        stdout_truncated: true,
        stderr_truncated: false,
        duration_ms: 3,
    }))
    .unwrap();
    assert_eq!(exited, vec![4, 1, 84, 0, 0, 1, 0, 3]);
    // Generation 2 appended variants; the earlier ones keep their tags.
    let env = encode(&HostMessage::Env(EnvUpdate {
        clear: true,
        unset: vec!["X".into()],
        set: vec![("A".into(), "b".into())],
    }))
    .unwrap();
    assert_eq!(env, vec![6, 1, 1, 1, b'X', 1, 1, b'A', 1, b'b']);
    assert_eq!(encode(&HostMessage::Shutdown).unwrap(), vec![7]);
    assert_eq!(encode(&GuestMessage::Ok).unwrap(), vec![8]);
}

/// Generation 3: port forwarding (`Connect`, `Expose`, `Unexpose`, `Forwards`).
#[test]
fn wire_format_snapshot_v3() {
    const { assert!(PROTOCOL_VERSION >= 3) };
    // 8080 as a varint is 0x90 0x3f.
    assert_eq!(
        encode(&HostMessage::Connect { port: 8080 }).unwrap(),
        vec![8, 0x90, 0x3f]
    );
    let expose = encode(&ApiRequest::Expose {
        guest_port: 80,
        host_port: Some(8080),
        bind: Some("127.0.0.1".into()),
    })
    .unwrap();
    let mut want = vec![4, 80, 1, 0x90, 0x3f, 1, 9];
    want.extend_from_slice(b"127.0.0.1");
    assert_eq!(expose, want);
    assert_eq!(
        encode(&ApiRequest::Expose {
            guest_port: 1,
            host_port: None,
            bind: None
        })
        .unwrap(),
        vec![4, 1, 0, 0]
    );
    assert_eq!(
        encode(&ApiRequest::Unexpose { host_port: 8080 }).unwrap(),
        vec![5, 0x90, 0x3f]
    );
    assert_eq!(encode(&ApiRequest::Forwards).unwrap(), vec![6]);
    let info = ForwardInfo {
        host_addr: "127.0.0.1".into(),
        host_port: 8080,
        guest_port: 80,
    };
    let mut want = vec![4, 9];
    want.extend_from_slice(b"127.0.0.1");
    want.extend_from_slice(&[0x90, 0x3f, 80]);
    assert_eq!(encode(&ApiReply::Forward(info.clone())).unwrap(), want);
    let mut want = vec![5, 1, 9];
    want.extend_from_slice(b"127.0.0.1");
    want.extend_from_slice(&[0x90, 0x3f, 80]);
    assert_eq!(encode(&ApiReply::Forwards(vec![info])).unwrap(), want);
}

/// Generation 4: snapshots (`Network`, `Pause`, `Resume`, `Snapshot`).
#[test]
fn wire_format_snapshot_v4() {
    const { assert!(PROTOCOL_VERSION >= 4) };
    let net = crate::boot::GuestNet {
        addr: std::net::Ipv4Addr::new(172, 16, 0, 2),
        prefix: 32,
        gateway: std::net::Ipv4Addr::new(172, 16, 0, 1),
        dns: vec![std::net::Ipv4Addr::new(9, 9, 9, 9)],
        mtu: 1500,
    };
    // An address is a length-prefixed tuple of four octets in postcard.
    let want = vec![
        9, 172, 16, 0, 2, 32, 172, 16, 0, 1, 1, 9, 9, 9, 9, 0xdc, 0x0b,
    ];
    assert_eq!(encode(&HostMessage::Network(net.clone())).unwrap(), want);
    assert_eq!(
        decode::<HostMessage>(&want).unwrap(),
        HostMessage::Network(net)
    );
    assert_eq!(encode(&ApiRequest::Pause).unwrap(), vec![7]);
    assert_eq!(encode(&ApiRequest::Resume).unwrap(), vec![8]);
    assert_eq!(
        encode(&ApiRequest::Snapshot { dir: "/s".into() }).unwrap(),
        vec![9, 2, b'/', b's']
    );
}

/// Generation 5: `HelloReply` ends with the guest's clocksource. The handshake's layout is
/// frozen from here on.
#[test]
fn wire_format_snapshot_v5() {
    const { assert!(PROTOCOL_VERSION >= 5) };
    let hello = GuestMessage::Hello(HelloReply {
        protocol_version: 5,
        agent_version: "1".into(),
        kernel_release: "k".into(),
        hostname: "h".into(),
        boot_ms: 2,
        clocksource: "tsc".into(),
    });
    let want = vec![0, 5, 1, b'1', 1, b'k', 1, b'h', 2, 3, b't', b's', b'c'];
    assert_eq!(encode(&hello).unwrap(), want);
    assert_eq!(decode::<GuestMessage>(&want).unwrap(), hello);
    let hello = HostMessage::Hello(Hello {
        protocol_version: 5,
        host_time_unix_ns: 1,
        hostname: "h".into(),
        entropy: ByteBuf::from(vec![7]),
        free_page_reporting: true,
    });
    let want = vec![0, 5, 1, 1, b'h', 1, 7, 1];
    assert_eq!(encode(&hello).unwrap(), want);
    assert_eq!(decode::<HostMessage>(&want).unwrap(), hello);
}

/// Generation 6: errors carry a kind (`GuestMessage::Error` and `ApiReply::Error` hold a
/// `WireError`); the supervisor API starts every connection with a frozen `ApiHello`.
#[test]
fn wire_format_snapshot_v6() {
    assert_eq!(PROTOCOL_VERSION, 6);
    assert_eq!(API_VERSION, 1);
    // The kinds' tags, in order; new kinds are only appended.
    let kinds = [
        ErrorKind::NotFound,
        ErrorKind::InvalidInput,
        ErrorKind::Timeout,
        ErrorKind::GuestGone,
        ErrorKind::Refused,
        ErrorKind::Busy,
        ErrorKind::Io,
        ErrorKind::Unsupported,
    ];
    for (tag, kind) in kinds.into_iter().enumerate() {
        assert_eq!(encode(&kind).unwrap(), vec![tag as u8], "{kind}");
    }
    let err = WireError::new(ErrorKind::NotFound, "no");
    let want = vec![5, 0, 2, b'n', b'o'];
    assert_eq!(encode(&GuestMessage::Error(err.clone())).unwrap(), want);
    assert_eq!(
        decode::<GuestMessage>(&want).unwrap(),
        GuestMessage::Error(err.clone())
    );
    let want = vec![2, 3, 1, b'x'];
    let gone = WireError::new(ErrorKind::GuestGone, "x");
    assert_eq!(encode(&ApiReply::Error(gone.clone())).unwrap(), want);
    assert_eq!(decode::<ApiReply>(&want).unwrap(), ApiReply::Error(gone));
    // The hello and its reply: frozen for every API version to come.
    let hello = ApiHello {
        magic: API_MAGIC,
        api_version: 1,
    };
    let want = vec![b's', b'm', b'v', b'A', 1];
    assert_eq!(encode(&hello).unwrap(), want);
    assert_eq!(decode::<ApiHello>(&want).unwrap(), hello);
    let ok = ApiHelloReply {
        magic: API_MAGIC,
        api_version: 1,
        refused: None,
    };
    assert_eq!(encode(&ok).unwrap(), vec![b's', b'm', b'v', b'A', 1, 0]);
    let refused = ApiHelloReply {
        magic: API_MAGIC,
        api_version: 300,
        refused: Some(WireError::new(ErrorKind::Refused, "v")),
    };
    // 300 as a varint is 0xac 0x02.
    let want = vec![b's', b'm', b'v', b'A', 0xac, 0x02, 1, 4, 1, b'v'];
    assert_eq!(encode(&refused).unwrap(), want);
    assert_eq!(decode::<ApiHelloReply>(&want).unwrap(), refused);
    // A hello's first byte is no request of the unversioned API (tags 0-9), so a supervisor
    // from before the hello refuses it as a bad request instead of carrying it out.
    assert!(API_MAGIC[0] > 9);
    // An unknown kind is a decode error, not a panic.
    assert!(decode::<GuestMessage>(&[5, 8, 0]).is_err());
}

#[test]
fn forward_messages_round_trip_and_bad_ports_are_refused() {
    let msgs = [
        HostMessage::Connect { port: 1 },
        HostMessage::Connect { port: u16::MAX },
    ];
    for m in msgs {
        assert_eq!(decode::<HostMessage>(&encode(&m).unwrap()).unwrap(), m);
    }
    let reqs = [
        ApiRequest::Expose {
            guest_port: 8000,
            host_port: Some(0),
            bind: Some("::1".into()),
        },
        ApiRequest::Unexpose { host_port: 1 },
        ApiRequest::Forwards,
    ];
    for r in reqs {
        assert_eq!(decode::<ApiRequest>(&encode(&r).unwrap()).unwrap(), r);
    }
    let v6 = ForwardInfo {
        host_addr: "::1".into(),
        host_port: 8080,
        guest_port: 80,
    };
    assert_eq!(v6.to_string(), "[::1]:8080 -> guest:80");
    // A port past u16 (65536 = 0x80 0x80 0x04) and a truncated varint are errors.
    assert!(decode::<HostMessage>(&[8, 0x80, 0x80, 0x04]).is_err());
    assert!(decode::<HostMessage>(&[8, 0x90]).is_err());
    assert!(decode::<HostMessage>(&[8]).is_err());
}

#[test]
fn oversized_frame_is_refused_before_allocation() {
    let mut buf = Vec::new();
    buf.extend_from_slice(&u32::MAX.to_le_bytes());
    let err = read_frame::<_, GuestMessage>(&mut &buf[..]).unwrap_err();
    assert!(matches!(err, ProtocolError::FrameTooLarge { .. }), "{err}");
}

#[test]
fn truncated_and_garbage_frames_are_errors() {
    let mut buf = Vec::new();
    write_frame(&mut buf, &GuestMessage::Pong(1)).unwrap();
    buf.pop();
    assert!(matches!(
        read_frame::<_, GuestMessage>(&mut &buf[..]),
        Err(ProtocolError::TruncatedFrame)
    ));
    let garbage = [3u8, 0, 0, 0, 0xff, 0xff, 0xff];
    assert!(matches!(
        read_frame::<_, GuestMessage>(&mut &garbage[..]),
        Err(ProtocolError::Decode(_))
    ));
    // Trailing bytes after a valid message are rejected too.
    let mut payload = encode(&GuestMessage::Pong(1)).unwrap();
    payload.push(0);
    assert!(decode::<GuestMessage>(&payload).is_err());
}

#[test]
fn empty_stream_is_clean_eof() {
    assert!(read_frame::<_, GuestMessage>(&mut &[][..])
        .unwrap()
        .is_none());
}

/// A cheap stand-in for the fuzzer on every test run: random and mutated frames never
/// panic the decoder and never allocate past the frame limit.
#[test]
fn garbage_never_panics() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut valid = Vec::new();
    write_frame(&mut valid, &sample_exec()).unwrap();
    write_frame(
        &mut valid,
        &GuestMessage::Error(WireError::new(ErrorKind::Busy, "taken")),
    )
    .unwrap();
    write_frame(
        &mut valid,
        &GuestMessage::Exited(ExitStatus {
            code: Some(1),
            ..Default::default()
        }),
    )
    .unwrap();
    for i in 0..50_000 {
        let len = (next() % 64) as usize;
        let mut data: Vec<u8> = if i % 2 == 0 {
            (0..len).map(|_| next() as u8).collect()
        } else {
            let mut v = valid.clone();
            for _ in 0..=(next() % 4) {
                let at = (next() as usize) % v.len();
                v[at] = next() as u8;
            }
            v
        };
        let _ = decode::<GuestMessage>(&data);
        let _ = decode::<HostMessage>(&data);
        let _ = decode::<ApiRequest>(&data);
        let _ = decode::<ApiReply>(&data);
        let _ = decode::<ApiHello>(&data);
        let _ = decode::<ApiHelloReply>(&data);
        let mut r = &data[..];
        while let Ok(Some(_)) = read_frame::<_, GuestMessage>(&mut r) {}
        data.clear();
    }
}

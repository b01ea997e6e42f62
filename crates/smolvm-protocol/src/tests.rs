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
#[test]
fn wire_format_snapshot_v2() {
    assert_eq!(PROTOCOL_VERSION, 2);
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
        let mut r = &data[..];
        while let Ok(Some(_)) = read_frame::<_, GuestMessage>(&mut r) {}
        data.clear();
    }
}

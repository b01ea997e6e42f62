//! `Connect` streams (port-forward tunnels) against the agent over `--listen-unix`: the
//! agent dials TCP services on this machine's loopback, as it would inside a guest.

mod support;

use std::time::Duration;

use futures::SinkExt;
use smolvm_protocol::{encode, ErrorKind, GuestMessage, HostMessage, WireError};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::compat::Compat;

/// A TCP service on 127.0.0.1 that reads until EOF, then answers with how many bytes it got
/// and a checksum of them, and closes.
async fn counting_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let (mut n, mut sum) = (0u64, 0u64);
                loop {
                    match c.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            n += k as u64;
                            sum = buf[..k]
                                .iter()
                                .fold(sum, |s, &b| s.wrapping_mul(31).wrapping_add(b as u64));
                        }
                    }
                }
                let _ = c.write_all(format!("{n} {sum}\n").as_bytes()).await;
            });
        }
    });
    port
}

/// A TCP service that greets first (as SSH or SMTP servers do), then echoes.
async fn banner_echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = c.write_all(b"HELLO\n").await;
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

/// A port nothing listens on.
async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

fn checksum(data: &[u8]) -> u64 {
    data.iter()
        .fold(0u64, |s, &b| s.wrapping_mul(31).wrapping_add(b as u64))
}

/// Opens a tunnel; returns the raw stream and the bytes that came after the `Ok` frame.
async fn tunnel(client: &Client, port: u16) -> (Compat<yamux::Stream>, Vec<u8>) {
    let mut r = client.open().await;
    r.send(&HostMessage::Connect { port }).await;
    assert_eq!(r.recv().await, Some(GuestMessage::Ok));
    let parts = r.framed.into_parts();
    (parts.io, parts.read_buf.to_vec())
}

#[tokio::test]
async fn a_tunnel_carries_a_mebibyte_each_way_with_half_close() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let port = counting_server().await;
    let (mut io, early) = tunnel(&client, port).await;
    assert!(early.is_empty());
    let data: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    io.write_all(&data).await.unwrap();
    // Our half ends; the service sees EOF and still answers on its half.
    io.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(PATIENCE, io.read_to_string(&mut answer))
        .await
        .expect("answer in time")
        .unwrap();
    assert_eq!(answer, format!("{} {}\n", data.len(), checksum(&data)));
}

#[tokio::test]
async fn bytes_sent_right_behind_the_request_are_not_lost() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let port = counting_server().await;
    let mut r = client.open().await;
    // The request frame and raw bytes in one write: the agent must hand the bytes it read
    // past the frame to the service.
    let mut wire = Vec::new();
    let req = encode(&HostMessage::Connect { port }).unwrap();
    wire.extend_from_slice(&(req.len() as u32).to_le_bytes());
    wire.extend_from_slice(&req);
    wire.extend_from_slice(b"early bytes");
    r.framed.get_mut().write_all(&wire).await.unwrap();
    r.framed.get_mut().flush().await.unwrap();
    assert_eq!(r.recv().await, Some(GuestMessage::Ok));
    let mut io = r.framed.into_parts().io;
    io.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(PATIENCE, io.read_to_string(&mut answer))
        .await
        .expect("answer in time")
        .unwrap();
    assert_eq!(answer, format!("11 {}\n", checksum(b"early bytes")));
}

#[tokio::test]
async fn a_service_that_speaks_first_is_heard() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let port = banner_echo_server().await;
    let (mut io, mut got) = tunnel(&client, port).await;
    while got.len() < 6 {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(PATIENCE, io.read(&mut buf))
            .await
            .expect("banner in time")
            .unwrap();
        assert!(n > 0, "tunnel closed before the banner");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"HELLO\n");
    io.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn a_port_without_a_service_is_refused_with_the_reason() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let port = closed_port().await;
    let mut r = client.open().await;
    r.send(&HostMessage::Connect { port }).await;
    let Some(GuestMessage::Error(e)) = r.recv().await else {
        panic!("expected an error");
    };
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    assert!(
        e.message
            .contains(&format!("nothing accepts connections on port {port}")),
        "{e}"
    );
    assert_eq!(r.recv().await, None, "the stream ends after the error");

    let mut r = client.open().await;
    r.send(&HostMessage::Connect { port: 0 }).await;
    assert!(matches!(
        r.recv().await,
        Some(GuestMessage::Error(WireError {
            kind: ErrorKind::InvalidInput,
            ..
        }))
    ));
}

#[tokio::test]
async fn ipv6_loopback_is_the_fallback() {
    let l = TcpListener::bind("[::1]:0").await.unwrap_or_else(|e| {
        panic!(
            "this test needs an IPv6 loopback ([::1]), which Linux has unless IPv6 is \
             disabled: {e}; to run the others, pass `--skip ipv6_loopback_is_the_fallback`"
        )
    });
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let _ = c.write_all(b"six").await;
        }
    });
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let (mut io, mut got) = tunnel(&client, port).await;
    tokio::time::timeout(PATIENCE, io.read_to_end(&mut got))
        .await
        .expect("data in time")
        .unwrap();
    assert_eq!(got, b"six");
}

#[tokio::test]
async fn many_tunnels_at_once() {
    let agent = Agent::start().await;
    let client = std::sync::Arc::new(agent.connect().await);
    let port = counting_server().await;
    let mut tasks = Vec::new();
    for i in 0..32u32 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let (mut io, _) = tunnel(&client, port).await;
            let data = vec![i as u8; 10_000 + i as usize];
            io.write_all(&data).await.unwrap();
            io.shutdown().await.unwrap();
            let mut answer = String::new();
            io.read_to_string(&mut answer).await.unwrap();
            assert_eq!(answer, format!("{} {}\n", data.len(), checksum(&data)));
        }));
    }
    for t in tasks {
        tokio::time::timeout(PATIENCE, t)
            .await
            .expect("tunnel done in time")
            .unwrap();
    }
}

/// Garbage as `Connect` requests, and garbage through tunnels, never panics the agent or
/// ends its session.
#[tokio::test]
async fn garbage_around_connect_never_hurts_the_agent() {
    let mut agent = Agent::start().await;
    let client = agent.connect().await;
    let echo = banner_echo_server().await;
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..200 {
        let mut r = client.open().await;
        // Tag 8 is `Connect`; what follows is random (bad varints, ports past u16, trailing
        // bytes, ports of nothing).
        let len = (next() % 8) as usize;
        let mut frame = vec![8u8];
        frame.extend((0..len).map(|_| next() as u8));
        if i % 3 == 0 {
            frame.truncate(1);
        }
        r.send_raw(frame).await;
        match r.recv().await {
            Some(GuestMessage::Error(_)) | None => {}
            Some(GuestMessage::Ok) => {
                // It happened to name a live port: close the tunnel.
                let mut parts = r.framed.into_parts();
                let _ = parts.io.shutdown().await;
            }
            Some(other) => panic!("unexpected answer {other:?}"),
        }
    }
    // Random bytes through a real tunnel come back unchanged (after the banner).
    let (mut io, mut got) = tunnel(&client, echo).await;
    let noise: Vec<u8> = (0..100_000).map(|_| next() as u8).collect();
    let (mut rd, mut wr) = tokio::io::split(&mut io);
    let write = async {
        wr.write_all(&noise).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let read = async {
        tokio::time::timeout(PATIENCE, rd.read_to_end(&mut got))
            .await
            .expect("echo in time")
            .unwrap();
    };
    tokio::join!(write, read);
    assert_eq!(&got[..6], b"HELLO\n");
    assert_eq!(&got[6..], &noise[..]);
    // Frames that are not requests at all (tags past the last variant, or `Connect` with a
    // random tail; never a tag that could run or stop anything), then the session still works.
    for _ in 0..50 {
        let mut r = client.open().await;
        let len = (next() % 32) as usize;
        let mut frame: Vec<u8> = (0..=len).map(|_| next() as u8).collect();
        frame[0] = frame[0].max(8);
        let _ = r.framed.send(bytes::Bytes::from(frame)).await;
        match tokio::time::timeout(Duration::from_secs(10), r.recv()).await {
            Ok(Some(GuestMessage::Error(_)) | None) => {}
            Ok(Some(GuestMessage::Ok)) => {
                let _ = r.framed.into_parts().io.shutdown().await;
            }
            Ok(Some(other)) => panic!("unexpected answer {other:?}"),
            Err(_) => panic!("no answer to a garbage frame"),
        }
    }
    assert!(matches!(client.handshake().await, GuestMessage::Hello(_)));
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent is still running"
    );
}

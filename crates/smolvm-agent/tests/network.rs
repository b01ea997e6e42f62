//! `Network` requests over `--listen-unix`. The agent looks for interfaces under its
//! `--root` (an empty directory here), so these tests never touch this machine's network.

mod support;

use std::time::Instant;

use smolvm_protocol::boot::GuestNet;
use smolvm_protocol::{ErrorKind, GuestMessage, HostMessage};
use support::*;

/// Sends `net` on a stream of its own; the one answer, after which the stream ends.
async fn network(client: &Client, net: GuestNet) -> GuestMessage {
    let mut r = client.open().await;
    r.send(&HostMessage::Network(net)).await;
    let reply = r.recv().await.expect("network reply");
    assert_eq!(r.recv().await, None, "the stream ends after the answer");
    reply
}

fn error_text(reply: GuestMessage, want: ErrorKind) -> String {
    match reply {
        GuestMessage::Error(why) => {
            assert_eq!(why.kind, want, "{why}");
            why.message
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn network_without_an_interface_is_a_clean_error() {
    let agent = Agent::start_with(None, &["--apply-identity"]).await;
    let client = agent.connect().await;
    // The agent looks for an interface for a while, then answers (within the client's
    // patience: a hang fails there).
    let start = Instant::now();
    let why = error_text(
        network(&client, GuestNet::user_mode()).await,
        ErrorKind::NotFound,
    );
    eprintln!("no interface: answered after {:?}", start.elapsed());
    assert!(why.contains("no Ethernet interface"), "{why}");
    assert!(why.contains("10.0.2.15/24"), "{why}");
    assert!(!agent.root.join("etc/resolv.conf").exists());
    // A malformed configuration is refused before anything is looked at.
    let bad = GuestNet {
        mtu: 1,
        ..GuestNet::user_mode()
    };
    let why = error_text(network(&client, bad).await, ErrorKind::InvalidInput);
    assert!(why.contains("mtu"), "{why}");
    // The session goes on.
    let out = client.exec(shell("echo still here")).await;
    assert_eq!(out.stdout_str(), "still here\n");
}

#[tokio::test]
async fn network_is_refused_without_apply_identity() {
    let agent = Agent::start().await;
    let client = agent.connect().await;
    let why = error_text(
        network(&client, GuestNet::user_mode()).await,
        ErrorKind::Unsupported,
    );
    assert!(why.contains("--apply-identity"), "{why}");
}

//! Telling host sessions apart on the virtio port.
//!
//! The port is one byte stream for the life of the VM, and the guest does not always see the
//! host reconnect: a quick reconnect, or a snapshot restored with its port already open, shows
//! no `POLLHUP` in between. A yamux session that goes on past such a reconnect refuses the new
//! host's streams ("stream already exists") or serves them stale state.
//!
//! The splitter follows the frame headers of the host's bytes on their way to yamux and ends
//! the current session (end-of-file) right before a header that only a new session sends, so
//! the next session starts with it:
//!
//! - the host's first ping: yamux (0.13 on) measures the round-trip time from its first
//!   poll, so a host session's very first frame is a ping (SYN) with opaque value 0; its
//!   later pings count up from there. It comes before any stream's frame, so the cut lands
//!   before every stream the new host opens, even when several open at once and the frame
//!   opening stream 1 is not the first of them on the wire (yamux writes the queued frames
//!   of different streams in no fixed order);
//! - the opening of stream 1 (a frame header with SYN on stream 1): a host session always
//!   opens it (its first stream id), and one session never sees it twice. This covers hosts
//!   whose first frame is not that ping.
//!
//! The first ping ends the current session only once it has seen a frame, the opening of
//! stream 1 only once it has seen stream 1 open, so neither ends the new session it starts.
//! When the port hangs up, what the old host left unread is dropped instead.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Size of a yamux frame header.
const HEADER_LEN: usize = 12;
/// yamux frame types that can open a stream: data and window update.
const OPENING_TYPES: [u8; 2] = [0, 1];
/// The data frame type (the only one with a body).
const TYPE_DATA: u8 = 0;
/// Highest known frame type (go-away).
const MAX_TYPE: u8 = 3;
/// The ping frame type.
const TYPE_PING: u8 = 2;
/// The SYN flag.
const FLAG_SYN: u16 = 1;
/// The first stream a yamux client opens.
const FIRST_CLIENT_STREAM: u32 = 1;
/// How much to read from the port at once.
const READ_SIZE: usize = 64 * 1024;

/// What a frame header says, as far as the splitter cares.
#[derive(Debug, PartialEq, Eq)]
enum Header {
    /// A frame of `len` bytes in all (header and body).
    Frame { len: u64, mark: Mark },
    /// Not a yamux header: the byte stream is out of step.
    Garbage,
}

/// Whether a frame may begin a host session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// The first ping a host sends (SYN, opaque value 0): a session's first frame.
    FirstPing,
    /// It opens stream 1: a session's first stream.
    OpensFirst,
    /// Any other frame.
    Other,
}

fn classify(h: &[u8]) -> Header {
    let (version, kind) = (h[0], h[1]);
    if version != 0 || kind > MAX_TYPE {
        return Header::Garbage;
    }
    let flags = u16::from_be_bytes([h[2], h[3]]);
    let stream = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    let length = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    let body = if kind == TYPE_DATA {
        u64::from(length)
    } else {
        0
    };
    let syn = flags & FLAG_SYN != 0;
    let mark = if kind == TYPE_PING && syn && stream == 0 && length == 0 {
        Mark::FirstPing
    } else if OPENING_TYPES.contains(&kind) && syn && stream == FIRST_CLIENT_STREAM {
        Mark::OpensFirst
    } else {
        Mark::Other
    };
    Header::Frame {
        len: HEADER_LEN as u64 + body,
        mark,
    }
}

/// Splits the byte stream `io` into consecutive host sessions.
pub struct Splitter<T> {
    io: T,
    /// Read from `io`, not yet handed to a session.
    pending: BytesMut,
    /// Bytes of the current frame still to hand over (0: at a header).
    frame_left: u64,
    /// Bytes to drop before the next header (the rest of a frame a failed session left).
    discard_left: u64,
    /// Whether `pending` starts where `frame_left` says; after garbage, bytes pass as they are.
    in_step: bool,
    /// Whether the current session was handed a frame header.
    seen_frame: bool,
    /// Whether the current session has seen stream 1 open.
    opened_first: bool,
    /// Whether the current session was ended before a new session's first frame.
    cut: bool,
    /// Whether `io` reported end-of-file (the host side closed) during the current session.
    hung_up: bool,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Splitter<T> {
    /// Starts at the beginning of a session.
    pub fn new(io: T) -> Self {
        Self {
            io,
            pending: BytesMut::new(),
            frame_left: 0,
            discard_left: 0,
            in_step: true,
            seen_frame: false,
            opened_first: false,
            cut: false,
            hung_up: false,
        }
    }

    /// Whether the last session was ended because a new host session began.
    pub fn was_cut(&self) -> bool {
        self.cut
    }

    /// Prepares the next session: after a hang-up, drops what the old host left; after a
    /// session that failed mid-frame, skips the rest of that frame.
    pub fn next_session(&mut self) {
        if self.hung_up {
            self.pending.clear();
            self.frame_left = 0;
            self.discard_left = 0;
            self.in_step = true;
        } else if !self.cut {
            self.discard_left = self.frame_left;
            self.frame_left = 0;
        }
        self.seen_frame = false;
        self.opened_first = false;
        self.cut = false;
        self.hung_up = false;
    }

    /// The I/O of the current session.
    pub fn session(&mut self) -> SessionIo<'_, T> {
        SessionIo(self)
    }

    /// Hands over what may go to the current session now; `None` when more input is needed.
    /// `Some(0)` means end-of-file for this session.
    fn deliver(&mut self, out: &mut ReadBuf<'_>) -> Option<usize> {
        loop {
            if self.cut {
                return Some(0);
            }
            if self.discard_left > 0 && !self.pending.is_empty() {
                let n = self.discard_left.min(self.pending.len() as u64) as usize;
                self.pending.advance(n);
                self.discard_left -= n as u64;
                continue;
            }
            if self.pending.is_empty() || self.discard_left > 0 {
                return None;
            }
            if !self.in_step || self.frame_left > 0 {
                let mut n = self.pending.len().min(out.remaining());
                if self.in_step {
                    n = n.min(usize::try_from(self.frame_left).unwrap_or(usize::MAX));
                    self.frame_left -= n as u64;
                }
                out.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Some(n);
            }
            if self.pending.len() < HEADER_LEN {
                return None;
            }
            match classify(&self.pending[..HEADER_LEN]) {
                Header::Garbage => self.in_step = false,
                Header::Frame { len, mark } => {
                    let begins = match mark {
                        Mark::FirstPing => self.seen_frame,
                        Mark::OpensFirst => self.opened_first,
                        Mark::Other => false,
                    };
                    if begins {
                        tracing::debug!("a new host session began; ending the current one");
                        self.cut = true;
                        return Some(0);
                    }
                    self.seen_frame = true;
                    self.opened_first |= mark == Mark::OpensFirst;
                    self.frame_left = len;
                }
            }
        }
    }
}

/// One session's view of the splitter's byte stream.
pub struct SessionIo<'a, T>(&'a mut Splitter<T>);

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for SessionIo<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let s = &mut *self.0;
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if s.deliver(out).is_some() {
                return Poll::Ready(Ok(()));
            }
            if s.hung_up {
                return Poll::Ready(Ok(()));
            }
            s.pending.reserve(READ_SIZE);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut s.io),
                cx,
                &mut s.pending
            ))?;
            if n == 0 {
                s.hung_up = true;
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for SessionIo<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The port outlives the session: a session ending must not close it.
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn header(kind: u8, flags: u16, stream: u32, len: u32) -> Vec<u8> {
        let mut h = vec![0, kind];
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&stream.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h
    }

    fn data(flags: u16, stream: u32, body: &[u8]) -> Vec<u8> {
        let mut f = header(0, flags, stream, body.len() as u32);
        f.extend_from_slice(body);
        f
    }

    /// One host session: a ping, stream 1 opened with data, a window update, stream 3.
    fn host_session(tag: u8) -> Vec<u8> {
        [
            header(2, FLAG_SYN, 0, 77),
            data(FLAG_SYN, 1, &[tag; 5]),
            header(1, 0, 1, 1000),
            data(FLAG_SYN, 3, &[tag; 300]),
            data(0, 1, &[tag; 2]),
        ]
        .concat()
    }

    async fn read_session<T: AsyncRead + AsyncWrite + Unpin>(s: &mut Splitter<T>) -> Vec<u8> {
        let mut got = Vec::new();
        s.session().read_to_end(&mut got).await.unwrap();
        got
    }

    #[tokio::test]
    async fn a_second_opening_of_stream_one_starts_a_new_session() {
        let (mut host, guest) = tokio::io::duplex(1 << 16);
        let (a, b) = (host_session(0xaa), host_session(0xbb));
        host.write_all(&a).await.unwrap();
        host.write_all(&b).await.unwrap();
        drop(host);
        let mut s = Splitter::new(guest);
        // A host whose first frame is not a first ping: that ping still reaches the old
        // session (which answers it); the cut comes right before stream 1 opens.
        assert_eq!(
            read_session(&mut s).await,
            [&a[..], &b[..HEADER_LEN]].concat()
        );
        assert!(s.was_cut());
        s.next_session();
        assert_eq!(read_session(&mut s).await, &b[HEADER_LEN..]);
        assert!(!s.was_cut());
    }

    #[tokio::test]
    async fn a_failed_session_skips_the_rest_of_its_frame() {
        let (mut host, guest) = tokio::io::duplex(1 << 16);
        let frame = data(FLAG_SYN, 1, &[1; 100]);
        let next = header(1, 0, 1, 5);
        host.write_all(&frame).await.unwrap();
        host.write_all(&next).await.unwrap();
        drop(host);
        let mut s = Splitter::new(guest);
        let mut part = [0u8; 20];
        s.session().read_exact(&mut part).await.unwrap();
        // The session dies here (say yamux choked); the next one starts at the next header.
        s.next_session();
        assert_eq!(read_session(&mut s).await, next);
    }

    #[tokio::test]
    async fn garbage_passes_through_untouched() {
        let (mut host, guest) = tokio::io::duplex(1 << 16);
        let mut bytes = vec![0xee; 40];
        bytes.extend(host_session(1));
        bytes.extend(host_session(2));
        host.write_all(&bytes).await.unwrap();
        drop(host);
        let mut s = Splitter::new(guest);
        assert_eq!(read_session(&mut s).await, bytes);
    }

    /// A new host session as a yamux host writes it when it opens streams 1 and 3 at once:
    /// its first ping, then the streams' frames in whatever order yamux took them.
    fn host_session_opening_at_once(tag: u8) -> Vec<u8> {
        [
            header(2, FLAG_SYN, 0, 0),
            data(FLAG_SYN, 3, &[tag; 30]),
            data(FLAG_SYN, 1, &[tag; 5]),
            data(0, 3, &[tag; 2]),
        ]
        .concat()
    }

    #[tokio::test]
    async fn a_new_session_starts_at_its_first_ping() {
        let (mut host, guest) = tokio::io::duplex(1 << 16);
        let a = host_session(0xaa);
        let (b, c) = (
            host_session_opening_at_once(0xbb),
            host_session_opening_at_once(0xcc),
        );
        host.write_all(&[&a[..], &b[..], &c[..]].concat())
            .await
            .unwrap();
        drop(host);
        let mut s = Splitter::new(guest);
        assert_eq!(read_session(&mut s).await, a);
        assert!(s.was_cut());
        s.next_session();
        // Stream 1 opening after stream 3 does not cut the new session again.
        assert_eq!(read_session(&mut s).await, b);
        assert!(s.was_cut());
        s.next_session();
        assert_eq!(read_session(&mut s).await, c);
        assert!(!s.was_cut());
    }

    #[tokio::test]
    async fn a_ping_counting_up_stays_in_its_session() {
        let (mut host, guest) = tokio::io::duplex(1 << 16);
        let bytes = [
            header(2, FLAG_SYN, 0, 0),
            data(FLAG_SYN, 1, b"x"),
            header(2, FLAG_SYN, 0, 1),
            // A pong (ACK) of the guest's first ping.
            header(2, 2, 0, 0),
            data(FLAG_SYN, 3, b"y"),
        ]
        .concat();
        host.write_all(&bytes).await.unwrap();
        drop(host);
        let mut s = Splitter::new(guest);
        assert_eq!(read_session(&mut s).await, bytes);
        assert!(!s.was_cut());
    }

    /// The first-ping rule rests on this: a yamux host's first frame is a ping with opaque
    /// value 0, even when streams were opened and written to before the connection ran.
    #[tokio::test]
    async fn a_yamux_hosts_first_frame_is_its_first_ping() {
        use std::future::poll_fn;
        use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

        let (host, mut guest) = tokio::io::duplex(1 << 16);
        let mut conn =
            yamux::Connection::new(host.compat(), yamux::Config::default(), yamux::Mode::Client);
        let mut streams = Vec::new();
        for _ in 0..2 {
            streams.push(
                poll_fn(|cx| conn.poll_new_outbound(cx))
                    .await
                    .unwrap()
                    .compat(),
            );
        }
        for stream in streams.iter_mut().rev() {
            stream.write_all(b"request").await.unwrap();
        }
        poll_fn(|cx| {
            let _ = conn.poll_next_inbound(cx);
            Poll::Ready(())
        })
        .await;
        let mut first = [0u8; HEADER_LEN];
        guest.read_exact(&mut first).await.unwrap();
        assert_eq!(
            classify(&first),
            Header::Frame {
                len: 12,
                mark: Mark::FirstPing
            }
        );
    }

    #[test]
    fn header_classification() {
        assert_eq!(
            classify(&data(FLAG_SYN, 1, b"abc")),
            Header::Frame {
                len: 15,
                mark: Mark::OpensFirst
            }
        );
        assert_eq!(
            classify(&header(1, FLAG_SYN | 2, 1, 9)),
            Header::Frame {
                len: 12,
                mark: Mark::OpensFirst
            }
        );
        assert_eq!(
            classify(&header(2, FLAG_SYN, 1, 9)),
            Header::Frame {
                len: 12,
                mark: Mark::Other
            }
        );
        assert_eq!(
            classify(&data(FLAG_SYN, 3, b"")),
            Header::Frame {
                len: 12,
                mark: Mark::Other
            }
        );
        assert_eq!(
            classify(&header(2, FLAG_SYN, 0, 0)),
            Header::Frame {
                len: 12,
                mark: Mark::FirstPing
            }
        );
        for not_first in [header(2, FLAG_SYN, 0, 1), header(2, 2, 0, 0)] {
            assert_eq!(
                classify(&not_first),
                Header::Frame {
                    len: 12,
                    mark: Mark::Other
                }
            );
        }
        assert_eq!(classify(&[1; 12]), Header::Garbage);
        assert_eq!(classify(&header(9, 0, 0, 0)), Header::Garbage);
    }
}

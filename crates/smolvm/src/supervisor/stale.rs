//! Dropping what a restored guest's saved session still had to say.
//!
//! A saved state holds the guest's agent mid-session with the host that saved it, including
//! bytes the guest had sent that QEMU had not yet passed on (in the virtio queues and the
//! port's buffers). A restored VM delivers them to its new supervisor first. They belong
//! to the old session: answering them breaks the new one (a stale ping's pong reaches the
//! guest's new session, which expected the pong of its own first ping, and it hangs up).
//!
//! The guest's agent starts a new yamux session when it sees the new host's first frame.
//! Like every yamux session (0.13 on), it sends a ping with opaque value 0 before anything
//! else. So on a restored VM everything the guest sent before that ping is dropped; the
//! ping is searched at any byte offset because the stale bytes may begin mid-frame. Stale
//! bytes are bounded by the queues that held them: past [`MAX_STALE`] it is an error.
//! Stale guest output that happened to hold those 12 bytes would stop the search early, and
//! the session would then fail on garbage frames, with an error, never silently.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The header of a yamux session's first frame: version 0, ping, SYN, stream 0, value 0.
pub const FIRST_PING: [u8; 12] = [0, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];

/// The most stale bytes dropped before giving up (the guest's queues hold far less).
pub const MAX_STALE: usize = 4 << 20;

/// How much to read at once while searching.
const READ_SIZE: usize = 16 * 1024;

/// Passes the guest's bytes on, once (on a restored VM) those of the saved session are gone.
pub struct SkipStale<T> {
    io: T,
    /// Whether the new session's first frame has been found (or no search was needed).
    found: bool,
    /// Bytes read while searching that are not yet dropped or passed on.
    held: BytesMut,
    /// How many bytes were dropped.
    dropped: usize,
}

impl<T> SkipStale<T> {
    /// Wraps `io`; `restored` says whether the guest's agent was resumed mid-session.
    pub fn new(io: T, restored: bool) -> Self {
        Self {
            io,
            found: !restored,
            held: BytesMut::new(),
            dropped: 0,
        }
    }

    /// How many stale bytes were dropped so far.
    pub fn dropped(&self) -> usize {
        self.dropped
    }

    /// Drops what precedes the first frame in `held`; true once it is found.
    fn search(&mut self) -> bool {
        if let Some(at) = self
            .held
            .windows(FIRST_PING.len())
            .position(|w| w == FIRST_PING)
        {
            self.held.advance(at);
            self.dropped += at;
            self.found = true;
            if self.dropped > 0 {
                tracing::info!(
                    bytes = self.dropped,
                    "dropped the saved agent session's unread bytes"
                );
            }
            return true;
        }
        // Keep what could be the start of the header, cut by the end of the read.
        let drop = self.held.len().saturating_sub(FIRST_PING.len() - 1);
        self.held.advance(drop);
        self.dropped += drop;
        false
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SkipStale<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        while !me.found {
            let mut chunk = [0u8; READ_SIZE];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut me.io).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // The guest hung up before starting a session: nothing of it is worth passing.
                return Poll::Ready(Ok(()));
            }
            me.held.extend_from_slice(rb.filled());
            if !me.search() && me.dropped > MAX_STALE {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the restored guest sent over {MAX_STALE} bytes without starting an agent session"
                    ),
                )));
            }
        }
        if !me.held.is_empty() {
            let n = me.held.len().min(out.remaining());
            out.put_slice(&me.held[..n]);
            me.held.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.io).poll_read(cx, out)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SkipStale<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A reader that hands out `data` in chunks of the given sizes (cycled).
    struct Chunked {
        data: Vec<u8>,
        at: usize,
        sizes: Vec<usize>,
        turn: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let me = self.get_mut();
            let size = me.sizes[me.turn % me.sizes.len()].max(1);
            me.turn += 1;
            let n = size.min(me.data.len() - me.at).min(out.remaining());
            out.put_slice(&me.data[me.at..me.at + n]);
            me.at += n;
            Poll::Ready(Ok(()))
        }
    }

    fn read_all(data: Vec<u8>, sizes: Vec<usize>, restored: bool) -> io::Result<(Vec<u8>, usize)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let reader = Chunked {
                data,
                at: 0,
                sizes,
                turn: 0,
            };
            let mut s = SkipStale::new(reader, restored);
            let mut got = Vec::new();
            s.read_to_end(&mut got).await?;
            Ok((got, s.dropped()))
        })
    }

    /// xorshift: reproducible "random" bytes and sizes without a dependency.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed.max(1);
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    #[test]
    fn stale_bytes_before_the_first_ping_go_whatever_the_read_sizes() {
        let mut next = rng(7);
        for case in 0..500 {
            // Stale bytes: random, or old-session-looking frames (a later ping, say).
            let stale_len = (next() % 3000) as usize;
            let mut stale: Vec<u8> = (0..stale_len).map(|_| next() as u8).collect();
            if case % 3 == 0 {
                stale.extend_from_slice(&[0, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]);
            }
            // Never the header itself (that is the documented limit of the search).
            assert!(!stale.windows(12).any(|w| w == FIRST_PING), "case {case}");
            let mut session = FIRST_PING.to_vec();
            session.extend((0..(next() % 500)).map(|_| next() as u8));
            let sizes: Vec<usize> = (0..5).map(|_| 1 + (next() % 40) as usize).collect();
            let mut data = stale.clone();
            data.extend_from_slice(&session);
            let (got, dropped) = read_all(data, sizes, true).unwrap();
            assert_eq!(got, session, "case {case}");
            assert_eq!(dropped, stale.len(), "case {case}");
        }
    }

    #[test]
    fn a_booted_guest_passes_through_untouched_and_a_restored_clean_one_too() {
        let data: Vec<u8> = (0..100u8).collect();
        let (got, dropped) = read_all(data.clone(), vec![7], false).unwrap();
        assert_eq!((got, dropped), (data, 0));
        let mut session = FIRST_PING.to_vec();
        session.extend_from_slice(b"rest of the session");
        let (got, dropped) = read_all(session.clone(), vec![3, 100], true).unwrap();
        assert_eq!((got, dropped), (session, 0));
    }

    #[test]
    fn a_guest_that_never_starts_a_session_is_bounded() {
        let endless = vec![0xAB; MAX_STALE + READ_SIZE * 2];
        let err = read_all(endless, vec![READ_SIZE], true).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("without starting"), "{err}");
        // A hang-up before any session is an end of stream, with nothing passed on.
        let (got, _) = read_all(vec![1, 2, 3], vec![2], true).unwrap();
        assert!(got.is_empty());
    }
}

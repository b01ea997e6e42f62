//! The one error type of the protocol crate.

/// What can go wrong while framing or decoding a message.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The peer announced a frame larger than we accept.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// Largest accepted length.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    TruncatedFrame,
    /// The frame could not be decoded as the expected message.
    #[error("malformed message: {0}")]
    Decode(#[source] postcard::Error),
    /// A message could not be encoded (should not happen for our types).
    #[error("could not encode message: {0}")]
    Encode(#[source] postcard::Error),
    /// I/O on the underlying stream failed.
    #[error("i/o error on protocol stream: {0}")]
    Io(#[from] std::io::Error),
}

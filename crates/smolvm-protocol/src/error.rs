//! The one error type of the protocol crate.

/// What can go wrong while framing or decoding a message, or parsing the guest's boot
/// parameters.
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
    /// A `smolvm.*` kernel parameter of the guest's network configuration is malformed
    /// (see [`crate::boot`]).
    #[error("invalid kernel parameter {param}={value:?}: {reason}")]
    InvalidBootParam {
        /// The parameter's name, e.g. `smolvm.ip`.
        param: &'static str,
        /// Its value as given.
        value: String,
        /// What is wrong with it and what is allowed.
        reason: String,
    },
    /// I/O on the underlying stream failed.
    #[error("i/o error on protocol stream: {0}")]
    Io(#[from] std::io::Error),
}

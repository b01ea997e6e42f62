//! Wire protocol between the smolvm host and the guest agent, and between clients and
//! the per-VM supervisor.
//!
//! Every message travels as one frame: a little-endian `u32` length followed by that many
//! bytes of a [postcard](https://docs.rs/postcard) encoding. Frames larger than
//! [`MAX_FRAME_LEN`] are refused before any allocation, so a hostile peer cannot make the
//! reader allocate more than that. See `VERSIONING.md` for the rules on changing it.

pub mod boot;
mod error;
mod frame;
mod message;

pub use error::ProtocolError;
#[cfg(feature = "tokio")]
pub use frame::codec;
pub use frame::{decode, encode, read_frame, write_frame, MAX_FRAME_LEN};
pub use message::*;

/// The protocol generation spoken by this build. Bump it on any change to the wire format.
pub const PROTOCOL_VERSION: u32 = 6;

/// The supervisor API version spoken by this build: a client and a supervisor of different
/// versions refuse each other at the [`ApiHello`] that starts every API connection. Bump it
/// on any change to [`ApiRequest`], [`ApiReply`] or what an API connection carries after
/// them (`VERSIONING.md`). Version 0 is the unversioned API before the hello existed.
pub const API_VERSION: u32 = 1;

/// First bytes of an [`ApiHello`] and an [`ApiHelloReply`] (`smvA`).
pub const API_MAGIC: [u8; 4] = *b"smvA";

/// Name of the virtio-serial port that carries the agent channel.
pub const AGENT_PORT_NAME: &str = "org.smolvm.agent";

/// Largest data chunk (stdout, stderr, stdin) put in one frame.
pub const MAX_CHUNK: usize = 64 * 1024;

#[cfg(test)]
mod tests;

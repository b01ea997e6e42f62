//! The handshake: the host's `Hello` gives the guest a fresh identity (clock, entropy,
//! hostname), which matters most for guests restored from a shared snapshot.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::time::{clock_gettime, clock_settime, ClockId};
use smolvm_protocol::{GuestMessage, Hello, HelloReply, PROTOCOL_VERSION};

/// Most entropy bytes taken from one Hello; the rest is ignored.
const MAX_ENTROPY: usize = 4096;
/// Longest hostname the kernel accepts.
const MAX_HOSTNAME: usize = 64;
/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Answers a Hello. With `apply`, it first sets the clock, feeds the entropy to the kernel
/// and sets the hostname; failures there are logged, not fatal.
pub fn answer(hello: &Hello, apply: bool) -> GuestMessage {
    if hello.protocol_version != PROTOCOL_VERSION {
        return GuestMessage::Error(format!(
            "protocol version mismatch: host speaks {}, agent speaks {PROTOCOL_VERSION}",
            hello.protocol_version
        ));
    }
    if apply {
        apply_identity(hello);
    } else {
        tracing::debug!("hello: leaving clock, entropy and hostname alone (no --apply-identity)");
    }
    GuestMessage::Hello(HelloReply {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        kernel_release: kernel_release(),
        hostname: hostname(),
        boot_ms: boot_ms(),
    })
}

/// Milliseconds since the kernel started (`CLOCK_BOOTTIME`).
pub fn boot_ms() -> u64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// `uname -r`.
fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The current hostname.
fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Sets the hostname, refusing names the kernel would reject.
pub fn set_hostname(name: &str) -> Result<(), String> {
    if name.len() > MAX_HOSTNAME || name.contains('\0') {
        return Err(format!("invalid hostname {name:?}"));
    }
    nix::unistd::sethostname(name).map_err(|e| e.desc().to_owned())
}

fn apply_identity(hello: &Hello) {
    if hello.host_time_unix_ns != 0 {
        let ns = hello.host_time_unix_ns;
        let ts = nix::sys::time::TimeSpec::new(
            (ns / 1_000_000_000) as libc::time_t,
            (ns % 1_000_000_000) as libc::c_long,
        );
        if let Err(e) = clock_settime(ClockId::CLOCK_REALTIME, ts) {
            tracing::warn!("cannot set the clock: {}", e.desc());
        }
    }
    if !hello.entropy.is_empty() {
        let n = hello.entropy.len().min(MAX_ENTROPY);
        if let Err(e) = add_entropy(&hello.entropy[..n]) {
            tracing::warn!("cannot add entropy: {e}");
        }
    }
    if !hello.hostname.is_empty() {
        if let Err(e) = set_hostname(&hello.hostname) {
            tracing::warn!("cannot set hostname: {e}");
        }
    }
}

/// Mixes `bytes` into the kernel's pool, credits them (`RNDADDENTROPY`) and forces a reseed
/// of the CRNG (`RNDRESEEDCRNG`), so clones of one snapshot stop sharing random state.
/// Falls back to a plain write when the ioctls are refused.
fn add_entropy(bytes: &[u8]) -> std::io::Result<()> {
    let mut urandom = OpenOptions::new().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len() + 3);
    let bits = (bytes.len() * 8) as libc::c_int;
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as libc::c_int).to_ne_bytes());
    info.extend_from_slice(bytes);
    info.resize(info.len().next_multiple_of(4), 0);
    // SAFETY: `info` is a complete rand_pool_info whose buf_size matches its data.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if let Err(e) = Errno::result(rc) {
        tracing::debug!(
            "RNDADDENTROPY refused ({}); writing to /dev/urandom",
            e.desc()
        );
        urandom.write_all(bytes)?;
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) };
    if let Err(e) = Errno::result(rc) {
        tracing::debug!("RNDRESEEDCRNG refused: {}", e.desc());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_bytes::ByteBuf;

    fn hello(version: u32) -> Hello {
        Hello {
            protocol_version: version,
            host_time_unix_ns: 0,
            hostname: String::new(),
            entropy: ByteBuf::from(vec![1, 2, 3]),
        }
    }

    #[test]
    fn answers_with_our_version() {
        let GuestMessage::Hello(reply) = answer(&hello(PROTOCOL_VERSION), false) else {
            panic!("expected a hello reply")
        };
        assert_eq!(reply.protocol_version, PROTOCOL_VERSION);
        assert_eq!(reply.agent_version, env!("CARGO_PKG_VERSION"));
        assert!(!reply.kernel_release.is_empty());
        assert!(reply.boot_ms > 0);
    }

    #[test]
    fn refuses_another_version() {
        assert_eq!(
            answer(&hello(PROTOCOL_VERSION + 1), false),
            GuestMessage::Error(format!(
                "protocol version mismatch: host speaks {}, agent speaks {PROTOCOL_VERSION}",
                PROTOCOL_VERSION + 1
            ))
        );
    }

    #[test]
    fn rejects_bad_hostnames_before_the_kernel_sees_them() {
        assert!(set_hostname(&"x".repeat(65)).is_err());
        assert!(set_hostname("a\0b").is_err());
    }
}

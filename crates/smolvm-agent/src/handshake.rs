//! The handshake: the host's `Hello` gives the guest a fresh identity (clock, entropy,
//! hostname), which matters most for guests restored from a shared snapshot.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::time::{clock_gettime, clock_settime, ClockId};
use smolvm_protocol::{ErrorKind, GuestMessage, Hello, HelloReply, WireError, PROTOCOL_VERSION};

/// Most entropy bytes taken from one Hello; the rest is ignored.
const MAX_ENTROPY: usize = 4096;
/// Longest hostname the kernel accepts.
const MAX_HOSTNAME: usize = 64;
/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Boot work PID 1 still does while the server starts (the guest's network): the read end
/// of a pipe whose write end PID 1 closes when that work is done.
static BOOT_GATE: Mutex<Option<OwnedFd>> = Mutex::new(None);
/// Longest wait for it: past the 1 s PID 1 may wait for an Ethernet interface.
const BOOT_GATE_WAIT: Duration = Duration::from_secs(3);

/// Makes the first answer to a Hello wait until the write end of `read_end`'s pipe is
/// closed (by PID 1, when the guest's network is configured), so the host never sees a
/// ready guest whose network is not.
pub fn set_boot_gate(read_end: OwnedFd) {
    *BOOT_GATE.lock().unwrap_or_else(|p| p.into_inner()) = Some(read_end);
}

/// Waits for the boot gate, once; later calls return at once. Concurrent callers wait for
/// the first.
fn wait_for_boot_gate() {
    let mut gate = BOOT_GATE.lock().unwrap_or_else(|p| p.into_inner());
    let Some(fd) = gate.take() else {
        return;
    };
    let deadline = Instant::now() + BOOT_GATE_WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for an open descriptor.
        let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as libc::c_int) };
        match rc {
            // End of file (every write end closed): the work is done.
            1.. => return,
            0 => {
                tracing::warn!(
                    "boot network setup still running after {} ms; answering the host anyway",
                    BOOT_GATE_WAIT.as_millis()
                );
                return;
            }
            _ if Errno::last() == Errno::EINTR => continue,
            _ => {
                tracing::warn!("waiting for the boot network setup: {}", Errno::last());
                return;
            }
        }
    }
}

/// Answers a Hello. With `apply`, it first sets the clock, feeds the entropy to the kernel
/// and sets the hostname; failures there are logged, not fatal. The first answer waits for
/// the boot gate (see [`set_boot_gate`]).
pub fn answer(hello: &Hello, apply: bool) -> GuestMessage {
    wait_for_boot_gate();
    if hello.protocol_version != PROTOCOL_VERSION {
        return GuestMessage::Error(WireError::new(
            ErrorKind::Refused,
            format!(
                "protocol version mismatch: host speaks {}, agent speaks {PROTOCOL_VERSION}",
                hello.protocol_version
            ),
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
        clocksource: clocksource(),
    })
}

/// Where the kernel names its current clocksource.
const CLOCKSOURCE: &str = "/sys/devices/system/clocksource/clocksource0/current_clocksource";

/// The kernel's current clocksource (`tsc`, `kvm-clock`, ...), or `unknown`. Early in a
/// boot the kernel runs on `tsc-early` until its TSC calibration is refined (about a second
/// of guest time), then switches to `tsc`; a handshake that comes first waits for the switch
/// (at most [`EARLY_CLOCK_WAIT`]), so what the host shows is the clock the guest keeps.
fn clocksource() -> String {
    let read = || {
        std::fs::read_to_string(CLOCKSOURCE)
            .map(|s| s.trim().chars().take(64).collect::<String>())
            .unwrap_or_else(|_| "unknown".to_owned())
    };
    let deadline = Instant::now() + EARLY_CLOCK_WAIT;
    let mut now = read();
    while now == "tsc-early" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        now = read();
    }
    now
}

/// How long a handshake waits for the guest kernel to leave its early TSC clocksource.
const EARLY_CLOCK_WAIT: Duration = Duration::from_secs(3);

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

/// The kernel's free page reporting threshold: pages freed in blocks of at least this order
/// are reported to the host (virtio-balloon `free-page-reporting`).
const PAGE_REPORTING_ORDER: &str = "/sys/module/page_reporting/parameters/page_reporting_order";

/// An order no block reaches (the largest is `MAX_ORDER - 1` = 10 on x86-64): nothing is
/// reported.
const NO_REPORTING_ORDER: &str = "11";

/// Turns free page reporting on (at the kernel's own threshold, remembered from the first
/// call) or off. Without the balloon driver there is nothing to turn.
fn set_free_page_reporting(on: bool) {
    static BOOT_ORDER: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let boot = BOOT_ORDER.get_or_init(|| {
        std::fs::read_to_string(PAGE_REPORTING_ORDER)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| s != NO_REPORTING_ORDER)
    });
    let Some(boot) = boot else { return };
    let want = if on {
        boot.as_str()
    } else {
        NO_REPORTING_ORDER
    };
    if let Err(e) = std::fs::write(PAGE_REPORTING_ORDER, want) {
        tracing::warn!("cannot set the free page reporting order to {want}: {e}");
    }
}

fn apply_identity(hello: &Hello) {
    set_free_page_reporting(hello.free_page_reporting);
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
            free_page_reporting: false,
        }
    }

    #[test]
    fn the_first_answer_waits_for_the_boot_gate_then_none_does() {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two descriptors into a two-element array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are fresh and ours alone.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        set_boot_gate(read_end);
        let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let closer = {
            let closed = closed.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                closed.store(true, std::sync::atomic::Ordering::SeqCst);
                drop(write_end);
            })
        };
        assert!(matches!(
            answer(&hello(PROTOCOL_VERSION), false),
            GuestMessage::Hello(_)
        ));
        assert!(
            closed.load(std::sync::atomic::Ordering::SeqCst),
            "answered before the gate closed"
        );
        closer.join().unwrap();
        // The gate is used up: later answers do not wait.
        assert!(BOOT_GATE.lock().unwrap().is_none());
        answer(&hello(PROTOCOL_VERSION), false);
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
            GuestMessage::Error(WireError::new(
                ErrorKind::Refused,
                format!(
                    "protocol version mismatch: host speaks {}, agent speaks {PROTOCOL_VERSION}",
                    PROTOCOL_VERSION + 1
                )
            ))
        );
    }

    #[test]
    fn rejects_bad_hostnames_before_the_kernel_sees_them() {
        assert!(set_hostname(&"x".repeat(65)).is_err());
        assert!(set_hostname("a\0b").is_err());
    }
}

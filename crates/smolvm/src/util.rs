//! Small host helpers shared by the runtime and the CLI.

use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

/// Fills `buf` from the kernel's random source.
pub(crate) fn random_bytes(buf: &mut [u8]) {
    // getrandom(2) never fails for small buffers once the pool is initialised; fall back to
    // /dev/urandom and, as a last resort, time-derived bytes (ids only need uniqueness).
    if nix_getrandom(buf) {
        return;
    }
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        if f.read_exact(buf).is_ok() {
            return;
        }
    }
    let t = now_unix_ns().to_le_bytes();
    for (i, b) in buf.iter_mut().enumerate() {
        *b = t[i % t.len()] ^ (std::process::id() as u8).wrapping_add(i as u8);
    }
}

fn nix_getrandom(buf: &mut [u8]) -> bool {
    // SAFETY: buf is a valid writable slice of buf.len() bytes.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    n >= 0 && n as usize == buf.len()
}

/// Nanoseconds since the Unix epoch.
pub(crate) fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> i64 {
    (now_unix_ns() / 1_000_000_000) as i64
}

/// Finds a program on `PATH`.
pub fn which(prog: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Whether a process with this pid exists (and is not a zombie we can see).
pub(crate) fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // State is the field after the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X"))
        }
        Err(_) => false,
    }
}

/// A process's start time in clock ticks after boot (field 22 of `/proc/PID/stat`); with
/// the pid it names one process for good, even after the pid is reused.
pub(crate) fn process_start_ticks(pid: u32) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name start at field 3 (state).
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The NUL-separated command line of a process (empty when it is gone or unreadable).
pub(crate) fn process_cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Every pid on the host.
pub(crate) fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// Sends SIGKILL to `pid` and waits (up to `wait`) until it is gone or a zombie.
pub(crate) fn kill_and_wait(pid: u32, wait: std::time::Duration) {
    if pid <= 1 {
        return;
    }
    // SAFETY: plain kill(2).
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let deadline = std::time::Instant::now() + wait;
    while pid_alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

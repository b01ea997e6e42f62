//! Helpers shared by smolvm's test suites (a dev-dependency only; never shipped).
//!
//! Nothing here knows about QEMU or VMs: the helpers wait for a condition with a deadline,
//! run tests one at a time, find processes by command line or process group, make private
//! state directories, kill what a test left running, and make a test *fail* with a message
//! saying how to run it when what it needs is missing (a test that cannot run here is
//! `#[ignore = "why"]` instead; it never passes without checking anything).

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often the polling helpers look again.
const POLL: Duration = Duration::from_millis(20);

/// Waits until `cond` holds, looking every 20 ms; panics naming `what` when it still does
/// not hold after `within`. Returns how long it took (for a test to log, not to assert on).
#[track_caller]
pub fn poll_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    poll_for(within, what, || cond().then_some(())).1
}

/// Waits until `probe` returns a value and returns it, with how long that took; panics
/// naming `what` when it has returned nothing after `within`.
#[track_caller]
pub fn poll_for<T>(
    within: Duration,
    what: &str,
    mut probe: impl FnMut() -> Option<T>,
) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(value) = probe() {
            return (value, start.elapsed());
        }
        if start.elapsed() >= within {
            panic!("timed out after {within:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// [`poll_until`] for async tests: sleeps on the tokio timer between looks.
pub async fn poll_until_async(
    within: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        if start.elapsed() >= within {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Runs `f` on a thread of its own and returns its result; panics naming `what` when it
/// has not finished after `within` (the thread is left behind). For "this call returns
/// rather than hangs": give a deadline well short of what a hang would take (a command
/// that sleeps 600 s, a timeout of 120 s), so the test checks the property, not the speed.
#[track_caller]
pub fn finishes_within<T: Send + 'static>(
    within: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(within) {
        Ok(value) => value,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what} still had not finished after {within:?}")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            panic!("{what} panicked (see above)")
        }
    }
}

/// A process-wide lock for tests that share something (an address pool, an nft table, a
/// timing-sensitive host): hold the guard for the whole test. A test that panicked while
/// holding it does not poison it for the others.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The command line of `pid`, its arguments joined by spaces (empty when it is gone).
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// The fields of `/proc/PID/stat` after the command name: state, ppid, pgrp, ...
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Every live process but this one: zombies are gone for every purpose but their parent's
/// bookkeeping, so they are left out.
fn live_pids() -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
                .filter(|&pid| pid != me)
                .filter(|&pid| {
                    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s != "Z"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Live processes (not this one) whose command line contains `needle`: a VM's supervisor
/// and QEMU name its directory, an agent names its socket.
pub fn processes_mentioning(needle: impl AsRef<Path>) -> Vec<u32> {
    let needle = needle.as_ref().display().to_string();
    live_pids()
        .into_iter()
        .filter(|&pid| cmdline(pid).contains(&needle))
        .collect()
}

/// Live processes in process group `pgid`.
pub fn processes_in_group(pgid: u32) -> Vec<u32> {
    let pgid = pgid.to_string();
    live_pids()
        .into_iter()
        .filter(|&pid| stat_fields(pid).is_some_and(|f| f.get(2) == Some(&pgid)))
        .collect()
}

/// Asserts that no live process mentions `needle` on its command line; `what` names them.
#[track_caller]
pub fn assert_no_process_mentions(needle: impl AsRef<Path>, what: &str) {
    let left = processes_mentioning(&needle);
    assert!(left.is_empty(), "{what} left running: {}", describe(&left));
}

/// "pid (command line)" for each of `pids`.
pub fn describe(pids: &[u32]) -> String {
    pids.iter()
        .map(|&pid| format!("{pid} ({})", cmdline(pid)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Kills (SIGKILL), when dropped, every process still mentioning `needle` on its command
/// line: a test that fails half-way leaves no supervisor, VMM or agent behind. A test
/// that means to check that nothing was left asserts that first (see
/// [`assert_no_process_mentions`]); the guard only cleans up.
pub struct KillLeftovers {
    needle: std::path::PathBuf,
}

impl KillLeftovers {
    pub fn new(needle: impl AsRef<Path>) -> Self {
        Self {
            needle: needle.as_ref().to_owned(),
        }
    }
}

impl Drop for KillLeftovers {
    fn drop(&mut self) {
        for pid in processes_mentioning(&self.needle) {
            let Ok(pid) = libc::pid_t::try_from(pid) else {
                continue;
            };
            // SAFETY: kill has no memory-safety preconditions; the pid was just read.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// A fresh directory, removed when dropped, with a short path (Unix socket paths are
/// limited to 107 bytes, and state directories hold sockets): `/tmp/smv-XXXXXX` where
/// `$TMPDIR` is unset.
pub fn short_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("smv-")
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot make a temporary directory: {e}"))
}

/// Fails the test unless `tool` is on `PATH`; `how` says where it comes from (e.g. "the
/// `cpio` package, which scripts/install-deps installs").
#[track_caller]
pub fn require_tool(tool: &str, how: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|dir| Path::new(dir).join(tool).is_file());
    assert!(
        found,
        "this test needs `{tool}` ({how}); run scripts/install-deps"
    );
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Fails the test unless it runs as root; `why` says what root is needed for.
#[track_caller]
pub fn require_root(why: &str) {
    assert!(
        is_root(),
        "this test needs root ({why}): run it as root, as scripts/test does"
    );
}

/// The network interfaces of this process's namespace (from `/proc/self/net/dev`: under
/// `unshare --net` alone, `/sys` still shows the host's, as it was mounted there).
pub fn links() -> Vec<String> {
    std::fs::read_to_string("/proc/self/net/dev")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim().to_string()))
        .collect()
}

/// Fails the test unless it runs as root in a network namespace of its own: one whose only
/// interfaces are loopback and those whose names start with one of `ours` (what tests make
/// there). Tests that create TAPs, routes or nft rules must never touch the host's network.
#[track_caller]
pub fn require_private_netns(ours: &[&str]) {
    const HOW: &str = "run them as root in a fresh network namespace, as scripts/test does: \
                       unshare --net sh -c 'ip link set lo up && cargo test ...'";
    assert!(is_root(), "these tests need root: {HOW}");
    let foreign: Vec<String> = links()
        .into_iter()
        .filter(|n| n != "lo" && !ours.iter().any(|p| n.starts_with(p)))
        .collect();
    assert!(
        foreign.is_empty(),
        "these tests change the network, so they refuse to run outside a private network \
         namespace (this one has {foreign:?}): {HOW}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_until_returns_once_the_condition_holds() {
        let mut n = 0;
        poll_until(Duration::from_secs(30), "three looks", || {
            n += 1;
            n == 3
        });
        assert_eq!(n, 3);
    }

    #[test]
    #[should_panic(expected = "timed out after 50ms waiting for the impossible")]
    fn poll_until_names_what_it_waited_for() {
        poll_until(Duration::from_millis(50), "the impossible", || false);
    }

    #[test]
    fn finishes_within_returns_the_result_or_names_the_hang() {
        assert_eq!(
            finishes_within(Duration::from_secs(30), "a sum", || 2 + 2),
            4
        );
        let hang = std::panic::catch_unwind(|| {
            finishes_within(Duration::from_millis(20), "a long sleep", || {
                std::thread::sleep(Duration::from_secs(5))
            })
        });
        assert!(hang.is_err());
    }

    #[test]
    fn poll_for_returns_the_value() {
        let (v, _) = poll_for(Duration::from_secs(30), "a value", || Some(7));
        assert_eq!(v, 7);
    }

    #[test]
    fn a_child_is_found_by_command_line_and_group_and_killed_by_the_guard() {
        use std::os::unix::process::CommandExt;
        let dir = short_tempdir();
        let marker = dir.path().join("marker");
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read line"])
            .arg(&marker)
            .stdin(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        poll_until(Duration::from_secs(30), "the child's command line", || {
            processes_mentioning(&marker) == [child.id()]
        });
        assert_eq!(processes_in_group(child.id()), [child.id()]);
        assert!(describe(&[child.id()]).contains("read line"));
        drop(KillLeftovers::new(&marker));
        let status = child.wait().unwrap();
        assert!(!status.success());
        assert_no_process_mentions(&marker, "the child");
    }

    #[test]
    #[should_panic(expected = "this test needs `no-such-tool-here`")]
    fn a_missing_tool_fails_the_test() {
        require_tool("no-such-tool-here", "nowhere");
    }

    #[tokio::test]
    async fn poll_until_async_waits_on_the_timer() {
        let start = Instant::now();
        poll_until_async(Duration::from_secs(30), "50 ms", || {
            start.elapsed() >= Duration::from_millis(50)
        })
        .await;
    }
}

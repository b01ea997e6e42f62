//! The VM's lock: an exclusive open-file-description lock on `DIR/supervisor.lock`, held by
//! the VM's supervisor for its whole life (and by a start, delete or fork in progress).
//! "Is it running" is "is the lock held"; the kernel releases it however the holder ends.

use std::path::Path;
use std::time::{Duration, Instant};

use super::files;
use crate::error::{io_err, Error, Result};

/// Whether a supervisor currently runs the VM in `vm_dir` (it holds the VM's lock for its
/// whole life; the kernel releases it however the process ends, so this never lies). Only
/// asks: taking nothing, it never makes a concurrent [`try_lock`] fail.
pub fn is_running(vm_dir: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(vm_dir.join(files::LOCK)) else {
        return false;
    };
    let mut query = whole_file_lock(libc::F_WRLCK);
    // SAFETY: F_OFD_GETLK on a descriptor we own only fills `query`, which outlives the call.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut query) };
    if rc != 0 {
        // Not knowing, say "running": callers then leave the VM's files alone.
        tracing::warn!(
            dir = %vm_dir.display(),
            "cannot query the VM's lock: {}",
            std::io::Error::last_os_error()
        );
        return true;
    }
    query.l_type != libc::F_UNLCK as libc::c_short
}

/// A lock request covering the whole file, for the open-file-description (`F_OFD_*`) locks
/// that guard a VM: owned by the open file (passed on with its descriptor, dropped when its
/// last descriptor closes), and testable without taking them.
fn whole_file_lock(kind: libc::c_int) -> libc::flock {
    // SAFETY: `flock` is plain data, for which all zeroes (the whole file, pid 0 as OFD
    // locks require) is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl
}

/// Environment variable naming the descriptor of the VM's lock, already held, that the
/// starting client hands to the supervisor.
pub const LOCK_FD_ENV: &str = "SMOLVM_SUPERVISOR_LOCK_FD";

/// Opens the VM's lock file and takes its lock without waiting. `None` when a supervisor
/// (or a start, delete or fork in progress) holds it. The lock is an exclusive OFD lock on
/// the returned file: closing every descriptor of it releases the lock; nothing unlocks it
/// explicitly.
pub(crate) fn try_lock(vm_dir: &Path) -> Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    let lock_path = vm_dir.join(files::LOCK);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(format!("opening {}", lock_path.display())))?;
    let request = whole_file_lock(libc::F_WRLCK);
    // SAFETY: F_OFD_SETLK on a descriptor we own reads `request`, which outlives the call.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &request) };
    if rc == 0 {
        return Ok(Some(f));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(None),
        _ => Err(io_err(format!("locking {}", lock_path.display()))(e)),
    }
}

/// How long a client retries the VM's lock before taking it for held: a process that
/// another thread of ours is spawning holds copies of our descriptors (a lock we just let
/// go among them) until its `exec`, a few milliseconds.
pub(crate) const LOCK_RETRY: Duration = Duration::from_secs(1);

/// [`try_lock`], retried for up to `wait` (see [`LOCK_RETRY`]).
pub(crate) fn lock_within(vm_dir: &Path, wait: Duration) -> Result<Option<std::fs::File>> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(f) = try_lock(vm_dir)? {
            return Ok(Some(f));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The lock handed over by the client that spawned us, if it is really this VM's lock.
pub(super) fn inherited_lock(vm_dir: &Path) -> Option<std::fs::File> {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::MetadataExt;
    let fd: i32 = std::env::var(LOCK_FD_ENV).ok()?.parse().ok()?;
    std::env::remove_var(LOCK_FD_ENV);
    if fd < 3 {
        return None;
    }
    // SAFETY: F_GETFD only checks that the descriptor is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the descriptor is open and nothing else in this process owns it.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    // Keep it from QEMU and anything else we spawn.
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    let ours = std::fs::metadata(vm_dir.join(files::LOCK)).ok()?;
    let given = f.metadata().ok()?;
    (ours.ino() == given.ino() && ours.dev() == given.dev()).then_some(f)
}

/// Takes the VM's supervisor lock, or says another supervisor has it.
pub(super) fn take_lock(vm_dir: &Path, id: &str) -> Result<std::fs::File> {
    try_lock(vm_dir)?.ok_or_else(|| Error::BadState {
        id: id.to_string(),
        state: "running".into(),
        hint: "another supervisor already runs this VM".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vm_lock_is_exclusive_and_asking_about_it_takes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_running(dir.path()), "no lock file: not running");
        let held = try_lock(dir.path()).unwrap().expect("a free lock is taken");
        assert!(is_running(dir.path()));
        assert!(
            try_lock(dir.path()).unwrap().is_none(),
            "a second taker fails"
        );
        drop(held);
        // Probes never stand in a taker's way. (A process that another test's thread forks
        // holds copies of our descriptors until its `exec`: wait that out, bounded.)
        for _ in 0..20 {
            smolvm_testing::poll_until(
                Duration::from_secs(30),
                "the VM lock to be released",
                || !is_running(dir.path()),
            );
            let held = try_lock(dir.path())
                .unwrap()
                .expect("a probe held the lock");
            assert!(is_running(dir.path()));
            drop(held);
        }
    }

    #[test]
    fn the_vm_lock_goes_with_its_descriptor_to_a_child_and_is_released_when_it_exits() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let held = try_lock(dir.path()).unwrap().unwrap();
        let fd = held.as_raw_fd();
        // SAFETY: clears close-on-exec on a descriptor we own, as `spawn` does.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
        let mut child = std::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .unwrap();
        drop(held);
        assert!(is_running(dir.path()), "the child's copy keeps the lock");
        child.wait().unwrap();
        smolvm_testing::poll_until(
            Duration::from_secs(30),
            "the VM lock to be released when the child exits",
            || !is_running(dir.path()),
        );
    }
}

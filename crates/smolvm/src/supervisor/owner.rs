//! Watching the process that owns an ephemeral VM without polling: a pidfd becomes readable
//! the moment that process exits, so an idle supervisor sleeps until something happens.

use std::os::fd::{FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

use crate::store::Owner;

/// A watch on one owner process (or on none: then it never fires).
#[derive(Default)]
pub struct OwnerWatch {
    /// The owner watched and its pidfd.
    watched: Option<(Owner, AsyncFd<OwnedFd>)>,
}

impl OwnerWatch {
    /// Watches `owner` from now on (`None`: nobody). Keeps the current watch when it is the
    /// same process. An owner already gone, or a pid reused by another process, fires at
    /// once; where pidfds are missing (Linux before 5.3) it never fires and the periodic
    /// check finds the owner gone instead.
    pub fn follow(&mut self, owner: Option<Owner>) {
        if self.watched.as_ref().map(|(o, _)| *o) == owner {
            return;
        }
        self.watched = owner.and_then(|o| open(o.pid).map(|fd| (o, fd)));
    }

    /// Resolves when the watched process has exited (or was never the owner); never
    /// resolves while nobody is watched.
    pub async fn exited(&self) {
        match &self.watched {
            Some((owner, fd)) => {
                // After the pidfd exists, the pid cannot be reused while we check it.
                if !owner.alive() {
                    return;
                }
                match fd.readable().await {
                    Ok(mut ready) => ready.retain_ready(),
                    Err(e) => {
                        tracing::warn!("watching the owner process failed: {e}");
                        std::future::pending::<()>().await
                    }
                }
            }
            None => std::future::pending().await,
        }
    }
}

/// A pidfd for `pid`, registered with the runtime; `None` when the kernel has none.
fn open(pid: u32) -> Option<AsyncFd<OwnedFd>> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if raw < 0 {
        tracing::debug!(
            "pidfd_open({pid}) failed: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    let raw = i32::try_from(raw).ok()?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: the AsyncFd owns the descriptor and neither replaces nor closes it early.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn fires_when_the_owner_exits_and_not_before() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .unwrap();
        let mut w = OwnerWatch::default();
        w.follow(Owner::of(child.id()));
        let early = tokio::time::timeout(Duration::from_millis(100), w.exited()).await;
        assert!(early.is_err(), "fired while the owner lived");
        // A zombie has exited: the pidfd is readable before anyone reaps it.
        tokio::time::timeout(Duration::from_secs(5), w.exited())
            .await
            .expect("did not fire when the owner exited");
        child.wait().unwrap();
    }

    #[tokio::test]
    async fn nobody_watched_never_fires() {
        let w = OwnerWatch::default();
        let r = tokio::time::timeout(Duration::from_millis(50), w.exited()).await;
        assert!(r.is_err());
    }
}

//! The SSH server of SSH images (`smolvm image ssh`): PID 1 starts `sshd` at boot when the
//! image carries the marker file. Plain images have the server installed but never start it
//! (and hold no host key). `sshd` daemonizes; PID 1's reaper reaps it like any orphan.
//! Nothing here delays or fails the boot: problems are logged.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The file whose presence asks for `sshd` (written by the host when it derives the image).
pub const MARKER: &str = "/etc/smolvm/sshd";
/// The server binary (from Debian's `openssh-server`).
pub const SSHD: &str = "/usr/sbin/sshd";
/// The privilege separation directory `sshd` insists on.
const PRIVSEP_DIR: &str = "/run/sshd";
/// Where `sshd` logs (there is no syslog in the guest).
const LOG_FILE: &str = "/var/log/sshd.log";

/// Where the pieces are; tests point them elsewhere.
#[derive(Debug, Clone)]
pub struct Layout {
    /// See [`MARKER`].
    pub marker: PathBuf,
    /// See [`SSHD`].
    pub sshd: PathBuf,
    /// The privilege separation directory, made with mode 0755.
    pub privsep_dir: PathBuf,
    /// Passed to `sshd -E`.
    pub log_file: PathBuf,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            marker: MARKER.into(),
            sshd: SSHD.into(),
            privsep_dir: PRIVSEP_DIR.into(),
            log_file: LOG_FILE.into(),
        }
    }
}

/// Starts `sshd` when the image asks for it; returns the pid of the process started (it
/// forks the daemon and exits). Call after the root is switched and `/run` is mounted.
pub fn start_if_enabled() -> Option<u32> {
    match start(&Layout::default()) {
        Ok(pid) => pid,
        Err(e) => {
            tracing::warn!("cannot start sshd: {e}");
            None
        }
    }
}

/// `Ok(None)`: not asked for, or no server installed (logged).
fn start(layout: &Layout) -> io::Result<Option<u32>> {
    if !layout.marker.exists() {
        return Ok(None);
    }
    if !layout.sshd.is_file() {
        tracing::warn!(
            "{} asks for sshd but {} is missing; build the base image again (it installs openssh-server)",
            layout.marker.display(),
            layout.sshd.display()
        );
        return Ok(None);
    }
    make_privsep_dir(&layout.privsep_dir)?;
    // No pre_exec and no working directory: std then uses posix_spawn (no copy of PID 1's
    // page tables, which costs tens of ms under TCG) and gives the child an empty signal
    // mask and default handlers, so sshd does not inherit PID 1's blocked SIGCHLD.
    let mut cmd = Command::new(&layout.sshd);
    cmd.arg("-E")
        .arg(&layout.log_file)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd.spawn()?;
    // Not waited for here: the reaper collects it when it exits after daemonizing.
    Ok(Some(child.id()))
}

/// Creates `dir` (root-owned, 0755, as sshd checks) or fixes its mode.
fn make_privsep_dir(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(dir: &Path) -> Layout {
        Layout {
            marker: dir.join("marker"),
            sshd: dir.join("sshd"),
            privsep_dir: dir.join("run-sshd"),
            log_file: dir.join("log"),
        }
    }

    #[test]
    fn nothing_happens_without_the_marker_or_the_server() {
        let tmp = tempfile::tempdir().unwrap();
        let l = layout(tmp.path());
        assert_eq!(start(&l).unwrap(), None);
        std::fs::write(&l.marker, b"").unwrap();
        assert_eq!(start(&l).unwrap(), None);
        assert!(!l.privsep_dir.exists());
    }

    #[test]
    fn the_server_is_started_with_its_directory_and_log() {
        let tmp = tempfile::tempdir().unwrap();
        let l = layout(tmp.path());
        std::fs::write(&l.marker, b"").unwrap();
        let out = tmp.path().join("args");
        std::fs::write(
            &l.sshd,
            format!(
                "#!/bin/sh\necho \"$@\" > {}\ngrep SigBlk /proc/self/status >> {}\n",
                out.display(),
                out.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&l.sshd, std::fs::Permissions::from_mode(0o755)).unwrap();
        // PID 1 blocks SIGCHLD; the server must not inherit that.
        let mut chld = nix::sys::signal::SigSet::empty();
        chld.add(nix::sys::signal::Signal::SIGCHLD);
        chld.thread_block().unwrap();
        let pid = start(&l);
        chld.thread_unblock().unwrap();
        let pid = pid.unwrap().expect("started");
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
        assert!(matches!(
            status,
            Ok(nix::sys::wait::WaitStatus::Exited(_, 0))
        ));
        let args = std::fs::read_to_string(&out).unwrap();
        assert!(
            args.starts_with(&format!("-E {}\n", l.log_file.display())),
            "{args}"
        );
        assert!(args.contains("SigBlk:\t0000000000000000"), "{args}");
        let mode = std::fs::metadata(&l.privsep_dir)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
        // A second boot finds the directory there.
        make_privsep_dir(&l.privsep_dir).unwrap();
    }
}

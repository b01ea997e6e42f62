//! The agent's command line.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::error::{AgentError, Result};

/// Shown by `--help` and after a usage error.
pub const USAGE: &str = "\
usage: smolvm-agent                         as PID 1 (/init of the guest): boot, then serve
       smolvm-agent --serve [--port DEVICE] serve on the virtio port, no init duties
       smolvm-agent --listen-unix PATH [--root DIR]
                                            serve on a Unix socket (development, tests)

options:
  --port DEVICE      serve on this character device instead of looking up the port
                     named org.smolvm.agent under /sys/class/virtio-ports (implies --serve)
  --apply-identity   let the host's Hello set the clock, hostname and entropy pool,
                     and its Network request the network (always on as PID 1; off by
                     default elsewhere, to leave a development host alone)
  --root DIR         keep the persistent environment under DIR instead of /
                     (DIR/etc/smolvm/env, DIR/etc/profile.d/smolvm_env.sh), and look
                     for DIR/sys/class/net and write DIR/etc/resolv.conf on Network;
                     with --listen-unix, so tests leave the machine's /etc alone
  --log LEVEL        error, warn, info (default), debug or trace; also SMOLVM_AGENT_LOG,
                     or smolvm.log= on the kernel command line as PID 1
  -h, --help         print this help
  -V, --version      print the version";

/// Where the agent serves the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of the guest: boot the system, then serve on the virtio port.
    Init,
    /// Serve on the virtio port (found by name, or the given device) without booting anything.
    Serve {
        /// Explicit device path; `None` looks the port up by name.
        port: Option<PathBuf>,
    },
    /// Serve on a Unix socket at this path, one connection at a time.
    ListenUnix(PathBuf),
}

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// Run the agent.
    Run(Options),
    /// Print the help text.
    Help,
    /// Print the version.
    Version,
}

/// Options of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Where to serve.
    pub mode: Mode,
    /// Whether Hello may change the clock, hostname and entropy pool.
    pub apply_identity: bool,
    /// Log level override.
    pub log: Option<String>,
    /// Directory the persistent environment lives under (`/` unless `--root`).
    pub state_root: PathBuf,
}

/// Parses the arguments after the program name. `is_pid1` picks the default mode.
pub fn parse(args: impl IntoIterator<Item = OsString>, is_pid1: bool) -> Result<Invocation> {
    let mut listen: Option<PathBuf> = None;
    let mut serve = false;
    let mut port: Option<PathBuf> = None;
    let mut apply_identity = false;
    let mut log = None;
    let mut state_root = PathBuf::from("/");
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let arg = arg
            .into_string()
            .map_err(|a| AgentError::Usage(format!("argument {a:?} is not valid UTF-8")))?;
        // The kernel passes unknown `key=value` words of its command line to init; ignore them.
        if is_pid1 && !arg.starts_with('-') {
            continue;
        }
        let mut value = |name: &str| {
            args.next()
                .map(PathBuf::from)
                .ok_or_else(|| AgentError::Usage(format!("{name} needs a value")))
        };
        match arg.as_str() {
            "-h" | "--help" => return Ok(Invocation::Help),
            "-V" | "--version" => return Ok(Invocation::Version),
            "--listen-unix" => listen = Some(value("--listen-unix")?),
            "--serve" => serve = true,
            "--port" => port = Some(value("--port")?),
            "--apply-identity" => apply_identity = true,
            "--root" => state_root = value("--root")?,
            "--log" => log = Some(value("--log")?.to_string_lossy().into_owned()),
            _ if is_pid1 => {}
            other => return Err(AgentError::Usage(format!("unknown argument `{other}`"))),
        }
    }
    let mode = match (listen, serve || port.is_some()) {
        (Some(_), true) => {
            return Err(AgentError::Usage(
                "--listen-unix cannot be combined with --serve or --port".into(),
            ))
        }
        (Some(path), false) => Mode::ListenUnix(path),
        (None, true) => Mode::Serve { port },
        (None, false) if is_pid1 => Mode::Init,
        (None, false) => {
            return Err(AgentError::Usage(
                "not running as PID 1: pass --listen-unix PATH or --serve".into(),
            ))
        }
    };
    let apply_identity = apply_identity || mode == Mode::Init;
    Ok(Invocation::Run(Options {
        mode,
        apply_identity,
        log,
        state_root,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], pid1: bool) -> Result<Invocation> {
        parse(args.iter().map(OsString::from), pid1)
    }

    #[test]
    fn pid1_without_arguments_is_init() {
        let Ok(Invocation::Run(opts)) = run(&["console=ttyS0"], true) else {
            panic!("expected a run")
        };
        assert_eq!(opts.mode, Mode::Init);
        assert!(opts.apply_identity);
    }

    #[test]
    fn listen_unix_skips_init_even_as_pid1() {
        let Ok(Invocation::Run(opts)) = run(&["--listen-unix", "/x.sock"], true) else {
            panic!("expected a run")
        };
        assert_eq!(opts.mode, Mode::ListenUnix("/x.sock".into()));
        assert!(!opts.apply_identity);
        assert_eq!(opts.state_root, PathBuf::from("/"));
    }

    #[test]
    fn root_moves_the_state() {
        let Ok(Invocation::Run(opts)) =
            run(&["--listen-unix", "/x.sock", "--root", "/tmp/r"], false)
        else {
            panic!("expected a run")
        };
        assert_eq!(opts.state_root, PathBuf::from("/tmp/r"));
        assert!(matches!(
            run(&["--serve", "--root"], false),
            Err(AgentError::Usage(_))
        ));
    }

    #[test]
    fn port_implies_serve() {
        let Ok(Invocation::Run(opts)) = run(&["--port", "/dev/vport0p1", "--log", "debug"], false)
        else {
            panic!("expected a run")
        };
        assert_eq!(
            opts.mode,
            Mode::Serve {
                port: Some("/dev/vport0p1".into())
            }
        );
        assert_eq!(opts.log.as_deref(), Some("debug"));
    }

    #[test]
    fn usage_errors() {
        assert!(matches!(run(&[], false), Err(AgentError::Usage(_))));
        assert!(matches!(
            run(&["--bogus"], false),
            Err(AgentError::Usage(_))
        ));
        assert!(matches!(
            run(&["--listen-unix"], false),
            Err(AgentError::Usage(_))
        ));
        assert!(matches!(
            run(&["--listen-unix", "a", "--serve"], false),
            Err(AgentError::Usage(_))
        ));
        assert_eq!(run(&["--help"], false).ok(), Some(Invocation::Help));
    }
}

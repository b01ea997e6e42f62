//! Turning an `ExecRequest` into a running process: argv, environment, working directory,
//! its own session and process group.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use smolvm_protocol::{Command, ExecRequest};
use tokio::process::Child;

use crate::env::Vars;
use crate::error::{os_reason, AgentError, Result};

/// The environment every command starts from; the persistent environment goes on top of it,
/// and the request's own variables on top of both.
pub const BASE_ENV: [(&str, &str); 6] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
    ("TERM", "dumb"),
    ("USER", "root"),
    ("LOGNAME", "root"),
];

/// Working directory when the request names none (`/` when it does not exist).
pub const DEFAULT_CWD: &str = "/root";

/// The shell that runs `Command::Shell` when the guest has bash: agents write bash.
pub const BASH: &str = "/bin/bash";
/// The shell that runs `Command::Shell` otherwise.
pub const SHELL: &str = "/bin/sh";

/// The shell for `Command::Shell`: bash where the guest has it, else `/bin/sh`.
fn shell() -> &'static str {
    static CHOICE: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    CHOICE.get_or_init(|| {
        if std::path::Path::new(BASH).is_file() {
            BASH
        } else {
            SHELL
        }
    })
}

/// The program and its arguments.
fn argv(command: &Command) -> Result<Vec<String>> {
    let argv = match command {
        Command::Shell(line) => vec![shell().to_owned(), "-c".to_owned(), line.clone()],
        Command::Argv(argv) if argv.is_empty() => return Err(AgentError::EmptyArgv),
        Command::Argv(argv) => argv.clone(),
    };
    if let Some(index) = argv.iter().position(|a| a.contains('\0')) {
        return Err(AgentError::NulInArgument { index });
    }
    Ok(argv)
}

/// Checks the request's variables; the base environment is applied before them.
fn check_env(env: &[(String, String)]) -> Result<()> {
    for (name, value) in env {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(AgentError::InvalidEnvName { name: name.clone() });
        }
        if value.contains('\0') {
            return Err(AgentError::NulInEnvValue { name: name.clone() });
        }
    }
    Ok(())
}

/// The directory to run in.
fn working_dir(cwd: Option<&str>) -> Result<PathBuf> {
    let Some(cwd) = cwd else {
        let default = Path::new(DEFAULT_CWD);
        return Ok(if default.is_dir() {
            default.to_owned()
        } else {
            PathBuf::from("/")
        });
    };
    let path = PathBuf::from(cwd);
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_dir() => Ok(path),
        Ok(_) => Err(AgentError::CwdNotDirectory(path)),
        Err(_) => Err(AgentError::CwdMissing(path)),
    }
}

/// Starts the process in a session and process group of its own (so its pid is also its
/// process-group id and the whole group can be signalled). stdout and stderr are pipes;
/// stdin is a pipe when the host will send it, `/dev/null` otherwise. Its environment is
/// [`BASE_ENV`], overridden by `persistent`, overridden by the request's `env`.
pub fn spawn(req: &ExecRequest, persistent: &Vars) -> Result<(Child, u32)> {
    let argv = argv(&req.command)?;
    check_env(&req.env)?;
    let cwd = working_dir(req.cwd.as_deref())?;
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(BASE_ENV)
        .envs(persistent)
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&cwd)
        .stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
    }
    let child = cmd.spawn().map_err(|e| AgentError::Spawn {
        program: argv[0].clone(),
        reason: os_reason(&e),
        io_kind: e.kind(),
    })?;
    let pid = child.id().ok_or_else(|| AgentError::Spawn {
        program: argv[0].clone(),
        reason: "the process vanished before it could be tracked".into(),
        io_kind: io::ErrorKind::Other,
    })?;
    Ok((child, pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_and_argv() {
        assert_eq!(
            argv(&Command::Shell("echo hi".into())).unwrap(),
            [shell(), "-c", "echo hi"]
        );
        assert!(shell() == BASH || shell() == SHELL);
        assert_eq!(argv(&Command::Argv(vec!["ls".into()])).unwrap(), ["ls"]);
        assert!(matches!(
            argv(&Command::Argv(vec![])),
            Err(AgentError::EmptyArgv)
        ));
        assert!(matches!(
            argv(&Command::Argv(vec!["a".into(), "b\0".into()])),
            Err(AgentError::NulInArgument { index: 1 })
        ));
    }

    #[test]
    fn env_names_are_checked() {
        let env = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        assert!(check_env(&env("GOOD_NAME", "any = value")).is_ok());
        for bad in ["", "A=B", "A\0"] {
            assert!(matches!(
                check_env(&env(bad, "v")),
                Err(AgentError::InvalidEnvName { .. })
            ));
        }
        assert!(matches!(
            check_env(&env("A", "v\0")),
            Err(AgentError::NulInEnvValue { .. })
        ));
    }

    #[test]
    fn working_directories() {
        assert_eq!(working_dir(Some("/")).unwrap(), PathBuf::from("/"));
        assert_eq!(
            working_dir(Some("/no/such/dir")).unwrap_err().to_string(),
            "working directory /no/such/dir does not exist"
        );
        assert_eq!(
            working_dir(Some("/proc/self/status"))
                .unwrap_err()
                .to_string(),
            "working directory /proc/self/status is not a directory"
        );
        assert!(working_dir(None).unwrap().is_dir());
    }
}

//! Running commands in a VM: options and results.

use std::time::Duration;

use smolvm_protocol::{Command, ExecRequest};

use crate::client::CancelToken;
use crate::error::{Error, Result};

/// Default cap on captured output, per stream (16 MiB).
pub const DEFAULT_MAX_OUTPUT: u64 = 16 << 20;

/// What to run and how.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// The command (a shell line or an argv).
    pub command: Command,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Working directory in the guest.
    pub cwd: Option<String>,
    /// Bytes fed to the process's stdin (stdin is /dev/null when `None`).
    pub stdin: Option<Vec<u8>>,
    /// Kill the process group after this long.
    pub timeout: Option<Duration>,
    /// Cap on captured bytes per stream.
    pub max_output_bytes: u64,
    /// Lets another thread cancel the command (it is then killed in the guest).
    pub cancel: Option<CancelToken>,
}

impl ExecOptions {
    /// Runs `line` with `/bin/bash -c` (`/bin/sh -c` in a guest without bash).
    pub fn shell(line: impl Into<String>) -> ExecOptions {
        Self::new(Command::Shell(line.into()))
    }

    /// Runs a program with arguments, without a shell.
    pub fn argv<I, S>(argv: I) -> ExecOptions
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::new(Command::Argv(argv.into_iter().map(Into::into).collect()))
    }

    fn new(command: Command) -> ExecOptions {
        ExecOptions {
            command,
            env: Vec::new(),
            cwd: None,
            stdin: None,
            timeout: None,
            max_output_bytes: DEFAULT_MAX_OUTPUT,
            cancel: None,
        }
    }

    /// Lets `token` cancel the command from another thread.
    pub fn cancel_with(mut self, token: CancelToken) -> Self {
        self.cancel = Some(token);
        self
    }

    /// Sets the cap on captured bytes per stream.
    pub fn max_output(mut self, bytes: u64) -> Self {
        self.max_output_bytes = bytes;
        self
    }

    /// Sets the timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Sets stdin.
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }

    /// Checks the options; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let empty = match &self.command {
            Command::Shell(s) => s.trim().is_empty(),
            Command::Argv(v) => v.first().is_none_or(|p| p.is_empty()),
        };
        if empty {
            return Err(Error::InvalidConfig {
                field: "command",
                value: String::new(),
                allowed: "a non-empty command".into(),
            });
        }
        for (k, _) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(Error::InvalidConfig {
                    field: "env",
                    value: k.clone(),
                    allowed: "variable names that are non-empty and contain no '=' or NUL".into(),
                });
            }
        }
        if let Some(t) = self.timeout {
            if t.is_zero() || t > Duration::from_secs(7 * 24 * 3600) {
                return Err(Error::InvalidConfig {
                    field: "timeout",
                    value: format!("{t:?}"),
                    allowed: "more than 0 and at most 7 days".into(),
                });
            }
        }
        Ok(())
    }

    /// The wire request.
    pub fn to_request(&self) -> ExecRequest {
        ExecRequest {
            command: self.command.clone(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            stdin: self.stdin.is_some(),
            timeout_ms: self.timeout.map(|t| t.as_millis() as u64),
            max_output_bytes: self.max_output_bytes,
        }
    }
}

/// The result of a command.
#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    /// Exit code (None when a signal ended it).
    pub exit_code: Option<i32>,
    /// The signal that ended it.
    pub signal: Option<i32>,
    /// Captured stdout (raw bytes, capped).
    pub stdout: Vec<u8>,
    /// Captured stderr (raw bytes, capped).
    pub stderr: Vec<u8>,
    /// Whether stdout was cut at the cap.
    pub stdout_truncated: bool,
    /// Whether stderr was cut at the cap.
    pub stderr_truncated: bool,
    /// Whether the timeout killed it.
    pub timed_out: bool,
    /// Host-side wall time of the call.
    pub duration: Duration,
}

impl ExecOutput {
    /// Exit code as a shell reports it (128+signal for signals, 124 for timeouts).
    pub fn shell_code(&self) -> i32 {
        if self.timed_out {
            124
        } else if let Some(c) = self.exit_code {
            c
        } else {
            128 + self.signal.unwrap_or(0)
        }
    }

    /// Stdout as text (invalid UTF-8 replaced).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Stderr as text (invalid UTF-8 replaced).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

//! Host tools the pipeline runs: finding them on `PATH` and running them with their
//! standard error captured for the error message.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::ImageError;

/// A host executable and the Debian package that provides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    /// The executable name.
    pub name: &'static str,
    /// The Debian package to install when it is missing.
    pub package: &'static str,
}

/// `apt-get`, for downloading the kernel package.
pub const APT_GET: Tool = Tool {
    name: "apt-get",
    package: "apt",
};
/// `apt-cache`, for resolving the kernel package and version.
pub const APT_CACHE: Tool = Tool {
    name: "apt-cache",
    package: "apt",
};
/// `dpkg-deb`, for unpacking the kernel package.
pub const DPKG_DEB: Tool = Tool {
    name: "dpkg-deb",
    package: "dpkg",
};
/// `mmdebstrap`, for building the Debian root filesystem.
pub const MMDEBSTRAP: Tool = Tool {
    name: "mmdebstrap",
    package: "mmdebstrap",
};
/// `mkfs.ext4`, for turning the root filesystem directory into a disk image.
pub const MKFS_EXT4: Tool = Tool {
    name: "mkfs.ext4",
    package: "e2fsprogs",
};

/// `ssh-keygen`, for the user's key pair and SSH images' host keys.
pub const SSH_KEYGEN: Tool = Tool {
    name: "ssh-keygen",
    package: "openssh-client",
};
/// `debugfs`, for writing files into an ext4 image without mounting it.
pub const DEBUGFS: Tool = Tool {
    name: "debugfs",
    package: "e2fsprogs",
};
/// `e2fsck`, for checking an ext4 image.
pub const E2FSCK: Tool = Tool {
    name: "e2fsck",
    package: "e2fsprogs",
};
/// `resize2fs`, for growing an ext4 image.
pub const RESIZE2FS: Tool = Tool {
    name: "resize2fs",
    package: "e2fsprogs",
};

/// Every tool a full build needs.
pub const BUILD_TOOLS: &[Tool] = &[APT_CACHE, APT_GET, DPKG_DEB, MMDEBSTRAP, MKFS_EXT4];

/// Directories searched after `PATH`: `mkfs.ext4` lives in `/usr/sbin`, which a normal
/// user's `PATH` often lacks.
const EXTRA_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// How much of a failing tool's standard error goes into the error message.
const STDERR_TAIL_LINES: usize = 30;

/// Finds `tool` on `PATH` (then in the sbin directories).
pub fn find(tool: Tool) -> Result<PathBuf, ImageError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(tool.name))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| ImageError::MissingTool {
            tool: tool.name.to_string(),
            package: tool.package.to_string(),
        })
}

/// Checks that all `tools` exist, failing on the first missing one.
pub fn require(tools: &[Tool]) -> Result<(), ImageError> {
    tools.iter().try_for_each(|&tool| find(tool).map(drop))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Builds a command for `tool` with standard input from `/dev/null`.
pub fn command(tool: Tool) -> Result<Command, ImageError> {
    let mut cmd = Command::new(find(tool)?);
    cmd.stdin(Stdio::null());
    Ok(cmd)
}

/// Runs `cmd` to completion and returns its standard output; a failure carries the end of
/// its standard error.
pub fn run(cmd: &mut Command) -> Result<String, ImageError> {
    let line = display(cmd);
    tracing::debug!(command = %line, "running");
    let output = cmd.output().map_err(|source| ImageError::Spawn {
        tool: program_name(cmd),
        source,
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(ImageError::ToolFailed {
            command: line,
            status: output.status.to_string(),
            stderr: tail(stderr.lines()),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `cmd`, handing each line of its standard error to `on_line` as it comes (for a
/// progress message); standard output is discarded.
pub fn run_streaming(cmd: &mut Command, mut on_line: impl FnMut(&str)) -> Result<(), ImageError> {
    let line = display(cmd);
    tracing::debug!(command = %line, "running");
    let tool = program_name(cmd);
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ImageError::Spawn {
            tool: tool.clone(),
            source,
        })?;
    let mut recent: VecDeque<String> = VecDeque::with_capacity(STDERR_TAIL_LINES);
    if let Some(stderr) = child.stderr.take() {
        for text in BufReader::new(stderr).split(b'\n').map_while(Result::ok) {
            let text = String::from_utf8_lossy(&text).into_owned();
            tracing::trace!(target: "smolvm_image::tool", "{text}");
            on_line(&text);
            if recent.len() == STDERR_TAIL_LINES {
                recent.pop_front();
            }
            recent.push_back(text);
        }
    }
    let status = child
        .wait()
        .map_err(|source| ImageError::Spawn { tool, source })?;
    if !status.success() {
        return Err(ImageError::ToolFailed {
            command: line,
            status: status.to_string(),
            stderr: tail(recent.iter().map(String::as_str)),
        });
    }
    Ok(())
}

/// The last lines of `lines`, joined, or a note that there were none.
fn tail<'a>(lines: impl Iterator<Item = &'a str>) -> String {
    let all: Vec<&str> = lines.filter(|l| !l.trim().is_empty()).collect();
    let start = all.len().saturating_sub(STDERR_TAIL_LINES);
    if all.is_empty() {
        "(it printed nothing on standard error)".to_string()
    } else {
        all[start..].join("\n")
    }
}

fn program_name(cmd: &Command) -> String {
    Path::new(cmd.get_program())
        .file_name()
        .unwrap_or(cmd.get_program())
        .to_string_lossy()
        .into_owned()
}

/// A command line as a user could paste it into a shell.
pub fn display(cmd: &Command) -> String {
    let mut words = vec![program_name(cmd)];
    words.extend(cmd.get_args().map(quote));
    words.join(" ")
}

/// Quotes `arg` for a POSIX shell when it needs it.
pub fn quote(arg: &OsStr) -> String {
    let text = arg.to_string_lossy();
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_its_package() {
        let err = find(Tool {
            name: "smolvm-no-such-tool",
            package: "smolvm-pkg",
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "smolvm-no-such-tool not found: install the Debian package `smolvm-pkg` \
             (apt-get install smolvm-pkg)"
        );
    }

    #[test]
    fn failing_command_reports_stderr_tail() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo out; echo first >&2; echo 'last words' >&2; exit 3",
        ]);
        let err = run(&mut cmd).unwrap_err().to_string();
        assert!(err.contains("sh -c 'echo out;"), "{err}");
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(err.contains("first\nlast words"), "{err}");
        assert!(!err.contains("out\n"), "{err}");
    }

    #[test]
    fn streaming_command_hands_out_lines() {
        let mut lines = Vec::new();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo a >&2; echo b >&2"]);
        run_streaming(&mut cmd, |l| lines.push(l.to_string())).unwrap();
        assert_eq!(lines, ["a", "b"]);
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo boom >&2; exit 1"]);
        let err = run_streaming(&mut cmd, |_| {}).unwrap_err().to_string();
        assert!(err.contains("boom"), "{err}");
    }

    #[test]
    fn run_returns_stdout() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hello"]);
        assert_eq!(run(&mut cmd).unwrap(), "hello\n");
    }
}

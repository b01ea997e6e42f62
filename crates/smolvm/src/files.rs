//! Copying files into and out of a running VM, streamed through the agent's exec channel
//! (no network, no SSH). Paths travel as arguments, never as shell text; sizes are checked
//! on both sides; a file arrives whole or not at all (written to a temporary name, then
//! renamed).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{io_err, Error, Result};
use crate::exec::ExecOptions;
use crate::vm::Vm;
use crate::OutputStream;

/// Largest file `read_file`/`download` accept unless told otherwise (4 GiB).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 4 << 30;
/// Longest guest path accepted (Linux's PATH_MAX).
pub const MAX_GUEST_PATH: usize = 4096;
/// How long one file transfer may take in all.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(3600);
/// Cap on what the helper commands may print besides file data.
const SMALL_OUTPUT: u64 = 64 * 1024;

/// Writes stdin to `$1` through a temporary file in the same directory, sets its mode
/// (`$2` in octal, or the mode of the file it replaces), checks the size against `$3`,
/// prints it, renames.
const WRITE_SCRIPT: &str = r#"set -e
p=$1; mode=$2
d=$(dirname -- "$p")
mkdir -p -- "$d"
t=$(mktemp -- "$d/.smolvm-upload.XXXXXX")
trap 'rm -f -- "$t"' EXIT
cat > "$t"
if [ -n "$mode" ]; then chmod -- "$mode" "$t"; elif [ -f "$p" ]; then chmod --reference="$p" -- "$t"; else chmod 0644 -- "$t"; fi
n=$(stat -c %s -- "$t")
if [ "$n" != "$3" ]; then echo "received $n bytes, expected $3; the file was not replaced" >&2; exit 3; fi
echo "$n"
mv -f -- "$t" "$p"
trap - EXIT"#;

/// Prints `TYPE|SIZE|MODE` of `$1` (following symlinks).
const STAT_SCRIPT: &str = r#"exec stat -L -c '%F|%s|%a' -- "$1""#;

/// What the guest says about a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestFileInfo {
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (e.g. 0o644).
    pub mode: u32,
}

/// Checks a guest path: absolute, no NUL, at most [`MAX_GUEST_PATH`] bytes.
pub fn validate_guest_path(field: &'static str, path: &str) -> Result<()> {
    let bad = |allowed: &str| Error::InvalidConfig {
        field,
        value: path.chars().take(200).collect(),
        allowed: allowed.into(),
    };
    if !path.starts_with('/') {
        return Err(bad("an absolute path in the guest, starting with /"));
    }
    if path.contains('\0') {
        return Err(bad("a path without NUL bytes"));
    }
    if path.len() > MAX_GUEST_PATH {
        return Err(bad("a path of at most 4096 bytes"));
    }
    Ok(())
}

fn validate_mode(mode: u32) -> Result<()> {
    if mode > 0o7777 {
        return Err(Error::InvalidConfig {
            field: "mode",
            value: format!("{mode:o}"),
            allowed: "permission bits between 0 and 0o7777".into(),
        });
    }
    Ok(())
}

fn file_err(path: &str, reason: impl Into<String>) -> Error {
    Error::GuestFile {
        path: path.to_string(),
        reason: reason.into(),
    }
}

/// The guest command's complaint, cleaned up for a message.
fn complaint(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if text.is_empty() {
        "the guest command failed without a message".into()
    } else {
        text.chars().take(500).collect()
    }
}

/// Parses `TYPE|SIZE|MODE` from the stat helper; anything else is refused.
fn parse_stat(path: &str, out: &[u8]) -> Result<(String, GuestFileInfo)> {
    let text = std::str::from_utf8(out)
        .map_err(|_| file_err(path, "the guest's stat answer is not text"))?
        .trim_end();
    let mut parts = text.rsplitn(3, '|');
    let (Some(mode), Some(size), Some(kind)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(file_err(path, "the guest's stat answer is malformed"));
    };
    let size = size
        .parse::<u64>()
        .map_err(|_| file_err(path, "the guest's stat answer has no size"))?;
    let mode = u32::from_str_radix(mode, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| file_err(path, "the guest's stat answer has no mode"))?;
    Ok((kind.to_string(), GuestFileInfo { size, mode }))
}

fn script(body: &str, args: &[&str]) -> ExecOptions {
    let mut argv = vec!["/bin/sh", "-c", body, "smolvm-files"];
    argv.extend_from_slice(args);
    ExecOptions::argv(argv).timeout(TRANSFER_TIMEOUT)
}

impl Vm {
    /// Size and permissions of a regular file in the guest.
    pub fn stat_file(&self, path: &str) -> Result<GuestFileInfo> {
        validate_guest_path("path", path)?;
        let out = self.exec(&script(STAT_SCRIPT, &[path]).max_output(SMALL_OUTPUT))?;
        if out.shell_code() != 0 {
            return Err(file_err(path, complaint(&out.stderr)));
        }
        let (kind, info) = parse_stat(path, &out.stdout)?;
        if kind != "regular file" && kind != "regular empty file" {
            return Err(file_err(
                path,
                format!("is a {kind}, not a regular file (copy files one at a time)"),
            ));
        }
        Ok(info)
    }

    /// Writes `data` to `path` in the guest (parent directories are made). `mode` sets the
    /// permissions; without it a replaced file keeps its own and a new one gets 0644.
    pub fn write_file(&self, path: &str, data: &[u8], mode: Option<u32>) -> Result<()> {
        let reader = std::io::Cursor::new(data.to_vec());
        self.write_file_from(path, Box::new(reader), data.len() as u64, mode)
    }

    /// Streams `size` bytes from `reader` into `path` in the guest; the file appears under
    /// its name only when complete and of the right size.
    pub fn write_file_from(
        &self,
        path: &str,
        reader: Box<dyn Read + Send>,
        size: u64,
        mode: Option<u32>,
    ) -> Result<()> {
        validate_guest_path("path", path)?;
        if path.ends_with('/') {
            return Err(Error::InvalidConfig {
                field: "path",
                value: path.to_string(),
                allowed: "a file path, not a directory (no trailing /)".into(),
            });
        }
        if let Some(m) = mode {
            validate_mode(m)?;
        }
        let mode_arg = mode.map(|m| format!("{m:o}")).unwrap_or_default();
        let size_arg = size.to_string();
        let opts = script(WRITE_SCRIPT, &[path, &mode_arg, &size_arg]).max_output(SMALL_OUTPUT);
        let (mut so, mut se) = (Vec::new(), Vec::new());
        let res = self.exec_io(&opts, Some(reader), &mut |s, d| {
            let buf = match s {
                OutputStream::Stdout => &mut so,
                OutputStream::Stderr => &mut se,
            };
            if (buf.len() as u64) < SMALL_OUTPUT {
                buf.extend_from_slice(d);
            }
        })?;
        if res.shell_code() != 0 {
            return Err(file_err(path, complaint(&se)));
        }
        let written = String::from_utf8_lossy(&so).trim().parse::<u64>().ok();
        if written != Some(size) {
            return Err(file_err(
                path,
                format!(
                    "wrote {} bytes, expected {size}; the file was not replaced",
                    written.map_or("an unknown number of".into(), |w| w.to_string())
                ),
            ));
        }
        Ok(())
    }

    /// Reads a whole regular file from the guest, refusing files over `max_bytes`.
    pub fn read_file(&self, path: &str, max_bytes: u64) -> Result<Vec<u8>> {
        let info = self.stat_file(path)?;
        if info.size > max_bytes {
            return Err(file_err(
                path,
                format!(
                    "is {} bytes, over the limit of {max_bytes} (pass a larger max_bytes, or download it)",
                    info.size
                ),
            ));
        }
        let mut data = Vec::with_capacity(info.size as usize);
        self.read_into(path, max_bytes, &mut data)?;
        Ok(data)
    }

    /// Streams `path` from the guest into `out`; returns the bytes copied.
    fn read_into(&self, path: &str, max_bytes: u64, out: &mut dyn Write) -> Result<u64> {
        // One byte over the limit tells a file that grew from one that fits exactly.
        let cap = max_bytes.saturating_add(1);
        let opts = ExecOptions::argv(["/bin/cat", "--", path])
            .timeout(TRANSFER_TIMEOUT)
            .max_output(cap);
        let mut copied = 0u64;
        let mut write_error: Option<std::io::Error> = None;
        let mut se = Vec::new();
        let res = self.exec_io(&opts, None, &mut |s, d| match s {
            OutputStream::Stdout => {
                let room = cap.saturating_sub(copied) as usize;
                let d = &d[..d.len().min(room)];
                copied += d.len() as u64;
                if write_error.is_none() {
                    if let Err(e) = out.write_all(d) {
                        write_error = Some(e);
                    }
                }
            }
            OutputStream::Stderr => {
                if (se.len() as u64) < SMALL_OUTPUT {
                    se.extend_from_slice(d);
                }
            }
        })?;
        if let Some(e) = write_error {
            return Err(Error::Io {
                context: format!("writing the copy of guest file {path}"),
                source: e,
            });
        }
        if res.shell_code() != 0 {
            return Err(file_err(path, complaint(&se)));
        }
        if copied > max_bytes || res.stdout_truncated {
            return Err(file_err(
                path,
                format!("grew past the limit of {max_bytes} bytes while being read"),
            ));
        }
        Ok(copied)
    }

    /// Copies a local regular file into the guest, keeping its permissions. A `remote`
    /// ending in `/` means "into this directory, under the same name". Returns the guest path.
    pub fn upload(&self, local: &Path, remote: &str) -> Result<String> {
        validate_guest_path("remote_path", remote)?;
        let file = std::fs::File::open(local)
            .map_err(io_err(format!("cannot open {} to upload", local.display())))?;
        let meta = file
            .metadata()
            .map_err(io_err(format!("cannot read {}", local.display())))?;
        if !meta.is_file() {
            return Err(Error::InvalidConfig {
                field: "local_path",
                value: local.display().to_string(),
                allowed: "a regular file (directories are copied one file at a time)".into(),
            });
        }
        let remote =
            if remote.ends_with('/') {
                let name = local.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
                    Error::InvalidConfig {
                        field: "local_path",
                        value: local.display().to_string(),
                        allowed: "a file name that is valid UTF-8".into(),
                    }
                })?;
                format!("{remote}{name}")
            } else {
                remote.to_string()
            };
        let mode = meta.permissions().mode() & 0o7777;
        self.write_file_from(&remote, Box::new(file), meta.len(), Some(mode))?;
        Ok(remote)
    }

    /// Copies a regular file from the guest to `local`, keeping its permissions; a `local`
    /// that is a directory (or ends in `/`) receives it under the same name. Parent
    /// directories are made. Files over `max_bytes` are refused. Returns the local path.
    pub fn download(&self, remote: &str, local: &Path, max_bytes: u64) -> Result<PathBuf> {
        let info = self.stat_file(remote)?;
        if info.size > max_bytes {
            return Err(file_err(
                remote,
                format!("is {} bytes, over the limit of {max_bytes}", info.size),
            ));
        }
        let into_dir = local.is_dir() || local.as_os_str().to_string_lossy().ends_with('/');
        let target = if into_dir {
            let name = Path::new(remote)
                .file_name()
                .ok_or_else(|| file_err(remote, "has no file name"))?;
            local.join(name)
        } else {
            local.to_path_buf()
        };
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .map_err(io_err(format!("cannot create {}", parent.display())))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".smolvm-download.")
            .tempfile_in(&parent)
            .map_err(io_err(format!(
                "cannot create a file in {}",
                parent.display()
            )))?;
        let copied = {
            let mut w = std::io::BufWriter::new(tmp.as_file_mut());
            let n = self.read_into(remote, max_bytes, &mut w)?;
            w.flush()
                .map_err(io_err(format!("writing {}", target.display())))?;
            n
        };
        if copied != info.size {
            return Err(file_err(
                remote,
                format!(
                    "changed while being read ({copied} bytes, {} expected)",
                    info.size
                ),
            ));
        }
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(info.mode)).map_err(
            io_err(format!("cannot set the mode of {}", target.display())),
        )?;
        tmp.persist(&target).map_err(|e| Error::Io {
            context: format!("cannot move the download into {}", target.display()),
            source: e.error,
        })?;
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_answers_are_parsed_strictly() {
        let (k, i) = parse_stat("/x", b"regular file|12|644\n").unwrap();
        assert_eq!((k.as_str(), i.size, i.mode), ("regular file", 12, 0o644));
        let (k, _) = parse_stat("/x", b"regular empty file|0|600").unwrap();
        assert_eq!(k, "regular empty file");
        for bad in [
            &b""[..],
            b"garbage",
            b"regular file|-1|644",
            b"regular file|1|99999",
            b"regular file|1|9",
            b"\xff\xfe|1|644",
        ] {
            assert!(parse_stat("/x", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn guest_paths_are_checked() {
        assert!(validate_guest_path("path", "/tmp/x").is_ok());
        for bad in ["tmp/x", "", "/a\0b"] {
            let e = validate_guest_path("path", bad).unwrap_err();
            assert!(e.to_string().contains("path"), "{e}");
        }
        assert!(validate_guest_path("path", &format!("/{}", "a".repeat(5000))).is_err());
        assert!(validate_mode(0o10000).is_err());
        assert!(validate_mode(0o755).is_ok());
    }
}

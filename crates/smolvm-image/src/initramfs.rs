//! A writer for uncompressed `newc` cpio archives, the format Linux unpacks as an initramfs.
//!
//! Entries are written with uid/gid 0 and mtime 0 so the same inputs give the same bytes.
//! Parent directories are added automatically (mode 0755) when an entry needs them.

use std::collections::HashSet;
use std::io::Write;

use crate::error::ImageError;

/// The `newc` magic (no checksums).
const NEWC_MAGIC: &str = "070701";
/// Length of a `newc` header: the magic and 13 eight-digit hex fields.
const HEADER_LEN: usize = 6 + 13 * 8;
/// The name of the entry that ends an archive.
const TRAILER: &str = "TRAILER!!!";
/// File type bits (`S_IFMT`) for the entry kinds we write.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
/// Largest file the format can describe (its size field is 32 bits).
const MAX_FILE_BYTES: usize = u32::MAX as usize;

/// Writes a `newc` cpio archive into any [`Write`].
///
/// Paths are given as absolute (`/init`) or relative (`init`) paths and stored relative, the
/// way the kernel and `cpio` expect. Call [`Writer::finish`] to write the trailer.
pub struct Writer<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    entries: HashSet<String>,
    dirs: HashSet<String>,
}

impl<W: Write> Writer<W> {
    /// Starts an empty archive.
    pub fn new(out: W) -> Self {
        Writer {
            out,
            written: 0,
            next_ino: 1,
            entries: HashSet::new(),
            dirs: HashSet::new(),
        }
    }

    /// Adds a directory with permission bits `mode` (e.g. `0o755`).
    pub fn add_dir(&mut self, path: &str, mode: u32) -> Result<(), ImageError> {
        let path = self.prepare(path)?;
        self.dirs.insert(path.clone());
        self.entry(&path, S_IFDIR | (mode & 0o7777), 2, 0, &[])
    }

    /// Adds a regular file with permission bits `mode` and contents `data`.
    pub fn add_file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), ImageError> {
        let path = self.prepare(path)?;
        if data.len() > MAX_FILE_BYTES {
            return Err(ImageError::Cpio {
                path,
                reason: "file is larger than 4 GiB".into(),
            });
        }
        self.entry(&path, S_IFREG | (mode & 0o7777), 1, 0, data)
    }

    /// Adds a symbolic link at `path` pointing to `target`.
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), ImageError> {
        let path = self.prepare(path)?;
        if target.is_empty() || target.contains('\0') {
            return Err(ImageError::Cpio {
                path,
                reason: "symlink target is empty or holds a NUL byte".into(),
            });
        }
        self.entry(&path, S_IFLNK | 0o777, 1, 0, target.as_bytes())
    }

    /// Adds a character device node (e.g. `/dev/console`, 5:1), which the kernel creates
    /// while unpacking: no privileges are needed to write it.
    pub fn add_char_device(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), ImageError> {
        let path = self.prepare(path)?;
        let rdev = (u64::from(major) << 32) | u64::from(minor);
        self.entry(&path, S_IFCHR | (mode & 0o7777), 1, rdev, &[])
    }

    /// Writes the `TRAILER!!!` entry and returns the underlying writer.
    pub fn finish(mut self) -> Result<W, ImageError> {
        self.header(TRAILER, 0, 0, 1, 0, 0)?;
        self.write_padded(TRAILER.as_bytes(), true)?;
        self.out.flush().map_err(|e| write_error(TRAILER, e))?;
        Ok(self.out)
    }

    /// Number of bytes written so far.
    pub fn len(&self) -> u64 {
        self.written
    }

    /// Whether nothing has been written yet.
    pub fn is_empty(&self) -> bool {
        self.written == 0
    }

    /// Normalizes `path`, rejects bad or duplicate paths and adds missing parent directories.
    fn prepare(&mut self, path: &str) -> Result<String, ImageError> {
        let normalized = normalize(path)?;
        if self.entries.contains(&normalized) {
            return Err(ImageError::Cpio {
                path: normalized,
                reason: "added twice".into(),
            });
        }
        let mut parent = String::new();
        let components: Vec<&str> = normalized.split('/').collect();
        for component in &components[..components.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            if self.dirs.contains(&parent) {
                continue;
            }
            if self.entries.contains(&parent) {
                return Err(ImageError::Cpio {
                    path: normalized.clone(),
                    reason: format!("its parent {parent:?} is not a directory"),
                });
            }
            self.dirs.insert(parent.clone());
            self.entries.insert(parent.clone());
            self.entry(&parent, S_IFDIR | 0o755, 2, 0, &[])?;
        }
        self.entries.insert(normalized.clone());
        Ok(normalized)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: u64,
        data: &[u8],
    ) -> Result<(), ImageError> {
        let ino = self.next_ino;
        self.next_ino += 1;
        // Sizes were bounded by the callers.
        self.header(name, ino, mode, nlink, rdev, data.len() as u32)?;
        self.write_padded(name.as_bytes(), true)?;
        if !data.is_empty() {
            self.write_padded(data, false).map_err(|e| match e {
                ImageError::Cpio { reason, .. } => ImageError::Cpio {
                    path: name.to_string(),
                    reason,
                },
                other => other,
            })?;
        }
        Ok(())
    }

    fn header(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        rdev: u64,
        size: u32,
    ) -> Result<(), ImageError> {
        let name_size = name.len() + 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0,                   // devmajor
            0,                   // devminor
            (rdev >> 32) as u32, // rdevmajor
            rdev as u32,         // rdevminor
            name_size as u32,
            0, // check
        ];
        let mut header = String::with_capacity(HEADER_LEN);
        header.push_str(NEWC_MAGIC);
        for field in fields {
            header.push_str(&format!("{field:08X}"));
        }
        self.write_raw(header.as_bytes(), name)
    }

    /// Writes `data` (plus a NUL if `nul`), then zeros up to the next 4-byte boundary.
    fn write_padded(&mut self, data: &[u8], nul: bool) -> Result<(), ImageError> {
        self.write_raw(data, "")?;
        if nul {
            self.write_raw(&[0], "")?;
        }
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.write_raw(&[0; 3][..pad], "")
    }

    fn write_raw(&mut self, data: &[u8], name: &str) -> Result<(), ImageError> {
        self.out.write_all(data).map_err(|e| write_error(name, e))?;
        self.written += data.len() as u64;
        Ok(())
    }
}

fn write_error(name: &str, e: std::io::Error) -> ImageError {
    ImageError::Cpio {
        path: name.to_string(),
        reason: format!("write failed: {e}"),
    }
}

/// Turns `/a/b` or `a/b` into `a/b`, rejecting empty, `.`/`..` components and NUL bytes.
fn normalize(path: &str) -> Result<String, ImageError> {
    let bad = |reason: &str| ImageError::Cpio {
        path: path.to_string(),
        reason: reason.to_string(),
    };
    if path.contains('\0') {
        return Err(bad("holds a NUL byte"));
    }
    let trimmed = path.trim_start_matches('/').trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(bad("empty path"));
    }
    if trimmed == TRAILER {
        return Err(bad("reserved name"));
    }
    for component in trimmed.split('/') {
        if component.is_empty() || component == "." || component == ".." {
            return Err(bad("holds an empty, `.` or `..` component"));
        }
    }
    Ok(trimmed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One entry parsed back from an archive.
    #[derive(Debug)]
    struct Parsed {
        name: String,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// A tiny `newc` reader that checks magic, alignment and the trailer.
    fn parse(archive: &[u8]) -> Vec<Parsed> {
        let mut pos = 0;
        let mut entries = Vec::new();
        loop {
            assert_eq!(pos % 4, 0, "header not 4-byte aligned");
            let header = std::str::from_utf8(&archive[pos..pos + HEADER_LEN]).unwrap();
            assert_eq!(&header[..6], NEWC_MAGIC);
            let field = |i: usize| u32::from_str_radix(&header[6 + i * 8..14 + i * 8], 16).unwrap();
            let (mode, nlink, size, name_size) = (field(1), field(4), field(6), field(11));
            assert_eq!(field(2), 0, "uid");
            assert_eq!(field(5), 0, "mtime");
            let name_start = pos + HEADER_LEN;
            let name_end = name_start + name_size as usize;
            assert_eq!(archive[name_end - 1], 0, "name not NUL-terminated");
            let name = std::str::from_utf8(&archive[name_start..name_end - 1])
                .unwrap()
                .to_string();
            let data_start = name_end.next_multiple_of(4);
            assert!(archive[name_end..data_start].iter().all(|&b| b == 0));
            let data_end = data_start + size as usize;
            let data = archive[data_start..data_end].to_vec();
            pos = data_end.next_multiple_of(4);
            assert!(archive[data_end..pos].iter().all(|&b| b == 0));
            if name == TRAILER {
                assert_eq!(pos, archive.len(), "bytes after the trailer");
                return entries;
            }
            entries.push(Parsed {
                name,
                mode,
                nlink,
                rdev: (field(9), field(10)),
                data,
            });
        }
    }

    #[test]
    fn round_trips_entries_with_alignment_and_trailer() {
        let mut w = Writer::new(Vec::new());
        w.add_dir("/dev", 0o755).unwrap();
        w.add_char_device("/dev/console", 0o600, 5, 1).unwrap();
        w.add_file("/init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.add_file("/smolvm/modules/a.ko", 0o644, &[1, 2, 3, 4, 5])
            .unwrap();
        w.add_symlink("/bin", "usr/bin").unwrap();
        w.add_file("/empty", 0o600, &[]).unwrap();
        let archive = w.finish().unwrap();
        assert_eq!(archive.len() % 4, 0);

        let entries = parse(&archive);
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "init",
                "smolvm",
                "smolvm/modules",
                "smolvm/modules/a.ko",
                "bin",
                "empty"
            ]
        );
        let by_name = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(by_name("dev").mode, 0o040755);
        assert_eq!(by_name("dev").nlink, 2);
        assert_eq!(by_name("dev/console").mode, 0o020600);
        assert_eq!(by_name("dev/console").rdev, (5, 1));
        assert_eq!(by_name("init").mode, 0o100755);
        assert_eq!(by_name("init").data, b"#!/bin/sh\necho hi\n");
        assert_eq!(by_name("smolvm/modules").mode, 0o040755);
        assert_eq!(by_name("smolvm/modules/a.ko").data, [1, 2, 3, 4, 5]);
        assert_eq!(by_name("bin").mode, 0o120777);
        assert_eq!(by_name("bin").data, b"usr/bin");
        assert!(by_name("empty").data.is_empty());
    }

    #[test]
    fn output_is_deterministic() {
        let build = || {
            let mut w = Writer::new(Vec::new());
            w.add_file("/a/b/c", 0o644, b"x").unwrap();
            w.finish().unwrap()
        };
        assert_eq!(build(), build());
    }

    #[test]
    fn empty_archive_is_just_the_trailer() {
        let archive = Writer::new(Vec::new()).finish().unwrap();
        assert!(parse(&archive).is_empty());
        assert_eq!(
            archive.len(),
            (HEADER_LEN + TRAILER.len() + 1).next_multiple_of(4)
        );
    }

    #[test]
    fn bad_and_duplicate_paths_are_rejected() {
        let mut w = Writer::new(Vec::new());
        for bad in ["", "/", "a/../b", "./a", "a//b", "TRAILER!!!", "a\0b"] {
            assert!(
                matches!(w.add_file(bad, 0o644, b""), Err(ImageError::Cpio { .. })),
                "{bad:?}"
            );
        }
        w.add_file("/x", 0o644, b"").unwrap();
        assert!(w.add_file("x", 0o644, b"").is_err());
        assert!(w.add_file("/x/y", 0o644, b"").is_err(), "parent is a file");
        assert!(w.add_symlink("/l", "").is_err());
    }

    #[test]
    fn the_cpio_tool_lists_the_archive() {
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("this test needs the cpio tool (run scripts/install-deps): {e}")
            });
        let mut w = Writer::new(Vec::new());
        w.add_file("/init", 0o755, b"binary").unwrap();
        w.add_dir("/proc", 0o755).unwrap();
        let archive = w.finish().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&archive).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "init\nproc\n");
    }
}

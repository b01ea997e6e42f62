//! Sparse files: root filesystem images are mostly holes. Copying and hashing them visit
//! only their data extents (`SEEK_DATA`/`SEEK_HOLE`); holes cost no reads.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::error::ImageError;

/// Copies `from` to the new file `to`, leaving holes (and zero blocks) as holes: a clone
/// where the filesystem can (`FICLONE`), else the data extents (`SEEK_DATA`/`SEEK_HOLE`).
pub fn sparse_copy(from: &Path, to: &Path) -> Result<(), ImageError> {
    let input = File::open(from).map_err(ImageError::io("cannot open", from))?;
    let len = input
        .metadata()
        .map_err(ImageError::io("cannot inspect", from))?
        .len();
    let output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(to)
        .map_err(ImageError::io("cannot create", to))?;
    // SAFETY: FICLONE reads the two descriptors, which the files keep open for the call.
    if unsafe { libc::ioctl(output.as_raw_fd(), libc::FICLONE, input.as_raw_fd()) } == 0 {
        return Ok(());
    }
    output
        .set_len(len)
        .map_err(ImageError::io("cannot size", to))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let Some((start, end)) = next_data(&input, pos, len) else {
            break;
        };
        let mut offset = start;
        while offset < end {
            let want = (end - offset).min(buf.len() as u64) as usize;
            let n = input
                .read_at(&mut buf[..want], offset)
                .map_err(ImageError::io("cannot read", from))?;
            if n == 0 {
                break;
            }
            let chunk = &buf[..n];
            if chunk.iter().any(|&b| b != 0) {
                output
                    .write_all_at(chunk, offset)
                    .map_err(ImageError::io("cannot write", to))?;
            }
            offset += n as u64;
        }
        pos = end.max(pos + 1);
    }
    Ok(())
}

/// The next data extent at or after `pos`: `(start, end)`; `None` when only a hole is left.
/// Without `SEEK_DATA` support the rest of the file counts as data.
pub fn next_data(file: &File, pos: u64, len: u64) -> Option<(u64, u64)> {
    let fd = file.as_raw_fd();
    // SAFETY: lseek only moves the file offset of a descriptor `file` keeps open.
    let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        let err = std::io::Error::last_os_error();
        return (err.raw_os_error() != Some(libc::ENXIO)).then_some((pos, len));
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    let end = if end < 0 { len } else { (end as u64).min(len) };
    Some((start as u64, end))
}

/// Calls `on_chunk` with the contents of `file` (`len` bytes) in order, in chunks of at most
/// 1 MiB; holes come as zeros without being read.
pub fn for_each_chunk(
    file: &File,
    len: u64,
    mut on_chunk: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let (start, end) = next_data(file, pos, len).unwrap_or((len, len));
        while pos < start.min(len) {
            let n = (start - pos).min(zeros.len() as u64) as usize;
            on_chunk(&zeros[..n]);
            pos += n as u64;
        }
        // Always progress, even should the file change under us.
        let end = end.max(pos + 1).min(len);
        while pos < end {
            let want = (end - pos).min(buf.len() as u64) as usize;
            let n = file.read_at(&mut buf[..want], pos)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file shrank while it was read",
                ));
            }
            on_chunk(&buf[..n]);
            pos += n as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_contents_and_holes() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let from = tmp.path().join("from");
        let file = File::create(&from).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(b"start", 0).unwrap();
        file.write_all_at(&[7u8; 3 << 20], 20 << 20).unwrap();
        file.write_all_at(b"end", (64 << 20) - 3).unwrap();
        drop(file);
        let to = tmp.path().join("to");
        sparse_copy(&from, &to).unwrap();
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        let allocated = std::fs::metadata(&to).unwrap().blocks() * 512;
        assert!(allocated < 16 << 20, "{allocated} bytes allocated");
        assert!(sparse_copy(&from, &to).is_err(), "never overwrites");
    }

    #[test]
    fn chunks_cover_data_and_holes() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let file = File::create(&path).unwrap();
        file.set_len(10 << 20).unwrap();
        file.write_all_at(b"abc", 5 << 20).unwrap();
        file.write_all_at(b"end", (10 << 20) - 3).unwrap();
        let file = File::open(&path).unwrap();
        let mut seen = Vec::new();
        for_each_chunk(&file, 10 << 20, |c| seen.extend_from_slice(c)).unwrap();
        assert_eq!(seen, std::fs::read(&path).unwrap());
        let mut seen = Vec::new();
        for_each_chunk(&file, 0, |c| seen.extend_from_slice(c)).unwrap();
        assert!(seen.is_empty());
    }
}

//! Growing the root filesystem to fill its disk. The host may give a VM a disk (a qcow2
//! overlay) larger than the image's ext4 filesystem; after the root is mounted, PID 1 grows
//! the mounted filesystem online with `EXT4_IOC_RESIZE_FS` (what `resize2fs` does for a
//! mounted filesystem), so no tool is needed in the guest.
//!
//! The current size comes from the ext4 superblock (read from the device), the disk's size
//! from `BLKGETSIZE64`. Nothing here stops the boot: a failure is logged as a warning.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::Instant;

use nix::mount::MsFlags;

use crate::error::{AgentError, Result};
use crate::mounts;

/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`, the device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `EXT4_IOC_RESIZE_FS`: `_IOW('f', 16, __u64)`, grow to this many blocks.
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;

/// Where the superblock starts on the device, and how long it is.
const SUPERBLOCK_OFFSET: u64 = 1024;
const SUPERBLOCK_LEN: usize = 1024;
/// `s_magic` of ext2/3/4.
const EXT4_MAGIC: u16 = 0xEF53;
/// `s_feature_incompat` bit: block counts have 64 bits (else the high half is not used).
const INCOMPAT_64BIT: u32 = 0x80;
/// Largest `s_log_block_size` (64 KiB blocks).
const MAX_LOG_BLOCK_SIZE: u32 = 6;

/// Offsets of the superblock fields we read.
const S_BLOCKS_COUNT_LO: usize = 0x04;
const S_LOG_BLOCK_SIZE: usize = 0x18;
const S_MAGIC: usize = 0x38;
const S_FEATURE_INCOMPAT: usize = 0x60;
const S_BLOCKS_COUNT_HI: usize = 0x150;

/// Size of an ext4 filesystem, from its superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per block.
    pub block_size: u64,
    /// Blocks in the filesystem.
    pub blocks: u64,
    /// Whether block counts may exceed 32 bits.
    pub is_64bit: bool,
}

fn u32_at(sb: &[u8], offset: usize) -> Option<u32> {
    let bytes = sb.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

fn u16_at(sb: &[u8], offset: usize) -> Option<u16> {
    let bytes = sb.get(offset..offset.checked_add(2)?)?;
    Some(u16::from_le_bytes(bytes.try_into().ok()?))
}

/// Reads the size of the filesystem from the 1024 bytes of its superblock.
pub fn parse_superblock(sb: &[u8]) -> Result<Geometry, String> {
    if sb.len() < SUPERBLOCK_LEN {
        return Err(format!(
            "superblock is {} bytes, expected {SUPERBLOCK_LEN}",
            sb.len()
        ));
    }
    let field = |offset| u32_at(sb, offset).ok_or("superblock field out of range");
    let magic = u16_at(sb, S_MAGIC).ok_or("superblock field out of range")?;
    if magic != EXT4_MAGIC {
        return Err(format!("not ext4 (magic {magic:#06x})"));
    }
    let log = field(S_LOG_BLOCK_SIZE)?;
    if log > MAX_LOG_BLOCK_SIZE {
        return Err(format!("unsupported block size (s_log_block_size {log})"));
    }
    let is_64bit = field(S_FEATURE_INCOMPAT)? & INCOMPAT_64BIT != 0;
    let hi = if is_64bit {
        field(S_BLOCKS_COUNT_HI)?
    } else {
        0
    };
    let blocks = (u64::from(hi) << 32) | u64::from(field(S_BLOCKS_COUNT_LO)?);
    if blocks == 0 {
        return Err("block count is 0".into());
    }
    Ok(Geometry {
        block_size: 1024 << log,
        blocks,
        is_64bit,
    })
}

/// The block count to grow to on a device of `device_bytes`; `None` when the filesystem
/// already fills it (or is larger: never shrink).
pub fn target_blocks(geometry: &Geometry, device_bytes: u64) -> Option<u64> {
    let mut blocks = device_bytes / geometry.block_size;
    if !geometry.is_64bit {
        blocks = blocks.min(u64::from(u32::MAX));
    }
    (blocks > geometry.blocks).then_some(blocks)
}

/// Grows the ext4 filesystem of `device`, mounted at `mount_point` with `fstype` and
/// `options`, to the size of the device. Skips what cannot be grown (other filesystems,
/// read-only mounts); logs failures as warnings.
pub fn grow_root(device: &str, fstype: &str, options: Option<&str>, mount_point: &str) {
    if !matches!(fstype, "ext4" | "ext3" | "ext2") {
        tracing::debug!("not growing {device}: {fstype} is not ext4");
        return;
    }
    if mounts::parse_mount_options(options)
        .0
        .contains(MsFlags::MS_RDONLY)
    {
        tracing::debug!("not growing {device}: mounted read-only");
        return;
    }
    let start = Instant::now();
    match grow(device, mount_point) {
        Ok(Some((from, to))) => tracing::info!(
            "grew the root filesystem from {} to {} MiB in {} ms",
            from >> 20,
            to >> 20,
            start.elapsed().as_millis()
        ),
        Ok(None) => tracing::debug!("the root filesystem fills {device}"),
        Err(e) => tracing::warn!("cannot grow the root filesystem: {e}"),
    }
}

/// Grows the filesystem; returns its old and new size in bytes, or `None` when it already
/// fills the device.
fn grow(device: &str, mount_point: &str) -> Result<Option<(u64, u64)>> {
    let dev = File::open(device).map_err(|e| AgentError::io(format!("open {device}"), e))?;
    let mut sb = [0u8; SUPERBLOCK_LEN];
    dev.read_exact_at(&mut sb, SUPERBLOCK_OFFSET)
        .map_err(|e| AgentError::io(format!("read the superblock of {device}"), e))?;
    let geometry = parse_superblock(&sb).map_err(|reason| AgentError::Superblock {
        device: device.to_owned(),
        reason,
    })?;
    let mut device_bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for it.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), BLKGETSIZE64, &mut device_bytes) };
    if rc != 0 {
        return Err(AgentError::io(
            format!("get the size of {device}"),
            io::Error::last_os_error(),
        ));
    }
    let Some(blocks) = target_blocks(&geometry, device_bytes) else {
        return Ok(None);
    };
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(mount_point)
        .map_err(|e| AgentError::io(format!("open {mount_point}"), e))?;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 through the pointer, which is valid for it.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_RESIZE_FS, &blocks) };
    if rc != 0 {
        return Err(AgentError::io(
            format!(
                "resize {mount_point} from {} to {blocks} blocks",
                geometry.blocks
            ),
            io::Error::last_os_error(),
        ));
    }
    Ok(Some((
        geometry.blocks * geometry.block_size,
        blocks * geometry.block_size,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A superblock with these fields; everything else zero.
    fn superblock(blocks: u64, log_block_size: u32, incompat: u32) -> Vec<u8> {
        let mut sb = vec![0u8; SUPERBLOCK_LEN];
        sb[S_BLOCKS_COUNT_LO..S_BLOCKS_COUNT_LO + 4]
            .copy_from_slice(&(blocks as u32).to_le_bytes());
        sb[S_BLOCKS_COUNT_HI..S_BLOCKS_COUNT_HI + 4]
            .copy_from_slice(&((blocks >> 32) as u32).to_le_bytes());
        sb[S_LOG_BLOCK_SIZE..S_LOG_BLOCK_SIZE + 4].copy_from_slice(&log_block_size.to_le_bytes());
        sb[S_MAGIC..S_MAGIC + 2].copy_from_slice(&EXT4_MAGIC.to_le_bytes());
        sb[S_FEATURE_INCOMPAT..S_FEATURE_INCOMPAT + 4].copy_from_slice(&incompat.to_le_bytes());
        sb
    }

    #[test]
    fn reads_block_size_and_count() {
        let geometry = parse_superblock(&superblock(262_144, 2, 0x2c2)).unwrap();
        assert_eq!(
            geometry,
            Geometry {
                block_size: 4096,
                blocks: 262_144,
                is_64bit: true
            }
        );
        let geometry = parse_superblock(&superblock(1 << 20, 0, 0x2)).unwrap();
        assert_eq!(geometry.block_size, 1024);
        assert!(!geometry.is_64bit);
    }

    #[test]
    fn high_half_counts_only_with_the_64bit_feature() {
        let big = (3u64 << 32) + 5;
        assert_eq!(
            parse_superblock(&superblock(big, 2, INCOMPAT_64BIT))
                .unwrap()
                .blocks,
            big
        );
        assert_eq!(parse_superblock(&superblock(big, 2, 0)).unwrap().blocks, 5);
    }

    #[test]
    fn rejects_what_is_not_a_usable_superblock() {
        let mut sb = superblock(1000, 2, 0);
        sb[S_MAGIC] = 0;
        assert!(parse_superblock(&sb).unwrap_err().contains("not ext4"));
        assert!(parse_superblock(&superblock(1000, 7, 0))
            .unwrap_err()
            .contains("block size"));
        assert!(parse_superblock(&superblock(1000, u32::MAX, 0)).is_err());
        assert!(parse_superblock(&superblock(0, 2, 0)).is_err());
        assert!(parse_superblock(&superblock(1000, 2, 0)[..512]).is_err());
        assert!(parse_superblock(&[]).is_err());
    }

    #[test]
    fn grows_only_to_a_larger_device() {
        let geometry = Geometry {
            block_size: 4096,
            blocks: 262_144,
            is_64bit: true,
        };
        assert_eq!(target_blocks(&geometry, 1 << 30), None);
        assert_eq!(target_blocks(&geometry, (1 << 30) + 4095), None);
        assert_eq!(target_blocks(&geometry, (1 << 30) + 4096), Some(262_145));
        assert_eq!(target_blocks(&geometry, 10 << 30), Some(2_621_440));
        assert_eq!(target_blocks(&geometry, 512 << 20), None, "never shrinks");
        let small = Geometry {
            block_size: 1024,
            blocks: 1000,
            is_64bit: false,
        };
        assert_eq!(
            target_blocks(&small, 64 << 40),
            Some(u64::from(u32::MAX)),
            "32-bit block counts are capped"
        );
    }
}

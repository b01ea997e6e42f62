//! Extracting the uncompressed kernel (`vmlinux`) from an x86 bzImage.
//!
//! QEMU `microvm` hangs booting Debian's compressed `vmlinuz`, but boots the uncompressed
//! ELF through its PVH entry point. The bzImage carries that ELF as a compressed payload
//! whose place is given by the boot protocol header (`payload_offset`, `payload_length`).
//!
//! The input is treated as untrusted: every offset and length is bounded, the output size is
//! capped, and malformed input yields an [`ImageError::Vmlinux`], never a panic.

use std::io::{self, Read, Write};

use crate::error::ImageError;

/// Offset of `setup_sects` (number of 512-byte setup sectors after the boot sector).
const SETUP_SECTS_OFFSET: usize = 0x1f1;
/// Offset of the `"HdrS"` boot protocol signature.
const HEADER_MAGIC_OFFSET: usize = 0x202;
/// Offset of the boot protocol version (u16).
const VERSION_OFFSET: usize = 0x206;
/// Offset of `payload_offset` (u32, relative to the start of the protected-mode code).
const PAYLOAD_OFFSET_OFFSET: usize = 0x248;
/// Offset of `payload_length` (u32).
const PAYLOAD_LENGTH_OFFSET: usize = 0x24c;
/// Boot protocol version that introduced the payload fields.
const MIN_BOOT_PROTOCOL: u16 = 0x0208;
/// Largest uncompressed kernel we accept.
const MAX_VMLINUX_BYTES: usize = 1 << 30;
/// Magic number of the LZ4 legacy frame format, little endian on disk.
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// Each block of an LZ4 legacy frame decompresses to at most this many bytes.
const LZ4_LEGACY_BLOCK_BYTES: usize = 8 << 20;
/// The ELF magic every vmlinux starts with.
const ELF_MAGIC: &[u8] = b"\x7fELF";

/// Extracts the uncompressed ELF kernel from a bzImage.
///
/// Supports payloads compressed with LZ4 (legacy frame, Debian's choice), gzip, zstd and xz
/// (xz only without the x86 BCJ filter).
pub fn extract(bzimage: &[u8]) -> Result<Vec<u8>, ImageError> {
    let payload = payload(bzimage)?;
    let elf = decompress(payload)?;
    if !elf.starts_with(ELF_MAGIC) {
        return Err(ImageError::Vmlinux(
            "the decompressed payload is not an ELF file".into(),
        ));
    }
    tracing::debug!(
        compressed = payload.len(),
        uncompressed = elf.len(),
        "extracted vmlinux"
    );
    Ok(elf)
}

/// Returns the compressed payload slice of a bzImage, checking the header on the way.
fn payload(image: &[u8]) -> Result<&[u8], ImageError> {
    let header_end = PAYLOAD_LENGTH_OFFSET + 4;
    if image.len() < header_end {
        return Err(ImageError::Vmlinux(format!(
            "the file is {} bytes, too short for a bzImage header",
            image.len()
        )));
    }
    if image.get(HEADER_MAGIC_OFFSET..HEADER_MAGIC_OFFSET + 4) != Some(b"HdrS".as_slice()) {
        return Err(ImageError::Vmlinux(
            "no \"HdrS\" boot header: not an x86 bzImage".into(),
        ));
    }
    let version = read_u16(image, VERSION_OFFSET)?;
    if version < MIN_BOOT_PROTOCOL {
        return Err(ImageError::Vmlinux(format!(
            "boot protocol {}.{:02} is too old (payload fields need 2.08)",
            version >> 8,
            version & 0xff
        )));
    }
    let setup_sects = match image.get(SETUP_SECTS_OFFSET).copied() {
        Some(0) => 4,
        Some(n) => usize::from(n),
        None => return Err(ImageError::Vmlinux("truncated header".into())),
    };
    let payload_offset = read_u32(image, PAYLOAD_OFFSET_OFFSET)? as usize;
    let payload_length = read_u32(image, PAYLOAD_LENGTH_OFFSET)? as usize;
    let start = (setup_sects + 1)
        .checked_mul(512)
        .and_then(|s| s.checked_add(payload_offset));
    let end = start.and_then(|s| s.checked_add(payload_length));
    match (start, end) {
        (Some(start), Some(end)) if end <= image.len() && payload_length > 0 => {
            Ok(&image[start..end])
        }
        _ => Err(ImageError::Vmlinux(format!(
            "payload (offset {payload_offset}, length {payload_length}, {setup_sects} setup \
             sectors) lies outside the {}-byte file",
            image.len()
        ))),
    }
}

/// Detects the compression of a payload by its magic number and decompresses it.
fn decompress(payload: &[u8]) -> Result<Vec<u8>, ImageError> {
    if payload.starts_with(&LZ4_LEGACY_MAGIC.to_le_bytes()) {
        lz4_legacy(payload)
    } else if payload.starts_with(&[0x1f, 0x8b]) {
        read_capped(flate2::read::GzDecoder::new(payload), "gzip")
    } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let decoder = ruzstd::decoding::StreamingDecoder::new(payload)
            .map_err(|e| ImageError::Vmlinux(format!("zstd: {e}")))?;
        read_capped(decoder, "zstd")
    } else if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        let mut out = CappedWriter::default();
        // The kernel build appends the uncompressed size after the stream, which ends in
        // the footer magic "YZ"; lzma-rs refuses trailing bytes.
        let mut input = match payload.len().checked_sub(4) {
            Some(end) if !payload.ends_with(b"YZ") && payload[..end].ends_with(b"YZ") => {
                &payload[..end]
            }
            _ => payload,
        };
        lzma_rs::xz_decompress(&mut input, &mut out).map_err(|e| {
            ImageError::Vmlinux(format!(
                "xz: {e} (note: kernels compressed with the x86 BCJ filter are not supported)"
            ))
        })?;
        Ok(out.buf)
    } else {
        let known = [
            (&b"BZh"[..], "bzip2"),
            (&[0x5d, 0x00, 0x00][..], "lzma"),
            (&[0x89, b'L', b'Z', b'O'][..], "lzo"),
        ];
        let name = known
            .iter()
            .find(|(magic, _)| payload.starts_with(magic))
            .map_or("an unknown format", |(_, name)| name);
        let head: Vec<String> = payload.iter().take(6).map(|b| format!("{b:02x}")).collect();
        Err(ImageError::Vmlinux(format!(
            "the payload is compressed with {name} (starts with {}), which is not supported; \
             supported: lz4, gzip, zstd, xz",
            head.join(" ")
        )))
    }
}

/// Decompresses an LZ4 legacy frame: blocks of `[u32 LE compressed size][lz4 block]`.
///
/// The kernel build appends the uncompressed size (4 bytes) after the frame, and a stream may
/// hold several frames; both are handled as the kernel's own `unlz4` does.
fn lz4_legacy(payload: &[u8]) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK_BYTES];
    let mut pos = 4; // past the magic
    let mut blocks = 0usize;
    while let Some(size_bytes) = payload.get(pos..pos + 4) {
        let size = u32::from_le_bytes([size_bytes[0], size_bytes[1], size_bytes[2], size_bytes[3]]);
        pos += 4;
        if size == LZ4_LEGACY_MAGIC {
            continue; // a concatenated frame starts here
        }
        let size = size as usize;
        let data = pos.checked_add(size).and_then(|end| payload.get(pos..end));
        let data = match data {
            Some(data) if size > 0 => data,
            // What is left is not a block: the appended size field, or padding.
            _ if blocks > 0 => break,
            _ => {
                return Err(ImageError::Vmlinux(format!(
                    "lz4: first block claims {size} bytes but only {} remain",
                    payload.len().saturating_sub(pos)
                )))
            }
        };
        let n = lz4_flex::block::decompress_into(data, &mut block)
            .map_err(|e| ImageError::Vmlinux(format!("lz4 block {blocks}: {e}")))?;
        if out.len() + n > MAX_VMLINUX_BYTES {
            return Err(too_large());
        }
        out.extend_from_slice(&block[..n]);
        pos += size;
        blocks += 1;
    }
    if blocks == 0 {
        return Err(ImageError::Vmlinux("lz4: the frame holds no block".into()));
    }
    Ok(out)
}

/// Reads a decompressor to its end, refusing more than [`MAX_VMLINUX_BYTES`].
fn read_capped(reader: impl Read, format: &str) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::new();
    reader
        .take(MAX_VMLINUX_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| ImageError::Vmlinux(format!("{format}: {e}")))?;
    if out.len() > MAX_VMLINUX_BYTES {
        return Err(too_large());
    }
    Ok(out)
}

fn too_large() -> ImageError {
    ImageError::Vmlinux(format!(
        "the uncompressed kernel exceeds {} MiB",
        MAX_VMLINUX_BYTES >> 20
    ))
}

fn read_u16(data: &[u8], at: usize) -> Result<u16, ImageError> {
    data.get(at..at + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or_else(|| ImageError::Vmlinux("truncated header".into()))
}

fn read_u32(data: &[u8], at: usize) -> Result<u32, ImageError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| ImageError::Vmlinux("truncated header".into()))
}

/// A `Vec` writer that fails once more than [`MAX_VMLINUX_BYTES`] are written.
#[derive(Default)]
struct CappedWriter {
    buf: Vec<u8>,
}

impl Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > MAX_VMLINUX_BYTES {
            return Err(io::Error::other("the uncompressed kernel is too large"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake ELF: the magic and some compressible and incompressible bytes.
    fn fake_elf(len: usize) -> Vec<u8> {
        let mut elf = ELF_MAGIC.to_vec();
        let mut x: u32 = 12345;
        while elf.len() < len {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            // One random byte, two zeros: compressible, but not trivially.
            elf.extend_from_slice(&[(x >> 16) as u8, 0, 0]);
        }
        elf.truncate(len);
        elf
    }

    /// Builds a bzImage around `payload` with `setup_sects` setup sectors.
    fn bzimage(payload: &[u8], setup_sects: u8) -> Vec<u8> {
        let sects = if setup_sects == 0 {
            4
        } else {
            setup_sects as usize
        };
        let payload_offset = 0x40usize;
        let mut image = vec![0u8; (sects + 1) * 512 + payload_offset];
        image[SETUP_SECTS_OFFSET] = setup_sects;
        image[HEADER_MAGIC_OFFSET..HEADER_MAGIC_OFFSET + 4].copy_from_slice(b"HdrS");
        image[VERSION_OFFSET..VERSION_OFFSET + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        image[PAYLOAD_OFFSET_OFFSET..PAYLOAD_OFFSET_OFFSET + 4]
            .copy_from_slice(&(payload_offset as u32).to_le_bytes());
        image[PAYLOAD_LENGTH_OFFSET..PAYLOAD_LENGTH_OFFSET + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend_from_slice(payload);
        image.extend_from_slice(&[0xaa; 100]); // trailing setup data / signature
        image
    }

    /// An LZ4 legacy frame as the kernel build makes it, uncompressed size appended.
    fn lz4_legacy_frame(data: &[u8], block: usize) -> Vec<u8> {
        let mut frame = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(block) {
            let compressed = lz4_flex::block::compress(chunk);
            frame.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
            frame.extend_from_slice(&compressed);
        }
        frame.extend_from_slice(&(data.len() as u32).to_le_bytes());
        frame
    }

    #[test]
    fn lz4_legacy_payload_is_extracted() {
        let elf = fake_elf(3 * LZ4_LEGACY_BLOCK_BYTES / 2);
        let image = bzimage(&lz4_legacy_frame(&elf, LZ4_LEGACY_BLOCK_BYTES), 27);
        assert_eq!(extract(&image).unwrap(), elf);
    }

    #[test]
    fn zero_setup_sects_means_four() {
        let elf = fake_elf(5000);
        let image = bzimage(&lz4_legacy_frame(&elf, LZ4_LEGACY_BLOCK_BYTES), 0);
        assert_eq!(extract(&image).unwrap(), elf);
    }

    #[test]
    fn concatenated_lz4_frames_are_joined() {
        let elf = fake_elf(100_000);
        let (a, b) = elf.split_at(40_000);
        let mut frame = lz4_legacy_frame(a, 16_384);
        frame.truncate(frame.len() - 4);
        frame.extend_from_slice(&lz4_legacy_frame(b, 16_384));
        assert_eq!(extract(&bzimage(&frame, 10)).unwrap(), elf);
    }

    #[test]
    fn gzip_payload_is_extracted() {
        let elf = fake_elf(100_000);
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&elf).unwrap();
        let mut payload = enc.finish().unwrap();
        payload.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        assert_eq!(extract(&bzimage(&payload, 10)).unwrap(), elf);
    }

    #[test]
    fn zstd_payload_is_extracted() {
        let elf = fake_elf(100_000);
        let mut payload = ruzstd::encoding::compress_to_vec(
            elf.as_slice(),
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        payload.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        assert_eq!(extract(&bzimage(&payload, 10)).unwrap(), elf);
    }

    #[test]
    fn xz_payload_is_extracted() {
        let elf = fake_elf(100_000);
        let mut payload = Vec::new();
        lzma_rs::xz_compress(&mut elf.as_slice(), &mut payload).unwrap();
        payload.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        assert_eq!(extract(&bzimage(&payload, 10)).unwrap(), elf);
    }

    #[test]
    fn non_elf_payload_is_rejected() {
        let data = vec![7u8; 10_000];
        let image = bzimage(&lz4_legacy_frame(&data, 4096), 10);
        let err = extract(&image).unwrap_err().to_string();
        assert!(err.contains("not an ELF"), "{err}");
    }

    #[test]
    fn unknown_compression_is_named() {
        let err = extract(&bzimage(b"BZh91AY&SY....", 10))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bzip2"), "{err}");
    }

    #[test]
    fn truncated_header_is_an_error() {
        for len in [0, 1, 0x1f1, 0x205, 0x24f] {
            let image = bzimage(&lz4_legacy_frame(&fake_elf(1000), 4096), 10);
            assert!(matches!(
                extract(&image[..len]),
                Err(ImageError::Vmlinux(_))
            ));
        }
    }

    #[test]
    fn truncated_payload_is_an_error() {
        let image = bzimage(&lz4_legacy_frame(&fake_elf(50_000), 4096), 10);
        let cut = (10 + 1) * 512 + 0x40 + 100;
        assert!(matches!(
            extract(&image[..cut]),
            Err(ImageError::Vmlinux(_))
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..2000 {
            let len = (round * 37) % 5000;
            let mut data = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                data.push(x as u8);
            }
            assert!(extract(&data).is_err());
        }
    }

    #[test]
    fn garbage_inside_a_valid_header_is_an_error_not_a_panic() {
        let elf = fake_elf(20_000);
        let good = bzimage(&lz4_legacy_frame(&elf, 4096), 10);
        let payload_start = 11 * 512 + 0x40;
        let mut x: u64 = 0x1234_5678_9abc_def1;
        for _ in 0..2000 {
            let mut image = good.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = payload_start + (x as usize % (image.len() - payload_start));
                image[at] = (x >> 32) as u8;
            }
            // Either an error or some output; never a panic.
            let _ = extract(&image);
        }
        // A hostile header: huge lengths and offsets.
        let mut image = good.clone();
        image[PAYLOAD_LENGTH_OFFSET..PAYLOAD_LENGTH_OFFSET + 4].copy_from_slice(&[0xff; 4]);
        assert!(extract(&image).is_err());
        let mut image = good;
        image[PAYLOAD_OFFSET_OFFSET..PAYLOAD_OFFSET_OFFSET + 4].copy_from_slice(&[0xff; 4]);
        assert!(extract(&image).is_err());
    }

    #[test]
    fn the_real_debian_kernel_is_extracted() {
        let kernel = crate::kernel::cached_for_tests();
        let bz = std::fs::read(&kernel.vmlinuz).unwrap();
        let elf = extract(&bz).unwrap();
        assert!(
            elf.len() > bz.len(),
            "vmlinux should be larger than vmlinuz"
        );
        // ELF64, x86-64.
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2);
        assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 62);
    }
}

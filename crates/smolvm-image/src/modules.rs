//! Picking the kernel modules the guest needs and putting them in load order.
//!
//! Debian's cloud kernel builds the virtio drivers as modules. The guest has no `modprobe`,
//! so the agent loads the files listed in `/smolvm/modules.list` one after the other; this
//! module makes sure every module comes after the modules it depends on (read from each
//! module's `.modinfo` section), pulling in dependencies that were not asked for.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::ImageError;

/// The modules the guest needs, in a load order that works.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_rng",
    "virtio_balloon",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

/// Largest module we accept, compressed or not.
const MAX_MODULE_BYTES: u64 = 64 << 20;

/// A kernel module ready to go into the initramfs.
#[derive(Debug, Clone)]
pub struct Module {
    /// Canonical name (dashes turned into underscores), e.g. `virtio_rng`.
    pub name: String,
    /// The uncompressed `.ko` contents.
    pub data: Vec<u8>,
}

impl Module {
    /// The file name used inside the initramfs: `<name>.ko`.
    pub fn file_name(&self) -> String {
        format!("{}.ko", self.name)
    }
}

/// Finds `wanted` modules under `modules_dir` (`lib/modules/<release>`), adds their
/// dependencies, and returns them in load order. Modules built into the kernel
/// (`modules.builtin`) are skipped; modules found nowhere are skipped with a warning.
pub fn collect(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<Module>, ImageError> {
    let available = index(&modules_dir.join("kernel"))?;
    let builtin = builtin(modules_dir);
    let mut loaded: HashMap<String, Vec<u8>> = HashMap::new();
    let mut order = Vec::new();
    let mut visiting = HashSet::new();
    for name in wanted {
        visit(
            &canonical(name),
            &available,
            &builtin,
            &mut loaded,
            &mut visiting,
            &mut order,
        )?;
    }
    Ok(order
        .into_iter()
        .filter_map(|name| loaded.remove(&name).map(|data| Module { name, data }))
        .collect())
}

/// Depth-first visit: dependencies are pushed to `order` before the module itself.
fn visit(
    name: &str,
    available: &BTreeMap<String, PathBuf>,
    builtin: &HashSet<String>,
    loaded: &mut HashMap<String, Vec<u8>>,
    visiting: &mut HashSet<String>,
    order: &mut Vec<String>,
) -> Result<(), ImageError> {
    if loaded.contains_key(name) || visiting.contains(name) {
        return Ok(());
    }
    let Some(path) = available.get(name) else {
        if builtin.contains(name) {
            tracing::debug!(module = name, "built into the kernel");
        } else {
            tracing::warn!(module = name, "kernel module not found; skipped");
        }
        return Ok(());
    };
    visiting.insert(name.to_string());
    let data = read_module(name, path)?;
    for dep in depends(&data) {
        visit(&dep, available, builtin, loaded, visiting, order)?;
    }
    visiting.remove(name);
    loaded.insert(name.to_string(), data);
    order.push(name.to_string());
    Ok(())
}

/// Maps canonical module names to their files under `dir`.
fn index(dir: &Path) -> Result<BTreeMap<String, PathBuf>, ImageError> {
    let mut found = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(ImageError::io("cannot list", &dir))?;
        for entry in entries {
            let entry = entry.map_err(ImageError::io("cannot list", &dir))?;
            let path = entry.path();
            let file_type = entry
                .file_type()
                .map_err(ImageError::io("cannot inspect", &path))?;
            if file_type.is_dir() {
                stack.push(path);
            } else if let Some(name) = module_name(&entry.file_name().to_string_lossy()) {
                found.insert(name, path);
            }
        }
    }
    Ok(found)
}

/// Names of the modules built into the kernel, from `modules.builtin`.
fn builtin(modules_dir: &Path) -> HashSet<String> {
    std::fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| module_name(line.rsplit('/').next().unwrap_or(line)))
        .collect()
}

/// `virtio-rng.ko.xz` -> `virtio_rng`; `None` for files that are not modules.
fn module_name(file_name: &str) -> Option<String> {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file_name.strip_suffix(ext))
        .filter(|stem| !stem.is_empty())
        .map(canonical)
}

/// Module names treat `-` and `_` alike; the kernel reports them with `_`.
fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// Reads a module file, decompressing `.ko.xz`, `.ko.zst` and `.ko.gz`.
fn read_module(name: &str, path: &Path) -> Result<Vec<u8>, ImageError> {
    let fail = |reason: String| ImageError::Module {
        name: name.to_string(),
        reason: format!("{}: {reason}", path.display()),
    };
    let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let mut raw = Vec::new();
    file.take(MAX_MODULE_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(|e| fail(e.to_string()))?;
    let data = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => {
            let mut out = Vec::new();
            lzma_rs::xz_decompress(&mut raw.as_slice(), &mut out)
                .map_err(|e| fail(format!("xz: {e}")))?;
            out
        }
        Some("zst") => {
            let decoder = ruzstd::decoding::StreamingDecoder::new(raw.as_slice())
                .map_err(|e| fail(format!("zstd: {e}")))?;
            read_bounded(decoder).map_err(|e| fail(format!("zstd: {e}")))?
        }
        Some("gz") => read_bounded(flate2::read::GzDecoder::new(raw.as_slice()))
            .map_err(|e| fail(format!("gzip: {e}")))?,
        _ => raw,
    };
    if data.len() as u64 > MAX_MODULE_BYTES {
        return Err(fail(format!("larger than {} MiB", MAX_MODULE_BYTES >> 20)));
    }
    if !data.starts_with(b"\x7fELF") {
        return Err(fail("not an ELF file".into()));
    }
    Ok(data)
}

fn read_bounded(reader: impl Read) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    reader.take(MAX_MODULE_BYTES + 1).read_to_end(&mut out)?;
    Ok(out)
}

/// The `depends=` list of a module, from its `.modinfo` ELF section.
///
/// Falls back to scanning the whole file when the section headers cannot be read.
pub(crate) fn depends(module: &[u8]) -> Vec<String> {
    let modinfo = modinfo_section(module).unwrap_or(module);
    modinfo
        .split(|&b| b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| {
            String::from_utf8_lossy(list)
                .split(',')
                .filter(|d| !d.is_empty())
                .map(canonical)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Finds the `.modinfo` section of a 64-bit little-endian ELF file.
fn modinfo_section(elf: &[u8]) -> Option<&[u8]> {
    let u16_at = |at: usize| -> Option<usize> {
        let b = elf.get(at..at.checked_add(2)?)?;
        Some(usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let u64_at = |at: usize| -> Option<usize> {
        let b = elf.get(at..at.checked_add(8)?)?;
        usize::try_from(u64::from_le_bytes(b.try_into().ok()?)).ok()
    };
    let u32_at = |at: usize| -> Option<usize> {
        let b = elf.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes(b.try_into().ok()?) as usize)
    };
    // ELFCLASS64, ELFDATA2LSB.
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let shoff = u64_at(0x28)?;
    let shentsize = u16_at(0x3a)?;
    let shnum = u16_at(0x3c)?;
    let shstrndx = u16_at(0x3e)?;
    if shentsize < 0x40 {
        return None;
    }
    let section = |index: usize| -> Option<(usize, &[u8])> {
        let header = shoff.checked_add(index.checked_mul(shentsize)?)?;
        let name = u32_at(header)?;
        let offset = u64_at(header.checked_add(0x18)?)?;
        let size = u64_at(header.checked_add(0x20)?)?;
        Some((name, elf.get(offset..offset.checked_add(size)?)?))
    };
    let (_, names) = section(shstrndx)?;
    (0..shnum).find_map(|i| {
        let (name, data) = section(i)?;
        let name = names.get(name..)?;
        let end = name.iter().position(|&b| b == 0)?;
        (&name[..end] == b".modinfo").then_some(data)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_are_canonical() {
        assert_eq!(module_name("virtio-rng.ko").as_deref(), Some("virtio_rng"));
        assert_eq!(module_name("vsock.ko.xz").as_deref(), Some("vsock"));
        assert_eq!(module_name("a.ko.zst").as_deref(), Some("a"));
        assert_eq!(module_name("modules.order"), None);
        assert_eq!(module_name(".ko"), None);
    }

    #[test]
    fn depends_are_read_from_raw_modinfo_strings() {
        let blob = b"\x00license=GPL\x00depends=virtio,virtio-ring\x00name=x\x00";
        assert_eq!(depends(blob), ["virtio", "virtio_ring"]);
        assert!(depends(b"\x00depends=\x00").is_empty());
        assert!(depends(b"").is_empty());
    }

    /// Writes a fake module: an ELF header (no sections) followed by modinfo strings.
    fn fake_module(dir: &Path, file: &str, deps: &str) {
        let mut data = b"\x7fELF\x02\x01".to_vec();
        data.resize(64, 0);
        data.extend_from_slice(format!("\0depends={deps}\0").as_bytes());
        std::fs::write(dir.join(file), data).unwrap();
    }

    #[test]
    fn dependencies_come_first_and_are_pulled_in() {
        let tmp = tempfile::tempdir().unwrap();
        let kernel = tmp.path().join("kernel/drivers");
        std::fs::create_dir_all(&kernel).unwrap();
        fake_module(&kernel, "virtio_ring.ko", "");
        fake_module(&kernel, "virtio.ko", "virtio_ring");
        fake_module(&kernel, "virtio_net.ko", "virtio,net_failover");
        fake_module(&kernel, "net_failover.ko", "failover");
        fake_module(&kernel, "failover.ko", "");
        fake_module(&kernel, "virtio-rng.ko", "virtio");
        std::fs::write(
            tmp.path().join("modules.builtin"),
            "kernel/drivers/virtio/virtio_mmio.ko\n",
        )
        .unwrap();
        let mods = collect(
            tmp.path(),
            &["virtio_net", "virtio_mmio", "virtio_rng", "missing"],
        )
        .unwrap();
        let names: Vec<&str> = mods.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_rng"
            ]
        );
        assert_eq!(mods[5].file_name(), "virtio_rng.ko");
    }

    #[test]
    fn compressed_modules_are_decompressed() {
        let tmp = tempfile::tempdir().unwrap();
        let kernel = tmp.path().join("kernel");
        std::fs::create_dir_all(&kernel).unwrap();
        fake_module(&kernel, "plain.ko", "");
        let plain = std::fs::read(kernel.join("plain.ko")).unwrap();
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut plain.as_slice(), &mut xz).unwrap();
        std::fs::write(kernel.join("a.ko.xz"), xz).unwrap();
        let zst = ruzstd::encoding::compress_to_vec(
            plain.as_slice(),
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        std::fs::write(kernel.join("b.ko.zst"), zst).unwrap();
        std::fs::write(kernel.join("c.ko.xz"), b"not xz").unwrap();
        let mods = collect(tmp.path(), &["a", "b"]).unwrap();
        assert_eq!(mods.len(), 2);
        assert!(mods.iter().all(|m| m.data == plain));
        assert!(matches!(
            collect(tmp.path(), &["c"]),
            Err(ImageError::Module { .. })
        ));
    }

    #[test]
    fn modinfo_section_is_found_in_the_real_debian_modules() {
        let dir = crate::kernel::cached_for_tests().modules_dir.as_path();
        let net = std::fs::read(dir.join("kernel/drivers/net/virtio_net.ko")).unwrap();
        assert!(modinfo_section(&net).is_some());
        let mut deps = depends(&net);
        deps.sort();
        assert_eq!(deps, ["net_failover", "virtio", "virtio_ring"]);
        let mods = collect(dir, GUEST_MODULES).unwrap();
        let names: Vec<&str> = mods.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names, GUEST_MODULES,
            "the documented order is a valid order"
        );
    }
}

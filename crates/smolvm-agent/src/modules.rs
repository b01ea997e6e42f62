//! Loading the kernel modules shipped in the initramfs (the virtio drivers of Debian's kernel).

use std::ffi::CString;
use std::fs::File;
use std::path::Path;

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};

/// The list of modules to load, one file name per line, in order.
pub const LIST: &str = "/smolvm/modules.list";
/// The folder holding the module files.
pub const DIR: &str = "/smolvm/modules";

/// `MODULE_INIT_COMPRESSED_FILE`: the kernel decompresses the module itself (Linux 5.17+).
const MODULE_INIT_COMPRESSED_FILE: u32 = 4;

/// One line of the list: a file name and optional module parameters.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// File name under [`DIR`].
    pub file: &'a str,
    /// Parameters, e.g. `napi_tx=1` (empty when none).
    pub params: &'a str,
}

/// Parses the list: blank lines and `#` comments are skipped; a file name may be followed
/// by module parameters.
pub fn parse_list(text: &str) -> Vec<Entry<'_>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| match l.split_once(char::is_whitespace) {
            Some((file, params)) => Entry {
                file,
                params: params.trim(),
            },
            None => Entry {
                file: l,
                params: "",
            },
        })
        .collect()
}

/// Loads one module file. A module that is already loaded (or built in) counts as loaded.
fn load(path: &Path, params: &str) -> Result<(), String> {
    if path.file_name().is_none() {
        return Err("not a file name".into());
    }
    let file = File::open(path).map_err(|e| e.to_string())?;
    let params = CString::new(params).map_err(|_| "parameters contain a NUL byte".to_string())?;
    let name = path.to_string_lossy();
    let flags = if [".xz", ".zst", ".gz"].iter().any(|ext| name.ends_with(ext)) {
        ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE)
    } else {
        ModuleInitFlags::empty()
    };
    match finit_module(&file, &params, flags) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(e.desc().to_string()),
    }
}

/// Loads every module of [`LIST`] from [`DIR`], in order. Failures are logged and skipped
/// (a missing driver shows up later as a missing device, with a clearer message).
/// Returns how many modules were loaded.
pub fn load_all() -> usize {
    let text = match std::fs::read_to_string(LIST) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
        Err(e) => {
            tracing::warn!("cannot read {LIST}: {e}");
            return 0;
        }
    };
    let mut loaded = 0;
    for entry in parse_list(&text) {
        // Only plain names: the list must not point outside the module folder.
        if entry.file.contains('/') {
            tracing::warn!("skipping module {:?}: not a plain file name", entry.file);
            continue;
        }
        match load(&Path::new(DIR).join(entry.file), entry.params) {
            Ok(()) => loaded += 1,
            Err(reason) => tracing::warn!("cannot load module {}: {reason}", entry.file),
        }
    }
    loaded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_parsing() {
        let text = "# virtio\nvirtio_ring.ko\n\n  virtio_net.ko.xz  napi_tx=1 \nvirtio_blk.ko\n";
        assert_eq!(
            parse_list(text),
            vec![
                Entry {
                    file: "virtio_ring.ko",
                    params: ""
                },
                Entry {
                    file: "virtio_net.ko.xz",
                    params: "napi_tx=1"
                },
                Entry {
                    file: "virtio_blk.ko",
                    params: ""
                },
            ]
        );
    }
}

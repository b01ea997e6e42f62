//! Finds the static guest agent binary that `smolvm image build` installs into images.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// Candidates, in order: `SMOLVM_AGENT_BIN`; the static build beside this program's
/// cargo target dir; `smolvm-agent` beside this program. Only a static binary qualifies
/// (it runs as /init before any library exists in the guest).
pub fn find() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SMOLVM_AGENT_BIN") {
        let p = PathBuf::from(p);
        if !is_static_elf(&p) {
            bail!(
                "SMOLVM_AGENT_BIN={} is not a static ELF binary",
                p.display()
            );
        }
        return Ok(p);
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            for profile in ["release", "debug"] {
                candidates.push(
                    dir.join("..")
                        .join("x86_64-unknown-linux-gnu")
                        .join(profile)
                        .join("smolvm-agent"),
                );
            }
            candidates.push(dir.join("smolvm-agent"));
        }
    }
    if let Some(p) = candidates.iter().find(|p| is_static_elf(p)) {
        return Ok(p.canonicalize().unwrap_or_else(|_| p.clone()));
    }
    bail!(
        "no static smolvm-agent binary found (looked at {}); build it with `./scripts/setup` or \
         `RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p smolvm-agent --target x86_64-unknown-linux-gnu`, \
         or point SMOLVM_AGENT_BIN at one",
        candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

/// Whether `path` is an x86-64 ELF without a program interpreter (statically linked).
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(data) = std::fs::read(path) else {
        return false;
    };
    elf_is_static(&data)
}

fn elf_is_static(d: &[u8]) -> bool {
    let u16_at = |o: usize| d.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        d.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        d.get(o..o + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    if d.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum as usize).all(|i| {
        let off = phoff as usize + i * phentsize as usize;
        u32_at(off) != Some(3) // PT_INTERP
    })
}

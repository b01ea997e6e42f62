//! `smolvm doctor`: checks the host and says what to do about each failure.

use anyhow::Result;

struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
    fix: Option<String>,
}

fn tool(name: &'static str, prog: &str, package: &str) -> Check {
    match smolvm::util::which(prog) {
        Some(p) => Check {
            name,
            ok: true,
            detail: p.display().to_string(),
            fix: None,
        },
        None => Check {
            name,
            ok: false,
            detail: format!("{prog} not found"),
            fix: Some(format!("apt-get install {package}")),
        },
    }
}

fn free_mib(path: &std::path::Path) -> Option<u64> {
    let mut p = path.to_path_buf();
    while !p.exists() {
        p = p.parent()?.to_path_buf();
    }
    let st = nix_statvfs(&p)?;
    Some(st / (1024 * 1024))
}

fn nix_statvfs(p: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a zeroed out-struct.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Runs every check; exit code 0 when VMs can run here (possibly slowly), 1 otherwise.
pub fn run() -> Result<i32> {
    let accel = smolvm::hypervisor::detect_accelerator();
    let mut checks = vec![Check {
        name: "kvm",
        ok: accel.kvm_usable,
        detail: accel.reason.clone(),
        fix: (!accel.kvm_usable).then(|| {
            "VMs will run under QEMU TCG (software emulation, seconds per boot); use a host with VT-x/AMD-V or nested virtualization for KVM".to_string()
        }),
    }];
    checks.push(tool("qemu", "qemu-system-x86_64", "qemu-system-x86"));
    checks.push(tool("qemu-img", "qemu-img", "qemu-utils"));
    checks.push(tool("mmdebstrap", "mmdebstrap", "mmdebstrap"));
    checks.push(tool("mkfs.ext4", "mkfs.ext4", "e2fsprogs"));
    checks.push(tool("debugfs", "debugfs", "e2fsprogs"));
    checks.push(tool("ssh-keygen", "ssh-keygen", "openssh-client"));
    checks.push(tool("apt-get", "apt-get", "apt"));
    checks.push(tool("nft", "nft", "nftables"));
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun");
    checks.push(Check {
        name: "tun",
        ok: tun.is_ok(),
        detail: match &tun {
            Ok(_) => "/dev/net/tun opens".into(),
            Err(e) => format!("/dev/net/tun: {e}"),
        },
        fix: tun
            .is_err()
            .then(|| "modprobe tun (needed for nat networking only)".to_string()),
    });
    let nat = smolvm::network::nat_available();
    checks.push(Check {
        name: "network",
        ok: nat.is_ok(),
        detail: match &nat {
            Ok(()) => "nat available: VMs get a TAP, an address from 172.16.0.0/16 and an egress policy (the default)".into(),
            Err(why) => format!("nat unavailable ({why}): VMs default to user-mode networking (no egress lists; the guest can reach the host's loopback through 10.0.2.2)"),
        },
        fix: nat
            .is_err()
            .then(|| "run as root (or with CAP_NET_ADMIN) with nftables and iproute2 installed".to_string()),
    });
    let paths = smolvm::Paths::from_env();
    let free = free_mib(&paths.images_dir);
    checks.push(Check {
        name: "disk",
        ok: free.is_some_and(|f| f >= 2048),
        detail: match free {
            Some(f) => format!("{f} MiB free at {}", paths.images_dir.display()),
            None => "cannot read free space".into(),
        },
        fix: Some("an image needs about 1.5 GiB; free some space or set SMOLVM_DATA_DIR".into())
            .filter(|_| free.is_none_or(|f| f < 2048)),
    });
    let img = smolvm_image::open(&paths.images_dir, smolvm::config::DEFAULT_IMAGE);
    checks.push(Check {
        name: "image",
        ok: img.is_ok(),
        detail: match &img {
            Ok(i) => format!("default image at {}", i.dir.display()),
            Err(e) => e.to_string(),
        },
        fix: img.is_err().then(|| "smolvm image build".to_string()),
    });
    let agent = crate::agent_bin::find();
    checks.push(Check {
        name: "agent",
        ok: agent.is_ok(),
        detail: match &agent {
            Ok(p) => p.display().to_string(),
            Err(e) => e.to_string(),
        },
        fix: None,
    });
    let mut fatal = false;
    for c in &checks {
        let mark = if c.ok {
            "ok  "
        } else if matches!(c.name, "kvm" | "nft" | "tun" | "network") {
            "warn"
        } else {
            "FAIL"
        };
        if mark == "FAIL" && matches!(c.name, "qemu" | "qemu-img") {
            fatal = true;
        }
        println!("[{mark}] {:<11} {}", c.name, c.detail);
        if let Some(f) = &c.fix {
            println!("       {:<11} -> {f}", "");
        }
    }
    println!("accelerator: {}", accel.accelerator);
    Ok(if fatal { 1 } else { 0 })
}

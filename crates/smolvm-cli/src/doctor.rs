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

/// The oldest QEMU whose `memory-backend-file` takes `rom=off` (templates map their RAM so).
const QEMU_MIN: (u32, u32) = (8, 2);

/// `(major, minor)` and the first line of `prog --version` ("... version 10.0.2 ...").
fn version_of(prog: &str) -> Option<((u32, u32), String)> {
    let out = std::process::Command::new(prog)
        .arg("--version")
        .output()
        .ok()?;
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .to_string();
    Some((parse_version(&line)?, line))
}

/// `(major, minor)` of a `--version` line such as "qemu-img version 10.0.2 (Debian ...)".
fn parse_version(line: &str) -> Option<(u32, u32)> {
    let v = line.split(" version ").nth(1)?.split_whitespace().next()?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// QEMU new enough for templates and snapshots, with a `qemu-img` of the same version.
fn qemu_versions() -> Check {
    let fix = "scripts/install-deps (on Debian 12: qemu-system-x86 and qemu-utils from bookworm-backports)";
    let (sys, img) = (version_of("qemu-system-x86_64"), version_of("qemu-img"));
    let (ok, detail) = match (&sys, &img) {
        (Some((s, line)), Some((i, _))) if *s >= QEMU_MIN && s == i => (true, line.clone()),
        (Some((s, line)), Some((i, _))) if *s >= QEMU_MIN => (
            false,
            format!("{line}, but qemu-img is {}.{}: they must match", i.0, i.1),
        ),
        (Some((_, line)), _) => (
            false,
            format!(
                "{line}: smolvm needs {}.{} or newer",
                QEMU_MIN.0, QEMU_MIN.1
            ),
        ),
        (None, _) => (false, "qemu-system-x86_64 --version gave no version".into()),
    };
    Check {
        name: "qemu 8.2+",
        ok,
        detail,
        fix: (!ok).then(|| fix.to_string()),
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
    checks.push(qemu_versions());
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
    checks.extend(jail_checks(&smolvm::hypervisor::jail::report()));
    let mut fatal = false;
    for c in &checks {
        let mark = if c.ok {
            "ok  "
        } else if matches!(
            c.name,
            "kvm"
                | "nft"
                | "tun"
                | "network"
                | "qemu uid"
                | "namespaces"
                | "cgroup"
                | "seccomp"
                | "limits"
        ) {
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

/// The jail a VM's QEMU gets on this host, as it will be applied (what is not there yet is a
/// warning, never left out).
fn jail_checks(j: &smolvm::hypervisor::jail::JailReport) -> Vec<Check> {
    let cg = &j.cgroup;
    vec![
        Check {
            name: "qemu uid",
            ok: j.uid != 0,
            detail: format!(
                "QEMU runs as uid {}, the caller's{}",
                j.uid,
                if j.uid == 0 { " (root)" } else { "" }
            ),
            fix: (j.uid == 0).then(|| {
                "not yet dropped to an unprivileged uid; run smolvm as a normal user where nat networking is not needed".to_string()
            }),
        },
        Check {
            name: "seccomp",
            ok: j.seccomp && j.enabled,
            detail: if !j.enabled {
                "SMOLVM_JAIL=off: QEMU runs without its seccomp sandbox and limits".into()
            } else if j.seccomp {
                format!("QEMU runs with -sandbox {}", j.sandbox)
            } else {
                "QEMU was built without libseccomp: -sandbox is unavailable".into()
            },
            fix: if !j.enabled {
                Some("unset SMOLVM_JAIL (it is only for measuring the jail's cost)".to_string())
            } else {
                (!j.seccomp).then(|| "install Debian's qemu-system-x86 (built with seccomp)".to_string())
            },
        },
        Check {
            name: "limits",
            ok: j.enabled,
            detail: j.limits.clone(),
            fix: None,
        },
        Check {
            name: "namespaces",
            ok: !j.namespaces.is_empty(),
            detail: if j.namespaces.is_empty() {
                "QEMU shares the host's mount, PID, IPC and UTS namespaces".into()
            } else {
                j.namespaces.join(", ")
            },
            fix: j
                .namespaces
                .is_empty()
                .then(|| "not yet confined to namespaces of its own".to_string()),
        },
        Check {
            name: "cgroup",
            ok: false,
            detail: match &cg.mount {
                None => "no cgroup v2 here: VMs run in the caller's cgroup, without limits of their own".into(),
                Some(m) if cg.missing.is_empty() => format!(
                    "cgroup v2 at {} offers {}; VMs still run in the caller's cgroup",
                    m.display(),
                    cg.available.join(", ")
                ),
                Some(m) => format!(
                    "cgroup v2 at {} lacks {} (bound to cgroup v1 here); VMs run in the caller's cgroup",
                    m.display(),
                    cg.missing.join(", ")
                ),
            },
            fix: Some("no per-VM cgroup (memory, pids, cpu, io limits) yet".into()),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_versions_parse_from_their_first_line() {
        let line = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)";
        assert_eq!(parse_version(line), Some((10, 0)));
        assert_eq!(
            parse_version("qemu-img version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"),
            Some((7, 2))
        );
        assert!(parse_version("QEMU emulator version 7.2.22").unwrap() < QEMU_MIN);
        assert_eq!(parse_version("qemu-img: no version here"), None);
        assert_eq!(parse_version("x version .1"), None);
    }
}

//! What confines a VM's QEMU on this host, as it will be applied: for `smolvm doctor`, and so
//! nothing about the jail is silent. Today: QEMU's own seccomp filter (`-sandbox`), no new
//! privileges, no core files and bounded open files. Not yet: an unprivileged uid, namespaces
//! and a cgroup per VM; the report says so rather than leaving it out.

use std::path::{Path, PathBuf};

/// The environment variable that turns the jail off, for measuring what it costs (`off`);
/// nothing else should ever set it.
pub const ENV: &str = "SMOLVM_JAIL";

/// Whether the jail applies (it does unless `SMOLVM_JAIL=off`).
pub fn enabled() -> bool {
    std::env::var(ENV).map_or(true, |v| v != "off")
}

/// The jail a VM's QEMU runs in, on this host.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JailReport {
    /// Whether it applies (`SMOLVM_JAIL=off` turns it off, to measure its cost).
    pub enabled: bool,
    /// The uid QEMU runs as (today: the caller's).
    pub uid: u32,
    /// Whether QEMU can install its seccomp filter (it was built with libseccomp).
    pub seccomp: bool,
    /// The `-sandbox` setting passed to QEMU.
    pub sandbox: &'static str,
    /// `no_new_privs`, no core files, the open-file limit: always applied.
    pub limits: String,
    /// Namespaces QEMU gets of its own (none yet).
    pub namespaces: Vec<&'static str>,
    /// The host's cgroup v2, as a VM's cgroup would need it.
    pub cgroup: CgroupSupport,
}

/// What the host's cgroup v2 offers a per-VM cgroup.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CgroupSupport {
    /// Where cgroup v2 is mounted, if it is.
    pub mount: Option<PathBuf>,
    /// The controllers a VM's cgroup uses that the v2 hierarchy has.
    pub available: Vec<String>,
    /// The ones it lacks (on a hybrid host they are bound to cgroup v1).
    pub missing: Vec<String>,
}

/// The controllers a VM's cgroup would use.
pub const CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "io"];

/// The jail as it will be applied on this host.
pub fn report() -> JailReport {
    JailReport {
        enabled: enabled(),
        // SAFETY: geteuid cannot fail.
        uid: unsafe { libc::geteuid() },
        seccomp: qemu_has_seccomp(),
        sandbox: super::qemu::SANDBOX,
        limits: format!(
            "no_new_privs, no core files, at most {} open files",
            super::MONITOR_MAX_FILES
        ),
        namespaces: Vec::new(),
        cgroup: cgroup_support(
            &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
            |p| std::fs::read_to_string(p).ok(),
        ),
    }
}

/// Whether the QEMU binary links libseccomp (without it `-sandbox` is refused).
fn qemu_has_seccomp() -> bool {
    let Ok(qemu) = super::qemu::QemuMicrovm::binary() else {
        return false;
    };
    std::process::Command::new("ldd")
        .arg(qemu)
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("libseccomp"))
}

/// The cgroup v2 mount in `mountinfo` and which of [`CONTROLLERS`] its root offers
/// (`read` reads a file).
pub fn cgroup_support(mountinfo: &str, read: impl Fn(&Path) -> Option<String>) -> CgroupSupport {
    // Fields: id parent major:minor root mount-point options ... - fstype source options.
    let mount = mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2")
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
    });
    let offered: Vec<String> = mount
        .as_ref()
        .and_then(|m| read(&m.join("cgroup.controllers")))
        .map(|c| c.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    let (available, missing): (Vec<String>, Vec<String>) = CONTROLLERS
        .iter()
        .map(|c| c.to_string())
        .partition(|c| offered.contains(c));
    CgroupSupport {
        mount,
        available,
        missing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hybrid_host_offers_no_controllers_in_cgroup_v2() {
        let hybrid = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                      42 31 0:39 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n";
        let s = cgroup_support(hybrid, |p| {
            (p == Path::new("/sys/fs/cgroup/unified/cgroup.controllers"))
                .then(|| "hugetlb\n".to_string())
        });
        assert_eq!(
            s.mount.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert!(s.available.is_empty());
        assert_eq!(s.missing, ["memory", "pids", "cpu", "io"]);
    }

    #[test]
    fn a_unified_host_offers_what_its_root_lists() {
        let unified = "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let s = cgroup_support(unified, |_| Some("cpuset cpu io memory pids".into()));
        assert_eq!(s.available, ["memory", "pids", "cpu", "io"]);
        assert!(s.missing.is_empty());
        let none = cgroup_support("", |_| None);
        assert_eq!(none.mount, None);
        assert_eq!(none.missing.len(), 4);
    }
}

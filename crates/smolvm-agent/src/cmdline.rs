//! The `smolvm.*` parameters of the kernel command line.

/// Default root device.
pub const DEFAULT_ROOT: &str = "/dev/vda";
/// Default root filesystem type.
pub const DEFAULT_ROOT_FSTYPE: &str = "ext4";
/// Default hostname.
pub const DEFAULT_HOSTNAME: &str = "smolvm";

/// What the host told the guest on the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootParams {
    /// `smolvm.root=`: block device holding the root filesystem.
    pub root: String,
    /// `smolvm.rootfstype=`: its filesystem type.
    pub root_fstype: String,
    /// `smolvm.rootflags=`: mount options, e.g. `noatime,errors=remount-ro`.
    pub root_flags: Option<String>,
    /// `smolvm.hostname=`: the hostname to set.
    pub hostname: String,
    /// `smolvm.log=`: log level of the agent.
    pub log: Option<String>,
}

impl Default for BootParams {
    fn default() -> Self {
        Self {
            root: DEFAULT_ROOT.into(),
            root_fstype: DEFAULT_ROOT_FSTYPE.into(),
            root_flags: None,
            hostname: DEFAULT_HOSTNAME.into(),
            log: None,
        }
    }
}

impl BootParams {
    /// Parses a kernel command line (the contents of `/proc/cmdline`).
    /// Unknown words are ignored; the last occurrence of a parameter wins.
    pub fn parse(cmdline: &str) -> Self {
        let mut params = Self::default();
        for word in cmdline.split_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let value = value.trim_matches('"');
            if value.is_empty() {
                continue;
            }
            match key {
                "smolvm.root" => params.root = value.into(),
                "smolvm.rootfstype" => params.root_fstype = value.into(),
                "smolvm.rootflags" => params.root_flags = Some(value.into()),
                "smolvm.hostname" => params.hostname = value.into(),
                "smolvm.log" => params.log = Some(value.into()),
                _ => {}
            }
        }
        params
    }

    /// Reads and parses `/proc/cmdline`; defaults when it cannot be read.
    pub fn from_proc() -> Self {
        match std::fs::read_to_string("/proc/cmdline") {
            Ok(line) => Self::parse(&line),
            Err(err) => {
                tracing::warn!("cannot read /proc/cmdline ({err}); using defaults");
                Self::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_parameters() {
        assert_eq!(
            BootParams::parse("console=ttyS0 quiet reboot=t"),
            BootParams::default()
        );
    }

    #[test]
    fn reads_smolvm_parameters() {
        let p = BootParams::parse(
            "console=ttyS0 smolvm.root=/dev/vdb smolvm.rootflags=noatime,ro \
             smolvm.hostname=\"box-1\" smolvm.log=debug smolvm.rootfstype=ext2 smolvm.bogus=1\n",
        );
        assert_eq!(p.root, "/dev/vdb");
        assert_eq!(p.root_fstype, "ext2");
        assert_eq!(p.root_flags.as_deref(), Some("noatime,ro"));
        assert_eq!(p.hostname, "box-1");
        assert_eq!(p.log.as_deref(), Some("debug"));
    }

    #[test]
    fn empty_values_keep_defaults() {
        let p = BootParams::parse("smolvm.root= smolvm.hostname=");
        assert_eq!(p, BootParams::default());
    }
}

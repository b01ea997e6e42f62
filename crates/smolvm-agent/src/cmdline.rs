//! The `smolvm.*` parameters of the kernel command line.

use smolvm_protocol::boot::{GuestNet, PARAM_DNS, PARAM_GW, PARAM_IP, PARAM_MTU};
use smolvm_protocol::ProtocolError;

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
    /// `smolvm.ip=`, `smolvm.gw=`, `smolvm.dns=`, `smolvm.mtu=` as given, in that order;
    /// [`BootParams::guest_net`] checks them.
    pub net: [Option<String>; 4],
}

impl Default for BootParams {
    fn default() -> Self {
        Self {
            root: DEFAULT_ROOT.into(),
            root_fstype: DEFAULT_ROOT_FSTYPE.into(),
            root_flags: None,
            hostname: DEFAULT_HOSTNAME.into(),
            log: None,
            net: Default::default(),
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
                PARAM_IP => params.net[0] = Some(value.into()),
                PARAM_GW => params.net[1] = Some(value.into()),
                PARAM_DNS => params.net[2] = Some(value.into()),
                PARAM_MTU => params.net[3] = Some(value.into()),
                _ => {}
            }
        }
        params
    }

    /// The network configuration the host asked for: `None` when it passed no `smolvm.ip`
    /// (the guest then configures no interface besides loopback), an error naming the
    /// parameter when one is malformed.
    pub fn guest_net(&self) -> Result<Option<GuestNet>, ProtocolError> {
        let [ip, gw, dns, mtu] = &self.net;
        GuestNet::from_params(ip.as_deref(), gw.as_deref(), dns.as_deref(), mtu.as_deref())
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
    fn reads_the_network_configuration() {
        let net = GuestNet::user_mode();
        let p = BootParams::parse(&format!(
            "console=ttyS0 smolvm.root=/dev/vda {} smolvm.hostname=vm-1",
            net.to_kernel_args()
        ));
        assert_eq!(p.guest_net().unwrap(), Some(net));
        assert_eq!(p.hostname, "vm-1");
    }

    #[test]
    fn no_network_without_smolvm_ip() {
        let p = BootParams::parse("console=ttyS0 smolvm.root=/dev/vda smolvm.ip=");
        assert_eq!(p.guest_net().unwrap(), None);
    }

    #[test]
    fn a_bad_network_parameter_is_an_error_naming_it() {
        let p = BootParams::parse("smolvm.ip=10.0.2.15/24 smolvm.gw=10.0.2.2 smolvm.mtu=64");
        let err = p.guest_net().unwrap_err().to_string();
        assert!(
            err.contains("smolvm.mtu") && err.contains("576..=9000"),
            "{err}"
        );
        // The last occurrence wins, as for every parameter.
        let p = BootParams::parse("smolvm.ip=bad smolvm.ip=10.0.2.15/24 smolvm.gw=10.0.2.2");
        assert_eq!(
            p.guest_net().unwrap().unwrap().addr.to_string(),
            "10.0.2.15"
        );
    }

    #[test]
    fn empty_values_keep_defaults() {
        let p = BootParams::parse("smolvm.root= smolvm.hostname=");
        assert_eq!(p, BootParams::default());
    }
}

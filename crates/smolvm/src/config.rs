//! VM configuration: the limits as named constants and validation in one place.
//! A config that fails validation creates nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Fewest vCPUs a VM may have.
pub const MIN_VCPUS: u32 = 1;
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 32;
/// vCPUs when none are asked for.
pub const DEFAULT_VCPUS: u32 = 2;
/// Least memory a VM may have, in MiB.
pub const MIN_MEM_MIB: u32 = 128;
/// Most memory a VM may have, in MiB.
pub const MAX_MEM_MIB: u32 = 16384;
/// Memory when none is asked for, in MiB.
pub const DEFAULT_MEM_MIB: u32 = 512;
/// Longest VM id.
pub const MAX_ID_LEN: usize = 63;
/// The image used when none is named.
pub const DEFAULT_IMAGE: &str = "default";
/// Largest disk a VM may be given, in MiB (1 TiB).
pub const MAX_DISK_MIB: u64 = 1 << 20;
/// Longest environment variable name.
pub const MAX_ENV_NAME: usize = 256;
/// Largest `NAME=VALUE` entry (with its terminating NUL), in bytes: the kernel's limit on
/// one environment string.
pub const MAX_ENV_ENTRY: usize = 128 * 1024;
/// Largest persistent environment in all (names, values and 2 bytes each), in bytes; it
/// must fit in one protocol frame and leave room for arguments in `execve`.
pub const MAX_ENV_TOTAL: usize = 768 * 1024;
/// Most persistent environment variables a VM may have.
pub const MAX_ENV_VARS: usize = 1024;

/// How a VM's root disk relates to its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiskMode {
    /// Each VM gets its own copy-on-write overlay on the read-only image (the default).
    #[default]
    Isolated,
    /// VMs of this image boot from one writable disk (trusted use; one running VM at a time).
    Shared,
}

impl std::str::FromStr for DiskMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "isolated" => Ok(DiskMode::Isolated),
            "shared" => Ok(DiskMode::Shared),
            other => Err(Error::InvalidConfig {
                field: "disk_mode",
                value: other.to_string(),
                allowed: "one of: isolated, shared".into(),
            }),
        }
    }
}

impl std::fmt::Display for DiskMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskMode::Isolated => "isolated",
            DiskMode::Shared => "shared",
        })
    }
}

/// How the VM is networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// `nat` when this process may create TAP devices (root or CAP_NET_ADMIN,
    /// /dev/net/tun, nft), else `user`. Resolved at create; the VM records the concrete mode.
    #[default]
    Auto,
    /// No network device at all (commands still run through the agent channel).
    None,
    /// QEMU user-mode networking (rootless, NAT inside QEMU). Egress lists need `nat`.
    User,
    /// A TAP device per VM, an address from 172.16.0.0/16, NAT out through nftables,
    /// VM-to-VM and VM-to-host traffic dropped, and a per-VM egress policy.
    Nat,
}

impl std::str::FromStr for NetworkMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(NetworkMode::Auto),
            "none" => Ok(NetworkMode::None),
            "user" => Ok(NetworkMode::User),
            "nat" => Ok(NetworkMode::Nat),
            other => Err(Error::InvalidConfig {
                field: "network",
                value: other.to_string(),
                allowed: "one of: auto, nat, user, none".into(),
            }),
        }
    }
}

impl std::fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NetworkMode::Auto => "auto",
            NetworkMode::None => "none",
            NetworkMode::User => "user",
            NetworkMode::Nat => "nat",
        })
    }
}

/// What happens to a guest's outgoing traffic that no `allow_egress`/`deny_egress` entry
/// matches. Link-local (cloud metadata), private ranges and the host stay blocked under
/// `allow` unless an `allow_egress` entry opens them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EgressDefault {
    /// Public destinations are reachable (the default).
    #[default]
    Allow,
    /// Nothing is reachable but `allow_egress` entries (in `user` mode: nothing at all).
    Deny,
}

impl std::str::FromStr for EgressDefault {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "allow" => Ok(EgressDefault::Allow),
            "deny" => Ok(EgressDefault::Deny),
            other => Err(Error::InvalidConfig {
                field: "egress",
                value: other.to_string(),
                allowed: "one of: allow, deny".into(),
            }),
        }
    }
}

impl std::fmt::Display for EgressDefault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EgressDefault::Allow => "allow",
            EgressDefault::Deny => "deny",
        })
    }
}

/// Everything that describes a VM before it exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmConfig {
    /// Stable id; generated as `vm-` plus 8 hex digits when absent.
    pub vm_id: Option<String>,
    /// Number of vCPUs (1..=32).
    pub vcpu_count: u32,
    /// Memory in MiB (128..=16384).
    pub mem_size_mib: u32,
    /// Name of a built image (see `smolvm image ls`).
    pub image: String,
    /// Extra kernel command-line arguments appended to ours.
    pub boot_args: Option<String>,
    /// Networking mode (`auto` resolves to `nat` or `user` at create).
    pub network: NetworkMode,
    /// Default egress policy (`allow` or `deny`); see [`EgressDefault`].
    pub egress: EgressDefault,
    /// Destinations opened: `A.B.C.D`, `A.B.C.D/N`, optionally `:PORT` (TCP and UDP).
    /// Checked before the default blocks, so an entry can open a private range. `nat` only.
    pub allow_egress: Vec<String>,
    /// Destinations closed, same syntax; checked before everything else. `nat` only.
    pub deny_egress: Vec<String>,
    /// Explicit kernel (uncompressed ELF vmlinux) instead of the image's.
    pub kernel_path: Option<PathBuf>,
    /// Explicit initramfs instead of the image's (it must hold the smolvm agent as /init).
    pub initrd_path: Option<PathBuf>,
    /// Explicit root filesystem (raw ext4 or qcow2) instead of the image's; it is only read
    /// in `isolated` mode and written in `shared` mode.
    pub rootfs_path: Option<PathBuf>,
    /// `isolated` (own overlay, default) or `shared` (one writable disk).
    pub disk_mode: DiskMode,
    /// Keep the VM's overlay when the VM is deleted (it is moved to the disks directory).
    pub retain_disk_on_delete: bool,
    /// Boot from this existing disk (e.g. one retained from a deleted VM) instead of a new
    /// overlay; it is used in place and never deleted by smolvm.
    pub disk_path: Option<PathBuf>,
    /// Size of the VM's disk in MiB (at least the image's); the guest grows its root
    /// filesystem to fill it. Default: the image's size.
    pub disk_size_mib: Option<u64>,
    /// Environment variables persisted in the guest for every command (never written to
    /// the state database).
    pub env_vars: BTreeMap<String, String>,
    /// Start from the image's booted template (made the first time a shape is used) instead
    /// of booting the kernel; `false` always boots cold. Only a VM's first start of an
    /// isolated disk from an image can use one; the others boot cold.
    pub snapshot: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vm_id: None,
            vcpu_count: DEFAULT_VCPUS,
            mem_size_mib: DEFAULT_MEM_MIB,
            image: DEFAULT_IMAGE.to_string(),
            boot_args: None,
            network: NetworkMode::default(),
            egress: EgressDefault::default(),
            allow_egress: Vec::new(),
            deny_egress: Vec::new(),
            kernel_path: None,
            initrd_path: None,
            rootfs_path: None,
            disk_mode: DiskMode::default(),
            retain_disk_on_delete: false,
            disk_path: None,
            disk_size_mib: None,
            env_vars: BTreeMap::new(),
            snapshot: true,
        }
    }
}

impl VmConfig {
    /// Checks every field; the first problem found is returned naming the field.
    pub fn validate(&self) -> Result<()> {
        if let Some(id) = &self.vm_id {
            validate_id(id)?;
        }
        if !(MIN_VCPUS..=MAX_VCPUS).contains(&self.vcpu_count) {
            return Err(Error::InvalidConfig {
                field: "vcpu_count",
                value: self.vcpu_count.to_string(),
                allowed: format!("must be between {MIN_VCPUS} and {MAX_VCPUS}"),
            });
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_size_mib) {
            return Err(Error::InvalidConfig {
                field: "mem_size_mib",
                value: self.mem_size_mib.to_string(),
                allowed: format!("must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB"),
            });
        }
        if self.image.is_empty()
            || !self
                .image
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            || self.image.starts_with('.')
        {
            return Err(Error::InvalidConfig {
                field: "image",
                value: self.image.clone(),
                allowed: "an image name of letters, digits, '-', '_' and '.'".into(),
            });
        }
        if let Some(args) = &self.boot_args {
            if args.len() > 2048 || args.chars().any(|c| c.is_control()) {
                return Err(Error::InvalidConfig {
                    field: "boot_args",
                    value: args.clone(),
                    allowed: "at most 2048 printable characters".into(),
                });
            }
        }
        for (field, path) in [
            ("kernel_path", &self.kernel_path),
            ("initrd_path", &self.initrd_path),
            ("rootfs_path", &self.rootfs_path),
            ("disk_path", &self.disk_path),
        ] {
            if let Some(p) = path {
                check_file(field, p)?;
            }
        }
        if let Some(size) = self.disk_size_mib {
            if !(1..=MAX_DISK_MIB).contains(&size) {
                return Err(Error::InvalidConfig {
                    field: "disk_size_mib",
                    value: size.to_string(),
                    allowed: format!(
                        "between 1 and {MAX_DISK_MIB} MiB, and at least the image's size"
                    ),
                });
            }
        }
        if self.disk_path.is_some() {
            let conflict = if self.disk_mode == DiskMode::Shared {
                Some(("disk_mode", "shared".to_string()))
            } else if let Some(r) = &self.rootfs_path {
                Some(("rootfs_path", r.display().to_string()))
            } else {
                self.disk_size_mib.map(|s| ("disk_size_mib", s.to_string()))
            };
            if let Some((field, value)) = conflict {
                return Err(Error::InvalidConfig {
                    field,
                    value,
                    allowed: "not together with disk_path (an existing disk is booted as it is)"
                        .into(),
                });
            }
        }
        if self.disk_mode == DiskMode::Shared {
            if self.retain_disk_on_delete {
                return Err(Error::InvalidConfig {
                    field: "retain_disk_on_delete",
                    value: "true".into(),
                    allowed: "only with disk_mode isolated (a shared disk is never deleted)".into(),
                });
            }
            if let Some(s) = self.disk_size_mib {
                return Err(Error::InvalidConfig {
                    field: "disk_size_mib",
                    value: s.to_string(),
                    allowed: "only with disk_mode isolated".into(),
                });
            }
        }
        validate_env(&self.env_vars)?;
        self.validate_egress()?;
        Ok(())
    }

    /// Checks the egress entries, and that the network mode can enforce them: lists need
    /// `nat` (QEMU's user-mode stack cannot filter by destination).
    pub fn validate_egress(&self) -> Result<()> {
        crate::network::egress::parse_list("allow_egress", &self.allow_egress)?;
        crate::network::egress::parse_list("deny_egress", &self.deny_egress)?;
        if matches!(self.network, NetworkMode::User | NetworkMode::None) {
            let field = if !self.allow_egress.is_empty() {
                Some(("allow_egress", &self.allow_egress))
            } else if !self.deny_egress.is_empty() {
                Some(("deny_egress", &self.deny_egress))
            } else {
                None
            };
            if let Some((field, list)) = field {
                return Err(Error::InvalidConfig {
                    field,
                    value: list.join(","),
                    allowed: format!(
                        "egress lists need network nat (this VM's network is {}; user mode can only allow everything or, with egress deny, nothing)",
                        self.network
                    ),
                });
            }
        }
        Ok(())
    }

    /// The config as stored in the state database: environment values are left out (they
    /// often hold API keys); the names are kept.
    pub fn redacted(&self) -> VmConfig {
        let mut c = self.clone();
        for v in c.env_vars.values_mut() {
            v.clear();
        }
        c
    }
}

fn check_file(field: &'static str, path: &std::path::Path) -> Result<()> {
    if let Err(why) = crate::hypervisor::qemu::check_path(path) {
        return Err(Error::InvalidConfig {
            field,
            value: path.display().to_string(),
            allowed: format!("a path QEMU can be given safely: {why}"),
        });
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(Error::InvalidConfig {
            field,
            value: path.display().to_string(),
            allowed: "a path to a regular file (this is not one)".into(),
        }),
        Err(e) => Err(Error::InvalidConfig {
            field,
            value: path.display().to_string(),
            allowed: format!("a path to an existing file ({e})"),
        }),
    }
}

/// Checks an environment variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most 256 bytes.
pub fn validate_env_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = name.len() <= MAX_ENV_NAME
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            field: "env_vars",
            value: name.to_string(),
            allowed: format!(
                "variable names of letters, digits and '_', not starting with a digit, at most {MAX_ENV_NAME} bytes"
            ),
        })
    }
}

/// Checks a set of environment variables (names, values without NUL, sizes, count) with
/// the limits the guest agent applies, so a bad set fails before any round trip.
pub fn validate_env<'a>(vars: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<()> {
    let (mut n, mut total) = (0, 0);
    for (name, value) in vars {
        validate_env_name(name)?;
        let entry = name.len() + value.len() + 2;
        if value.contains('\0') || entry > MAX_ENV_ENTRY {
            return Err(Error::InvalidConfig {
                field: "env_vars",
                value: format!("{name}=<{} bytes>", value.len()),
                allowed: format!(
                    "values without NUL bytes; NAME=VALUE at most {} bytes",
                    MAX_ENV_ENTRY - 1
                ),
            });
        }
        n += 1;
        total += entry;
    }
    if n > MAX_ENV_VARS || total > MAX_ENV_TOTAL {
        return Err(Error::InvalidConfig {
            field: "env_vars",
            value: format!("{n} variables, {total} bytes"),
            allowed: format!("at most {MAX_ENV_VARS} variables and {MAX_ENV_TOTAL} bytes in all"),
        });
    }
    Ok(())
}

/// Checks a VM id: lowercase letters, digits and '-', 1 to 63 characters, starting with a
/// letter or digit.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !id.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            field: "vm_id",
            value: id.to_string(),
            allowed: format!(
                "1 to {MAX_ID_LEN} lowercase letters, digits and '-', not starting with '-'"
            ),
        })
    }
}

/// A fresh id: `vm-` and 8 random hex digits.
pub fn generate_id() -> String {
    let mut b = [0u8; 4];
    crate::util::random_bytes(&mut b);
    format!("vm-{:08x}", u32::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        VmConfig::default().validate().unwrap();
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let c = VmConfig {
            vcpu_count: 33,
            ..Default::default()
        };
        let msg = c.validate().unwrap_err().to_string();
        assert!(
            msg.contains("vcpu_count") && msg.contains("33") && msg.contains("1 and 32"),
            "{msg}"
        );
        let c = VmConfig {
            mem_size_mib: 64,
            ..Default::default()
        };
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("mem_size_mib") && msg.contains("64"), "{msg}");
    }

    #[test]
    fn disk_options_that_conflict_are_refused() {
        let c = VmConfig {
            disk_mode: DiskMode::Shared,
            retain_disk_on_delete: true,
            ..Default::default()
        };
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("retain_disk_on_delete"), "{msg}");
        let c = VmConfig {
            disk_path: Some("/nonexistent/disk.qcow2".into()),
            ..Default::default()
        };
        let msg = c.validate().unwrap_err().to_string();
        assert!(
            msg.contains("disk_path") && msg.contains("/nonexistent"),
            "{msg}"
        );
        let c = VmConfig {
            disk_size_mib: Some(0),
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("disk_size_mib"));
        assert!("nfs"
            .parse::<DiskMode>()
            .unwrap_err()
            .to_string()
            .contains("isolated, shared"));
    }

    #[test]
    fn env_names_and_values() {
        let ok: BTreeMap<String, String> = [("API_KEY", "sk-'$(x)`\n"), ("_x1", "")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        validate_env(&ok).unwrap();
        for bad in ["", "1A", "A-B", "A=B", "A B", "É"] {
            assert!(validate_env_name(bad).is_err(), "{bad:?}");
        }
        let nul: BTreeMap<String, String> = [("A".to_string(), "a\0b".to_string())].into();
        assert!(validate_env(&nul).unwrap_err().to_string().contains("NUL"));
        let c = VmConfig {
            env_vars: ok,
            ..Default::default()
        };
        assert!(c.redacted().env_vars.values().all(|v| v.is_empty()));
    }

    #[test]
    fn network_and_egress() {
        assert_eq!("nat".parse::<NetworkMode>().unwrap(), NetworkMode::Nat);
        assert_eq!("auto".parse::<NetworkMode>().unwrap(), NetworkMode::Auto);
        assert!("bridge"
            .parse::<NetworkMode>()
            .unwrap_err()
            .to_string()
            .contains("auto, nat, user, none"));
        assert_eq!(
            "deny".parse::<EgressDefault>().unwrap(),
            EgressDefault::Deny
        );
        assert!("block".parse::<EgressDefault>().is_err());
        let c = VmConfig {
            network: NetworkMode::Nat,
            egress: EgressDefault::Deny,
            allow_egress: vec!["203.0.113.0/24".into(), "198.51.100.7:443".into()],
            deny_egress: vec!["203.0.113.9".into()],
            ..Default::default()
        };
        c.validate().unwrap();
        let bad = VmConfig {
            allow_egress: vec!["203.0.113.0/24".into(), "nope".into()],
            ..c.clone()
        };
        let msg = bad.validate().unwrap_err().to_string();
        assert!(
            msg.contains("allow_egress") && msg.contains("nope"),
            "{msg}"
        );
        let user = VmConfig {
            network: NetworkMode::User,
            ..c.clone()
        };
        let msg = user.validate().unwrap_err().to_string();
        assert!(msg.contains("need network nat"), "{msg}");
        // egress deny alone is fine in user mode (QEMU restrict=on).
        VmConfig {
            network: NetworkMode::User,
            egress: EgressDefault::Deny,
            ..Default::default()
        }
        .validate()
        .unwrap();
        // Rows stored before these fields existed still load.
        let old: VmConfig = serde_json::from_str(r#"{"network":"user","vcpu_count":1}"#).unwrap();
        assert_eq!(
            (old.network, old.egress, old.allow_egress.len()),
            (NetworkMode::User, EgressDefault::Allow, 0)
        );
    }

    #[test]
    fn ids() {
        validate_id("agent-workspace").unwrap();
        validate_id(&generate_id()).unwrap();
        for bad in ["", "Upper", "a_b", "-x", &"a".repeat(64), "a/b", "a b"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_path_with_a_comma_is_refused_before_it_reaches_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let sneaky = dir.path().join("x,backing.file.filename=etc-shadow");
        std::fs::write(&sneaky, b"").unwrap();
        for field in ["kernel_path", "rootfs_path", "disk_path"] {
            let mut c = VmConfig::default();
            match field {
                "kernel_path" => c.kernel_path = Some(sneaky.clone()),
                "rootfs_path" => c.rootfs_path = Some(sneaky.clone()),
                _ => c.disk_path = Some(sneaky.clone()),
            }
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field) && e.contains("comma"), "{e}");
        }
    }
}

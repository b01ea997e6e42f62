//! VM configuration: the limits as named constants and validation in one place.
//! A config that fails validation creates nothing.

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

/// How the VM is networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// No network device at all (commands still run through the agent channel).
    #[default]
    None,
    /// QEMU user-mode networking (rootless, NAT inside QEMU).
    User,
}

impl std::str::FromStr for NetworkMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(NetworkMode::None),
            "user" => Ok(NetworkMode::User),
            other => Err(Error::InvalidConfig {
                field: "network",
                value: other.to_string(),
                allowed: "one of: none, user".into(),
            }),
        }
    }
}

impl std::fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NetworkMode::None => "none",
            NetworkMode::User => "user",
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
    /// Networking mode.
    pub network: NetworkMode,
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
        Ok(())
    }
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
    fn ids() {
        validate_id("agent-workspace").unwrap();
        validate_id(&generate_id()).unwrap();
        for bad in ["", "Upper", "a_b", "-x", &"a".repeat(64), "a/b", "a b"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }
}

//! What a user may ask of a VM made from a snapshot, and the one rule per option that says
//! what becomes of it. The CLI (`smolvm create --from-snapshot`) and the Python SDK
//! (`SmolVM.from_snapshot`) only convert their options into a [`SnapshotOverrides`]; every
//! decision is made here, so both front ends honour and refuse the same things with the
//! same words.
//!
//! A VM made from a snapshot resumes the saved guest: its memory (so its vCPUs, memory size
//! and kernel command line), its devices, and its disk as it was. So:
//!
//! | option | rule |
//! |---|---|
//! | `vm_id` | honoured: the new VM's id (generated when absent) |
//! | `env_vars` | merged: set on top of the environment the saved guest already has |
//! | `network` | honoured where the saved network device can be restored: a snapshot taken on `nat` or `user` restores on that mode only (the saved state holds the backend's: a TAP's device features, slirp's state), one without a network device on `none` only, one whose device was unplugged (`none`, made from a template with a device) on any; `auto` (and absent) keep the snapshot's |
//! | `egress`, `allow_egress`, `deny_egress` | honoured: replace the snapshot's (absent: the snapshot's) |
//! | `retain_disk_on_delete` | honoured (absent: the snapshot's VM's) |
//! | `vcpu_count`, `mem_size_mib` | refused unless the snapshot's: the saved memory fixes them |
//! | `boot_args` | refused unless the snapshot's: a restored kernel keeps the command line it booted with |
//! | `image`, `kernel_path`, `initrd_path`, `rootfs_path` | refused unless the snapshot's: its memory and disk were made from those files |
//! | `disk_size_mib` | refused unless the snapshot's: the saved guest's file system keeps its size |
//! | `disk_mode` | `isolated` only: the VM's disk is its own overlay on the snapshot's |
//! | `disk_path` | refused: the VM's disk is made from the snapshot's |
//! | `snapshot` | `true` only: `false` would boot cold, without the snapshot |
//!
//! A refusal is [`Error::InvalidConfig`] naming the option, the value given, the
//! snapshot's value and why; nothing is created.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::SavedState;
use crate::config::{DiskMode, EgressDefault, NetworkMode, VmConfig};
use crate::error::{Error, Result};
use crate::store::Owner;

/// The options given for a VM made from a snapshot; `None` (or an empty map) means "not
/// given". See the module docs for what becomes of each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotOverrides {
    /// The new VM's id.
    pub vm_id: Option<String>,
    /// Environment variables set on top of the saved guest's.
    pub env_vars: BTreeMap<String, String>,
    /// Network mode (within what the saved network device allows).
    pub network: Option<NetworkMode>,
    /// Default egress policy.
    pub egress: Option<EgressDefault>,
    /// Destinations opened (`nat` only).
    pub allow_egress: Option<Vec<String>>,
    /// Destinations closed (`nat` only).
    pub deny_egress: Option<Vec<String>>,
    /// Keep the VM's disk when it is deleted.
    pub retain_disk_on_delete: Option<bool>,
    /// vCPUs: must be the snapshot's.
    pub vcpu_count: Option<u32>,
    /// Memory in MiB: must be the snapshot's.
    pub mem_size_mib: Option<u32>,
    /// Image: must be the snapshot's.
    pub image: Option<String>,
    /// Extra kernel arguments: must be the snapshot's.
    pub boot_args: Option<String>,
    /// Kernel: must be the snapshot's.
    pub kernel_path: Option<PathBuf>,
    /// Initramfs: must be the snapshot's.
    pub initrd_path: Option<PathBuf>,
    /// Root file system: must be the snapshot's.
    pub rootfs_path: Option<PathBuf>,
    /// Disk size in MiB: must be the snapshot's.
    pub disk_size_mib: Option<u64>,
    /// Disk mode: `isolated` only.
    pub disk_mode: Option<DiskMode>,
    /// An existing disk: refused.
    pub disk_path: Option<PathBuf>,
    /// Resume from saved state: `true` only.
    pub snapshot: Option<bool>,
    /// Not an option of the VM: the process whose death deletes it (ephemeral VMs).
    pub owner: Option<Owner>,
}

/// Why an option cannot apply: the option, the value given, what can apply and why.
fn refuse(snapshot: &str, field: &'static str, value: String, allowed: String) -> Error {
    Error::InvalidConfig {
        field,
        value,
        allowed: format!("{allowed}, for a VM made from snapshot {snapshot:?}"),
    }
}

/// `given`, when given, must be the snapshot's own value (`own`), else a refusal naming
/// `field`; `show` writes a value (`None`: the snapshot has none of its own).
fn fixed<T: PartialEq>(
    snapshot: &str,
    field: &'static str,
    given: Option<&T>,
    own: Option<&T>,
    why: &str,
    show: impl Fn(Option<&T>) -> String,
) -> Result<()> {
    match given {
        Some(g) if Some(g) != own => Err(refuse(
            snapshot,
            field,
            show(Some(g)),
            format!("only the snapshot's own ({}): {why}", show(own)),
        )),
        _ => Ok(()),
    }
}

fn text<T: ToString>(v: Option<&T>) -> String {
    v.map_or_else(|| "none".into(), T::to_string)
}

fn path_or_images(p: Option<&PathBuf>) -> String {
    p.map_or_else(|| "the image's".into(), |p| p.display().to_string())
}

impl SnapshotOverrides {
    /// The config of a VM made from `saved` with these options over it, validated; or the
    /// first option that cannot apply, refused. The network is concrete (`auto` taken as
    /// the snapshot's) but not yet checked against this host.
    pub fn merge(&self, saved: &SavedState) -> Result<VmConfig> {
        let name = saved.name.as_str();
        let source = saved.config.clone().unwrap_or_default();
        let shape = "the saved memory fixes the shape of a restored VM";
        fixed(
            name,
            "vcpu_count",
            self.vcpu_count.as_ref(),
            Some(&saved.vcpus),
            shape,
            text,
        )?;
        fixed(
            name,
            "mem_size_mib",
            self.mem_size_mib.as_ref(),
            Some(&saved.mem_mib),
            shape,
            text,
        )?;
        fixed(
            name,
            "image",
            self.image.as_ref(),
            Some(&saved.image),
            "its memory and disk were made from that image",
            text,
        )?;
        let files = "its memory and disk were made from those files";
        for (field, given, own) in [
            ("kernel_path", &self.kernel_path, &source.kernel_path),
            ("initrd_path", &self.initrd_path, &source.initrd_path),
            ("rootfs_path", &self.rootfs_path, &source.rootfs_path),
        ] {
            fixed(
                name,
                field,
                given.as_ref(),
                own.as_ref(),
                files,
                path_or_images,
            )?;
        }
        fixed(
            name,
            "boot_args",
            self.boot_args.as_ref(),
            saved.boot_args.as_ref(),
            "a restored kernel keeps the command line it booted with; boot a new VM to \
             change kernel arguments",
            text,
        )?;
        fixed(
            name,
            "disk_size_mib",
            self.disk_size_mib.as_ref(),
            source.disk_size_mib.as_ref(),
            "the saved guest's file system keeps the size it was saved with",
            |s| s.map_or_else(|| "the image's".into(), u64::to_string),
        )?;
        if let Some(mode) = self.disk_mode.filter(|m| *m != DiskMode::Isolated) {
            return Err(refuse(
                name,
                "disk_mode",
                mode.to_string(),
                "isolated only: the VM's disk is its own overlay on the snapshot's".into(),
            ));
        }
        if let Some(p) = &self.disk_path {
            return Err(refuse(
                name,
                "disk_path",
                p.display().to_string(),
                "none: the VM's disk is made from the snapshot's".into(),
            ));
        }
        if self.snapshot == Some(false) {
            return Err(refuse(
                name,
                "snapshot",
                "false".into(),
                "true only: false would boot cold, without the snapshot's memory".into(),
            ));
        }
        let network = self.network_for(saved, &source)?;
        let mut c = VmConfig {
            vm_id: self.vm_id.clone(),
            vcpu_count: saved.vcpus,
            mem_size_mib: saved.mem_mib,
            image: saved.image.clone(),
            boot_args: saved.boot_args.clone(),
            network,
            egress: self.egress.unwrap_or(source.egress),
            allow_egress: self
                .allow_egress
                .clone()
                .unwrap_or_else(|| source.allow_egress.clone()),
            deny_egress: self
                .deny_egress
                .clone()
                .unwrap_or_else(|| source.deny_egress.clone()),
            kernel_path: source.kernel_path.clone(),
            initrd_path: source.initrd_path.clone(),
            rootfs_path: source.rootfs_path.clone(),
            disk_mode: DiskMode::Isolated,
            retain_disk_on_delete: self
                .retain_disk_on_delete
                .unwrap_or(source.retain_disk_on_delete),
            disk_path: None,
            disk_size_mib: source.disk_size_mib,
            // The saved guest has its own values (never stored): only these are set.
            env_vars: self.env_vars.clone(),
            snapshot: true,
        };
        if network == NetworkMode::None && self.network.is_none() {
            // The snapshot's lists went with its network; none has no use for them.
            c.allow_egress.clear();
            c.deny_egress.clear();
        }
        c.validate()?;
        Ok(c)
    }

    /// The network of the new VM: `auto` and absent keep the snapshot's; another mode must
    /// fit the saved network device.
    fn network_for(&self, saved: &SavedState, source: &VmConfig) -> Result<NetworkMode> {
        let own = if saved.nic {
            source.network
        } else {
            NetworkMode::None
        };
        let want = match self.network {
            None | Some(NetworkMode::Auto) => return Ok(own),
            Some(n) => n,
        };
        let name = saved.name.as_str();
        if !saved.nic && want != NetworkMode::None {
            return Err(refuse(
                name,
                "network",
                want.to_string(),
                "none only: the snapshot has no network device".into(),
            ));
        }
        // A guest saved on a TAP negotiated virtio-net features (vnet_hdr) only a TAP has;
        // one saved on user mode carries slirp's state, which only slirp loads.
        let why = match source.network {
            NetworkMode::Nat => Some("its network device uses features only a TAP device has"),
            NetworkMode::User => Some("the saved state holds user mode's network stack"),
            NetworkMode::None | NetworkMode::Auto => None,
        };
        if let Some(why) = why.filter(|_| want != source.network) {
            return Err(refuse(
                name,
                "network",
                want.to_string(),
                format!(
                    "{} only: the snapshot was taken on {} networking and {why}",
                    source.network, source.network
                ),
            ));
        }
        Ok(want)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::Accelerator;
    use crate::snapshot::Kind;

    fn saved(network: NetworkMode) -> SavedState {
        SavedState {
            name: "s1".into(),
            kind: Kind::Snapshot,
            image: "default".into(),
            image_stamp: "x".into(),
            vcpus: 2,
            mem_mib: 512,
            nic: network != NetworkMode::None,
            accelerator: Accelerator::Tcg,
            cmdline: "console=ttyS0".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            source_vm: Some("src".into()),
            boot_args: Some("quiet".into()),
            config: Some(VmConfig {
                vm_id: Some("src".into()),
                vcpu_count: 2,
                mem_size_mib: 512,
                network,
                boot_args: Some("quiet".into()),
                env_vars: [("SECRET".to_string(), String::new())].into(),
                ..VmConfig::default()
            }),
            created_at: 1,
        }
    }

    fn refused(o: SnapshotOverrides, s: &SavedState) -> (&'static str, String) {
        match o.merge(s) {
            Err(Error::InvalidConfig { field, value, .. }) => (field, value),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn nothing_given_is_the_snapshots_vm_without_its_id_or_environment() {
        let s = saved(NetworkMode::User);
        let c = SnapshotOverrides::default().merge(&s).unwrap();
        assert_eq!((c.vcpu_count, c.mem_size_mib), (2, 512));
        assert_eq!(c.vm_id, None);
        assert!(c.env_vars.is_empty());
        assert_eq!(c.network, NetworkMode::User);
        assert_eq!(c.boot_args.as_deref(), Some("quiet"));
        assert!(c.snapshot && c.disk_mode == DiskMode::Isolated);
    }

    #[test]
    fn honoured_options_apply() {
        let s = saved(NetworkMode::Nat);
        let c = SnapshotOverrides {
            vm_id: Some("copy".into()),
            env_vars: [("A".to_string(), "1".to_string())].into(),
            egress: Some(EgressDefault::Deny),
            allow_egress: Some(vec!["203.0.113.0/24".into()]),
            retain_disk_on_delete: Some(true),
            // The snapshot's own values are accepted.
            vcpu_count: Some(2),
            mem_size_mib: Some(512),
            image: Some("default".into()),
            boot_args: Some("quiet".into()),
            disk_mode: Some(DiskMode::Isolated),
            snapshot: Some(true),
            network: Some(NetworkMode::Auto),
            ..Default::default()
        }
        .merge(&s)
        .unwrap();
        assert_eq!(c.vm_id.as_deref(), Some("copy"));
        assert_eq!(c.env_vars.get("A").map(String::as_str), Some("1"));
        assert_eq!(c.network, NetworkMode::Nat, "auto keeps the snapshot's");
        assert_eq!(c.egress, EgressDefault::Deny);
        assert_eq!(c.allow_egress, ["203.0.113.0/24"]);
        assert!(c.retain_disk_on_delete);
        // A snapshot whose device was unplugged (network none, from a template with a
        // device) restores on any network.
        let mut s = saved(NetworkMode::None);
        s.nic = true;
        for n in [NetworkMode::None, NetworkMode::User, NetworkMode::Nat] {
            let o = SnapshotOverrides {
                network: Some(n),
                ..Default::default()
            };
            assert_eq!(o.merge(&s).unwrap().network, n);
        }
    }

    #[test]
    fn each_fixed_option_is_refused_naming_it_and_its_value() {
        let s = saved(NetworkMode::Nat);
        let cases: Vec<(SnapshotOverrides, &str, &str)> = vec![
            (
                SnapshotOverrides {
                    vcpu_count: Some(3),
                    ..Default::default()
                },
                "vcpu_count",
                "3",
            ),
            (
                SnapshotOverrides {
                    mem_size_mib: Some(1024),
                    ..Default::default()
                },
                "mem_size_mib",
                "1024",
            ),
            (
                SnapshotOverrides {
                    image: Some("other".into()),
                    ..Default::default()
                },
                "image",
                "other",
            ),
            (
                SnapshotOverrides {
                    kernel_path: Some("/boot/vmlinux".into()),
                    ..Default::default()
                },
                "kernel_path",
                "/boot/vmlinux",
            ),
            (
                SnapshotOverrides {
                    initrd_path: Some("/boot/initrd".into()),
                    ..Default::default()
                },
                "initrd_path",
                "/boot/initrd",
            ),
            (
                SnapshotOverrides {
                    rootfs_path: Some("/r.ext4".into()),
                    ..Default::default()
                },
                "rootfs_path",
                "/r.ext4",
            ),
            (
                SnapshotOverrides {
                    boot_args: Some("loglevel=7".into()),
                    ..Default::default()
                },
                "boot_args",
                "loglevel=7",
            ),
            (
                SnapshotOverrides {
                    disk_size_mib: Some(4096),
                    ..Default::default()
                },
                "disk_size_mib",
                "4096",
            ),
            (
                SnapshotOverrides {
                    disk_mode: Some(DiskMode::Shared),
                    ..Default::default()
                },
                "disk_mode",
                "shared",
            ),
            (
                SnapshotOverrides {
                    disk_path: Some("/d.qcow2".into()),
                    ..Default::default()
                },
                "disk_path",
                "/d.qcow2",
            ),
            (
                SnapshotOverrides {
                    snapshot: Some(false),
                    ..Default::default()
                },
                "snapshot",
                "false",
            ),
            (
                SnapshotOverrides {
                    network: Some(NetworkMode::User),
                    ..Default::default()
                },
                "network",
                "user",
            ),
            (
                SnapshotOverrides {
                    network: Some(NetworkMode::None),
                    ..Default::default()
                },
                "network",
                "none",
            ),
        ];
        for (o, field, value) in cases {
            let e = o.merge(&s).unwrap_err().to_string();
            let (f, v) = refused(o, &s);
            assert_eq!(f, field, "{e}");
            assert!(v.contains(value), "{value:?} not in {v:?}");
            assert!(e.contains("s1"), "{e}");
        }
        // A snapshot without a network device: none only; one taken on user mode: user
        // only.
        for (saved_on, refused_modes) in [
            (NetworkMode::None, [NetworkMode::User, NetworkMode::Nat]),
            (NetworkMode::User, [NetworkMode::None, NetworkMode::Nat]),
        ] {
            let s = saved(saved_on);
            for n in refused_modes {
                let o = SnapshotOverrides {
                    network: Some(n),
                    ..Default::default()
                };
                assert_eq!(refused(o, &s).0, "network", "{saved_on} to {n}");
            }
        }
        // Bad values of honoured options are the config's usual errors.
        let o = SnapshotOverrides {
            vm_id: Some("Bad Id".into()),
            ..Default::default()
        };
        assert_eq!(refused(o, &s).0, "vm_id");
    }
}

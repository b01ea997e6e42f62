//! smolvm guest images, built on the host from Debian packages.
//!
//! An image is a directory holding:
//! - `vmlinux`: Debian's cloud kernel, uncompressed (QEMU `microvm` boots it through PVH);
//! - `initrd.cpio`: an uncompressed newc initramfs with the guest agent as `/init` and the
//!   virtio modules in `/smolvm/modules/`, their load order in `/smolvm/modules.list`;
//! - `rootfs.ext4`: a minimal Debian (mmdebstrap) with python3, read-only, meant as the
//!   backing file of per-VM copy-on-write overlays;
//! - `manifest.json`: what it was built from, checksums and build timings.
//!
//! [`build`] makes one (or returns the existing one when its inputs are unchanged),
//! [`open`], [`list`] and [`remove`] manage them. [`build_ssh_image`] derives an image whose
//! guest also runs an SSH server with a pinned host key (see [`ssh`]).

mod build;
mod error;
pub mod initramfs;
mod kernel;
mod manifest;
mod modules;
mod progress;
mod rootfs;
mod sources;
mod sparse;
pub mod ssh;
mod store;
mod tools;
pub mod vmlinux;

use std::path::PathBuf;

pub use build::{
    build, BuildOptions, DEFAULT_IMAGE, DEFAULT_ROOTFS_SIZE_MIB, INITRAMFS_MODULES_DIR,
    INITRAMFS_MODULES_LIST, MIN_ROOTFS_SIZE_MIB,
};
pub use error::ImageError;
pub use kernel::KERNEL_META_PACKAGE;
pub use manifest::{
    AgentInfo, FileInfo, Files, KernelInfo, Manifest, SshInfo, BUILDER_VERSION, FORMAT_VERSION,
    MANIFEST_FILE,
};
pub use modules::GUEST_MODULES;
pub use progress::StepTiming;
pub use rootfs::{
    AGENT_PATH, BASE_PACKAGES, DEBIAN_SUITE, HOSTNAME, RESOLV_CONF_PLACEHOLDER, SSHD_MARKER,
    VOLUME_LABEL,
};
pub use ssh::{
    build_ssh_image, default_keys_dir, ensure_ssh_key, known_hosts_path, read_public_key,
    ssh_command_hint, KNOWN_HOSTS_FILE,
};
pub use store::{list, open, remove, Image, INITRD_FILE, ROOTFS_FILE, VMLINUX_FILE};

/// The directory images live in by default:
/// `$SMOLVM_IMAGE_DIR`, else `$SMOLVM_DATA_DIR/images`, else `$XDG_DATA_HOME/smolvm/images`,
/// else `~/.local/share/smolvm/images` (`/var/lib/smolvm/images` without a home directory).
pub fn default_images_dir() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("SMOLVM_IMAGE_DIR") {
        return dir;
    }
    if let Some(dir) = var("SMOLVM_DATA_DIR") {
        return dir.join("images");
    }
    if let Some(dir) = var("XDG_DATA_HOME").filter(|d| d.is_absolute()) {
        return dir.join("smolvm/images");
    }
    match var("HOME") {
        Some(home) => home.join(".local/share/smolvm/images"),
        None => PathBuf::from("/var/lib/smolvm/images"),
    }
}

//! `manifest.json`: what an image was built from and checksums of what it holds.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ImageError;
use crate::progress::StepTiming;

/// File name of the manifest inside an image directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Version of the manifest's layout; readers refuse newer ones.
pub const FORMAT_VERSION: u32 = 1;

/// Version of the build pipeline. Bump it whenever a change to the pipeline changes what
/// an image contains, so existing images count as out of date.
pub const BUILDER_VERSION: u32 = 2;

/// Everything recorded about a built image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version of this file ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Pipeline version that built the image ([`BUILDER_VERSION`]).
    pub builder_version: u32,
    /// The image name.
    pub name: String,
    /// When the build finished, RFC 3339 UTC.
    pub created: String,
    /// Debian suite of the root filesystem, e.g. `bookworm`.
    pub suite: String,
    /// Main Debian mirror the root filesystem came from.
    pub mirror: String,
    /// All apt sources given to mmdebstrap.
    pub sources: Vec<String>,
    /// The guest kernel.
    pub kernel: KernelInfo,
    /// Packages asked for on top of Debian's `minbase`.
    pub packages: Vec<String>,
    /// Kernel modules in `/smolvm/modules/` of the initramfs, in load order (file names).
    pub modules: Vec<String>,
    /// Size of the root filesystem image in MiB.
    pub rootfs_size_mib: u64,
    /// The guest agent installed as `/init` and in the root filesystem.
    pub agent: AgentInfo,
    /// The image's files and their checksums.
    pub files: Files,
    /// Hash of the build inputs; an image whose inputs hash matches is up to date.
    pub inputs_hash: String,
    /// How long each build step took.
    #[serde(default)]
    pub build_steps: Vec<StepTiming>,
    /// For an SSH image (made by [`crate::build_ssh_image`]): its base and keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SshInfo>,
}

/// What an SSH image adds to its base image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshInfo {
    /// The image it was derived from.
    pub base: String,
    /// The base image's inputs hash when this one was derived.
    pub base_inputs_hash: String,
    /// The public key in root's `authorized_keys`.
    pub authorized_key: String,
    /// The image's SSH host public key (`ssh-ed25519 AAAA...`), pinned in `known_hosts`.
    pub host_key: String,
    /// The name `known_hosts` gives the host key; pass it as `ssh -o HostKeyAlias=...`.
    pub host_key_alias: String,
    /// File name of the `known_hosts` file in the image directory.
    pub known_hosts: String,
}

/// The kernel an image boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    /// Debian package, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    /// Debian version of the package, e.g. `6.1.192-2`.
    pub version: String,
    /// Kernel release (`uname -r`), e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
}

/// The guest agent in an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// SHA-256 of the agent binary, hex.
    pub sha256: String,
    /// Where it is installed in the root filesystem.
    pub rootfs_path: String,
}

/// The files of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Files {
    /// The uncompressed kernel (ELF).
    pub vmlinux: FileInfo,
    /// The initramfs (uncompressed newc cpio).
    pub initrd: FileInfo,
    /// The root filesystem (raw ext4).
    pub rootfs: FileInfo,
}

/// One file of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// File name inside the image directory.
    pub file: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the contents, hex.
    pub sha256: String,
}

/// The inputs that decide an image's contents; equal inputs mean no rebuild is needed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inputs {
    /// [`BUILDER_VERSION`].
    pub builder_version: u32,
    /// Debian suite.
    pub suite: String,
    /// Packages on top of `minbase`, in order.
    pub packages: Vec<String>,
    /// Kernel package name.
    pub kernel_package: String,
    /// Kernel package version.
    pub kernel_version: String,
    /// SHA-256 of the agent binary.
    pub agent_sha256: String,
    /// Root filesystem size in MiB.
    pub rootfs_size_mib: u64,
}

impl Inputs {
    /// A SHA-256 over the inputs in a fixed order, hex.
    pub fn hash(&self) -> String {
        // Serializing a struct of strings and numbers cannot fail; fall back to Debug.
        let canonical = serde_json::to_vec(self).unwrap_or_else(|_| format!("{self:?}").into());
        hex::encode(Sha256::digest(canonical))
    }
}

impl Manifest {
    /// Reads and checks `dir/manifest.json`.
    pub fn load(dir: &Path) -> Result<Manifest, String> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a valid manifest: {e}", path.display()))?;
        if manifest.format_version > FORMAT_VERSION {
            return Err(format!(
                "{} has format {}, newer than this smolvm understands ({FORMAT_VERSION})",
                path.display(),
                manifest.format_version
            ));
        }
        Ok(manifest)
    }

    /// Writes `dir/manifest.json` (mode 0644).
    pub fn save(&self, dir: &Path) -> Result<(), ImageError> {
        let path = dir.join(MANIFEST_FILE);
        let mut text = serde_json::to_string_pretty(self).map_err(|e| ImageError::Io {
            context: "cannot encode",
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        text.push('\n');
        std::fs::write(&path, text).map_err(ImageError::io("cannot write", &path))
    }
}

/// SHA-256 and size of a file, streamed; holes of sparse files are hashed without reading.
pub fn hash_file(path: &Path) -> Result<(String, u64), ImageError> {
    let file = std::fs::File::open(path).map_err(ImageError::io("cannot open", path))?;
    let size = file
        .metadata()
        .map_err(ImageError::io("cannot inspect", path))?
        .len();
    let mut hasher = Sha256::new();
    crate::sparse::for_each_chunk(&file, size, |chunk| hasher.update(chunk))
        .map_err(ImageError::io("cannot read", path))?;
    Ok((hex::encode(hasher.finalize()), size))
}

/// SHA-256 of bytes in memory, hex.
pub fn hash_bytes(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Inputs {
        Inputs {
            builder_version: BUILDER_VERSION,
            suite: "bookworm".into(),
            packages: vec!["python3".into()],
            kernel_package: "linux-image-6.1.0-56-cloud-amd64".into(),
            kernel_version: "6.1.192-2".into(),
            agent_sha256: hash_bytes(b"agent"),
            rootfs_size_mib: 1024,
        }
    }

    #[test]
    fn inputs_hash_is_stable_and_sensitive() {
        let base = inputs();
        assert_eq!(base.hash(), inputs().hash());
        assert_eq!(base.hash().len(), 64);
        let mut other = inputs();
        other.rootfs_size_mib = 2048;
        assert_ne!(base.hash(), other.hash());
        let mut other = inputs();
        other.kernel_version = "6.1.193-1".into();
        assert_ne!(base.hash(), other.hash());
        let mut other = inputs();
        other.packages.push("git".into());
        assert_ne!(base.hash(), other.hash());
    }

    #[test]
    fn file_hash_matches_bytes_hash() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let data = vec![42u8; 3 << 20];
        std::fs::write(&path, &data).unwrap();
        assert_eq!(
            hash_file(&path).unwrap(),
            (hash_bytes(&data), data.len() as u64)
        );
        assert_eq!(
            hash_bytes(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}

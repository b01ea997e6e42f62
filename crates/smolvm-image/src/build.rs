//! The build pipeline: kernel, vmlinux, initramfs, root filesystem, manifest; built in a
//! staging directory and renamed into place only when complete.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use crate::error::ImageError;
use crate::initramfs;
use crate::kernel::{self, KernelPackage, UnpackedKernel};
use crate::manifest::{
    self, AgentInfo, FileInfo, Files, Inputs, KernelInfo, Manifest, BUILDER_VERSION, FORMAT_VERSION,
};
use crate::modules::{self, Module};
use crate::progress::Steps;
use crate::rootfs::{self, DEBIAN_SUITE};
use crate::sources;
use crate::store::{self, Image, INITRD_FILE, ROOTFS_FILE, VMLINUX_FILE};
use crate::tools::{self, APT_CACHE, BUILD_TOOLS};

/// Default image name.
pub const DEFAULT_IMAGE: &str = "default";
/// Default root filesystem size in MiB.
pub const DEFAULT_ROOTFS_SIZE_MIB: u64 = 1024;
/// Smallest root filesystem accepted: the base packages alone take about 280 MiB, plus
/// ext4's journal and metadata.
pub const MIN_ROOTFS_SIZE_MIB: u64 = 400;
/// Directory inside the initramfs holding the kernel modules.
pub const INITRAMFS_MODULES_DIR: &str = "/smolvm/modules";
/// File inside the initramfs listing the module file names, one a line, in load order.
pub const INITRAMFS_MODULES_LIST: &str = "/smolvm/modules.list";
/// Largest agent binary accepted.
const MAX_AGENT_BYTES: u64 = 512 << 20;

/// What to build and how.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Image name; the image goes in `images_dir/NAME`.
    pub name: String,
    /// Directory holding all images (see [`crate::default_images_dir`]).
    pub images_dir: PathBuf,
    /// The static guest agent binary, installed as `/init` and in the root filesystem.
    pub agent_binary: PathBuf,
    /// Rebuild even when the image is up to date.
    pub force: bool,
    /// Show a spinner per step on standard error.
    pub progress: bool,
    /// Size of the root filesystem image in MiB.
    pub rootfs_size_mib: u64,
    /// Debian packages installed on top of the base set.
    pub extra_packages: Vec<String>,
}

impl BuildOptions {
    /// Options for the `default` image in the default images directory, with `agent_binary`.
    pub fn new(agent_binary: impl Into<PathBuf>) -> Self {
        BuildOptions {
            name: DEFAULT_IMAGE.to_string(),
            images_dir: crate::default_images_dir(),
            agent_binary: agent_binary.into(),
            force: false,
            progress: false,
            rootfs_size_mib: DEFAULT_ROOTFS_SIZE_MIB,
            extra_packages: Vec::new(),
        }
    }

    /// The packages mmdebstrap installs: the base set, then the extra ones, without repeats.
    pub fn packages(&self) -> Result<Vec<String>, ImageError> {
        let mut packages: Vec<String> = rootfs::BASE_PACKAGES
            .iter()
            .map(|p| p.to_string())
            .collect();
        for extra in &self.extra_packages {
            let extra = extra.trim();
            validate_package(extra)?;
            if !packages.iter().any(|p| p == extra) {
                packages.push(extra.to_string());
            }
        }
        Ok(packages)
    }
}

/// Builds the image described by `opts`, or returns the existing one when it was built
/// from the same inputs (unless `opts.force`).
///
/// Up-to-date checks ask apt for the current kernel version (no download). A failed or
/// interrupted build leaves any existing image as it was.
pub fn build(opts: &BuildOptions) -> Result<Image, ImageError> {
    let started = Instant::now();
    store::validate_name(&opts.name)?;
    if opts.rootfs_size_mib < MIN_ROOTFS_SIZE_MIB {
        return Err(ImageError::RootfsTooSmall {
            needed_mib: MIN_ROOTFS_SIZE_MIB,
            size_mib: opts.rootfs_size_mib,
        });
    }
    let packages = opts.packages()?;
    let agent = read_agent(&opts.agent_binary)?;
    let agent_sha256 = manifest::hash_bytes(&agent);
    tools::require(&[APT_CACHE])?;
    std::fs::create_dir_all(&opts.images_dir)
        .map_err(ImageError::io("cannot create", &opts.images_dir))?;
    let _lock = store::lock(&opts.images_dir, &opts.name)?;
    store::clean_leftovers(&opts.images_dir, &opts.name);

    let mut steps = Steps::new(opts.progress);
    let kernel_package = steps.run("Resolving the kernel package", |_| kernel::resolve())?;
    let inputs = Inputs {
        builder_version: BUILDER_VERSION,
        suite: DEBIAN_SUITE.to_string(),
        packages: packages.clone(),
        kernel_package: kernel_package.package.clone(),
        kernel_version: kernel_package.version.clone(),
        agent_sha256: agent_sha256.clone(),
        rootfs_size_mib: opts.rootfs_size_mib,
    };
    let inputs_hash = inputs.hash();
    if !opts.force {
        match store::open(&opts.images_dir, &opts.name) {
            Ok(image) if image.manifest.inputs_hash == inputs_hash => {
                tracing::info!(image = %opts.name, "image is up to date");
                return Ok(image);
            }
            Ok(_) => tracing::info!(image = %opts.name, "image is out of date; rebuilding"),
            Err(ImageError::NotFound { .. }) => {}
            Err(e) => tracing::warn!("{e}; rebuilding"),
        }
    }

    tools::require(BUILD_TOOLS)?;
    let staging = Staging::new(&opts.images_dir, &opts.name)?;
    let work = Work {
        opts,
        staging: staging.path(),
        kernel_package: &kernel_package,
        packages: &packages,
        agent: &agent,
        agent_sha256: &agent_sha256,
        inputs_hash: &inputs_hash,
    };
    work.run(&mut steps)?;
    store::install(&staging.keep(), &opts.images_dir, &opts.name)?;
    let image = store::open(&opts.images_dir, &opts.name)?;
    tracing::info!(
        image = %opts.name,
        seconds = started.elapsed().as_secs_f64(),
        "image built"
    );
    Ok(image)
}

/// One build in its staging directory.
struct Work<'a> {
    opts: &'a BuildOptions,
    staging: &'a Path,
    kernel_package: &'a KernelPackage,
    packages: &'a [String],
    agent: &'a [u8],
    agent_sha256: &'a str,
    inputs_hash: &'a str,
}

impl Work<'_> {
    fn run(&self, steps: &mut Steps) -> Result<(), ImageError> {
        let cache_dir = self.opts.images_dir.join(".cache");
        let deb = steps.run("Downloading the kernel package", |_| {
            kernel::download(self.kernel_package, &cache_dir)
        })?;
        let unpack_dir = self.staging.join("kernel");
        let unpacked = steps.run("Unpacking the kernel package", |_| {
            kernel::unpack(&deb, &unpack_dir)
        })?;
        steps.run("Extracting vmlinux", |_| self.write_vmlinux(&unpacked))?;
        let modules = steps.run("Writing the initramfs", |_| self.write_initramfs(&unpacked))?;
        store::remove_dir_safely(&unpack_dir)?;

        let sources = sources::from_host(DEBIAN_SUITE);
        let root = self.staging.join("rootfs");
        steps.run("Building the root filesystem (mmdebstrap)", |step| {
            rootfs::bootstrap(&root, self.packages, &sources, |line| step.detail(line))
        })?;
        steps.run("Configuring the root filesystem", |_| {
            rootfs::configure(&root, self.agent)
        })?;
        let rootfs_image = self.staging.join(ROOTFS_FILE);
        steps.run("Making the ext4 image", |_| {
            rootfs::make_ext4(&root, &rootfs_image, self.opts.rootfs_size_mib)
        })?;
        store::remove_dir_safely(&root)?;

        let timings = steps.timings().to_vec();
        steps.run("Writing checksums and the manifest", |_| {
            let manifest = Manifest {
                format_version: FORMAT_VERSION,
                builder_version: BUILDER_VERSION,
                name: self.opts.name.clone(),
                created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                suite: DEBIAN_SUITE.to_string(),
                mirror: sources.mirror.clone(),
                sources: sources.lines.clone(),
                kernel: KernelInfo {
                    package: self.kernel_package.package.clone(),
                    version: self.kernel_package.version.clone(),
                    release: unpacked.release.clone(),
                },
                packages: self.packages.to_vec(),
                modules: modules.iter().map(Module::file_name).collect(),
                rootfs_size_mib: self.opts.rootfs_size_mib,
                agent: AgentInfo {
                    sha256: self.agent_sha256.to_string(),
                    rootfs_path: rootfs::AGENT_PATH.to_string(),
                },
                files: Files {
                    vmlinux: self.file_info(VMLINUX_FILE)?,
                    initrd: self.file_info(INITRD_FILE)?,
                    rootfs: self.file_info(ROOTFS_FILE)?,
                },
                inputs_hash: self.inputs_hash.to_string(),
                build_steps: timings,
                ssh: None,
            };
            manifest.save(self.staging)?;
            for file in [VMLINUX_FILE, INITRD_FILE, manifest::MANIFEST_FILE] {
                set_mode(&self.staging.join(file), 0o644)?;
            }
            // Images are read-only bases for copy-on-write overlays.
            set_mode(&self.staging.join(ROOTFS_FILE), 0o444)?;
            set_mode(self.staging, 0o755)
        })
    }

    fn write_vmlinux(&self, kernel: &UnpackedKernel) -> Result<(), ImageError> {
        let bzimage = std::fs::read(&kernel.vmlinuz)
            .map_err(ImageError::io("cannot read", &kernel.vmlinuz))?;
        let elf = crate::vmlinux::extract(&bzimage)?;
        let path = self.staging.join(VMLINUX_FILE);
        std::fs::write(&path, elf).map_err(ImageError::io("cannot write", &path))
    }

    fn write_initramfs(&self, kernel: &UnpackedKernel) -> Result<Vec<Module>, ImageError> {
        let modules = modules::collect(&kernel.modules_dir, modules::GUEST_MODULES)?;
        let mut cpio = initramfs::Writer::new(Vec::new());
        cpio.add_dir("/dev", 0o755)?;
        // The kernel opens /dev/console for /init's standard streams before /init runs.
        cpio.add_char_device("/dev/console", 0o600, 5, 1)?;
        for dir in ["/proc", "/sys"] {
            cpio.add_dir(dir, 0o555)?;
        }
        for dir in ["/newroot", "/smolvm", INITRAMFS_MODULES_DIR] {
            cpio.add_dir(dir, 0o755)?;
        }
        cpio.add_file("/init", 0o755, self.agent)?;
        let mut list = String::new();
        for module in &modules {
            let file = module.file_name();
            cpio.add_file(
                &format!("{INITRAMFS_MODULES_DIR}/{file}"),
                0o644,
                &module.data,
            )?;
            list.push_str(&file);
            list.push('\n');
        }
        cpio.add_file(INITRAMFS_MODULES_LIST, 0o644, list.as_bytes())?;
        let archive = cpio.finish()?;
        let path = self.staging.join(INITRD_FILE);
        std::fs::write(&path, archive).map_err(ImageError::io("cannot write", &path))?;
        tracing::debug!(modules = %list.trim().replace('\n', ","), "initramfs written");
        Ok(modules)
    }

    fn file_info(&self, file: &str) -> Result<FileInfo, ImageError> {
        let (sha256, size) = manifest::hash_file(&self.staging.join(file))?;
        Ok(FileInfo {
            file: file.to_string(),
            size,
            sha256,
        })
    }
}

/// The staging directory of a build; removed (safely) unless kept.
pub(crate) struct Staging {
    path: Option<PathBuf>,
}

impl Staging {
    /// Creates `images_dir/.NAME.build-*`.
    pub(crate) fn new(images_dir: &Path, name: &str) -> Result<Self, ImageError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!(".{name}.build-"))
            .tempdir_in(images_dir)
            .map_err(ImageError::io(
                "cannot create a build directory in",
                images_dir,
            ))?;
        Ok(Staging {
            path: Some(dir.keep()),
        })
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    /// Hands the directory over to the caller; it is no longer removed on drop.
    pub(crate) fn keep(mut self) -> PathBuf {
        self.path.take().unwrap_or_default()
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            if let Err(e) = store::remove_dir_safely(&path) {
                tracing::warn!("{e}");
            }
        }
    }
}

/// Sets the permission bits of `path`.
pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(ImageError::io("cannot set permissions of", path))
}

/// Reads the agent binary, with errors that say what to do.
fn read_agent(path: &Path) -> Result<Vec<u8>, ImageError> {
    let bad = |reason: String| ImageError::AgentBinary {
        path: path.to_path_buf(),
        reason,
    };
    if path.as_os_str().is_empty() {
        return Err(bad("no path given".into()));
    }
    let meta = std::fs::metadata(path).map_err(|e| {
        bad(format!(
            "{e}; build the guest agent first (a static binary, see crates/smolvm-agent)"
        ))
    })?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.len() == 0 || meta.len() > MAX_AGENT_BYTES {
        return Err(bad(format!(
            "{} bytes; expected a static executable of at most {} MiB",
            meta.len(),
            MAX_AGENT_BYTES >> 20
        )));
    }
    let data = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    if !data.starts_with(b"\x7fELF") {
        tracing::warn!(
            path = %path.display(),
            "the guest agent is not an ELF executable; the image will not boot"
        );
    }
    Ok(data)
}

/// Accepts `name`, `name:arch` and `name=version` as apt and mmdebstrap read them.
fn validate_package(spec: &str) -> Result<(), ImageError> {
    let (name, version) = match spec.split_once('=') {
        Some((name, version)) => (name, Some(version)),
        None => (spec, None),
    };
    let (name, arch) = match name.split_once(':') {
        Some((name, arch)) => (name, Some(arch)),
        None => (name, None),
    };
    let name_ok = name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    let arch_ok = arch.is_none_or(|a| {
        !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    });
    let version_ok = version.is_none_or(|v| {
        !v.is_empty()
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".+~:-".contains(c))
    });
    if name_ok && arch_ok && version_ok {
        Ok(())
    } else {
        Err(ImageError::InvalidPackage {
            name: spec.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_list_is_base_then_extras_without_repeats() {
        let mut opts = BuildOptions::new("/agent");
        opts.extra_packages = vec!["git".into(), "python3".into(), " curl ".into()];
        assert_eq!(
            opts.packages().unwrap(),
            [
                "python3",
                "ca-certificates",
                "procps",
                "iproute2",
                "openssh-server",
                "git",
                "curl"
            ]
        );
    }

    #[test]
    fn package_names_are_validated() {
        for good in ["git", "g++", "libc6:amd64", "python3=3.11.2-1+b1", "0ad"] {
            validate_package(good).unwrap();
        }
        for bad in ["", "a", "Git", "git,curl", "a b", "--evil", "x=", "x:"] {
            assert!(validate_package(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn agent_binary_errors_are_actionable() {
        let err = read_agent(Path::new("/nonexistent/agent"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("build the guest agent first"), "{err}");
        let tmp = tempfile::tempdir().unwrap();
        assert!(read_agent(tmp.path()).is_err());
        let empty = tmp.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(read_agent(&empty).is_err());
    }

    #[test]
    fn tiny_rootfs_fails_before_any_work() {
        let mut opts = BuildOptions::new("/nonexistent/agent");
        opts.rootfs_size_mib = 100;
        let err = build(&opts).unwrap_err().to_string();
        assert!(err.contains("at least 400 MiB"), "{err}");
    }

    #[test]
    fn invalid_name_fails_before_any_work() {
        let mut opts = BuildOptions::new("/nonexistent/agent");
        opts.name = "../escape".into();
        assert!(matches!(build(&opts), Err(ImageError::InvalidName { .. })));
    }
}

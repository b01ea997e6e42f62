//! The guest kernel: resolving Debian's cloud kernel package with apt, downloading it into a
//! cache and unpacking it.

use std::path::{Path, PathBuf};

use crate::error::ImageError;
use crate::tools::{self, APT_CACHE, APT_GET, DPKG_DEB};

/// The Debian meta package that depends on the current cloud kernel.
pub const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";

/// A resolved kernel package: what `apt-get download` fetches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPackage {
    /// The versioned package, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    /// Its Debian version, e.g. `6.1.192-2`.
    pub version: String,
}

/// A kernel package unpacked into a directory.
#[derive(Debug, Clone)]
pub struct UnpackedKernel {
    /// The kernel release (`uname -r` in the guest), e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// The compressed kernel, `boot/vmlinuz-<release>`.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>`.
    pub modules_dir: PathBuf,
}

/// Asks apt which kernel package and version the meta package currently points to.
///
/// Uses apt's candidate versions, so it honours the host's pinning. Cheap: no download.
pub fn resolve() -> Result<KernelPackage, ImageError> {
    let meta = apt_show(KERNEL_META_PACKAGE)?;
    let depends = field(&meta, "Depends").unwrap_or_default();
    let package = depends
        .split([',', '|'])
        .map(|dep| dep.split_whitespace().next().unwrap_or(""))
        .find(|name| name.starts_with("linux-image-"))
        .ok_or_else(|| ImageError::KernelPackage {
            package: KERNEL_META_PACKAGE.to_string(),
            reason: format!("its Depends field names no linux-image package ({depends:?})"),
        })?
        .to_string();
    let info = apt_show(&package)?;
    let version = field(&info, "Version").ok_or_else(|| ImageError::KernelPackage {
        package: package.clone(),
        reason: "apt-cache shows no Version field".into(),
    })?;
    tracing::debug!(%package, %version, "resolved kernel package");
    Ok(KernelPackage { package, version })
}

/// `apt-cache show --no-all-versions PKG`, turning "no packages found" into advice to
/// run `apt-get update`.
fn apt_show(package: &str) -> Result<String, ImageError> {
    let mut cmd = tools::command(APT_CACHE)?;
    cmd.args(["show", "--no-all-versions", package]);
    match tools::run(&mut cmd) {
        Ok(out) if out.trim().is_empty() => Err(ImageError::AptListsMissing {
            package: package.to_string(),
        }),
        Ok(out) => Ok(out),
        Err(ImageError::ToolFailed { stderr, .. })
            if stderr.contains("No packages found") || stderr.contains("Unable to locate") =>
        {
            Err(ImageError::AptListsMissing {
                package: package.to_string(),
            })
        }
        Err(e) => Err(e),
    }
}

/// The value of `name` in the first paragraph of a Debian control text.
fn field(control: &str, name: &str) -> Option<String> {
    let mut value: Option<String> = None;
    for line in control.lines() {
        if line.trim().is_empty() {
            break;
        }
        if let Some(v) = value.as_mut() {
            if line.starts_with([' ', '\t']) {
                v.push(' ');
                v.push_str(line.trim());
                continue;
            }
            break;
        }
        if let Some((key, rest)) = line.split_once(':') {
            if key.eq_ignore_ascii_case(name) {
                value = Some(rest.trim().to_string());
            }
        }
    }
    value
}

/// Downloads `kernel` into `cache_dir` (reusing an earlier download of the same version)
/// and returns the path of the `.deb`.
pub fn download(kernel: &KernelPackage, cache_dir: &Path) -> Result<PathBuf, ImageError> {
    std::fs::create_dir_all(cache_dir).map_err(ImageError::io("cannot create", cache_dir))?;
    let file_name = format!(
        "{}_{}.deb",
        kernel.package,
        kernel.version.replace([':', '/'], "_")
    );
    let cached = cache_dir.join(&file_name);
    if cached.is_file() {
        match deb_identity(&cached) {
            Ok(found) if &found == kernel => {
                tracing::info!(path = %cached.display(), "using the cached kernel package");
                return Ok(cached);
            }
            _ => {
                tracing::warn!(path = %cached.display(), "cached kernel package is stale; downloading again")
            }
        }
    }
    let staging = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(cache_dir)
        .map_err(ImageError::io("cannot create a directory in", cache_dir))?;
    // apt-get download writes into the current directory. As root it warns that the
    // download is "unsandboxed"; that is harmless.
    let mut cmd = tools::command(APT_GET)?;
    cmd.args(["download", "-q"])
        .arg(format!("{}={}", kernel.package, kernel.version))
        .current_dir(staging.path());
    tools::run(&mut cmd)?;
    let deb = std::fs::read_dir(staging.path())
        .map_err(ImageError::io("cannot list", staging.path()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| ImageError::KernelPackage {
            package: kernel.package.clone(),
            reason: "apt-get download finished but left no .deb file".into(),
        })?;
    let found = deb_identity(&deb)?;
    if &found != kernel {
        return Err(ImageError::KernelPackage {
            package: kernel.package.clone(),
            reason: format!(
                "apt-get downloaded {} {} instead of version {}",
                found.package, found.version, kernel.version
            ),
        });
    }
    std::fs::rename(&deb, &cached).map_err(ImageError::io("cannot move into place", &cached))?;
    remove_other_kernels(cache_dir, &file_name);
    Ok(cached)
}

/// Deletes older kernel packages from the cache; failures only cost disk space.
fn remove_other_kernels(cache_dir: &Path, keep: &str) {
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != keep && name.starts_with("linux-image-") && name.ends_with(".deb") {
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::debug!(file = %name, error = %e, "could not remove an old kernel package");
            }
        }
    }
}

/// Package name and version of a `.deb`, read with `dpkg-deb -f`.
fn deb_identity(deb: &Path) -> Result<KernelPackage, ImageError> {
    let mut cmd = tools::command(DPKG_DEB)?;
    cmd.arg("-f").arg(deb).args(["Package", "Version"]);
    let out = tools::run(&mut cmd)?;
    let get = |name: &str| {
        field(&out, name).ok_or_else(|| ImageError::KernelPackage {
            package: deb.display().to_string(),
            reason: format!("the package has no {name} field"),
        })
    };
    Ok(KernelPackage {
        package: get("Package")?,
        version: get("Version")?,
    })
}

/// Unpacks a kernel `.deb` into `dest` and finds the kernel and its modules.
pub fn unpack(deb: &Path, dest: &Path) -> Result<UnpackedKernel, ImageError> {
    let mut cmd = tools::command(DPKG_DEB)?;
    cmd.arg("-x").arg(deb).arg(dest);
    tools::run(&mut cmd)?;
    locate(deb, dest)
}

/// Finds `boot/vmlinuz-<release>` and `lib/modules/<release>` in an unpacked kernel.
fn locate(deb: &Path, root: &Path) -> Result<UnpackedKernel, ImageError> {
    let bad = |reason: String| ImageError::KernelPackage {
        package: deb.display().to_string(),
        reason,
    };
    let boot = root.join("boot");
    let mut kernels: Vec<(String, PathBuf)> = std::fs::read_dir(&boot)
        .map_err(|e| bad(format!("no boot/ directory ({e})")))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let release = name.strip_prefix("vmlinuz-")?.to_string();
            Some((release, e.path()))
        })
        .collect();
    let (release, vmlinuz) = match kernels.len() {
        1 => kernels.remove(0),
        0 => return Err(bad("no boot/vmlinuz-* file".into())),
        n => return Err(bad(format!("{n} boot/vmlinuz-* files; expected one"))),
    };
    let modules_dir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|dir| root.join(dir).join(&release))
        .find(|dir| dir.is_dir())
        .ok_or_else(|| bad(format!("no lib/modules/{release} directory")))?;
    Ok(UnpackedKernel {
        release,
        vmlinuz,
        modules_dir,
    })
}

/// The kernel package `smolvm image build` cached in the images directory, unpacked once
/// per test process, for the tests that check our readers against Debian's real files. It
/// is there after `scripts/setup`, and `scripts/test` builds the image before the tests.
#[cfg(test)]
pub(crate) fn cached_for_tests() -> &'static UnpackedKernel {
    static UNPACKED: std::sync::OnceLock<(tempfile::TempDir, UnpackedKernel)> =
        std::sync::OnceLock::new();
    &UNPACKED
        .get_or_init(|| {
            let cache = crate::default_images_dir().join(".cache");
            let deb = std::fs::read_dir(&cache)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    let name = p.file_name().unwrap_or_default().to_string_lossy();
                    name.starts_with("linux-image-") && name.ends_with(".deb")
                })
                .unwrap_or_else(|| {
                    panic!(
                        "no kernel package in {}: build the default image first \
                         (`scripts/setup`, or `smolvm image build`; `scripts/test` does)",
                        cache.display()
                    )
                });
            let dir = tempfile::tempdir().expect("a temporary directory");
            let unpacked = unpack(&deb, dir.path()).expect("unpacking the cached kernel package");
            (dir, unpacked)
        })
        .1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_fields_are_parsed() {
        let text = "Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\n\
                    Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\n\
                    Description: Linux for\n cloud platforms\n\nPackage: other\nVersion: 9\n";
        assert_eq!(field(text, "Version").as_deref(), Some("6.1.192-2"));
        assert_eq!(
            field(text, "depends").as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)")
        );
        assert_eq!(
            field(text, "Description").as_deref(),
            Some("Linux for cloud platforms")
        );
        assert_eq!(field(text, "Missing"), None);
    }

    #[test]
    fn unpacked_kernel_is_located() {
        let tmp = tempfile::tempdir().unwrap();
        let deb = Path::new("k.deb");
        assert!(locate(deb, tmp.path()).is_err());
        std::fs::create_dir_all(tmp.path().join("boot")).unwrap();
        std::fs::write(tmp.path().join("boot/vmlinuz-6.1.0-9-cloud-amd64"), b"x").unwrap();
        std::fs::write(tmp.path().join("boot/config-6.1.0-9-cloud-amd64"), b"x").unwrap();
        let err = locate(deb, tmp.path()).unwrap_err().to_string();
        assert!(err.contains("lib/modules/6.1.0-9-cloud-amd64"), "{err}");
        std::fs::create_dir_all(tmp.path().join("lib/modules/6.1.0-9-cloud-amd64")).unwrap();
        let k = locate(deb, tmp.path()).unwrap();
        assert_eq!(k.release, "6.1.0-9-cloud-amd64");
        assert!(k.vmlinuz.ends_with("boot/vmlinuz-6.1.0-9-cloud-amd64"));
    }

    #[test]
    fn resolves_the_cloud_kernel_from_apt() {
        // The image build needs the same (scripts/test builds the image before the tests).
        let k = resolve().unwrap_or_else(|e| {
            panic!("this test needs apt-cache and the Debian package lists (apt-get update): {e}")
        });
        assert!(k.package.starts_with("linux-image-"), "{k:?}");
        assert!(k.package.ends_with("-cloud-amd64"), "{k:?}");
        assert!(!k.version.is_empty());
    }
}

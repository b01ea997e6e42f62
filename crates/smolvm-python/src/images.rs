//! Images from Python: the default images directory, the SSH key pair and SSH-capable
//! images (`smolvm.build.ImageBuilder`).

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::errors::image_to_py;

/// Where images are kept: `$SMOLVM_IMAGE_DIR`, else `$SMOLVM_DATA_DIR/images`, else the XDG data directory's `smolvm/images`.
#[pyfunction]
pub fn default_images_dir() -> String {
    smolvm_image::default_images_dir().display().to_string()
}

/// The SSH key pair used for SSH images: `(private, public)` paths, made when absent.
#[pyfunction]
#[pyo3(signature = (dir=None))]
pub fn ensure_ssh_key(py: Python<'_>, dir: Option<PathBuf>) -> PyResult<(String, String)> {
    let dir = dir.unwrap_or_else(smolvm_image::default_keys_dir);
    let (private, public) = py
        .allow_threads(|| smolvm_image::ensure_ssh_key(&dir))
        .map_err(|e| image_to_py(py, e))?;
    Ok((private.display().to_string(), public.display().to_string()))
}

/// Derives the image `name` from `base` with an SSH server for `ssh_public_key` (key text
/// or a path to a `.pub` file). Returns `(kernel, rootfs, known_hosts, host_key_alias)`.
#[pyfunction]
#[pyo3(signature = (ssh_public_key, name, rootfs_size_mib=None, base="default", images_dir=None))]
pub fn build_ssh_image(
    py: Python<'_>,
    ssh_public_key: String,
    name: String,
    rootfs_size_mib: Option<u64>,
    base: &str,
    images_dir: Option<PathBuf>,
) -> PyResult<(String, String, String, String)> {
    let dir = images_dir.unwrap_or_else(smolvm_image::default_images_dir);
    let base = base.to_string();
    let image = py
        .allow_threads(|| {
            smolvm_image::build_ssh_image(&dir, &base, &name, &ssh_public_key, rootfs_size_mib)
        })
        .map_err(|e| image_to_py(py, e))?;
    Ok((
        image.kernel.display().to_string(),
        image.rootfs.display().to_string(),
        smolvm_image::known_hosts_path(&image).display().to_string(),
        smolvm_image::ssh::host_key_alias(&image.name),
    ))
}

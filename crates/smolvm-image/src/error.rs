//! The one error type of the image crate.

use std::path::PathBuf;

/// Everything that can go wrong while building, opening or removing an image.
///
/// Each message says what failed and, where there is one, what the user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A host tool the pipeline needs is not on `PATH`.
    #[error(
        "{tool} not found: install the Debian package `{package}` (apt-get install {package})"
    )]
    MissingTool {
        /// The executable that was looked up.
        tool: String,
        /// The Debian package that provides it.
        package: String,
    },

    /// apt has no package lists, or none that know the package.
    #[error(
        "apt knows no package `{package}`: run `apt-get update` (as root) so apt has package lists, then try again"
    )]
    AptListsMissing {
        /// The package apt could not find.
        package: String,
    },

    /// A host tool could not be started.
    #[error("could not run {tool}: {source}")]
    Spawn {
        /// The executable.
        tool: String,
        /// Why it could not be started.
        #[source]
        source: std::io::Error,
    },

    /// A host tool ran and failed; `stderr` holds the end of what it printed.
    #[error("`{command}` failed ({status}):\n{stderr}")]
    ToolFailed {
        /// The command line, for the user to re-run by hand.
        command: String,
        /// Its exit status.
        status: String,
        /// The last lines of its standard error.
        stderr: String,
    },

    /// A file system operation failed.
    #[error("{context} {}: {source}", path.display())]
    Io {
        /// What was being done.
        context: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The downloaded kernel package does not look like a Debian kernel package.
    #[error("kernel package {package}: {reason}")]
    KernelPackage {
        /// The Debian package name.
        package: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The uncompressed kernel could not be extracted from a bzImage.
    #[error("cannot extract vmlinux from the bzImage: {0}")]
    Vmlinux(String),

    /// A kernel module could not be read or decompressed.
    #[error("kernel module {name}: {reason}")]
    Module {
        /// The module name.
        name: String,
        /// What went wrong.
        reason: String,
    },

    /// An initramfs entry was rejected (bad path, duplicate, too large).
    #[error("initramfs entry {path:?}: {reason}")]
    Cpio {
        /// The path inside the archive.
        path: String,
        /// Why it was rejected.
        reason: String,
    },

    /// The guest agent binary given to the build is unusable.
    #[error("guest agent binary {}: {reason}", path.display())]
    AgentBinary {
        /// The path that was given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The root filesystem contents do not fit the requested disk size.
    #[error(
        "the root filesystem needs about {needed_mib} MiB but the disk size is {size_mib} MiB: \
         raise the root filesystem size to at least {needed_mib} MiB"
    )]
    RootfsTooSmall {
        /// Estimated size needed.
        needed_mib: u64,
        /// Size that was asked for.
        size_mib: u64,
    },

    /// An extra package name that apt or mmdebstrap would misread.
    #[error(
        "invalid Debian package name {name:?}: use lowercase letters, digits and `+-.`, \
         optionally followed by `=VERSION`"
    )]
    InvalidPackage {
        /// The rejected name.
        name: String,
    },

    /// An image name that cannot be used as a directory name.
    #[error("invalid image name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// No image of that name exists.
    #[error(
        "image \"{name}\" not found (available: {}); build it with `smolvm image build {name}`",
        if available.is_empty() { "none".to_string() } else { available.join(", ") }
    )]
    NotFound {
        /// The name asked for.
        name: String,
        /// Names of the images that do exist.
        available: Vec<String>,
    },

    /// An image directory exists but is incomplete or damaged.
    #[error("image \"{name}\" is damaged ({reason}); rebuild it with `smolvm image build {name} --force`")]
    Damaged {
        /// The image name.
        name: String,
        /// What is missing or wrong.
        reason: String,
    },

    /// An SSH public key given by the user is unusable.
    #[error(
        "invalid SSH public key {input}: {reason}; give the key itself (one line such as \
         `ssh-ed25519 AAAA... comment`; types: {types}) or the path of its `.pub` file",
        types = crate::ssh::KEY_TYPES.join(", ")
    )]
    InvalidSshKey {
        /// The value given (shortened), or the file it came from.
        input: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The root filesystem size asked for an SSH image is out of range.
    #[error(
        "root filesystem size {size_mib} MiB for image \"{name}\" is not allowed: use at least \
         {min_mib} MiB (the size of its base image \"{base}\") and at most {max_mib} MiB, or \
         leave the size out to keep the base's"
    )]
    InvalidRootfsSize {
        /// The image being built.
        name: String,
        /// The size asked for.
        size_mib: u64,
        /// The base image.
        base: String,
        /// The smallest size allowed (the base's).
        min_mib: u64,
        /// The largest size allowed.
        max_mib: u64,
    },

    /// An SSH image cannot be derived from this base image.
    #[error("cannot derive SSH image \"{name}\" from base image \"{base}\": {reason}")]
    InvalidBase {
        /// The image being built.
        name: String,
        /// The base asked for.
        base: String,
        /// Why not, and what to use instead.
        reason: String,
    },

    /// An image of that name exists and is not an SSH image, so it is not replaced.
    #[error(
        "image \"{name}\" already exists and is not an SSH image: choose another name, or \
         remove it first with `smolvm image rm {name}`"
    )]
    NotAnSshImage {
        /// The name asked for.
        name: String,
    },

    /// Writing the SSH files into a root filesystem did not give the expected result.
    #[error("SSH files in {}: {reason}", path.display())]
    SshInjection {
        /// The root filesystem image.
        path: PathBuf,
        /// What was found wrong.
        reason: String,
    },
}

impl ImageError {
    /// Whether the error is the caller's input being wrong (a bad name, key, size or base),
    /// as opposed to a failure of the host or its tools.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ImageError::InvalidSshKey { .. }
                | ImageError::InvalidRootfsSize { .. }
                | ImageError::InvalidBase { .. }
                | ImageError::NotAnSshImage { .. }
                | ImageError::InvalidName { .. }
                | ImageError::InvalidPackage { .. }
                | ImageError::RootfsTooSmall { .. }
                | ImageError::NotFound { .. }
        )
    }

    /// Builds an [`ImageError::Io`] for `path`; used with `map_err`.
    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> ImageError {
        let path = path.into();
        move |source| ImageError::Io {
            context,
            path,
            source,
        }
    }
}

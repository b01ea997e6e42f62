//! SSH images: an image derived from a built base image (normally `default`) whose guest also
//! runs an SSH server that accepts one public key, with a host key made on the host and pinned
//! in the image's `known_hosts` (so `ssh` never has to trust on first use).
//!
//! Deriving needs neither the network nor a mount: the base's kernel and initramfs are linked
//! (or copied), its root filesystem is copied sparsely (and grown with `resize2fs` when asked),
//! and the SSH files are written into the ext4 image with `debugfs`. The guest agent starts
//! `sshd` at boot when [`crate::SSHD_MARKER`] exists.
//!
//! ```text
//! images_dir/NAME/ (0700)  vmlinux  initrd.cpio  rootfs.ext4 (0400: it holds the private host
//!                          key)  manifest.json (with "ssh")  known_hosts
//! ```

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::build::{set_mode, Staging};
use crate::error::ImageError;
use crate::manifest::{self, FileInfo, SshInfo, MANIFEST_FILE};
use crate::progress::Steps;
use crate::rootfs::SSHD_MARKER;
use crate::sparse::sparse_copy;
use crate::store::{self, Image, INITRD_FILE, ROOTFS_FILE, VMLINUX_FILE};
use crate::tools::{self, DEBUGFS, E2FSCK, RESIZE2FS, SSH_KEYGEN};

/// Key types accepted in `authorized_keys` (those the guest's OpenSSH 9.2 enables).
pub const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Longest public key (text or file) accepted.
pub const MAX_PUBLIC_KEY_BYTES: usize = 16 * 1024;

/// File name of the key pair [`ensure_ssh_key`] makes (`.pub` for the public half).
pub const SSH_KEY_FILE: &str = "id_ed25519";

/// File name of the pinned host key list in an SSH image's directory.
pub const KNOWN_HOSTS_FILE: &str = "known_hosts";

/// Largest root filesystem an SSH image may ask for, in MiB (1 TiB; the file is sparse).
pub const MAX_SSH_ROOTFS_SIZE_MIB: u64 = 1 << 20;

/// Where the image's host key lives in the guest (its `.pub` beside it).
pub const HOST_KEY_PATH: &str = "/etc/ssh/ssh_host_ed25519_key";

/// The SSH server in the guest (Debian's `openssh-server`, part of the base packages).
const SSHD_PATH: &str = "/usr/sbin/sshd";

/// Root's home directory inside the guest (a guest path; the agent runs commands with
/// `HOME` set to it). A macro so the paths below are built from it at compile time.
macro_rules! guest_root_home {
    () => {
        "/root"
    };
}

/// Root's home directory inside the guest.
pub const GUEST_ROOT_HOME: &str = guest_root_home!();

/// Root's SSH directory inside the guest.
pub const GUEST_SSH_DIR: &str = concat!(guest_root_home!(), "/.ssh");

/// Where root's authorized key goes in the guest.
pub const AUTHORIZED_KEYS_PATH: &str = concat!(guest_root_home!(), "/.ssh/authorized_keys");

/// The sshd configuration smolvm adds (`sshd_config` includes `sshd_config.d/*.conf`).
pub const SSHD_CONFIG_PATH: &str = "/etc/ssh/sshd_config.d/smolvm.conf";

/// Contents of [`SSHD_CONFIG_PATH`]: the pinned host key only, root by key only.
pub const SSHD_CONFIG: &str = "# Written by smolvm: this image's pinned host key; root logs in \
with its authorized key only.\n\
HostKey /etc/ssh/ssh_host_ed25519_key\n\
PermitRootLogin prohibit-password\n\
PasswordAuthentication no\n\
KbdInteractiveAuthentication no\n";

/// Contents of [`SSHD_MARKER`].
const SSHD_MARKER_TEXT: &str =
    "# smolvm: the guest agent starts sshd at boot while this file exists.\n";

/// Version of the derivation below; part of an SSH image's inputs, so a change to what it
/// writes rebuilds existing SSH images (keeping their host key).
const SSH_BUILDER_VERSION: u32 = 1;

/// Directories made (when missing) and set to root-owned with these modes.
const DIRS: &[(&str, u32)] = &[
    (GUEST_ROOT_HOME, 0o700),
    (GUEST_SSH_DIR, 0o700),
    ("/etc/ssh", 0o755),
    ("/etc/ssh/sshd_config.d", 0o755),
    ("/etc/smolvm", 0o755),
];

/// Reads an SSH public key given either as the key itself (one line such as
/// `ssh-ed25519 AAAA... comment`) or as the path of a `.pub` file (`~/` is expanded).
///
/// Returns the key as one normalized line (`TYPE BASE64[ COMMENT]`, no newline). Checks: one
/// line, at most [`MAX_PUBLIC_KEY_BYTES`], a type from [`KEY_TYPES`], base64 data that
/// holds a key of that type, no control characters.
pub fn read_public_key(key_or_path: &str) -> Result<String, ImageError> {
    let trimmed = key_or_path.trim();
    if trimmed.is_empty() {
        return Err(invalid_key("\"\"", "it is empty"));
    }
    let first = trimmed.split_ascii_whitespace().next().unwrap_or_default();
    let names_a_type = KEY_TYPES.contains(&first)
        || ["ssh-", "ecdsa-", "sk-"]
            .iter()
            .any(|p| first.starts_with(p));
    let path = expand_home(trimmed);
    let may_be_path = trimmed.len() <= 4096 && !trimmed.contains(['\n', '\0']);
    if !KEY_TYPES.contains(&first) && may_be_path && path.is_file() {
        let text = read_key_file(&path)?;
        return parse_public_key(&text, &path.display().to_string());
    }
    if !names_a_type && !trimmed.contains(char::is_whitespace) {
        return Err(invalid_key(
            &describe_input(key_or_path),
            "it is not a key and no such file exists",
        ));
    }
    parse_public_key(key_or_path, &describe_input(key_or_path))
}

/// Checks one public key line; `input` names it in errors.
fn parse_public_key(text: &str, input: &str) -> Result<String, ImageError> {
    let bad = |reason: String| invalid_key(input, &reason);
    if text.len() > MAX_PUBLIC_KEY_BYTES {
        return Err(bad(format!(
            "it is {} bytes; a public key is at most {MAX_PUBLIC_KEY_BYTES} bytes",
            text.len()
        )));
    }
    if text.contains("PRIVATE KEY") {
        return Err(bad(
            "this is a private key: give the public key (the `.pub` file beside it)".into(),
        ));
    }
    let line = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(text)
        .trim_matches([' ', '\t']);
    if line.contains(['\n', '\r']) {
        return Err(bad(
            "it holds more than one line; give exactly one key".into()
        ));
    }
    if line.contains('\0') {
        return Err(bad("it contains a NUL byte".into()));
    }
    if line.chars().any(|c| c.is_control() && c != '\t') {
        return Err(bad("it contains control characters".into()));
    }
    let mut fields = line.splitn(3, [' ', '\t']).filter(|f| !f.is_empty());
    let key_type = fields.next().unwrap_or_default();
    if key_type.is_empty() {
        return Err(bad("it is empty".into()));
    }
    if !KEY_TYPES.contains(&key_type) {
        let reason = if key_type == "ssh-dss" {
            "DSA keys are disabled in the guest's OpenSSH; use an ed25519 key".to_string()
        } else if key_type.contains("-cert-") {
            "certificates are not supported; give the plain public key".to_string()
        } else {
            format!("unknown key type {:?}", shorten(key_type, 40))
        };
        return Err(bad(reason));
    }
    let data = fields.next().unwrap_or_default();
    if data.is_empty() {
        return Err(bad("there is no key data after the key type".into()));
    }
    let blob = base64_decode(data).ok_or_else(|| bad("the key data is not base64".into()))?;
    if blob_key_type(&blob) != Some(key_type.as_bytes()) {
        return Err(bad(format!("the key data does not hold a {key_type} key")));
    }
    let comment = fields.next().map(str::trim).unwrap_or_default();
    Ok(if comment.is_empty() {
        format!("{key_type} {data}")
    } else {
        format!("{key_type} {data} {comment}")
    })
}

fn invalid_key(input: &str, reason: &str) -> ImageError {
    ImageError::InvalidSshKey {
        input: input.to_string(),
        reason: reason.to_string(),
    }
}

/// The user's input, quoted and shortened, for an error message.
fn describe_input(input: &str) -> String {
    format!("{:?}", shorten(input.trim(), 48))
}

fn shorten(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        text.to_string()
    } else {
        text.chars().take(max_chars - 1).chain(['…']).collect()
    }
}

/// `~/x` to `$HOME/x`.
fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) if !home.is_empty() => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// Reads a public key file of at most [`MAX_PUBLIC_KEY_BYTES`].
fn read_key_file(path: &Path) -> Result<String, ImageError> {
    let input = path.display().to_string();
    let file = File::open(path).map_err(|e| invalid_key(&input, &format!("cannot open: {e}")))?;
    let mut data = Vec::new();
    file.take(MAX_PUBLIC_KEY_BYTES as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| invalid_key(&input, &format!("cannot read: {e}")))?;
    if data.len() > MAX_PUBLIC_KEY_BYTES {
        return Err(invalid_key(
            &input,
            &format!(
                "the file is over {MAX_PUBLIC_KEY_BYTES} bytes; a public key file holds one line"
            ),
        ));
    }
    String::from_utf8(data).map_err(|_| invalid_key(&input, "the file is not text"))
}

/// Decodes standard base64 (with padding); `None` when it is not.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if bytes.is_empty() || !bytes.len().is_multiple_of(4) {
        return None;
    }
    let pad = bytes.iter().rev().take_while(|&&c| c == b'=').count();
    if pad > 2 {
        return None;
    }
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in &bytes[..bytes.len() - pad] {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// The key type an SSH key blob starts with (a length-prefixed string).
fn blob_key_type(blob: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    blob.get(4..4usize.checked_add(len)?)
}

/// Where [`ensure_ssh_key`]'s key pair lives by default: `keys/` beside the images
/// directory (`$SMOLVM_DATA_DIR/keys`, else `~/.local/share/smolvm/keys`).
pub fn default_keys_dir() -> PathBuf {
    let images = crate::default_images_dir();
    images
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or(images)
        .join("keys")
}

/// Returns `(DIR/id_ed25519, DIR/id_ed25519.pub)`, generating the pair with `ssh-keygen -t
/// ed25519 -N ''` when it is missing (the directory 0700, the private key 0600).
///
/// Safe to call from several processes at once: generation happens under a lock, into a
/// temporary directory, and is renamed into place, so all of them end with the same pair.
pub fn ensure_ssh_key(dir: &Path) -> Result<(PathBuf, PathBuf), ImageError> {
    let private = dir.join(SSH_KEY_FILE);
    let public = dir.join(format!("{SSH_KEY_FILE}.pub"));
    if private.is_file() && public.is_file() {
        check_key_file(&public)?;
        return Ok((private, public));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(ImageError::io("cannot create", dir))?;
    let _lock = store::lock_file(
        &dir.join(format!(".{SSH_KEY_FILE}.lock")),
        "waiting for another process making the SSH key",
    )?;
    if !(private.is_file() && public.is_file()) {
        let tmp = tempfile::Builder::new()
            .prefix(".keygen-")
            .tempdir_in(dir)
            .map_err(ImageError::io(
                "cannot create a temporary directory in",
                dir,
            ))?;
        let new_private = tmp.path().join(SSH_KEY_FILE);
        let new_public = tmp.path().join(format!("{SSH_KEY_FILE}.pub"));
        if private.is_file() {
            // The public half went missing: derive it again from the private key.
            let mut cmd = tools::command(SSH_KEYGEN)?;
            cmd.arg("-y").arg("-f").arg(&private);
            let line = tools::run(&mut cmd)?;
            std::fs::write(&new_public, line)
                .map_err(ImageError::io("cannot write", &new_public))?;
            set_mode(&new_public, 0o644)?;
            rename(&new_public, &public)?;
        } else {
            keygen(&new_private, "smolvm")?;
            set_mode(&new_private, 0o600)?;
            set_mode(&new_public, 0o644)?;
            // The public half first: a pair counts as present once the private key is there.
            rename(&new_public, &public)?;
            rename(&new_private, &private)?;
            tracing::info!(key = %private.display(), "generated an SSH key pair");
        }
    }
    check_key_file(&public)?;
    Ok((private, public))
}

/// Checks that `path` holds one valid public key.
fn check_key_file(path: &Path) -> Result<(), ImageError> {
    parse_public_key(&read_key_file(path)?, &path.display().to_string()).map(drop)
}

fn rename(from: &Path, to: &Path) -> Result<(), ImageError> {
    std::fs::rename(from, to).map_err(ImageError::io("cannot move into place", to))
}

/// `ssh-keygen -q -t ed25519 -N '' -C COMMENT -f PATH` (PATH must not exist).
fn keygen(path: &Path, comment: &str) -> Result<(), ImageError> {
    let mut cmd = tools::command(SSH_KEYGEN)?;
    cmd.args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path);
    tools::run(&mut cmd).map(drop)
}

/// The name an SSH image's host key has in its `known_hosts`: `smolvm-NAME`.
pub fn host_key_alias(image_name: &str) -> String {
    format!("smolvm-{image_name}")
}

/// The `known_hosts` file of an SSH image (made by [`build_ssh_image`]).
pub fn known_hosts_path(image: &Image) -> PathBuf {
    image.dir.join(KNOWN_HOSTS_FILE)
}

/// The `ssh` command line that logs in as root to a VM of the SSH image `image` reachable at
/// `host:port`, with `private_key`, trusting only the image's pinned host key.
pub fn ssh_command_hint(image: &Image, private_key: &Path, host: &str, port: u16) -> String {
    command_hint(
        &image.name,
        &known_hosts_path(image),
        private_key,
        host,
        port,
    )
}

fn command_hint(name: &str, known_hosts: &Path, key: &Path, host: &str, port: u16) -> String {
    let q = |s: &str| tools::quote(s.as_ref());
    [
        "ssh".to_string(),
        "-i".into(),
        q(&key.to_string_lossy()),
        "-p".into(),
        port.to_string(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        q(&format!("UserKnownHostsFile={}", known_hosts.display())),
        "-o".into(),
        q(&format!("HostKeyAlias={}", host_key_alias(name))),
        q(&format!("root@{host}")),
    ]
    .join(" ")
}

/// What decides an SSH image's contents; equal inputs mean the image is up to date.
#[derive(Serialize)]
struct SshInputs<'a> {
    ssh_builder_version: u32,
    base: &'a str,
    base_inputs_hash: &'a str,
    authorized_key: &'a str,
    rootfs_size_mib: u64,
}

/// Derives the SSH image `name` in `images_dir` from the built image `base` (normally
/// `default`): root accepts `ssh_public_key` (the key or a `.pub` path, see
/// [`read_public_key`]), the guest runs `sshd` with a host key made here and pinned in
/// `NAME/known_hosts`. `rootfs_size_mib` grows the root filesystem (never below the base's;
/// `None` keeps the base's size).
///
/// No network, no mount. Built in a staging directory and renamed into place, under the
/// image's lock: a failed build leaves nothing, concurrent calls make one image. When `name`
/// exists with the same inputs it is returned unchanged; when it is rebuilt (other key or
/// size, newer base) it keeps its host key, so the pin stays valid.
pub fn build_ssh_image(
    images_dir: &Path,
    base: &str,
    name: &str,
    ssh_public_key: &str,
    rootfs_size_mib: Option<u64>,
) -> Result<Image, ImageError> {
    let started = Instant::now();
    store::validate_name(name)?;
    store::validate_name(base)?;
    if name == base {
        return Err(ImageError::InvalidBase {
            name: name.to_string(),
            base: base.to_string(),
            reason: "an SSH image needs a name of its own; the base image stays as it is".into(),
        });
    }
    let authorized_key = read_public_key(ssh_public_key)?;
    // Fails early (with the way to build it) when the base is missing.
    store::open(images_dir, base)?;
    tools::require(&[SSH_KEYGEN, DEBUGFS, E2FSCK, RESIZE2FS])?;

    // Both names, in a fixed order (no deadlock between two derivations): the base must not
    // be rebuilt while it is copied.
    let (first, second) = if base < name {
        (base, name)
    } else {
        (name, base)
    };
    let _first = store::lock(images_dir, first)?;
    let _second = store::lock(images_dir, second)?;
    store::clean_leftovers(images_dir, name);

    let base_image = store::open(images_dir, base)?;
    if base_image.manifest.ssh.is_some() {
        return Err(ImageError::InvalidBase {
            name: name.to_string(),
            base: base.to_string(),
            reason: "it is an SSH image itself; derive from a plain image such as `default`".into(),
        });
    }
    if stat(&base_image.rootfs, SSHD_PATH).is_err() {
        return Err(ImageError::InvalidBase {
            name: name.to_string(),
            base: base.to_string(),
            reason: format!(
                "it has no SSH server ({SSHD_PATH}; made by an older smolvm): rebuild it with \
                 `smolvm image build {base}`"
            ),
        });
    }
    let base_len = std::fs::metadata(&base_image.rootfs)
        .map_err(ImageError::io("cannot inspect", &base_image.rootfs))?
        .len();
    let base_mib = base_len.div_ceil(1 << 20);
    let size_mib = rootfs_size_mib.unwrap_or(base_mib);
    if size_mib < base_mib || size_mib > MAX_SSH_ROOTFS_SIZE_MIB {
        return Err(ImageError::InvalidRootfsSize {
            name: name.to_string(),
            size_mib,
            base: base.to_string(),
            min_mib: base_mib,
            max_mib: MAX_SSH_ROOTFS_SIZE_MIB,
        });
    }
    let inputs = SshInputs {
        ssh_builder_version: SSH_BUILDER_VERSION,
        base,
        base_inputs_hash: &base_image.manifest.inputs_hash,
        authorized_key: &authorized_key,
        rootfs_size_mib: size_mib,
    };
    let canonical = serde_json::to_vec(&inputs).map_err(|e| ImageError::Io {
        context: "cannot encode the inputs of",
        path: images_dir.join(name),
        source: std::io::Error::other(e),
    })?;
    let inputs_hash = manifest::hash_bytes(&canonical);

    let mut old_host_key = None;
    match store::open(images_dir, name) {
        Ok(image) => match &image.manifest.ssh {
            None => {
                return Err(ImageError::NotAnSshImage {
                    name: name.to_string(),
                })
            }
            Some(_)
                if image.manifest.inputs_hash == inputs_hash
                    && known_hosts_path(&image).is_file() =>
            {
                tracing::info!(image = name, "SSH image is up to date");
                return Ok(image);
            }
            Some(ssh) => {
                tracing::info!(image = name, "SSH image is out of date; rebuilding");
                old_host_key = Some((image.rootfs.clone(), ssh.host_key.clone()));
            }
        },
        Err(ImageError::NotFound { .. }) => {}
        Err(e) => tracing::warn!("{e}; rebuilding"),
    }

    let staging = Staging::new(images_dir, name)?;
    let secrets = tempfile::Builder::new()
        .prefix("smolvm-ssh-")
        .tempdir()
        .map_err(ImageError::io(
            "cannot create a temporary directory in",
            std::env::temp_dir(),
        ))?;
    let secrets_dir = secrets.path().to_path_buf();
    let job = Derive {
        base: &base_image,
        name,
        staging: staging.path(),
        secrets: &secrets_dir,
        authorized_key: &authorized_key,
        base_len,
        size_mib,
    };
    let mut steps = Steps::new(false);
    steps.run("Linking the kernel and initramfs", |_| {
        job.link_boot_files()
    })?;
    let rootfs = staging.path().join(ROOTFS_FILE);
    steps.run("Copying the root filesystem", |_| {
        sparse_copy(&base_image.rootfs, &rootfs)
    })?;
    if size_mib << 20 > base_len {
        steps.run("Growing the root filesystem", |_| grow(&rootfs, size_mib))?;
    }
    let host_key = steps.run("Making the host key", |_| {
        job.host_key(old_host_key.as_ref())
    })?;
    steps.run("Writing the SSH files (debugfs)", |_| {
        job.inject(&rootfs, &host_key)
    })?;
    steps.run("Checking the root filesystem", |_| {
        verify(&rootfs, &job.expected(&host_key)?)?;
        fsck_clean(&rootfs)
    })?;
    // The private host key now exists only inside the image.
    drop(secrets);

    let timings = steps.timings().to_vec();
    steps.run("Writing the manifest", |_| {
        job.finish(&host_key.public, &inputs_hash, timings)
    })?;
    store::install(&staging.keep(), images_dir, name)?;
    let image = store::open(images_dir, name)?;
    tracing::info!(
        image = name,
        base,
        seconds = started.elapsed().as_secs_f64(),
        "SSH image built"
    );
    Ok(image)
}

/// The image's host key pair, in the private temporary directory.
struct HostKey {
    /// The private key file (0600).
    private: PathBuf,
    /// The public key file.
    public_file: PathBuf,
    /// `ssh-ed25519 AAAA...` (no comment).
    public: String,
}

/// A file to write into the guest.
struct GuestFile {
    path: &'static str,
    mode: u32,
    data: Vec<u8>,
}

/// One derivation.
struct Derive<'a> {
    base: &'a Image,
    name: &'a str,
    staging: &'a Path,
    secrets: &'a Path,
    authorized_key: &'a str,
    base_len: u64,
    size_mib: u64,
}

impl Derive<'_> {
    /// Hard-links the base's kernel and initramfs (copies them across filesystems).
    fn link_boot_files(&self) -> Result<(), ImageError> {
        for file in [VMLINUX_FILE, INITRD_FILE] {
            let from = self.base.dir.join(file);
            let from = from
                .canonicalize()
                .map_err(ImageError::io("cannot resolve", &from))?;
            let to = self.staging.join(file);
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).map_err(ImageError::io("cannot copy", &from))?;
                set_mode(&to, 0o644)?;
            }
        }
        Ok(())
    }

    /// The previous image's host key when it can be recovered, else a new one.
    fn host_key(&self, old: Option<&(PathBuf, String)>) -> Result<HostKey, ImageError> {
        let private = self.secrets.join("host_key");
        let public_file = self.secrets.join("host_key.pub");
        if let Some((old_rootfs, old_public)) = old {
            match recover_host_key(old_rootfs, &private, old_public) {
                Ok(public) => {
                    std::fs::write(&public_file, format!("{public} root@{}\n", self.alias()))
                        .map_err(ImageError::io("cannot write", &public_file))?;
                    tracing::info!(image = self.name, "kept the image's host key");
                    return Ok(HostKey {
                        private,
                        public_file,
                        public,
                    });
                }
                Err(e) => {
                    tracing::warn!(image = self.name, "making a new host key: {e}");
                    let _ = std::fs::remove_file(&private);
                }
            }
        }
        keygen(&private, &format!("root@{}", self.alias()))?;
        let text = std::fs::read_to_string(&public_file)
            .map_err(ImageError::io("cannot read", &public_file))?;
        Ok(HostKey {
            private,
            public_file,
            public: key_without_comment(&text),
        })
    }

    fn alias(&self) -> String {
        host_key_alias(self.name)
    }

    /// The files the guest gets.
    fn expected(&self, host_key: &HostKey) -> Result<Vec<GuestFile>, ImageError> {
        let read = |path: &Path| std::fs::read(path).map_err(ImageError::io("cannot read", path));
        Ok(vec![
            GuestFile {
                path: AUTHORIZED_KEYS_PATH,
                mode: 0o600,
                data: format!("{}\n", self.authorized_key).into_bytes(),
            },
            GuestFile {
                path: HOST_KEY_PATH,
                mode: 0o600,
                data: read(&host_key.private)?,
            },
            GuestFile {
                path: "/etc/ssh/ssh_host_ed25519_key.pub",
                mode: 0o644,
                data: read(&host_key.public_file)?,
            },
            GuestFile {
                path: SSHD_CONFIG_PATH,
                mode: 0o644,
                data: SSHD_CONFIG.as_bytes().to_vec(),
            },
            GuestFile {
                path: SSHD_MARKER,
                mode: 0o644,
                data: SSHD_MARKER_TEXT.as_bytes().to_vec(),
            },
        ])
    }

    /// Writes the directories and files into the ext4 image with one `debugfs -w` run.
    fn inject(&self, rootfs: &Path, host_key: &HostKey) -> Result<(), ImageError> {
        let files = self.expected(host_key)?;
        let mut script = String::new();
        for (dir, _) in DIRS {
            script.push_str(&format!("mkdir {dir}\n"));
        }
        for (i, file) in files.iter().enumerate() {
            let (parent, base) = file.path.rsplit_once('/').unwrap_or(("", file.path));
            let source = format!("file{i}");
            let source_path = self.secrets.join(&source);
            write_private(&source_path, &file.data)?;
            let parent = if parent.is_empty() { "/" } else { parent };
            script.push_str(&format!("cd {parent}\nrm {base}\nwrite {source} {base}\n"));
        }
        let owned = DIRS
            .iter()
            .map(|&(path, mode)| (path, 0o040000 | mode))
            .chain(files.iter().map(|f| (f.path, 0o100000 | f.mode)));
        for (path, mode) in owned {
            script.push_str(&format!(
                "sif {path} mode 0{mode:o}\nsif {path} uid 0\nsif {path} gid 0\n"
            ));
        }
        let script_path = self.secrets.join("debugfs.cmds");
        write_private(&script_path, script.as_bytes())?;
        let mut cmd = tools::command(DEBUGFS)?;
        cmd.current_dir(self.secrets)
            .arg("-w")
            .arg("-f")
            .arg("debugfs.cmds")
            .arg(rootfs);
        // debugfs exits 0 even when a command fails; `verify` checks the result.
        tools::run(&mut cmd).map(drop)
    }

    /// Writes `known_hosts` and the manifest, and sets the modes of the staged image.
    fn finish(
        &self,
        host_key: &str,
        inputs_hash: &str,
        build_steps: Vec<crate::StepTiming>,
    ) -> Result<(), ImageError> {
        let alias = self.alias();
        let known_hosts = self.staging.join(KNOWN_HOSTS_FILE);
        std::fs::write(&known_hosts, format!("{alias} {host_key}\n"))
            .map_err(ImageError::io("cannot write", &known_hosts))?;
        let (sha256, size) = manifest::hash_file(&self.staging.join(ROOTFS_FILE))?;
        let mut manifest = self.base.manifest.clone();
        manifest.name = self.name.to_string();
        manifest.created = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        manifest.rootfs_size_mib = self.size_mib;
        manifest.files.rootfs = FileInfo {
            file: ROOTFS_FILE.to_string(),
            size,
            sha256,
        };
        manifest.inputs_hash = inputs_hash.to_string();
        manifest.build_steps = build_steps;
        manifest.ssh = Some(SshInfo {
            base: self.base.name.clone(),
            base_inputs_hash: self.base.manifest.inputs_hash.clone(),
            authorized_key: self.authorized_key.to_string(),
            host_key: host_key.to_string(),
            host_key_alias: alias,
            known_hosts: KNOWN_HOSTS_FILE.to_string(),
        });
        manifest.save(self.staging)?;
        for file in [KNOWN_HOSTS_FILE, MANIFEST_FILE] {
            set_mode(&self.staging.join(file), 0o644)?;
        }
        // The root filesystem holds the image's private host key: only its owner (who runs
        // the VMs) may read it.
        set_mode(&self.staging.join(ROOTFS_FILE), 0o400)?;
        set_mode(self.staging, 0o700)?;
        tracing::debug!(image = self.name, base_bytes = self.base_len, "staged");
        Ok(())
    }
}

/// `TYPE BASE64` of a public key line (its comment dropped).
fn key_without_comment(line: &str) -> String {
    line.split_ascii_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes `data` to a new file readable by its owner only.
fn write_private(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(ImageError::io("cannot create", path))?;
    file.write_all(data)
        .map_err(ImageError::io("cannot write", path))
}

/// Reads the host key out of an older build of the image into `private` (0600) and checks
/// that it matches `expected_public`; returns its public key.
fn recover_host_key(
    old_rootfs: &Path,
    private: &Path,
    expected_public: &str,
) -> Result<String, ImageError> {
    let data = debugfs_cat(old_rootfs, HOST_KEY_PATH)?;
    write_private(private, &data)?;
    let mut cmd = tools::command(SSH_KEYGEN)?;
    cmd.arg("-y").arg("-f").arg(private);
    let public = key_without_comment(&tools::run(&mut cmd)?);
    if public != key_without_comment(expected_public) {
        return Err(ImageError::SshInjection {
            path: old_rootfs.to_path_buf(),
            reason: "the host key in the image does not match its manifest".into(),
        });
    }
    Ok(public)
}

/// Grows the ext4 image to `size_mib`: extend the file, `e2fsck -fy`, `resize2fs`.
fn grow(rootfs: &Path, size_mib: u64) -> Result<(), ImageError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(rootfs)
        .map_err(ImageError::io("cannot open", rootfs))?;
    file.set_len(size_mib << 20)
        .map_err(ImageError::io("cannot extend", rootfs))?;
    drop(file);
    let mut cmd = tools::command(E2FSCK)?;
    cmd.arg("-fy").arg(rootfs);
    // 0: clean, 1: errors corrected; anything else is a failure.
    run_allowing(&mut cmd, &[0, 1])?;
    let mut cmd = tools::command(RESIZE2FS)?;
    cmd.arg(rootfs);
    tools::run(&mut cmd).map(drop)
}

/// `e2fsck -fn`: fails unless the filesystem is clean.
fn fsck_clean(rootfs: &Path) -> Result<(), ImageError> {
    let mut cmd = tools::command(E2FSCK)?;
    cmd.arg("-fn").arg(rootfs);
    tools::run(&mut cmd).map(drop)
}

/// Runs `cmd`, accepting the exit codes in `ok`.
fn run_allowing(cmd: &mut Command, ok: &[i32]) -> Result<(), ImageError> {
    let line = tools::display(cmd);
    let output = cmd.output().map_err(|source| ImageError::Spawn {
        tool: line.split(' ').next().unwrap_or_default().to_string(),
        source,
    })?;
    match output.status.code() {
        Some(code) if ok.contains(&code) => Ok(()),
        _ => Err(ImageError::ToolFailed {
            command: line,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        }),
    }
}

/// Runs one `debugfs -R REQUEST` (read-only) on `image`; returns its standard output.
fn debugfs(image: &Path, request: &str) -> Result<Vec<u8>, ImageError> {
    let mut cmd = tools::command(DEBUGFS)?;
    cmd.env("DEBUGFS_PAGER", "__none__")
        .arg("-R")
        .arg(request)
        .arg(image);
    let output = cmd.output().map_err(|source| ImageError::Spawn {
        tool: DEBUGFS.name.to_string(),
        source,
    })?;
    // debugfs prints its version banner on standard error; anything else there is an error.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let problems: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .collect();
    if !output.status.success() || !problems.is_empty() {
        return Err(ImageError::SshInjection {
            path: image.to_path_buf(),
            reason: format!("`debugfs -R '{request}'`: {}", problems.join("; ")),
        });
    }
    Ok(output.stdout)
}

/// The contents of `path` inside the ext4 `image`.
fn debugfs_cat(image: &Path, path: &str) -> Result<Vec<u8>, ImageError> {
    debugfs(image, &format!("cat {path}"))
}

/// Type, mode and owner of an inode, from `debugfs stat`.
#[derive(Debug, PartialEq, Eq)]
struct InodeInfo {
    kind: String,
    mode: u32,
    uid: u32,
    gid: u32,
}

fn parse_stat(text: &str) -> Option<InodeInfo> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let after = |label: &str| {
        words
            .iter()
            .position(|w| *w == label)
            .and_then(|i| words.get(i + 1).copied())
    };
    Some(InodeInfo {
        kind: after("Type:")?.to_string(),
        mode: u32::from_str_radix(after("Mode:")?, 8).ok()?,
        uid: after("User:")?.parse().ok()?,
        gid: after("Group:")?.parse().ok()?,
    })
}

/// The type, mode and owner of `path` in `image`.
fn stat(image: &Path, path: &str) -> Result<InodeInfo, ImageError> {
    let out = debugfs(image, &format!("stat {path}"))?;
    parse_stat(&String::from_utf8_lossy(&out)).ok_or_else(|| ImageError::SshInjection {
        path: image.to_path_buf(),
        reason: format!("cannot read what `debugfs stat {path}` printed"),
    })
}

/// Checks that every directory and file is in `image` with its mode, root as owner and the
/// expected contents.
fn verify(image: &Path, files: &[GuestFile]) -> Result<(), ImageError> {
    let wrong = |path: &str, what: String| ImageError::SshInjection {
        path: image.to_path_buf(),
        reason: format!("{path}: {what}"),
    };
    let entries = DIRS
        .iter()
        .map(|&(path, mode)| (path, "directory", mode))
        .chain(files.iter().map(|f| (f.path, "regular", f.mode)));
    for (path, kind, mode) in entries {
        let info = stat(image, path)?;
        let expected = InodeInfo {
            kind: kind.to_string(),
            mode,
            uid: 0,
            gid: 0,
        };
        if info != expected {
            return Err(wrong(
                path,
                format!("found {info:?}, expected {expected:?}"),
            ));
        }
    }
    for file in files {
        if debugfs_cat(image, file.path)? != file.data {
            return Err(wrong(
                file.path,
                "contents differ from what was written".into(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails the test when ssh-keygen is missing (it comes with openssh-client, which
    /// scripts/install-deps installs).
    fn require_ssh_keygen() {
        if let Err(e) = tools::find(SSH_KEYGEN) {
            panic!("this test needs ssh-keygen (openssh-client; run scripts/install-deps): {e}");
        }
    }

    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFd4pUpYtFzs2D2xMkdoQ8bp6cxxwXYCBGFULVgmyrpP";

    fn reason(input: &str) -> String {
        match read_public_key(input) {
            Err(ImageError::InvalidSshKey { reason, .. }) => reason,
            other => panic!("{input:?}: expected InvalidSshKey, got {other:?}"),
        }
    }

    #[test]
    fn good_keys_are_normalized() {
        assert_eq!(read_public_key(ED25519).unwrap(), ED25519);
        assert_eq!(
            read_public_key(&format!("  {ED25519}   me@host  \n")).unwrap(),
            format!("{ED25519} me@host")
        );
        assert_eq!(
            read_public_key(&format!("{ED25519}\tcomment with spaces\r\n")).unwrap(),
            format!("{ED25519} comment with spaces")
        );
    }

    #[test]
    fn generated_keys_of_every_kind_are_accepted() {
        require_ssh_keygen();
        let tmp = tempfile::tempdir().unwrap();
        for (kind, bits) in [
            ("ed25519", None),
            ("rsa", Some("2048")),
            ("ecdsa", Some("384")),
        ] {
            let path = tmp.path().join(kind);
            let mut cmd = Command::new("ssh-keygen");
            cmd.args(["-q", "-t", kind, "-N", "", "-C", "x@y", "-f"])
                .arg(&path);
            if let Some(bits) = bits {
                cmd.args(["-b", bits]);
            }
            assert!(cmd.status().unwrap().success());
            let pub_path = format!("{}.pub", path.display());
            let text = std::fs::read_to_string(&pub_path).unwrap();
            assert_eq!(read_public_key(&pub_path).unwrap(), text.trim());
            assert_eq!(read_public_key(&text).unwrap(), text.trim());
            // The private key by mistake.
            let err = reason(&path.display().to_string());
            assert!(err.contains("private key"), "{err}");
        }
    }

    #[test]
    fn path_form_reads_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("key.pub");
        std::fs::write(&path, format!("{ED25519} me\n")).unwrap();
        assert_eq!(
            read_public_key(&path.display().to_string()).unwrap(),
            format!("{ED25519} me")
        );
        let missing = tmp.path().join("nope.pub").display().to_string();
        assert!(reason(&missing).contains("no such file"));
        std::fs::write(&path, vec![b'a'; MAX_PUBLIC_KEY_BYTES + 1]).unwrap();
        assert!(reason(&path.display().to_string()).contains("over 16384 bytes"));
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(reason(&path.display().to_string()).contains("not text"));
        std::fs::write(&path, format!("{ED25519} a\n{ED25519} b\n")).unwrap();
        assert!(reason(&path.display().to_string()).contains("more than one line"));
    }

    #[test]
    fn garbage_is_refused_with_reasons() {
        assert!(reason("").contains("empty"));
        assert!(reason("   \n").contains("empty"));
        assert!(reason("hello").contains("no such file"));
        assert!(reason("hello world").contains("unknown key type"));
        assert!(reason("ssh-dss AAAAB3NzaC1kc3MAAACBAP").contains("DSA"));
        assert!(reason("ssh-ed25519-cert-v01@openssh.com AAAA").contains("certificates"));
        assert!(reason("ssh-ed25519").contains("no key data"));
        assert!(reason("ssh-ed25519 not*base64").contains("not base64"));
        assert!(reason("ssh-ed25519 AAAA").contains("does not hold a ssh-ed25519 key"));
        // A valid blob of another type.
        let rsa_type_blob = "AAAAB3NzaC1yc2EAAAADAQAB";
        assert!(reason(&format!("ssh-ed25519 {rsa_type_blob}")).contains("does not hold"));
        assert!(reason(&format!("{ED25519} a\0b")).contains("NUL"));
        assert!(reason(&format!("{ED25519} a\x1bb")).contains("control"));
        let err = read_public_key("nonsense words").unwrap_err().to_string();
        assert!(err.contains("ssh-ed25519, ssh-rsa"), "{err}");
        assert!(err.contains(".pub"), "{err}");
    }

    #[test]
    fn multi_line_and_too_long_keys_are_refused() {
        assert!(reason(&format!("{ED25519}\n{ED25519}")).contains("more than one line"));
        assert!(reason(&format!("{ED25519} a\rb")).contains("more than one line"));
        let long = format!("{ED25519} {}", "c".repeat(MAX_PUBLIC_KEY_BYTES));
        assert!(reason(&long).contains("at most 16384 bytes"));
        // Long input is shortened in the message.
        let err = read_public_key(&long).unwrap_err().to_string();
        assert!(err.len() < 600, "{err}");
    }

    #[test]
    fn base64_decoding() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGk=").unwrap(), b"hi");
        assert_eq!(base64_decode("YWJj").unwrap(), b"abc");
        for bad in ["", "abc", "a===", "ab$d", "===="] {
            assert!(base64_decode(bad).is_none_or(|v| v.is_empty()), "{bad}");
        }
        assert_eq!(blob_key_type(b"\0\0\0\x03abcdef"), Some(&b"abc"[..]));
        assert_eq!(blob_key_type(b"\0\0\0\x09abc"), None);
        assert_eq!(blob_key_type(b"\0\0"), None);
    }

    #[test]
    fn ensure_ssh_key_generates_once_even_when_raced() {
        require_ssh_keygen();
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/keys");
        let pairs: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4).map(|_| s.spawn(|| ensure_ssh_key(&dir))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect()
        });
        let (private, public) = &pairs[0];
        assert!(pairs.iter().all(|p| p == &pairs[0]));
        assert_eq!(private, &dir.join("id_ed25519"));
        assert_eq!(public, &dir.join("id_ed25519.pub"));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(private), 0o600);
        let text = std::fs::read_to_string(public).unwrap();
        assert!(text.starts_with("ssh-ed25519 ") && text.trim_end().ends_with(" smolvm"));
        // The same pair on the next call; the public half is restored when deleted.
        assert_eq!(ensure_ssh_key(&dir).unwrap(), pairs[0]);
        std::fs::remove_file(public).unwrap();
        ensure_ssh_key(&dir).unwrap();
        assert_eq!(
            key_without_comment(&std::fs::read_to_string(public).unwrap()),
            key_without_comment(&text)
        );
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock"))
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn stat_output_is_parsed() {
        let text = "Inode: 17   Type: regular    Mode:  0600   Flags: 0x80000\n\
                    Generation: 0    Version: 0x00000000:00000000\n\
                    User:     0   Group:     0   Project:     0   Size: 6\n";
        assert_eq!(
            parse_stat(text),
            Some(InodeInfo {
                kind: "regular".into(),
                mode: 0o600,
                uid: 0,
                gid: 0
            })
        );
        assert_eq!(parse_stat("nothing"), None);
    }

    #[test]
    fn command_hint_pins_the_host_key() {
        assert_eq!(
            command_hint(
                "box",
                Path::new("/data/images/box/known_hosts"),
                Path::new("/k/id ed25519"),
                "127.0.0.1",
                2222
            ),
            "ssh -i '/k/id ed25519' -p 2222 -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes \
             -o UserKnownHostsFile=/data/images/box/known_hosts -o HostKeyAlias=smolvm-box \
             root@127.0.0.1"
        );
    }

    #[test]
    fn default_keys_dir_is_beside_the_images() {
        let images = crate::default_images_dir();
        assert_eq!(default_keys_dir().parent(), images.parent());
        assert!(default_keys_dir().ends_with("keys"));
    }
}

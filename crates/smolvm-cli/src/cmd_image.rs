//! `smolvm image build|ssh|key|ls|rm`.

use anyhow::Result;
use clap::Subcommand;

use crate::table;

/// Image subcommands.
#[derive(Subcommand)]
pub enum ImageCmd {
    /// Build an image from Debian packages (kernel, initramfs with the agent, root fs).
    Build {
        /// Image name.
        #[arg(default_value = smolvm::config::DEFAULT_IMAGE)]
        name: String,
        /// Rebuild even when nothing changed.
        #[arg(long)]
        force: bool,
        /// Root filesystem size in MiB.
        #[arg(long)]
        size: Option<u64>,
    },
    /// Derive an image whose guest also runs an SSH server: root accepts KEY, and the host
    /// key, made here, is pinned in the image's known_hosts (no trust on first use).
    Ssh {
        /// Name of the new image.
        name: String,
        /// The public key: the key itself or the path of a .pub file [default: smolvm's own
        /// key, see `smolvm image key`].
        #[arg(long, value_name = "PUB_OR_PATH")]
        key: Option<String>,
        /// Root filesystem size in MiB (at least the base's) [default: the base's].
        #[arg(long, value_name = "MIB")]
        size: Option<u64>,
        /// The image to derive from (built with `smolvm image build`).
        #[arg(long, default_value = smolvm::config::DEFAULT_IMAGE)]
        base: String,
    },
    /// Print the paths of smolvm's SSH key pair (private, then public), generating it when
    /// missing.
    Key,
    /// List built images.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove an image.
    Rm {
        /// Image name.
        name: String,
    },
    /// Boot the image once and save it as the template that new VMs of this shape resume
    /// from (otherwise made on first use). Prints the template's directory.
    Warm {
        /// Image name.
        #[arg(default_value = smolvm::config::DEFAULT_IMAGE)]
        name: String,
        #[command(flatten)]
        shape: crate::ShapeArgs,
        /// Disk size (MiB) of the VMs it serves [default: the image's].
        #[arg(long)]
        disk_size: Option<u64>,
    },
}

/// Runs an image subcommand.
pub fn run(cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::Build { name, force, size } => {
            let img = build(&name, force, size)?;
            println!("{}", img.dir.display());
            Ok(())
        }
        ImageCmd::Ssh {
            name,
            key,
            size,
            base,
        } => {
            let image = ssh(&name, key.as_deref(), size, &base)?;
            let rows = [
                ("kernel", image.kernel.display().to_string()),
                ("initrd", image.initrd.display().to_string()),
                ("rootfs", image.rootfs.display().to_string()),
                (
                    "known_hosts",
                    smolvm_image::known_hosts_path(&image).display().to_string(),
                ),
                (
                    "host_key_alias",
                    smolvm_image::ssh::host_key_alias(&image.name),
                ),
            ];
            for (what, value) in rows {
                println!("{what:<15}{value}");
            }
            Ok(())
        }
        ImageCmd::Key => {
            let dir = smolvm_image::default_keys_dir();
            let (private, public) =
                smolvm_image::ensure_ssh_key(&dir).map_err(smolvm::Error::Image)?;
            println!("{}", private.display());
            println!("{}", public.display());
            Ok(())
        }
        ImageCmd::Ls { json } => {
            let dir = smolvm::Paths::from_env().images_dir;
            let images = smolvm_image::list(&dir)?;
            if json {
                let v: Vec<_> = images.iter().map(|i| &i.manifest).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let mut rows = vec![vec![
                "NAME".to_string(),
                "TEMPLATES".to_string(),
                "PATH".to_string(),
            ]];
            for i in images {
                let (count, bytes) = smolvm::snapshot::template::usage(&dir, &i.name);
                rows.push(vec![
                    i.name.clone(),
                    format!("{count} ({} MiB)", bytes.div_ceil(1 << 20)),
                    i.dir.display().to_string(),
                ]);
            }
            table::print(&rows);
            Ok(())
        }
        ImageCmd::Rm { name } => {
            let dir = smolvm::Paths::from_env().images_dir;
            smolvm_image::remove(&dir, &name)?;
            Ok(())
        }
        ImageCmd::Warm {
            name,
            shape,
            disk_size,
        } => crate::cmd_snapshot::warm(&smolvm::VmConfig {
            image: name,
            vcpu_count: shape.cpus,
            mem_size_mib: shape.memory,
            network: shape.network.parse()?,
            disk_size_mib: disk_size,
            ..Default::default()
        }),
    }
}

/// Builds (or finds up to date) the image `name`.
pub fn build(name: &str, force: bool, size: Option<u64>) -> Result<smolvm_image::Image> {
    smolvm::config::VmConfig {
        image: name.to_string(),
        ..Default::default()
    }
    .validate()?;
    let agent = crate::agent_bin::find()?;
    let opts = smolvm_image::BuildOptions {
        name: name.to_string(),
        images_dir: smolvm::Paths::from_env().images_dir,
        agent_binary: agent,
        force,
        progress: true,
        rootfs_size_mib: size.unwrap_or(1024),
        extra_packages: Vec::new(),
    };
    Ok(smolvm_image::build(&opts)?)
}

/// Derives (or finds up to date) the SSH image `name` from `base`; without `key`, smolvm's
/// own key (generated when missing).
pub fn ssh(
    name: &str,
    key: Option<&str>,
    size: Option<u64>,
    base: &str,
) -> Result<smolvm_image::Image> {
    let key = match key {
        Some(key) => key.to_string(),
        None => {
            let (_, public) = smolvm_image::ensure_ssh_key(&smolvm_image::default_keys_dir())
                .map_err(smolvm::Error::Image)?;
            public.display().to_string()
        }
    };
    let images_dir = smolvm::Paths::from_env().images_dir;
    let image = smolvm_image::build_ssh_image(&images_dir, base, name, &key, size)
        .map_err(smolvm::Error::Image)?;
    Ok(image)
}

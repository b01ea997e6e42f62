//! `smolvm image build|ls|rm`.

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
}

/// Runs an image subcommand.
pub fn run(cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::Build { name, force, size } => {
            let img = build(&name, force, size)?;
            println!("{}", img.dir.display());
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
            let mut rows = vec![vec!["NAME".to_string(), "PATH".to_string()]];
            for i in images {
                rows.push(vec![i.name.clone(), i.dir.display().to_string()]);
            }
            table::print(&rows);
            Ok(())
        }
        ImageCmd::Rm { name } => {
            let dir = smolvm::Paths::from_env().images_dir;
            smolvm_image::remove(&dir, &name)?;
            Ok(())
        }
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

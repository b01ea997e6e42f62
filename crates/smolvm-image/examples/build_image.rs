//! Builds an image from the command line, for trying the pipeline without the smolvm CLI:
//!
//! ```text
//! cargo run -p smolvm-image --example build_image -- AGENT [NAME] [--force] [--images-dir DIR]
//!     [--package PKG]... [--size MIB]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let mut positional = Vec::new();
    let mut force = false;
    let mut images_dir = None;
    let mut packages = Vec::new();
    let mut size = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--force" => force = true,
            "--images-dir" => images_dir = args.next().map(PathBuf::from),
            "--package" => packages.extend(args.next()),
            "--size" => size = args.next().and_then(|s| s.parse().ok()),
            _ => positional.push(arg),
        }
    }
    let Some(agent) = positional.first() else {
        eprintln!(
            "usage: build_image AGENT [NAME] [--force] [--images-dir DIR] [--package PKG]... [--size MIB]"
        );
        return ExitCode::from(2);
    };
    let mut opts = smolvm_image::BuildOptions::new(agent);
    if let Some(name) = positional.get(1) {
        opts.name = name.clone();
    }
    if let Some(dir) = images_dir {
        opts.images_dir = dir;
    }
    opts.force = force;
    opts.extra_packages = packages;
    if let Some(size) = size {
        opts.rootfs_size_mib = size;
    }
    opts.progress = true;
    match smolvm_image::build(&opts) {
        Ok(image) => {
            println!("{}", image.dir.display());
            for step in &image.manifest.build_steps {
                println!("  {:<45} {:>6.2}s", step.step, step.seconds);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

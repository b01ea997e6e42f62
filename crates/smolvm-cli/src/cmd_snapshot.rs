//! Saved states from the shell: `pause`, `resume`, `fork`, `snapshot create|ls|rm`,
//! `create --from-snapshot` and `image warm`.

use anyhow::Result;
use clap::Subcommand;
use smolvm::snapshot::{Kind, Saved};
use smolvm::{Runtime, VmConfig};

use crate::table;

/// `smolvm snapshot ...`.
#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Save a running VM's memory, devices and disk as NAME; the VM goes on running.
    /// `smolvm create --from-snapshot NAME` starts new VMs from it.
    Create {
        /// VM id.
        id: String,
        /// Snapshot name (letters, digits, '.', '_', '-').
        name: String,
    },
    /// List snapshots.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove snapshots (refused while VMs made from them exist).
    Rm {
        /// Snapshot names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// Runs a `smolvm snapshot` subcommand.
pub fn run(cmd: SnapshotCmd) -> Result<()> {
    let rt = Runtime::open()?;
    match cmd {
        SnapshotCmd::Create { id, name } => {
            let t0 = std::time::Instant::now();
            let saved = rt.get(&id)?.snapshot(&name)?;
            eprintln!(
                "saved {id} as snapshot {name} in {} ({} MiB at {})",
                table::ms(t0.elapsed()),
                saved.size_bytes() >> 20,
                saved.dir.display()
            );
            Ok(())
        }
        SnapshotCmd::Ls { json } => ls(&rt, json),
        SnapshotCmd::Rm { names } => {
            for n in names {
                rt.remove_snapshot(&n)?;
            }
            Ok(())
        }
    }
}

fn ls(rt: &Runtime, json: bool) -> Result<()> {
    let all = rt.snapshots()?;
    if json {
        let v: Vec<serde_json::Value> = all.iter().map(to_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut rows = vec![vec![
        "NAME".into(),
        "KIND".into(),
        "FROM VM".into(),
        "IMAGE".into(),
        "CPUS".into(),
        "MEMORY".into(),
        "SIZE".into(),
        "ACCEL".into(),
    ]];
    for s in &all {
        let m = &s.meta;
        rows.push(vec![
            m.name.clone(),
            kind_name(m.kind).into(),
            m.source_vm.clone().unwrap_or_else(|| "-".into()),
            m.image.clone(),
            m.vcpus.to_string(),
            format!("{} MiB", m.mem_mib),
            format!("{} MiB", s.size_bytes() >> 20),
            m.accelerator.to_string(),
        ]);
    }
    table::print(&rows);
    Ok(())
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Template => "template",
        Kind::Snapshot => "snapshot",
        Kind::Fork => "fork",
    }
}

fn to_json(s: &Saved) -> serde_json::Value {
    serde_json::json!({
        "name": s.meta.name,
        "kind": kind_name(s.meta.kind),
        "source_vm": s.meta.source_vm,
        "image": s.meta.image,
        "vcpus": s.meta.vcpus,
        "mem_mib": s.meta.mem_mib,
        "network_device": s.meta.nic,
        "accelerator": s.meta.accelerator,
        "created_at": s.meta.created_at,
        "size_bytes": s.size_bytes(),
        "path": s.dir,
    })
}

/// `smolvm pause` / `smolvm resume`.
pub fn pause(id: &str, pause: bool) -> Result<()> {
    let rt = Runtime::open()?;
    let vm = rt.get(id)?;
    if pause {
        vm.pause()?;
    } else {
        vm.resume()?;
    }
    Ok(())
}

/// `smolvm fork ID N`: prints the new VMs' ids.
pub fn fork(id: &str, n: usize) -> Result<()> {
    let rt = Runtime::open()?;
    let t0 = std::time::Instant::now();
    let forks = rt.get(id)?.fork(n)?;
    for f in &forks {
        println!("{}", f.id());
    }
    eprintln!("forked {id} into {n} VMs in {}", table::ms(t0.elapsed()));
    Ok(())
}

/// `smolvm image warm NAME`: builds the template of an image and shape now.
pub fn warm(cfg: &VmConfig) -> Result<()> {
    let rt = Runtime::open()?;
    let t0 = std::time::Instant::now();
    let (saved, built) = rt.warm_template(cfg)?;
    eprintln!(
        "{} template {} of image {} ({} vCPUs, {} MiB, {}) in {}",
        if built { "built" } else { "already had" },
        saved.meta.name,
        saved.meta.image,
        saved.meta.vcpus,
        saved.meta.mem_mib,
        saved.meta.accelerator,
        table::ms(t0.elapsed())
    );
    println!("{}", saved.dir.display());
    Ok(())
}

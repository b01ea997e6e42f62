//! `smolvm`: run untrusted code in microVMs from the shell.
//!
//! Exit codes: 0 ok, 1 failure (or the command's own code for `run`/`exec`), 2 bad usage,
//! 3 VM not found.

mod agent_bin;
mod bench;
mod bench_density;
mod bench_start;
mod cmd_cp;
mod cmd_image;
mod cmd_snapshot;
mod cmd_vm;
mod doctor;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Run untrusted code in hardware-isolated microVMs.
#[derive(Parser)]
#[command(name = "smolvm", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// Resource and image options shared by `run` and `create`. Options not given take the
/// runtime's defaults (or, with `--from-snapshot`, the snapshot's), so every option is
/// optional here.
#[derive(Args, Clone)]
pub struct VmArgs {
    /// Number of vCPUs (1-32) [default: 2; a snapshot's own with --from-snapshot].
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Memory in MiB (128-16384) [default: 512; a snapshot's own with --from-snapshot].
    #[arg(long)]
    pub memory: Option<u32>,
    /// Image to boot (see `smolvm image ls`) [default: default].
    #[arg(long)]
    pub image: Option<String>,
    /// Network mode: nat (TAP + nftables; needs root), user (QEMU user-mode, rootless),
    /// none, or auto (nat where possible, else user) [default: auto; a snapshot's own with
    /// --from-snapshot].
    #[arg(long)]
    pub network: Option<String>,
    /// Default egress policy: allow (public destinations; link-local, private ranges and
    /// the host stay blocked) or deny (only --allow entries) [default: allow].
    #[arg(long)]
    pub egress: Option<String>,
    /// Open a destination: A.B.C.D, A.B.C.D/N, optionally :PORT (repeatable; nat only).
    #[arg(long = "allow", value_name = "CIDR[:PORT]")]
    pub allow: Vec<String>,
    /// Close a destination, same syntax, checked first (repeatable; nat only).
    #[arg(long = "deny", value_name = "CIDR[:PORT]")]
    pub deny: Vec<String>,
    /// Extra kernel command-line arguments.
    #[arg(long)]
    pub boot_args: Option<String>,
    /// Boot the kernel instead of resuming the image's booted template (made on first use
    /// of each image and shape; see `smolvm image warm`).
    #[arg(long)]
    pub cold: bool,
}

/// The shape of the VMs a command prepares or measures (`image warm`, `bench start`).
#[derive(Args, Clone)]
pub struct ShapeArgs {
    /// vCPUs per VM.
    #[arg(long, default_value_t = smolvm::config::DEFAULT_VCPUS)]
    pub cpus: u32,
    /// Memory per VM in MiB.
    #[arg(long, default_value_t = smolvm::config::DEFAULT_MEM_MIB)]
    pub memory: u32,
    /// Network mode: auto, nat, user or none (nat and user VMs share a template; none has
    /// no network device).
    #[arg(long, default_value = "auto")]
    pub network: String,
}

/// Options only `create` takes: identity, disks and the persistent environment.
#[derive(Args, Clone)]
pub struct CreateArgs {
    /// The VM's id (lowercase letters, digits, '-'); generated when absent.
    #[arg(long)]
    pub name: Option<String>,
    /// Disk mode: isolated (own copy-on-write overlay) or shared (one writable disk per
    /// image) [default: isolated].
    #[arg(long)]
    pub disk_mode: Option<String>,
    /// Boot from this existing disk (e.g. one retained by `--retain-disk`), used in place.
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Size of the VM's disk in MiB (at least the image's); the guest's root filesystem grows to fill it.
    #[arg(long)]
    pub disk_size: Option<u64>,
    /// Keep the VM's disk when it is deleted (moved to the state directory's disks/).
    #[arg(long)]
    pub retain_disk: bool,
    /// Persistent environment variable, KEY=VALUE (repeatable); every command sees it.
    #[arg(long = "env", short = 'e')]
    pub env: Vec<String>,
    /// Boot this kernel (uncompressed vmlinux) instead of the image's.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Boot this initramfs (holding the smolvm agent) instead of the image's.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Use this root filesystem (raw ext4 or qcow2) instead of the image's.
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// Resume from this snapshot (`smolvm snapshot ls`): memory, processes and files as
    /// they were; the VM gets its own id, hostname, address and randomness. --name, --env
    /// (added to the saved environment), --network, --egress, --allow, --deny and
    /// --retain-disk apply; the others must be the snapshot's own or are refused (exit 2).
    #[arg(long, value_name = "NAME")]
    pub from_snapshot: Option<String>,
}

/// Options for running one command.
#[derive(Args, Clone)]
pub struct ExecArgs {
    /// Kill the command (and its whole process group) after this many seconds.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Environment variable for the command, KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e')]
    pub env: Vec<String>,
    /// Working directory inside the VM.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Forward this process's stdin to the command.
    #[arg(long, short = 'i')]
    pub interactive: bool,
    /// The command and its arguments (run directly; use `sh -c '...'` for shell syntax).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a VM, run one command in it, print its output, delete the VM.
    Run {
        #[command(flatten)]
        vm: VmArgs,
        #[command(flatten)]
        exec: ExecArgs,
        /// Print how long each phase took, and the accelerator.
        #[arg(long)]
        timings: bool,
    },
    /// Create a VM and start it (prints its id); it runs until stopped or deleted.
    Create {
        #[command(flatten)]
        create: CreateArgs,
        #[command(flatten)]
        vm: VmArgs,
        /// Do not start it.
        #[arg(long)]
        no_start: bool,
    },
    /// Start a created or stopped VM.
    Start {
        /// VM id.
        id: String,
    },
    /// Freeze a running VM's vCPUs (its clocks and timers stop with them).
    Pause {
        /// VM id.
        id: String,
    },
    /// Let a paused VM run again.
    Resume {
        /// VM id.
        id: String,
    },
    /// Start N new VMs that continue from a running VM's present state (prints their ids).
    Fork {
        /// VM id.
        id: String,
        /// How many.
        #[arg(default_value_t = 1)]
        n: usize,
    },
    /// Save, list and remove snapshots of running VMs.
    Snapshot {
        #[command(subcommand)]
        cmd: cmd_snapshot::SnapshotCmd,
    },
    /// Run a command in a running VM.
    Exec {
        /// VM id.
        id: String,
        #[command(flatten)]
        exec: ExecArgs,
    },
    /// Stop a VM (a clean guest shutdown first; its disk is kept for the next start).
    Stop {
        /// VM id.
        id: String,
        /// Skip the clean shutdown: end QEMU at once.
        #[arg(short, long)]
        force: bool,
    },
    /// Delete VMs (stopping them first).
    Rm {
        /// VM ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Do not fail on VMs that do not exist.
        #[arg(short, long)]
        force: bool,
    },
    /// List VMs.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy a file into or out of a running VM: `smolvm cp ./a ID:/tmp/a`,
    /// `smolvm cp ID:/tmp/out ./out` (permissions kept; a path ending in / means "into").
    Cp {
        /// Source: a host path or ID:/guest/path.
        src: String,
        /// Destination: a host path or ID:/guest/path.
        dst: String,
        /// Refuse downloads larger than this many bytes (default 4 GiB).
        #[arg(long)]
        max_size: Option<u64>,
    },
    /// Forward a host port to a port on the VM's loopback, through the agent channel (no
    /// network needed): `smolvm port ID 8000` (a free host port), `smolvm port ID 8000:8080`.
    /// Without a port, list the VM's forwards. Forwards last until removed (`--rm HOST`) or
    /// the VM is deleted, and come back when it starts again.
    Port {
        /// VM id.
        id: String,
        /// GUEST or GUEST:HOST (guest port, and host port; a free host port when absent).
        #[arg(value_name = "GUEST[:HOST]")]
        spec: Option<String>,
        /// Host address to listen on (default 127.0.0.1; other addresses expose the guest
        /// port to whoever can reach them).
        #[arg(long, value_name = "ADDR", requires = "spec")]
        bind: Option<String>,
        /// Remove the forward on this host port.
        #[arg(long = "rm", value_name = "HOST", conflicts_with_all = ["spec", "bind"])]
        rm: Option<u16>,
    },
    /// Print a VM's guest console log.
    Logs {
        /// VM id.
        id: String,
    },
    /// Show everything recorded about a VM, as JSON.
    Inspect {
        /// VM id.
        id: String,
    },
    /// Show or change a VM's persistent environment variables.
    Env {
        /// VM id.
        id: String,
        /// Variables to set, KEY=VALUE.
        set: Vec<String>,
        /// Variable to remove (repeatable).
        #[arg(long)]
        unset: Vec<String>,
        /// Remove every variable before setting the given ones.
        #[arg(long)]
        clear: bool,
    },
    /// Repair what crashed processes left: delete ephemeral VMs whose owner died, mark VMs
    /// whose supervisor died, kill orphan processes, remove stale files.
    Gc {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Manage images.
    Image {
        #[command(subcommand)]
        cmd: cmd_image::ImageCmd,
    },
    /// Check this host: KVM, QEMU, image tools, networking, disk.
    Doctor,
    /// Measure performance.
    Bench {
        #[command(subcommand)]
        cmd: bench::BenchCmd,
    },
    /// (internal) Run a VM's supervisor.
    #[command(name = "__supervise", hide = true)]
    Supervise {
        /// The VM's directory.
        dir: PathBuf,
    },
}

/// Maps an error to the documented exit codes.
pub fn exit_code_for(err: &anyhow::Error) -> u8 {
    match err.downcast_ref::<smolvm::Error>() {
        Some(e) if e.is_usage() => 2,
        Some(e) if e.is_not_found() => 3,
        _ => 1,
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SMOLVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let res = match cli.command {
        Cmd::Supervise { dir } => return ExitCode::from(smolvm::supervisor::main(&dir) as u8),
        Cmd::Run { vm, exec, timings } => cmd_vm::run(&vm, &exec, timings),
        Cmd::Create {
            create,
            vm,
            no_start,
        } => cmd_vm::create(&create, &vm, no_start).map(|_| 0),
        Cmd::Start { id } => cmd_vm::start(&id).map(|_| 0),
        Cmd::Exec { id, exec } => cmd_vm::exec(&id, &exec),
        Cmd::Pause { id } => cmd_snapshot::pause(&id, true).map(|_| 0),
        Cmd::Resume { id } => cmd_snapshot::pause(&id, false).map(|_| 0),
        Cmd::Fork { id, n } => cmd_snapshot::fork(&id, n).map(|_| 0),
        Cmd::Snapshot { cmd } => cmd_snapshot::run(cmd).map(|_| 0),
        Cmd::Stop { id, force } => cmd_vm::stop(&id, force).map(|_| 0),
        Cmd::Rm { ids, force } => cmd_vm::rm(&ids, force).map(|_| 0),
        Cmd::Ls { json } => cmd_vm::ls(json).map(|_| 0),
        Cmd::Cp { src, dst, max_size } => cmd_cp::run(&src, &dst, max_size).map(|_| 0),
        Cmd::Port { id, spec, bind, rm } => {
            cmd_vm::port(&id, spec.as_deref(), bind.as_deref(), rm).map(|_| 0)
        }
        Cmd::Logs { id } => cmd_vm::logs(&id).map(|_| 0),
        Cmd::Inspect { id } => cmd_vm::inspect(&id).map(|_| 0),
        Cmd::Env {
            id,
            set,
            unset,
            clear,
        } => cmd_vm::env(&id, &set, &unset, clear).map(|_| 0),
        Cmd::Gc { json } => cmd_vm::gc(json).map(|_| 0),
        Cmd::Image { cmd } => cmd_image::run(cmd).map(|_| 0),
        Cmd::Doctor => doctor::run(),
        Cmd::Bench { cmd } => bench::run(cmd).map(|_| 0),
    };
    match res {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("smolvm: {e:#}");
            ExitCode::from(exit_code_for(&e))
        }
    }
}

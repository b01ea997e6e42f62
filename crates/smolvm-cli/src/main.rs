//! `smolvm`: run untrusted code in microVMs from the shell.
//!
//! Exit codes: 0 ok, 1 failure (or the command's own code for `run`/`exec`), 2 bad usage,
//! 3 VM not found.

mod agent_bin;
mod bench;
mod cmd_image;
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

/// Resource and image options shared by `run` and `create`.
#[derive(Args, Clone)]
pub struct VmArgs {
    /// Number of vCPUs (1-32).
    #[arg(long, default_value_t = smolvm::config::DEFAULT_VCPUS)]
    pub cpus: u32,
    /// Memory in MiB (128-16384).
    #[arg(long, default_value_t = smolvm::config::DEFAULT_MEM_MIB)]
    pub memory: u32,
    /// Image to boot (see `smolvm image ls`).
    #[arg(long, default_value = smolvm::config::DEFAULT_IMAGE)]
    pub image: String,
    /// Network mode: none or user (QEMU user-mode NAT).
    #[arg(long, default_value = "none")]
    pub network: String,
    /// Extra kernel command-line arguments.
    #[arg(long)]
    pub boot_args: Option<String>,
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
    /// Create a VM (recorded, not started).
    Create {
        /// The VM's id (lowercase letters, digits, '-'); generated when absent.
        #[arg(long)]
        name: Option<String>,
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
    /// Run a command in a running VM.
    Exec {
        /// VM id.
        id: String,
        #[command(flatten)]
        exec: ExecArgs,
    },
    /// Stop a VM.
    Stop {
        /// VM id.
        id: String,
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
    /// Print a VM's guest console log.
    Logs {
        /// VM id.
        id: String,
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
        Cmd::Create { name, vm, no_start } => cmd_vm::create(name, &vm, no_start).map(|_| 0),
        Cmd::Start { id } => cmd_vm::start(&id).map(|_| 0),
        Cmd::Exec { id, exec } => cmd_vm::exec(&id, &exec),
        Cmd::Stop { id } => cmd_vm::stop(&id).map(|_| 0),
        Cmd::Rm { ids, force } => cmd_vm::rm(&ids, force).map(|_| 0),
        Cmd::Ls { json } => cmd_vm::ls(json).map(|_| 0),
        Cmd::Logs { id } => cmd_vm::logs(&id).map(|_| 0),
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

//! `smolvm-agent`: the guest side of smolvm.
//!
//! As PID 1 (`/init` of the guest's initramfs) it loads the virtio drivers, mounts the root
//! disk, switches into it, forks the server and stays on as the reaper. The server speaks
//! `smolvm-protocol` over yamux on the virtio-serial port `org.smolvm.agent`. With
//! `--listen-unix PATH` it serves the same protocol on a Unix socket and does nothing else,
//! so the host side can be tested without a VM.
//!
//! Besides running commands it keeps the guest's persistent environment (`env.rs`), shuts the
//! guest down cleanly on request (`shutdown.rs`) and, at boot, grows the root filesystem to
//! fill its disk (`grow.rs`) and starts `sshd` in SSH images (`sshd.rs`).

mod cli;
mod cmdline;
mod env;
mod error;
mod exec;
mod grow;
mod handshake;
mod init;
mod logging;
mod modules;
mod mounts;
mod mux;
mod net;
mod port;
mod reaper;
mod request;
mod server;
mod shutdown;
mod spawn;
mod splitter;
mod sshd;

use cli::{Invocation, Mode};
use server::{Endpoint, ServerConfig};
use shutdown::OnShutdown;

fn main() {
    let is_pid1 = std::process::id() == 1;
    let opts = match cli::parse(std::env::args_os().skip(1), is_pid1) {
        Ok(Invocation::Run(opts)) => opts,
        Ok(Invocation::Help) => {
            println!("{}", cli::USAGE);
            return;
        }
        Ok(Invocation::Version) => {
            println!("smolvm-agent {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        Err(e) => {
            eprintln!("smolvm-agent: {e}");
            std::process::exit(2);
        }
    };
    let endpoint = match &opts.mode {
        Mode::Init => init::run(&opts),
        Mode::Serve { port } => Endpoint::Port(port.clone()),
        Mode::ListenUnix(path) => Endpoint::Unix(path.clone()),
    };
    let env_log = std::env::var("SMOLVM_AGENT_LOG").ok();
    logging::init(opts.log.as_deref().or(env_log.as_deref()));
    // Not under our PID 1 (that path never gets here): a Shutdown request ends this process.
    let cfg = ServerConfig {
        apply_identity: opts.apply_identity,
        state_root: opts.state_root.clone(),
        on_shutdown: OnShutdown::Exit,
    };
    std::process::exit(server::run(endpoint, cfg));
}

//! A running QEMU: the process, its monitor (QMP) and the sockets it connects to.

use std::path::Path;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};

use super::migrate;
use super::qmp::Qmp;
use super::QemuMicrovm;
use crate::error::{io_err, Error, Result};
use crate::hypervisor::{
    log_tail, Endpoints, ExitSignal, LaunchSpec, MonitorProcess, RestoreFrom, SavedRam, Vmm,
};

/// Longest QEMU may take to connect each of its sockets, and to answer the monitor's greeting.
const CONNECT: Duration = Duration::from_secs(10);
/// Longest QEMU may take to act on `quit` before it is killed.
const QUIT: Duration = Duration::from_secs(2);

/// One QEMU process and the host's ends of its sockets.
pub struct QemuVmm {
    process: MonitorProcess,
    agent_l: UnixListener,
    console_l: UnixListener,
    qmp_l: UnixListener,
    qmp: Option<Qmp>,
    console_log: std::path::PathBuf,
    log: std::path::PathBuf,
}

fn bind(path: &Path) -> Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(io_err(format!("listening on {}", path.display())))
}

async fn accept(l: &UnixListener, what: &str) -> Result<UnixStream> {
    match tokio::time::timeout(CONNECT, l.accept()).await {
        Ok(Ok((s, _))) => Ok(s),
        Ok(Err(e)) => Err(io_err(format!("accepting QEMU's {what} connection"))(e)),
        Err(_) => Err(Error::Timeout {
            what: format!("QEMU to connect its {what}"),
            secs: Some(CONNECT.as_secs_f64()),
        }),
    }
}

impl QemuVmm {
    fn qmp(&mut self) -> Result<&mut Qmp> {
        self.qmp
            .as_mut()
            .ok_or_else(|| Error::Qmp("the monitor is not connected yet".into()))
    }
}

impl Vmm for QemuVmm {
    const NAME: &'static str = "qemu-microvm";

    fn launch(spec: &LaunchSpec, ep: &Endpoints) -> Result<QemuVmm> {
        if spec.accelerator == crate::hypervisor::Accelerator::None {
            return Err(Error::StartFailed {
                id: spec.id.clone(),
                reason: "QEMU needs an accelerator (kvm or tcg); the spec names none".into(),
            });
        }
        let args = QemuMicrovm::checked_args(spec, ep)?;
        // QEMU connects to the host's sockets: they listen before it starts.
        let agent_l = bind(&ep.agent)?;
        let console_l = bind(&ep.console)?;
        let qmp_l = bind(&ep.control)?;
        let mut cmd = std::process::Command::new(QemuMicrovm::binary()?);
        cmd.args(args);
        let process = MonitorProcess::spawn(cmd, &ep.log, "QEMU")?;
        Ok(QemuVmm {
            process,
            agent_l,
            console_l,
            qmp_l,
            qmp: None,
            console_log: ep.console_log.clone(),
            log: ep.log.clone(),
        })
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    async fn connect(&mut self) -> Result<()> {
        let console = accept(&self.console_l, "serial console").await?;
        tokio::spawn(crate::supervisor::console::capture(
            console,
            self.console_log.clone(),
        ));
        let stream = accept(&self.qmp_l, "monitor").await?;
        self.qmp = Some(Qmp::negotiate(stream, CONNECT).await?);
        Ok(())
    }

    async fn load(&mut self, from: &RestoreFrom) -> Result<()> {
        let qmp = self.qmp()?;
        if from.ram.is_some() {
            // RAM is the mapped template file; the stream holds the devices only.
            migrate::ignore_shared_ram(qmp, true).await?;
            migrate::start_load(qmp, &from.memory).await?;
        }
        // (Without a RAM file, QEMU was started with `-incoming file:...` and is loading.)
        migrate::await_load(qmp).await
    }

    async fn agent(&mut self) -> Result<UnixStream> {
        accept(&self.agent_l, "agent port").await
    }

    async fn pause(&mut self) -> Result<()> {
        migrate::pause(self.qmp()?).await
    }

    async fn resume(&mut self) -> Result<()> {
        migrate::resume(self.qmp()?).await
    }

    async fn save(&mut self, memory: &Path, ram: SavedRam) -> Result<()> {
        let qmp = self.qmp()?;
        migrate::ignore_shared_ram(qmp, ram == SavedRam::InSharedFile).await?;
        migrate::save(qmp, memory).await
    }

    fn exit_signal(&self) -> ExitSignal {
        self.process.exit_signal()
    }

    async fn quit(&mut self) {
        if self.process.exit_signal().ended().is_some() {
            return;
        }
        if let Some(qmp) = self.qmp.as_mut() {
            let _ = qmp.execute("quit", None, Duration::from_millis(500)).await;
        }
        if !self.process.ended_within(QUIT).await {
            self.process.kill().await;
        }
    }

    async fn kill(&mut self) {
        self.process.kill().await;
    }

    fn last_words(&self) -> String {
        log_tail(&self.log, 6)
    }
}

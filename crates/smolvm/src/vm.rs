//! The public Rust API: a [`Runtime`] creates and finds VMs; a [`Vm`] is a handle on one.
//! Handles are cheap; dropping one leaves the VM running (its supervisor owns it).

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use smolvm_protocol::HelloReply;

use crate::client::{ApiClient, OutputStream};
use crate::config::{generate_id, VmConfig};
use crate::error::{io_err, Error, Result};
use crate::exec::{ExecOptions, ExecOutput};
use crate::hypervisor::{detect_accelerator, Accelerator, LaunchSpec};
use crate::paths::{create_private_dir, Paths};
use crate::store::{Store, VmRecord, VmState};
use crate::supervisor::{files, StartupEvent};

struct Inner {
    paths: Paths,
    store: Mutex<Store>,
}

/// Entry point of the API: owns the state database and paths.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

/// How long each start phase took.
#[derive(Debug, Clone, Serialize)]
pub struct StartTimings {
    /// From the start call until QEMU was running.
    pub create_start: Duration,
    /// From the start call until the agent handshake completed.
    pub ready: Duration,
    /// Accelerator the VM runs on.
    pub accelerator: Accelerator,
    /// The agent's handshake answer.
    pub guest: HelloReply,
}

/// A VM as listed, with its state reconciled against the running processes.
#[derive(Debug, Clone, Serialize)]
pub struct VmInfo {
    /// The stored record, state reconciled.
    #[serde(flatten)]
    pub record: VmRecord,
}

/// A handle on one VM.
#[derive(Clone)]
pub struct Vm {
    rt: Runtime,
    id: String,
    dir: PathBuf,
}

impl Runtime {
    /// Opens the runtime with paths from the environment (see [`Paths::from_env`]).
    pub fn open() -> Result<Runtime> {
        Self::with_paths(Paths::from_env())
    }

    /// Opens the runtime with explicit paths.
    pub fn with_paths(paths: Paths) -> Result<Runtime> {
        paths.ensure()?;
        let store = Store::open(&paths.db_path())?;
        Ok(Runtime {
            inner: Arc::new(Inner {
                paths,
                store: Mutex::new(store),
            }),
        })
    }

    /// The paths in use.
    pub fn paths(&self) -> &Paths {
        &self.inner.paths
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        // A panic while holding the lock cannot leave SQLite inconsistent; keep going.
        self.inner
            .store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Validates `config` and records a new VM with its own disk. Nothing is created when
    /// the config or the image is bad.
    pub fn create(&self, config: VmConfig) -> Result<Vm> {
        config.validate()?;
        let image = smolvm_image::open(&self.paths().images_dir, &config.image)?;
        let explicit = config.vm_id.is_some();
        let mut attempt = 0;
        let (id, dir) = loop {
            let id = config.vm_id.clone().unwrap_or_else(generate_id);
            let dir = self.paths().vm_dir(&id);
            let mut cfg = config.clone();
            cfg.vm_id = Some(id.clone());
            let rec = VmRecord {
                id: id.clone(),
                state: VmState::Created,
                config: cfg,
                dir: dir.display().to_string(),
                supervisor_pid: None,
                qemu_pid: None,
                accelerator: None,
                error: None,
                created_at: crate::util::now_unix(),
                started_at: None,
            };
            match self.store().insert(&rec) {
                Ok(()) => break (id, dir),
                Err(Error::VmExists(_)) if !explicit && attempt < 5 => attempt += 1,
                Err(e) => return Err(e),
            }
        };
        let vm = Vm {
            rt: self.clone(),
            id: id.clone(),
            dir: dir.clone(),
        };
        let made = (|| {
            let sock = dir.join(files::API_SOCK);
            if sock.as_os_str().len() > 100 {
                return Err(Error::InvalidConfig {
                    field: "SMOLVM_HOME",
                    value: self.paths().state_dir.display().to_string(),
                    allowed:
                        "a shorter state directory (Unix socket paths are limited to 107 bytes)"
                            .into(),
                });
            }
            create_private_dir(&dir)?;
            crate::disk::create_overlay(&image.rootfs, &dir.join("disk.qcow2"))
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&dir);
            let _ = self.store().delete(&id);
            return Err(e);
        }
        Ok(vm)
    }

    /// A handle on an existing VM.
    pub fn get(&self, id: &str) -> Result<Vm> {
        let rec = self
            .store()
            .get(id)?
            .ok_or_else(|| Error::VmNotFound(id.to_string()))?;
        Ok(Vm {
            rt: self.clone(),
            id: rec.id,
            dir: PathBuf::from(rec.dir),
        })
    }

    /// Every VM, with states reconciled against reality (a dead supervisor is an error,
    /// never "running").
    pub fn list(&self) -> Result<Vec<VmInfo>> {
        let records = self.store().list()?;
        Ok(records
            .into_iter()
            .map(|r| VmInfo {
                record: self.reconcile(r),
            })
            .collect())
    }

    fn reconcile(&self, mut r: VmRecord) -> VmRecord {
        if r.state == VmState::Running {
            let sup_alive = r.supervisor_pid.is_some_and(crate::util::pid_alive);
            if !sup_alive {
                let why = format!(
                    "its supervisor (pid {}) is gone",
                    r.supervisor_pid.unwrap_or(0)
                );
                let _ = self.store().set_state(&r.id, VmState::Error, Some(&why));
                r.state = VmState::Error;
                r.error = Some(why);
            }
        }
        r
    }
}

impl Vm {
    /// The VM's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The VM's private directory.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The VM's record, state reconciled.
    pub fn info(&self) -> Result<VmRecord> {
        let rec = self
            .rt
            .store()
            .get(&self.id)?
            .ok_or_else(|| Error::VmNotFound(self.id.clone()))?;
        Ok(self.rt.reconcile(rec))
    }

    /// Path of the guest's console log.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join(files::CONSOLE_LOG)
    }

    fn client(&self) -> ApiClient {
        ApiClient::new(&self.id, &self.dir.join(files::API_SOCK))
    }

    /// Boots the VM and waits until its agent answers.
    pub fn start(&self) -> Result<StartTimings> {
        let t0 = Instant::now();
        let rec = self.info()?;
        if rec.state == VmState::Running {
            return Err(Error::BadState {
                id: self.id.clone(),
                state: "running".into(),
                hint: "it is already started".into(),
            });
        }
        let image = smolvm_image::open(&self.rt.paths().images_dir, &rec.config.image)?;
        let accel = detect_accelerator();
        let ready_timeout_secs = std::env::var("SMOLVM_READY_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(match accel.accelerator {
                Accelerator::Kvm => 30,
                Accelerator::Tcg => 120,
            });
        let spec = LaunchSpec {
            id: self.id.clone(),
            vcpus: rec.config.vcpu_count,
            mem_mib: rec.config.mem_size_mib,
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            disk: self.dir.join("disk.qcow2"),
            disk_format: "qcow2".into(),
            extra_boot_args: rec.config.boot_args.clone(),
            network: rec.config.network,
            accelerator: accel.accelerator,
            tsc_khz: accel.tsc_khz,
            db_path: self.rt.paths().db_path(),
            ready_timeout_secs,
        };
        let spec_json = serde_json::to_vec_pretty(&spec).unwrap_or_default();
        std::fs::write(self.dir.join(files::SPEC), spec_json).map_err(io_err(format!(
            "writing {}",
            self.dir.join(files::SPEC).display()
        )))?;
        // A fresh console log per boot.
        let _ = std::fs::remove_file(self.console_log());

        let bin = crate::supervisor::supervisor_binary()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(files::SUPERVISOR_LOG))
            .map_err(io_err("opening supervisor.log"))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("__supervise")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        // SAFETY: setsid is async-signal-safe. The supervisor gets its own session so a
        // Ctrl-C in the caller's terminal does not reach it.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(io_err(format!("starting the supervisor {}", bin.display())))?;
        let sup_pid = child.id();
        let stdout = child.stdout.take();
        // Reap the supervisor whenever it ends, so no zombie outlives it.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        let (tx, rx) = mpsc::channel::<StartupEvent>();
        if let Some(out) = stdout {
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out)
                    .lines()
                    .map_while(|l| l.ok())
                    .take(16)
                {
                    if let Ok(ev) = serde_json::from_str::<StartupEvent>(&line) {
                        if tx.send(ev).is_err() {
                            break;
                        }
                    }
                }
            });
        }
        let deadline = t0 + Duration::from_secs(ready_timeout_secs + 30);
        let mut create_start = None;
        let fail = |reason: String| {
            // SAFETY: plain kill(2) of our own child's pid.
            unsafe {
                libc::kill(sup_pid as i32, libc::SIGKILL);
            }
            let _ = self
                .rt
                .store()
                .set_state(&self.id, VmState::Error, Some(&reason));
            reason
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(StartupEvent::Started { .. }) => create_start = Some(t0.elapsed()),
                Ok(StartupEvent::Ready { hello }) => {
                    let ready = t0.elapsed();
                    return Ok(StartTimings {
                        create_start: create_start.unwrap_or(ready),
                        ready,
                        accelerator: accel.accelerator,
                        guest: hello,
                    });
                }
                Ok(StartupEvent::Failed { reason }) => {
                    let reason = fail(reason);
                    return Err(Error::StartFailed {
                        id: self.id.clone(),
                        reason,
                    });
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    fail("timed out waiting for the supervisor".into());
                    return Err(Error::ReadyTimeout {
                        id: self.id.clone(),
                        secs: ready_timeout_secs,
                        accel: accel.accelerator.to_string(),
                        console: self.console_log(),
                    });
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let tail = std::fs::read_to_string(self.dir.join(files::SUPERVISOR_LOG))
                        .unwrap_or_default()
                        .lines()
                        .rev()
                        .take(5)
                        .collect::<Vec<_>>()
                        .join(" | ");
                    let reason = fail(format!(
                        "the supervisor exited before the VM was ready: {tail}"
                    ));
                    return Err(Error::StartFailed {
                        id: self.id.clone(),
                        reason,
                    });
                }
            }
        }
    }

    fn require_running(&self) -> Result<()> {
        let rec = self.info()?;
        if rec.state != VmState::Running {
            return Err(Error::BadState {
                id: self.id.clone(),
                state: rec.state.to_string(),
                hint: match rec.error {
                    Some(e) => format!("{e}; start it again with `smolvm start {}`", self.id),
                    None => format!("start it with `smolvm start {}`", self.id),
                },
            });
        }
        Ok(())
    }

    /// Runs a command and collects its output (each stream capped at
    /// `opts.max_output_bytes`; the result says when it was cut).
    pub fn exec(&self, opts: &ExecOptions) -> Result<ExecOutput> {
        let cap = opts.max_output_bytes as usize;
        let mut out = ExecOutput::default();
        let (mut so, mut se) = (Vec::new(), Vec::new());
        let (mut so_cut, mut se_cut) = (false, false);
        let res = self.exec_streaming(opts, &mut |stream, data| {
            let (buf, cut) = match stream {
                OutputStream::Stdout => (&mut so, &mut so_cut),
                OutputStream::Stderr => (&mut se, &mut se_cut),
            };
            let room = cap.saturating_sub(buf.len());
            if data.len() > room {
                *cut = true;
            }
            buf.extend_from_slice(&data[..data.len().min(room)]);
        })?;
        out.exit_code = res.exit_code;
        out.signal = res.signal;
        out.timed_out = res.timed_out;
        out.duration = res.duration;
        out.stdout_truncated = res.stdout_truncated || so_cut;
        out.stderr_truncated = res.stderr_truncated || se_cut;
        out.stdout = so;
        out.stderr = se;
        Ok(out)
    }

    /// Runs a command, handing output chunks to `sink` as they arrive; the returned output
    /// has empty buffers.
    pub fn exec_streaming(
        &self,
        opts: &ExecOptions,
        sink: &mut dyn FnMut(OutputStream, &[u8]),
    ) -> Result<ExecOutput> {
        opts.validate()?;
        self.require_running()?;
        let t0 = Instant::now();
        let stdin: Option<Box<dyn std::io::Read + Send>> = opts
            .stdin
            .clone()
            .map(|d| Box::new(std::io::Cursor::new(d)) as Box<dyn std::io::Read + Send>);
        // The agent enforces the timeout; allow generous slack before giving up on it.
        let deadline = opts.timeout.map(|t| t + Duration::from_secs(30));
        let st = self
            .client()
            .exec(opts.to_request(), stdin, deadline, sink)?;
        Ok(ExecOutput {
            exit_code: st.code,
            signal: st.signal,
            timed_out: st.timed_out,
            stdout_truncated: st.stdout_truncated,
            stderr_truncated: st.stderr_truncated,
            duration: t0.elapsed(),
            ..Default::default()
        })
    }

    /// Stops the VM (flushing the guest's disks first when `graceful`). Stopping a VM that
    /// is not running is not an error.
    pub fn stop(&self, graceful: bool) -> Result<()> {
        let rec = self.info()?;
        let grace = if graceful {
            Duration::from_secs(3)
        } else {
            Duration::ZERO
        };
        if rec.state == VmState::Running && self.client().stop(grace).is_ok() {
            return Ok(());
        }
        // The supervisor is unreachable: make sure nothing of the VM survives.
        for pid in [rec.supervisor_pid, rec.qemu_pid].into_iter().flatten() {
            if crate::util::pid_alive(pid) {
                // SAFETY: plain kill(2).
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
        }
        if matches!(rec.state, VmState::Running | VmState::Error) {
            self.rt
                .store()
                .set_state(&self.id, VmState::Stopped, rec.error.as_deref())?;
        }
        Ok(())
    }

    /// Stops the VM and removes everything of it: processes, sockets, disk, row.
    pub fn delete(&self) -> Result<()> {
        self.stop(false)?;
        if self.dir.starts_with(self.rt.paths().vms_dir()) {
            std::fs::remove_dir_all(&self.dir)
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(io_err(format!("removing {}", self.dir.display())))?;
        }
        self.rt.store().delete(&self.id)
    }
}

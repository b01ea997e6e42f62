//! The public Rust API: a [`Runtime`] creates and finds VMs; a [`Vm`] is a handle on one.
//! Handles are cheap; dropping one leaves the VM running (its supervisor owns it).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use smolvm_protocol::HelloReply;

use std::collections::BTreeMap;

use smolvm_protocol::EnvUpdate;

use crate::client::{ApiClient, OutputStream};
use crate::config::{
    generate_id, validate_env, validate_env_name, DiskMode, NetworkMode, VmConfig,
};
use crate::disk::{self, OVERLAY_NAME};
use crate::error::{Error, Result};
use crate::exec::{ExecOptions, ExecOutput};
use crate::hypervisor::{Accelerator, LaunchSpec};
use crate::paths::{create_private_dir, Paths};
use crate::store::{Base, Owner, Store, VmRecord, VmState};
use crate::supervisor::files;
use crate::supervisor::spawn::LaunchError;

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
    /// The VM was already running; nothing was started.
    pub already_running: bool,
    /// The saved state it resumed from, if it did not boot cold.
    pub restored: Option<Base>,
}

/// What a VM boots: kernel, initramfs and the base its disk is made from.
pub(crate) struct BootFiles {
    pub(crate) kernel: PathBuf,
    pub(crate) initrd: PathBuf,
    pub(crate) base: Option<PathBuf>,
    /// The image lets several running VMs write one disk (marker file `shareable`).
    shareable: bool,
}

/// A VM as listed, with its state reconciled against the running processes.
#[derive(Debug, Clone, Serialize)]
pub struct VmInfo {
    /// The stored record, state reconciled.
    #[serde(flatten)]
    pub record: VmRecord,
    /// Its recorded port forwards.
    pub forwards: Vec<crate::forward::ForwardInfo>,
}

/// A handle on one VM.
#[derive(Clone)]
pub struct Vm {
    pub(crate) rt: Runtime,
    id: String,
    dir: PathBuf,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .finish()
    }
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

    pub(crate) fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        // A panic while holding the lock cannot leave SQLite inconsistent; keep going.
        self.inner
            .store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Validates `config` and records a new VM with its own disk. Nothing is created when
    /// the config or the image is bad.
    pub fn create(&self, config: VmConfig) -> Result<Vm> {
        self.create_with_owner(config, None)
    }

    /// Like [`Runtime::create`], but the VM belongs to this process: when the process dies
    /// (however it dies), the VM's supervisor stops and deletes it.
    pub fn create_ephemeral(&self, config: VmConfig) -> Result<Vm> {
        self.create_with_owner(config, Owner::current())
    }

    /// Creates a VM (belonging to `owner`, if any: see [`Runtime::create_ephemeral`]) and
    /// starts it; a VM that does not start is deleted, so an error leaves nothing.
    pub fn create_started(
        &self,
        config: VmConfig,
        owner: Option<Owner>,
    ) -> Result<(Vm, StartTimings)> {
        start_or_delete(self.create_with_owner(config, owner)?)
    }

    pub(crate) fn boot_files(&self, config: &VmConfig) -> Result<BootFiles> {
        let explicit = config.kernel_path.is_some()
            && config.initrd_path.is_some()
            && (config.rootfs_path.is_some() || config.disk_path.is_some());
        let image = if explicit {
            None
        } else {
            Some(smolvm_image::open(&self.paths().images_dir, &config.image)?)
        };
        let kernel = match (&config.kernel_path, &image) {
            (Some(k), _) => k.clone(),
            (None, Some(i)) => i.kernel.clone(),
            (None, None) => unreachable_config("kernel_path")?,
        };
        // A kernel from an image directory goes with that image's initramfs (its modules
        // match that kernel).
        let sibling_initrd = config
            .kernel_path
            .as_ref()
            .and_then(|k| k.parent())
            .filter(|d| d.join("manifest.json").is_file())
            .map(|d| d.join("initrd.cpio"))
            .filter(|p| p.is_file());
        let initrd = match (&config.initrd_path, sibling_initrd, &image) {
            (Some(i), _, _) => i.clone(),
            (None, Some(i), _) => i,
            (None, None, Some(img)) => img.initrd.clone(),
            (None, None, None) => unreachable_config("initrd_path")?,
        };
        let base = config
            .rootfs_path
            .clone()
            .or_else(|| image.as_ref().map(|i| i.rootfs.clone()));
        let shareable = image
            .as_ref()
            .is_some_and(|i| i.dir.join("shareable").is_file());
        Ok(BootFiles {
            kernel,
            initrd,
            base,
            shareable,
        })
    }

    pub(crate) fn create_with_owner(&self, config: VmConfig, owner: Option<Owner>) -> Result<Vm> {
        config.validate()?;
        let config = resolve_network(config)?;
        let boot = self.boot_files(&config)?;
        let explicit = config.vm_id.is_some();
        let mut attempt = 0;
        let (id, dir) = loop {
            let id = config.vm_id.clone().unwrap_or_else(generate_id);
            let dir = self.paths().vm_dir(&id);
            let mut cfg = config.clone();
            cfg.vm_id = Some(id.clone());
            let rec = VmRecord::new(&id, cfg, &dir, owner);
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
            if dir.exists() {
                // Left by a crash between creating it and recording the VM: not ours any more.
                crate::cleanup::kill_vm_processes(&dir);
                crate::cleanup::remove_dir(&dir)?;
            }
            create_private_dir(&dir)?;
            let (disk, format) = self.make_disk(&config, &boot, &dir)?;
            // The format is pinned now, before any guest has written the disk, and never
            // probed again.
            disk::check_chain(&disk, format, &self.disk_roots(&config, &dir))?;
            disk::pin_format(&dir, format)?;
            if !config.env_vars.is_empty() {
                crate::env::add_pending(&dir, crate::env::set_update(&config.env_vars, true))?;
            }
            if config.network == NetworkMode::Nat {
                self.store().allocate_address(&id)?;
            }
            self.store().set_disk(&id, &disk)
        })();
        if let Err(e) = made {
            let _ = crate::cleanup::remove_dir(&dir);
            let _ = self.store().delete(&id);
            return Err(e);
        }
        Ok(vm)
    }

    /// Where the files a VM's disk builds on may lie: its own directory, smolvm's saved
    /// states, shared and retained disks, the image store, and the files its config names.
    pub(crate) fn disk_roots(&self, config: &VmConfig, dir: &std::path::Path) -> Vec<PathBuf> {
        let mut roots = vec![
            dir.to_path_buf(),
            self.paths().images_dir.clone(),
            self.paths().disks_dir(),
            crate::snapshot::snapshots_dir(self.paths()),
        ];
        roots.extend(config.rootfs_path.clone());
        roots.extend(config.disk_path.clone());
        roots
    }

    /// The VM's root disk and its format: an existing one (its format read now, once), the
    /// image's shared one, or a new overlay.
    fn make_disk(
        &self,
        config: &VmConfig,
        boot: &BootFiles,
        dir: &std::path::Path,
    ) -> Result<(PathBuf, disk::DiskFormat)> {
        let absolute = |field: &'static str, p: &PathBuf| {
            std::fs::canonicalize(p).map_err(|e| Error::InvalidConfig {
                field,
                value: p.display().to_string(),
                allowed: format!("a path to an existing file ({e})"),
            })
        };
        let adopted = |field: &'static str, p: &PathBuf| -> Result<(PathBuf, disk::DiskFormat)> {
            let p = absolute(field, p)?;
            let format = disk::detect_format(&p)?;
            Ok((p, format))
        };
        if let Some(p) = &config.disk_path {
            return adopted("disk_path", p);
        }
        let base = boot.base.as_ref().ok_or_else(|| {
            Error::Disk("no root filesystem: give rootfs_path or an image".into())
        })?;
        match config.disk_mode {
            DiskMode::Shared => match &config.rootfs_path {
                Some(p) => {
                    let (p, format) = adopted("rootfs_path", p)?;
                    // An image's root file system is the read-only base of every VM and
                    // template of it: no guest may write it.
                    if std::fs::canonicalize(&self.paths().images_dir)
                        .is_ok_and(|images| p.starts_with(images))
                    {
                        return Err(Error::InvalidConfig {
                            field: "rootfs_path",
                            value: p.display().to_string(),
                            allowed: "with disk_mode shared, a file outside the image store \
                                      (an image's root file system is never written; leave \
                                      rootfs_path out to share the image's own writable disk)"
                                .into(),
                        });
                    }
                    Ok((p, format))
                }
                None => Ok((
                    disk::shared_disk(&self.paths().disks_dir(), &config.image, base)?,
                    disk::DiskFormat::Qcow2,
                )),
            },
            DiskMode::Isolated => {
                let overlay = dir.join(OVERLAY_NAME);
                let mut base = absolute("rootfs_path", base)?;
                if config.rootfs_path.is_none() {
                    // The VM's own link to its image's root file system: rebuilding or
                    // removing the image leaves this VM's disk as it was.
                    base = disk::link_backing(&base, dir, disk::ROOTFS_LINK);
                } else {
                    let format = disk::detect_format(&base)?;
                    disk::check_chain(&base, format, &self.disk_roots(config, dir))?;
                }
                disk::create_overlay(&base, &overlay, config.disk_size_mib)?;
                Ok((overlay, disk::DiskFormat::Qcow2))
            }
        }
    }

    /// A handle on an existing VM (also on one whose record does not read: it can still
    /// be deleted).
    pub fn get(&self, id: &str) -> Result<Vm> {
        let dir = self
            .store()
            .locate(id)?
            .ok_or_else(|| Error::VmNotFound(id.to_string()))?;
        Ok(Vm {
            rt: self.clone(),
            id: id.to_string(),
            dir,
        })
    }

    /// Runs `f` with the state database.
    pub(crate) fn with_store<T>(&self, f: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
        f(&self.store())
    }

    /// Every VM whose record reads, with states reconciled against reality (a dead
    /// supervisor is an error, never "running"). A VM whose record does not read is left
    /// out (with a warning in the log); [`Runtime::list_all`] names them.
    pub fn list(&self) -> Result<Vec<VmInfo>> {
        let (vms, corrupt) = self.list_all()?;
        for e in corrupt {
            tracing::warn!("{e}");
        }
        Ok(vms)
    }

    /// [`Runtime::list`], and apart an [`Error::CorruptRecord`] for each VM whose record
    /// does not read (`smolvm rm ID` removes such a VM: [`Vm::delete`] works on it).
    pub fn list_all(&self) -> Result<(Vec<VmInfo>, Vec<Error>)> {
        let (records, corrupt) = self.store().list()?;
        let mut forwards = self.forwards_by_vm()?;
        let vms = records
            .into_iter()
            .map(|r| VmInfo {
                forwards: forwards.remove(&r.id).unwrap_or_default(),
                record: self.reconcile(r),
            })
            .collect();
        Ok((vms, corrupt.iter().map(|c| c.error()).collect()))
    }

    fn reconcile(&self, mut r: VmRecord) -> VmRecord {
        if r.state.is_live() && !crate::supervisor::is_running(&r.dir) {
            let why = format!(
                "its supervisor (pid {}) is gone; `smolvm gc` cleans up, `smolvm start {}` boots it again",
                r.supervisor_pid.unwrap_or(0),
                r.id
            );
            // Only if nothing changed meanwhile (a supervisor that just stopped cleanly
            // recorded `stopped` before letting go of its lock).
            if let Ok(true) = self.store().mark_lost(&r.id, r.supervisor_pid, &why) {
                r.state = VmState::Error;
                r.error = Some(why);
                r.supervisor_pid = None;
                r.qemu_pid = None;
            } else if let Ok(Some(now)) = self.store().get(&r.id) {
                r = now;
            }
        }
        r
    }
}

/// What [`Vm::remove`] left: the removed VM's base, and its disk if retained.
struct Removed {
    base: Option<Base>,
    kept: Option<PathBuf>,
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

    /// The VM's network: mode, address, egress policy and its nftables rules.
    pub fn network_info(&self) -> Result<crate::network::NetworkInfo> {
        let rec = self.info()?;
        let addr = self.rt.store().address_of(&self.id)?;
        crate::network::NetworkInfo::new(&rec.config, addr)
    }

    /// Path of the guest's console log.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join(files::CONSOLE_LOG)
    }

    pub(crate) fn client(&self) -> ApiClient {
        ApiClient::new(&self.id, &self.dir.join(files::API_SOCK))
    }

    /// Boots the VM and waits until its agent answers. Starting a running VM does nothing
    /// (the timings say `already_running`).
    pub fn start(&self) -> Result<StartTimings> {
        match self.start_from(true) {
            Ok(t) => Ok(t),
            Err(StartError::Plain(e)) => Err(e),
            // A template that does not resume is dropped (made again on next use) and this
            // VM boots cold instead.
            Err(StartError::Template(point, reason)) => {
                tracing::warn!(id = %self.id, %reason, "the template did not resume; booting cold");
                // The VM's lock is held while its disk is put back (once the failed
                // supervisor let go of it), so `gc` takes the `qemu-img` doing it for no
                // stray.
                let held = crate::supervisor::lock_within(&self.dir, TEMPLATE_SUPERVISOR_EXIT)?
                    .ok_or_else(|| Error::BadState {
                        id: self.id.clone(),
                        state: "starting".into(),
                        hint: "the supervisor of its failed resume did not exit; try again".into(),
                    })?;
                self.abandon_template(&point)?;
                drop(held);
                self.start_from(false).map_err(StartError::into_error)
            }
        }
    }

    fn start_from(&self, allow_saved: bool) -> std::result::Result<StartTimings, StartError> {
        let t0 = Instant::now();
        let rec = self.info()?;
        // Take the VM's lock now and hand it to the supervisor, so it is held without a gap
        // from here to the supervisor's exit: two starts cannot race, and `gc` never
        // mistakes a VM being started for an orphan.
        let lock = match crate::supervisor::try_lock(&self.dir)? {
            Some(lock) => lock,
            None => {
                if let Some((status, guest)) = self
                    .client()
                    .status()
                    .ok()
                    .and_then(|s| s.guest.clone().map(|g| (s, g)))
                {
                    return Ok(StartTimings {
                        create_start: Duration::ZERO,
                        ready: Duration::ZERO,
                        accelerator: match status.accelerator.as_str() {
                            "kvm" => Accelerator::Kvm,
                            "none" => Accelerator::None,
                            _ => Accelerator::Tcg,
                        },
                        guest,
                        already_running: true,
                        restored: None,
                    });
                }
                // No supervisor answers: held by a start in progress, or for an instant.
                crate::supervisor::lock_within(&self.dir, crate::supervisor::LOCK_RETRY)?
                    .ok_or_else(|| Error::BadState {
                        id: self.id.clone(),
                        state: "starting".into(),
                        hint: "another process is starting it; wait for it to finish".into(),
                    })?
            }
        };
        let boot = self.rt.boot_files(&rec.config)?;
        let disk_path = rec.disk_path.clone();
        if !disk_path.is_file() {
            return Err(Error::Disk(format!(
                "the disk of VM {} ({}) is missing; delete the VM with `smolvm rm {}`",
                self.id,
                disk_path.display(),
                self.id
            ))
            .into());
        }
        let host = crate::launch::Host::detect()?;
        let point = if allow_saved && host.vmm.can_save() {
            self.resume_point(&rec, &boot, &host.accel)?
        } else {
            None
        };
        let nat = if rec.config.network == NetworkMode::Nat {
            let addr = self.rt.store().allocate_address(&self.id)?;
            Some(crate::network::NatPlan::new(&rec.config, addr)?)
        } else {
            None
        };
        let spec = self.launch_spec(&rec, &boot, disk_path, &host, point.as_ref(), nat)?;
        let restored_from = point.as_ref().map(|p| p.base.clone());
        if let Some(net) = &spec.guest_net {
            self.rt.store().set_ip(&self.id, Some(net.addr))?;
        }
        // A fresh console log per boot.
        let _ = std::fs::remove_file(self.console_log());

        let record_error = |reason: &str| {
            let _ = self
                .rt
                .store()
                .set_state(&self.id, VmState::Error, Some(reason));
        };
        match crate::launch::start(&self.dir, &spec, lock, t0) {
            Ok(l) => {
                let ready = t0.elapsed();
                Ok(StartTimings {
                    create_start: l.qemu_started.unwrap_or(ready),
                    ready,
                    accelerator: host.accel.accelerator,
                    guest: l.hello,
                    already_running: false,
                    restored: restored_from,
                })
            }
            Err(LaunchError::Failed(reason)) => match point {
                Some(p) if p.template().is_some() => Err(StartError::Template(Box::new(p), reason)),
                _ => Err(Error::StartFailed {
                    id: self.id.clone(),
                    reason,
                }
                .into()),
            },
            Err(LaunchError::TimedOut) => {
                record_error("timed out waiting for the supervisor");
                Err(Error::ReadyTimeout {
                    id: self.id.clone(),
                    secs: spec.ready_timeout_secs,
                    accel: host.accel.accelerator.to_string(),
                    console: self.console_log(),
                }
                .into())
            }
            Err(LaunchError::Spawn(e)) => Err(e.into()),
            Err(e) => {
                let reason = e.reason();
                record_error(&reason);
                Err(Error::StartFailed {
                    id: self.id.clone(),
                    reason,
                }
                .into())
            }
        }
    }

    /// The launch spec of this VM: its machine, network, and the saved state it resumes.
    fn launch_spec(
        &self,
        rec: &VmRecord,
        boot: &BootFiles,
        disk_path: PathBuf,
        host: &crate::launch::Host,
        point: Option<&crate::snapshot::ops::ResumePoint>,
        nat: Option<crate::network::NatPlan>,
    ) -> Result<LaunchSpec> {
        // Pinned when the disk was made; never probed again (a guest may have written
        // anything onto a raw disk, a qcow2 header included). Its chain stays inside
        // smolvm's directories and the files the VM was given.
        let disk_format = disk::pinned_format(&self.dir, &disk_path)?;
        disk::check_chain(
            &disk_path,
            disk_format,
            &self.rt.disk_roots(&rec.config, &self.dir),
        )?;
        let mut spec = crate::launch::machine(
            &self.id,
            &rec.config,
            (&boot.kernel, &boot.initrd),
            (disk_path, disk_format),
            host,
            (&self.rt.paths().db_path(), &self.rt.paths().state_dir),
        );
        spec.network = rec.config.network;
        spec.lock_disk = !(boot.shareable && rec.config.disk_mode == DiskMode::Shared);
        spec.guest_net = match (&nat, rec.config.network) {
            (Some(n), _) => Some(smolvm_protocol::boot::GuestNet {
                addr: n.addr,
                prefix: 32,
                gateway: crate::network::GATEWAY,
                dns: n.dns.clone(),
                mtu: crate::network::GUEST_MTU,
            }),
            // QEMU's slirp: fixed addresses, the same in every VM.
            (None, NetworkMode::User) => Some(smolvm_protocol::boot::GuestNet::user_mode()),
            _ => None,
        };
        spec.restrict_user_net = rec.config.network == NetworkMode::User
            && rec.config.egress == crate::config::EgressDefault::Deny;
        spec.unplugged_nic =
            point.is_some_and(|p| p.saved.meta.nic) && rec.config.network == NetworkMode::None;
        spec.restore = point.map(|p| crate::hypervisor::RestoreFrom {
            memory: p.saved.memory(),
            cmdline: p.saved.meta.cmdline.clone(),
            ram: p.saved.ram(),
        });
        spec.nat = nat;
        Ok(spec)
    }

    pub(crate) fn require_running(&self) -> Result<()> {
        let rec = self.info()?;
        if rec.state != VmState::Running {
            return Err(Error::BadState {
                id: self.id.clone(),
                state: rec.state.to_string(),
                hint: match rec.error {
                    _ if rec.state == VmState::Paused => {
                        format!("resume it first (`smolvm resume {}`)", self.id)
                    }
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
        self.exec_tee(opts, &mut |_, _| {})
    }

    /// Like [`Vm::exec`], and also hands each output chunk to `sink` as it arrives (for
    /// callers that show output live and still want the result).
    pub fn exec_tee(
        &self,
        opts: &ExecOptions,
        sink: &mut dyn FnMut(OutputStream, &[u8]),
    ) -> Result<ExecOutput> {
        let cap = opts.max_output_bytes as usize;
        let mut out = ExecOutput::default();
        let (mut so, mut se) = (Vec::new(), Vec::new());
        let (mut so_cut, mut se_cut) = (false, false);
        let res = self.exec_streaming(opts, &mut |stream, data| {
            sink(stream, data);
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
        let stdin: Option<Box<dyn std::io::Read + Send>> = opts
            .stdin
            .clone()
            .map(|d| Box::new(std::io::Cursor::new(d)) as Box<dyn std::io::Read + Send>);
        self.exec_io(opts, stdin, sink)
    }

    /// Runs a command whose stdin is streamed from `stdin` (instead of `opts.stdin`).
    pub(crate) fn exec_io(
        &self,
        opts: &ExecOptions,
        stdin: Option<Box<dyn std::io::Read + Send>>,
        sink: &mut dyn FnMut(OutputStream, &[u8]),
    ) -> Result<ExecOutput> {
        opts.validate()?;
        self.require_running()?;
        let t0 = Instant::now();
        // The agent enforces the timeout; allow generous slack before giving up on it.
        let deadline = opts.timeout.map(|t| t + Duration::from_secs(30));
        let mut req = opts.to_request();
        req.stdin = stdin.is_some();
        let st = self
            .client()
            .exec(req, stdin, deadline, opts.cancel.as_ref(), sink)?;
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

    /// Stops the VM. With `graceful`, the guest first shuts down cleanly (processes
    /// ended, disks flushed) within a few seconds; then QEMU is told to quit, then killed.
    /// Stopping a VM that is not running is not an error.
    pub fn stop(&self, graceful: bool) -> Result<()> {
        let rec = self.info()?;
        let grace = if graceful {
            Duration::from_secs(3)
        } else {
            Duration::ZERO
        };
        if crate::supervisor::is_running(&self.dir) && self.client().stop(grace).is_ok() {
            // The supervisor has recorded the stop; wait for it to let go of the VM.
            // ... and to exit, so that when this returns no process of the VM is left.
            let deadline = Instant::now() + Duration::from_secs(5);
            let gone = || {
                !crate::supervisor::is_running(&self.dir)
                    && !rec.supervisor_pid.is_some_and(crate::util::pid_alive)
            };
            while !gone() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if gone() {
                return Ok(());
            }
        }
        // The supervisor is unreachable or stuck: make sure nothing of the VM survives.
        crate::cleanup::kill_vm_processes(&self.dir);
        if let Err(e) = crate::cleanup::remove_network(&self.rt.store(), &self.id) {
            tracing::warn!(id = %self.id, error = %e, "could not remove the VM's network");
        }
        for f in [
            files::API_SOCK,
            files::AGENT_SOCK,
            files::CONSOLE_SOCK,
            files::QMP_SOCK,
        ] {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
        let now = self.info()?;
        if matches!(
            now.state,
            VmState::Running | VmState::Paused | VmState::Error
        ) {
            let reason = now.error.or(rec.error);
            self.rt
                .store()
                .set_state(&self.id, VmState::Stopped, reason.as_deref())?;
        }
        Ok(())
    }

    /// Stops the VM and removes everything of it: processes, sockets, overlay (unless
    /// `retain_disk_on_delete`), row. Returns where the disk was retained, if it was.
    pub fn delete(&self) -> Result<Option<PathBuf>> {
        let removed = self.remove()?;
        if let Some(base) = &removed.base {
            self.rt.release_fork_state(base);
        }
        Ok(removed.kept)
    }

    /// [`Vm::delete`], leaving the saved state the VM was made from even when it was a
    /// fork's and this its last user: a fork removes it itself once all its VMs are made.
    pub(crate) fn delete_keeping_saved_state(&self) -> Result<Option<PathBuf>> {
        Ok(self.remove()?.kept)
    }

    /// Stops the VM and removes it; returns its base and where its disk was retained.
    fn remove(&self) -> Result<Removed> {
        let rec = match self.info() {
            Ok(rec) => rec,
            Err(e @ Error::CorruptRecord { .. }) => return self.purge(&e),
            Err(e) => return Err(e),
        };
        // A disk that is kept must be consistent: shut the guest down cleanly first.
        self.stop(rec.config.retain_disk_on_delete)?;
        // Hold the VM's lock while its files go (`qemu-img` rewrites a disk that is kept):
        // `gc` leaves a locked VM and its processes alone, and no start can begin.
        let _lock = self.dir.is_dir().then(|| {
            crate::supervisor::lock_within(&self.dir, crate::supervisor::LOCK_RETRY)
                .ok()
                .flatten()
        });
        let kept = crate::cleanup::remove_vm(&self.rt.paths().state_dir, &self.rt.store(), &rec)?;
        Ok(Removed {
            base: rec.base,
            kept,
        })
    }

    /// Removes a VM whose record does not read: its processes, network, directory and row.
    /// Its config is unknown, so its disk is not retained.
    fn purge(&self, why: &Error) -> Result<Removed> {
        tracing::warn!(id = %self.id, "removing a VM whose record does not read: {why}");
        crate::cleanup::kill_vm_processes(&self.dir);
        let _lock = self.dir.is_dir().then(|| {
            crate::supervisor::lock_within(&self.dir, crate::supervisor::LOCK_RETRY)
                .ok()
                .flatten()
        });
        let store = self.rt.store();
        crate::cleanup::remove_network(&store, &self.id)?;
        let vms_dir = self.rt.paths().vms_dir();
        if self.dir.starts_with(&vms_dir) && self.dir != vms_dir {
            crate::cleanup::remove_dir(&self.dir)?;
        }
        store.delete(&self.id)?;
        Ok(Removed {
            base: None,
            kept: None,
        })
    }

    /// Makes this VM ephemeral (owned by `owner`: deleted when that process dies) or, with
    /// `None`, persistent.
    pub fn set_owner(&self, owner: Option<Owner>) -> Result<()> {
        if self.rt.store().set_owner(&self.id, owner)? {
            Ok(())
        } else {
            Err(Error::VmNotFound(self.id.clone()))
        }
    }

    /// Sets persistent environment variables: every later command sees them, and login
    /// shells get them from /etc/profile.d/smolvm_env.sh. Without `merge`, every other
    /// variable is removed. Values are passed as data, never through a shell. On a VM that
    /// is not running, the change is applied at its next start. Returns the environment
    /// after the change (empty when the VM is not running).
    pub fn set_env_vars(
        &self,
        vars: &BTreeMap<String, String>,
        merge: bool,
    ) -> Result<BTreeMap<String, String>> {
        validate_env(vars)?;
        self.update_env(crate::env::set_update(vars, merge))
    }

    /// Removes persistent environment variables; returns the environment after the change.
    pub fn unset_env_vars(&self, names: &[String]) -> Result<BTreeMap<String, String>> {
        for n in names {
            validate_env_name(n)?;
        }
        self.update_env(EnvUpdate {
            unset: names.to_vec(),
            ..Default::default()
        })
    }

    /// What the running guest said about itself at its handshake (kernel, agent, clocksource).
    pub fn guest(&self) -> Result<smolvm_protocol::HelloReply> {
        self.require_running()?;
        self.client()
            .status()?
            .guest
            .ok_or_else(|| Error::BadState {
                id: self.id.clone(),
                state: "starting".into(),
                hint: "its agent has not answered yet; try again in a moment".into(),
            })
    }

    /// The persistent environment variables, read from the running guest.
    pub fn env_vars(&self) -> Result<BTreeMap<String, String>> {
        self.require_running()?;
        Ok(self
            .client()
            .env(EnvUpdate::default())?
            .into_iter()
            .collect())
    }

    fn update_env(&self, update: EnvUpdate) -> Result<BTreeMap<String, String>> {
        let rec = self.info()?;
        if rec.state == VmState::Running {
            return Ok(self.client().env(update)?.into_iter().collect());
        }
        crate::env::add_pending(&self.dir, update)?;
        Ok(BTreeMap::new())
    }
}

pub(crate) use crate::launch::ready_timeout_secs;

/// Longest the supervisor of a template that did not resume may take to exit.
const TEMPLATE_SUPERVISOR_EXIT: Duration = Duration::from_secs(5);

/// Starts a VM just made; deletes it when it does not start (the start's error is the one
/// returned).
pub(crate) fn start_or_delete(vm: Vm) -> Result<(Vm, StartTimings)> {
    match vm.start() {
        Ok(t) => Ok((vm, t)),
        Err(e) => {
            if let Err(d) = vm.delete() {
                tracing::warn!(id = %vm.id(), "could not delete the VM that did not start: {d}");
            }
            Err(e)
        }
    }
}

/// Why a start failed: plainly, or because its template did not resume (then the caller
/// boots cold).
enum StartError {
    Plain(Error),
    Template(Box<crate::snapshot::ops::ResumePoint>, String),
}

impl From<Error> for StartError {
    fn from(e: Error) -> Self {
        StartError::Plain(e)
    }
}

impl StartError {
    fn into_error(self) -> Error {
        match self {
            StartError::Plain(e) => e,
            StartError::Template(p, reason) => Error::StartFailed {
                id: p.base.to_string(),
                reason,
            },
        }
    }
}

/// Resolves `auto` networking to `nat` when this process may create TAP devices, else to
/// `user`; refuses `nat` where it cannot work, saying why.
pub(crate) fn resolve_network(mut config: VmConfig) -> Result<VmConfig> {
    // The fake monitor's "guest" is the host: it has no network of its own to give.
    if crate::hypervisor::VmmKind::from_env()? == crate::hypervisor::VmmKind::Fake {
        return match config.network {
            NetworkMode::Auto | NetworkMode::None => {
                config.network = NetworkMode::None;
                Ok(config)
            }
            NetworkMode::Nat | NetworkMode::User => Err(Error::Unsupported(
                "the fake monitor cannot give a VM a network (nat or user): use --network none, \
                 or let QEMU run VMs (unset SMOLVM_VMM)"
                    .into(),
            )),
        };
    }
    match config.network {
        NetworkMode::Auto => {
            config.network = match crate::network::nat_available() {
                Ok(()) => NetworkMode::Nat,
                Err(why) => {
                    tracing::debug!(%why, "nat networking unavailable; using user mode");
                    if !config.allow_egress.is_empty() || !config.deny_egress.is_empty() {
                        return Err(Error::Network(format!(
                            "egress lists need nat networking, which is not available here ({why}); run as root (or with CAP_NET_ADMIN) with nftables installed"
                        )));
                    }
                    NetworkMode::User
                }
            };
        }
        NetworkMode::Nat => {
            if let Err(why) = crate::network::nat_available() {
                return Err(Error::Network(format!(
                    "nat networking is not available here: {why}; use --network user (rootless) or none"
                )));
            }
        }
        NetworkMode::User | NetworkMode::None => {}
    }
    config.validate_egress()?;
    Ok(config)
}

fn unreachable_config<T>(field: &'static str) -> Result<T> {
    Err(Error::InvalidConfig {
        field,
        value: String::new(),
        allowed: "a path, or an image to take it from".into(),
    })
}

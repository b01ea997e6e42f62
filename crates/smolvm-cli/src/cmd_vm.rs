//! VM commands: run, create, start, exec, stop, rm, ls, port, logs.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use smolvm::{ExecOptions, OutputStream, Runtime, Vm, VmConfig};

use crate::table::{self, ms};
use crate::{CreateArgs, ExecArgs, VmArgs};

/// Builds a validated config from flags: the runtime's defaults, with what was given set.
pub fn config_from(c: Option<&CreateArgs>, a: &VmArgs) -> Result<VmConfig> {
    let mut cfg = VmConfig::default();
    if let Some(v) = a.cpus {
        cfg.vcpu_count = v;
    }
    if let Some(v) = a.memory {
        cfg.mem_size_mib = v;
    }
    if let Some(v) = &a.image {
        cfg.image = v.clone();
    }
    if let Some(v) = &a.network {
        cfg.network = v.parse()?;
    }
    if let Some(v) = &a.egress {
        cfg.egress = v.parse()?;
    }
    cfg.snapshot = !a.cold;
    cfg.boot_args = a.boot_args.clone();
    cfg.allow_egress = a.allow.clone();
    cfg.deny_egress = a.deny.clone();
    if let Some(c) = c {
        cfg.vm_id = c.name.clone();
        if let Some(v) = &c.disk_mode {
            cfg.disk_mode = v.parse()?;
        }
        cfg.disk_path = c.disk.clone();
        cfg.disk_size_mib = c.disk_size;
        cfg.retain_disk_on_delete = c.retain_disk;
        cfg.kernel_path = c.kernel.clone();
        cfg.initrd_path = c.initrd.clone();
        cfg.rootfs_path = c.rootfs.clone();
        cfg.env_vars = env_from(&c.env)?;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The flags given with `--from-snapshot`, every one of them, for the runtime to honour
/// or refuse (see [`smolvm::SnapshotOverrides`]).
pub fn overrides_from(c: &CreateArgs, a: &VmArgs) -> Result<smolvm::SnapshotOverrides> {
    let given = |list: &[String]| (!list.is_empty()).then(|| list.to_vec());
    Ok(smolvm::SnapshotOverrides {
        vm_id: c.name.clone(),
        env_vars: env_from(&c.env)?,
        network: a.network.as_deref().map(str::parse).transpose()?,
        egress: a.egress.as_deref().map(str::parse).transpose()?,
        allow_egress: given(&a.allow),
        deny_egress: given(&a.deny),
        retain_disk_on_delete: c.retain_disk.then_some(true),
        vcpu_count: a.cpus,
        mem_size_mib: a.memory,
        image: a.image.clone(),
        boot_args: a.boot_args.clone(),
        kernel_path: c.kernel.clone(),
        initrd_path: c.initrd.clone(),
        rootfs_path: c.rootfs.clone(),
        disk_size_mib: c.disk_size,
        disk_mode: c.disk_mode.as_deref().map(str::parse).transpose()?,
        disk_path: c.disk.clone(),
        snapshot: a.cold.then_some(false),
        owner: None,
    })
}

/// `--env KEY=VALUE` flags as a map.
fn env_from(flags: &[String]) -> Result<std::collections::BTreeMap<String, String>> {
    let mut vars = std::collections::BTreeMap::new();
    for kv in flags {
        let (k, v) = split_kv("--env", kv)?;
        vars.insert(k.to_string(), v.to_string());
    }
    Ok(vars)
}

/// Splits `KEY=VALUE`, or names the flag and what it expects.
fn split_kv<'a>(flag: &'static str, kv: &'a str) -> Result<(&'a str, &'a str)> {
    Ok(kv
        .split_once('=')
        .ok_or_else(|| smolvm::Error::InvalidConfig {
            field: flag,
            value: kv.to_string(),
            allowed: "KEY=VALUE".into(),
        })?)
}

/// Builds exec options from flags.
pub fn exec_options(a: &ExecArgs) -> Result<ExecOptions> {
    let mut o = ExecOptions::argv(a.command.iter().cloned());
    for kv in &a.env {
        let (k, v) = split_kv("--env", kv)?;
        o = o.env(k, v);
    }
    if let Some(c) = &a.cwd {
        o = o.cwd(c.clone());
    }
    if let Some(t) = a.timeout {
        if !(t.is_finite() && t > 0.0 && t <= 7.0 * 24.0 * 3600.0) {
            return Err(smolvm::Error::InvalidConfig {
                field: "--timeout",
                value: t.to_string(),
                allowed: "seconds, more than 0 and at most 604800".into(),
            }
            .into());
        }
        o = o.timeout(Duration::from_secs_f64(t));
    }
    o.validate()?;
    Ok(o)
}

/// Says once per state directory, clearly, that VMs run without KVM here, and why.
fn tcg_notice(rt: &Runtime) {
    use smolvm::hypervisor::VmmKind;
    if VmmKind::from_env().ok() == Some(VmmKind::Fake) {
        // Every time: nothing is isolated.
        eprintln!(
            "smolvm: note: SMOLVM_VMM=fake: no VM runs; commands run on this host as this user (the test lane's stand-in)"
        );
        return;
    }
    let accel = smolvm::hypervisor::detect_accelerator();
    if accel.kvm_usable {
        return;
    }
    let marker = rt.paths().state_dir.join("tcg-notice-shown");
    if marker.exists() {
        return;
    }
    eprintln!(
        "smolvm: note: VMs on this host run under QEMU TCG (software emulation, seconds per boot), not KVM: {}. `smolvm doctor` explains.",
        accel.reason
    );
    let _ = std::fs::write(&marker, b"");
}

/// Creates the VM (owned by `owner`: deleted when it dies; or persistent) and, with
/// `start`, starts it (a VM that does not start is deleted), building the default image on
/// first use.
fn create_vm(
    rt: &Runtime,
    cfg: VmConfig,
    owner: Option<smolvm::Owner>,
    start: bool,
) -> Result<(Vm, Option<smolvm::StartTimings>)> {
    tcg_notice(rt);
    let make = |cfg: VmConfig| -> smolvm::Result<(Vm, Option<smolvm::StartTimings>)> {
        if start {
            rt.create_started(cfg, owner).map(|(vm, t)| (vm, Some(t)))
        } else if owner.is_some() {
            rt.create_ephemeral(cfg).map(|vm| (vm, None))
        } else {
            rt.create(cfg).map(|vm| (vm, None))
        }
    };
    match make(cfg.clone()) {
        Err(smolvm::Error::Image(smolvm_image::ImageError::NotFound { name, .. }))
            if name == smolvm::config::DEFAULT_IMAGE =>
        {
            eprintln!("smolvm: the default image is not built yet; building it now (once)");
            crate::cmd_image::build(&name, false, None)?;
            Ok(make(cfg)?)
        }
        other => Ok(other?),
    }
}

/// Streams a command's output to our stdout/stderr; returns its shell-style exit code.
fn stream_exec(
    vm: &Vm,
    opts: &ExecOptions,
    interactive: bool,
) -> Result<(i32, smolvm::ExecOutput)> {
    let mut opts = opts.clone();
    if interactive {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("reading stdin")?;
        opts.stdin = Some(buf);
    }
    let out = vm.exec_streaming(&opts, &mut |s, data| match s {
        OutputStream::Stdout => {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(data);
            let _ = o.flush();
        }
        OutputStream::Stderr => {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(data);
        }
    })?;
    if out.timed_out {
        eprintln!("smolvm: command timed out and was killed");
    }
    Ok((out.shell_code(), out))
}

/// `smolvm run`.
pub fn run(a: &VmArgs, e: &ExecArgs, timings: bool) -> Result<i32> {
    let cfg = config_from(None, a)?;
    let opts = exec_options(e)?;
    let t0 = Instant::now();
    let rt = Runtime::open()?;
    // Owned by this process: should it be killed, the VM's supervisor deletes the VM.
    let (vm, st) = create_vm(&rt, cfg, smolvm::Owner::current(), true)?;
    let st = st.ok_or_else(|| anyhow::anyhow!("the VM was not started"))?;
    let created = t0.elapsed().saturating_sub(st.ready);
    // Ctrl-C deletes the VM before exiting: nothing is left behind.
    let current: Arc<Mutex<Option<Vm>>> = Arc::new(Mutex::new(Some(vm.clone())));
    let for_handler = current.clone();
    let _ = ctrlc::set_handler(move || {
        if let Some(vm) = for_handler.lock().ok().and_then(|mut g| g.take()) {
            let _ = vm.delete();
        }
        std::process::exit(130);
    });
    let result = (|| {
        let t_exec = Instant::now();
        let (code, _) = stream_exec(&vm, &opts, e.interactive)?;
        Ok::<_, anyhow::Error>((t_exec.elapsed(), code))
    })();
    let t_del = Instant::now();
    let deleted = current
        .lock()
        .ok()
        .and_then(|mut g| g.take())
        .map(|v| v.delete());
    let del = t_del.elapsed();
    let (exec_t, code) = result?;
    if let Some(Err(err)) = deleted {
        eprintln!("smolvm: warning: could not delete VM {}: {err}", vm.id());
    }
    if timings {
        eprintln!();
        eprintln!("phase            time");
        eprintln!("create+start     {}", ms(created + st.create_start));
        eprintln!("agent ready      {}", ms(created + st.ready));
        eprintln!("exec             {}", ms(exec_t));
        eprintln!("stop+delete      {}", ms(del));
        eprintln!("total            {}", ms(t0.elapsed()));
        match &st.restored {
            Some(from) => eprintln!(
                "accelerator: {} (guest kernel {}, resumed from {from})",
                st.accelerator, st.guest.kernel_release
            ),
            None => eprintln!(
                "accelerator: {} (guest kernel {}, cold boot, boot to agent {} ms)",
                st.accelerator, st.guest.kernel_release, st.guest.boot_ms
            ),
        }
    }
    Ok(code)
}

/// `smolvm create`.
pub fn create(c: &CreateArgs, a: &VmArgs, no_start: bool) -> Result<()> {
    let vm = match &c.from_snapshot {
        Some(name) => {
            let overrides = overrides_from(c, a)?;
            let rt = Runtime::open()?;
            if no_start {
                rt.create_from_snapshot(name, overrides)?
            } else {
                rt.create_started_from_snapshot(name, overrides)?.0
            }
        }
        None => {
            let cfg = config_from(Some(c), a)?;
            let rt = Runtime::open()?;
            create_vm(&rt, cfg, None, !no_start)?.0
        }
    };
    println!("{}", vm.id());
    Ok(())
}

/// `smolvm start`.
pub fn start(id: &str) -> Result<()> {
    let rt = Runtime::open()?;
    let vm = rt.get(id)?;
    let st = vm.start()?;
    eprintln!("started {id} in {} ({})", ms(st.ready), st.accelerator);
    warn_inactive_forwards(&vm);
    Ok(())
}

/// Says which recorded forwards the supervisor could not re-establish (port taken).
fn warn_inactive_forwards(vm: &Vm) {
    let (Ok(recorded), Ok(active)) = (vm.forwards(), vm.active_forwards()) else {
        return;
    };
    for f in recorded.iter().filter(|f| !active.contains(f)) {
        eprintln!(
            "smolvm: warning: port forward {f} is not active (its host port is taken?); see {}",
            vm.dir()
                .join(smolvm::supervisor::files::SUPERVISOR_LOG)
                .display()
        );
    }
}

/// `smolvm exec`.
pub fn exec(id: &str, e: &ExecArgs) -> Result<i32> {
    let opts = exec_options(e)?;
    let rt = Runtime::open()?;
    let vm = rt.get(id)?;
    Ok(stream_exec(&vm, &opts, e.interactive)?.0)
}

/// `smolvm stop`.
pub fn stop(id: &str, force: bool) -> Result<()> {
    let rt = Runtime::open()?;
    rt.get(id)?.stop(!force)?;
    Ok(())
}

/// `smolvm rm`.
pub fn rm(ids: &[String], force: bool) -> Result<()> {
    let rt = Runtime::open()?;
    for id in ids {
        match rt.get(id) {
            Ok(vm) => {
                if let Some(disk) = vm.delete()? {
                    eprintln!(
                        "{id}: disk retained at {} (boot it with `smolvm create --disk {}`)",
                        disk.display(),
                        disk.display()
                    );
                }
            }
            Err(smolvm::Error::VmNotFound(_)) if force => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// `smolvm ls`.
pub fn ls(json: bool) -> Result<()> {
    let rt = Runtime::open()?;
    let (vms, corrupt) = rt.list_all()?;
    // The other VMs are listed; each one whose record does not read is named on stderr
    // with how to remove it.
    for e in &corrupt {
        eprintln!("smolvm: warning: {e}");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&vms)?);
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut rows = vec![vec![
        "ID".into(),
        "STATE".into(),
        "CPUS".into(),
        "MEMORY".into(),
        "UPTIME".into(),
        "IP".into(),
        "PORTS".into(),
        "ACCEL".into(),
        "ERROR".into(),
    ]];
    for v in vms {
        let ports = ports_column(&v.forwards);
        let r = v.record;
        let uptime = match (r.state, r.started_at) {
            (smolvm::VmState::Running, Some(s)) => format!("{}s", (now - s).max(0)),
            _ => "-".into(),
        };
        rows.push(vec![
            r.id,
            r.state.to_string(),
            r.config.vcpu_count.to_string(),
            format!("{} MiB", r.config.mem_size_mib),
            uptime,
            // The guest's address in nat mode; `-` in the others.
            r.ip.map_or_else(|| "-".into(), |ip| ip.to_string()),
            ports,
            r.accelerator.map_or_else(|| "-".into(), |a| a.to_string()),
            r.error.unwrap_or_default(),
        ]);
    }
    table::print(&rows);
    Ok(())
}

/// `8080->80,[::1]:9000->90`: the host address is shown when it is not 127.0.0.1.
fn ports_column(forwards: &[smolvm::ForwardInfo]) -> String {
    if forwards.is_empty() {
        return "-".into();
    }
    forwards
        .iter()
        .map(|f| {
            if f.host_addr == "127.0.0.1" {
                format!("{}->{}", f.host_port, f.guest_port)
            } else {
                format!("{}->{}", f.host(), f.guest_port)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses `GUEST` or `GUEST:HOST` (ports 1-65535; host 0 means a free port).
fn parse_port_spec(spec: &str) -> Result<(u16, Option<u16>)> {
    let bad = || smolvm::Error::InvalidConfig {
        field: "GUEST[:HOST]",
        value: spec.to_string(),
        allowed: "a guest port, optionally with a host port: 8000 or 8000:8080 (1-65535)".into(),
    };
    let (guest, host) = match spec.split_once(':') {
        Some((g, h)) => (g, Some(h)),
        None => (spec, None),
    };
    let guest: u16 = guest.parse().map_err(|_| bad())?;
    if guest == 0 {
        return Err(bad().into());
    }
    let host = match host {
        Some(h) => Some(h.parse::<u16>().map_err(|_| bad())?),
        None => None,
    };
    Ok((guest, host))
}

/// `smolvm port`: add (`GUEST[:HOST]`), remove (`--rm HOST`) or list a VM's forwards.
pub fn port(id: &str, spec: Option<&str>, bind: Option<&str>, rm: Option<u16>) -> Result<()> {
    let rt = Runtime::open()?;
    let vm = rt.get(id)?;
    if let Some(host_port) = rm {
        vm.unexpose(host_port)?;
        return Ok(());
    }
    let Some(spec) = spec else {
        let recorded = vm.forwards()?;
        let running = vm.info()?.state == smolvm::VmState::Running;
        let active = if running {
            vm.active_forwards().unwrap_or_default()
        } else {
            Vec::new()
        };
        for f in &recorded {
            if running && !active.contains(f) {
                println!("{f} (not active: its host port was taken when the VM started)");
            } else {
                println!("{f}");
            }
        }
        if !running && !recorded.is_empty() {
            eprintln!("{id} is not running: its forwards come back when it starts");
        }
        return Ok(());
    };
    let (guest, host) = parse_port_spec(spec)?;
    let bind = match bind {
        Some(b) => {
            Some(
                b.parse::<std::net::IpAddr>()
                    .map_err(|_| smolvm::Error::InvalidConfig {
                        field: "--bind",
                        value: b.to_string(),
                        allowed: "an IP address of this host, e.g. 127.0.0.1, ::1 or 0.0.0.0"
                            .into(),
                    })?,
            )
        }
        None => None,
    };
    let f = vm.expose_local(guest, host, bind)?;
    println!("{f}");
    Ok(())
}

/// `smolvm logs`.
pub fn logs(id: &str) -> Result<()> {
    let rt = Runtime::open()?;
    let vm = rt.get(id)?;
    let path = vm.console_log();
    let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    std::io::stdout().write_all(&data)?;
    Ok(())
}

/// `smolvm inspect`.
pub fn inspect(id: &str) -> Result<()> {
    let rt = Runtime::open()?;
    let vm = rt.get(id)?;
    let rec = vm.info()?;
    let running = rec.state == smolvm::VmState::Running;
    let out = serde_json::json!({
        "vm": rec,
        "console_log": vm.console_log(),
        "supervisor_log": vm.dir().join(smolvm::supervisor::files::SUPERVISOR_LOG),
        "forwards": vm.forwards()?,
        // Kernel, agent and clocksource, as the guest reported them (when running).
        "guest": if running { vm.guest().ok() } else { None },
        "network": vm.network_info()?,
        "env_names": if running {
            vm.env_vars().ok().map(|e| e.into_keys().collect::<Vec<_>>())
        } else {
            None
        },
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// `smolvm env`.
pub fn env(id: &str, set: &[String], unset: &[String], clear: bool) -> Result<()> {
    let rt = Runtime::open()?;
    let vm = rt.get(id)?;
    let mut vars = std::collections::BTreeMap::new();
    for kv in set {
        let (k, v) = split_kv("KEY=VALUE", kv)?;
        vars.insert(k.to_string(), v.to_string());
    }
    let mut now = None;
    if !unset.is_empty() {
        now = Some(vm.unset_env_vars(unset)?);
    }
    if !vars.is_empty() || clear {
        now = Some(vm.set_env_vars(&vars, !clear)?);
    }
    let now = match now {
        Some(n) if vm.info()?.state == smolvm::VmState::Running => n,
        Some(_) => {
            eprintln!("{id} is not running: the change applies at its next start");
            return Ok(());
        }
        None => vm.env_vars()?,
    };
    for (k, v) in now {
        println!("{k}={v}");
    }
    Ok(())
}

/// `smolvm gc`.
pub fn gc(json: bool) -> Result<()> {
    let rt = Runtime::open()?;
    let r = rt.gc()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else if r.is_clean() {
        eprintln!("nothing to clean up");
    } else {
        for id in &r.deleted_vms {
            eprintln!("deleted {id} (its owner process is gone)");
        }
        for id in &r.marked_error {
            eprintln!("marked {id} as error (its supervisor is gone)");
        }
        for d in &r.removed_dirs {
            eprintln!("removed orphan directory {}", d.display());
        }
        for id in &r.removed_rows {
            eprintln!("removed {id} (its directory was gone)");
        }
        for f in &r.removed_forwards {
            eprintln!("removed port forward {f} (its VM is gone)");
        }
        for t in &r.removed_taps {
            eprintln!("removed TAP device {t} and its rules (no running VM uses it)");
        }
        for c in &r.removed_chains {
            eprintln!("removed nftables chain inet smolvm {c} (no running VM uses it)");
        }
        for a in &r.released_addresses {
            eprintln!("released address {a} (its VM is gone)");
        }
        for s in &r.removed_saved_states {
            eprintln!("removed {s} (unused, or made from an image since rebuilt)");
        }
        if r.killed_processes > 0 {
            eprintln!("killed {} orphan process(es)", r.killed_processes);
        }
        if !r.removed_files.is_empty() {
            eprintln!("removed {} stale file(s)", r.removed_files.len());
        }
    }
    Ok(())
}

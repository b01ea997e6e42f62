//! VM commands: run, create, start, exec, stop, rm, ls, logs.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use smolvm::{ExecOptions, OutputStream, Runtime, Vm, VmConfig};

use crate::table::{self, ms};
use crate::{ExecArgs, VmArgs};

/// Builds a validated config from flags.
pub fn config_from(name: Option<String>, a: &VmArgs) -> Result<VmConfig> {
    let cfg = VmConfig {
        vm_id: name,
        vcpu_count: a.cpus,
        mem_size_mib: a.memory,
        image: a.image.clone(),
        boot_args: a.boot_args.clone(),
        network: a.network.parse()?,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Builds exec options from flags.
pub fn exec_options(a: &ExecArgs) -> Result<ExecOptions> {
    let mut o = ExecOptions::argv(a.command.iter().cloned());
    for kv in &a.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| smolvm::Error::InvalidConfig {
                field: "--env",
                value: kv.clone(),
                allowed: "KEY=VALUE".into(),
            })?;
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

/// Creates the VM, building the default image on first use.
fn create_vm(rt: &Runtime, cfg: VmConfig) -> Result<Vm> {
    tcg_notice(rt);
    match rt.create(cfg.clone()) {
        Err(smolvm::Error::Image(smolvm_image::ImageError::NotFound { name, .. }))
            if name == smolvm::config::DEFAULT_IMAGE =>
        {
            eprintln!("smolvm: the default image is not built yet; building it now (once)");
            crate::cmd_image::build(&name, false, None)?;
            Ok(rt.create(cfg)?)
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
    let vm = create_vm(&rt, cfg)?;
    let created = t0.elapsed();
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
        let st = vm.start()?;
        let t_exec = Instant::now();
        let (code, _) = stream_exec(&vm, &opts, e.interactive)?;
        Ok::<_, anyhow::Error>((st, t_exec.elapsed(), code))
    })();
    let t_del = Instant::now();
    let deleted = current
        .lock()
        .ok()
        .and_then(|mut g| g.take())
        .map(|v| v.delete());
    let del = t_del.elapsed();
    let (st, exec_t, code) = result?;
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
        eprintln!(
            "accelerator: {} (guest kernel {}, boot to agent {} ms)",
            st.accelerator, st.guest.kernel_release, st.guest.boot_ms
        );
    }
    Ok(code)
}

/// `smolvm create`.
pub fn create(name: Option<String>, a: &VmArgs, no_start: bool) -> Result<()> {
    let cfg = config_from(name, a)?;
    let rt = Runtime::open()?;
    let vm = create_vm(&rt, cfg)?;
    if !no_start {
        if let Err(e) = vm.start() {
            let _ = vm.delete();
            return Err(e.into());
        }
    }
    println!("{}", vm.id());
    Ok(())
}

/// `smolvm start`.
pub fn start(id: &str) -> Result<()> {
    let rt = Runtime::open()?;
    let st = rt.get(id)?.start()?;
    eprintln!("started {id} in {} ({})", ms(st.ready), st.accelerator);
    Ok(())
}

/// `smolvm exec`.
pub fn exec(id: &str, e: &ExecArgs) -> Result<i32> {
    let opts = exec_options(e)?;
    let rt = Runtime::open()?;
    let vm = rt.get(id)?;
    Ok(stream_exec(&vm, &opts, e.interactive)?.0)
}

/// `smolvm stop`.
pub fn stop(id: &str) -> Result<()> {
    let rt = Runtime::open()?;
    rt.get(id)?.stop(true)?;
    Ok(())
}

/// `smolvm rm`.
pub fn rm(ids: &[String], force: bool) -> Result<()> {
    let rt = Runtime::open()?;
    for id in ids {
        match rt.get(id) {
            Ok(vm) => vm.delete()?,
            Err(smolvm::Error::VmNotFound(_)) if force => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// `smolvm ls`.
pub fn ls(json: bool) -> Result<()> {
    let rt = Runtime::open()?;
    let vms = rt.list()?;
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
        "ACCEL".into(),
        "ERROR".into(),
    ]];
    for v in vms {
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
            r.accelerator.unwrap_or_else(|| "-".into()),
            r.error.unwrap_or_default(),
        ]);
    }
    table::print(&rows);
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

//! `smolvm bench density`: how many idle VMs this host holds. Starts N VMs from the
//! image's template one after another, then measures their idle CPU, their host memory
//! (PSS, which counts pages they share once), that each still answers a command, and
//! whether a guest gives freed memory back to the host; deletes them all at the end (also
//! on error and on Ctrl-C).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use smolvm::{ExecOptions, NetworkMode, Runtime, Vm, VmConfig};

use crate::bench::{percentile, print_stats, stat, Setting, Stat};
use crate::table::{self, ms};

/// How long the VMs idle after the last start before idle CPU is measured.
const SETTLE: Duration = Duration::from_secs(5);
/// Memory the reclaim check allocates in the guest, in MiB.
const RECLAIM_ALLOC_MIB: u32 = 200;
/// The reclaim check's VM has at least this much memory, so the allocation fits.
const RECLAIM_MIN_MEM_MIB: u32 = 512;
/// How often, and for how long at most, QEMU's RSS is read after the guest frees memory.
const RECLAIM_POLL: Duration = Duration::from_millis(500);
const RECLAIM_WAIT: Duration = Duration::from_secs(20);
/// The reclaim watch ends early once RSS has not shrunk for this long.
const RECLAIM_STABLE: Duration = Duration::from_secs(5);
/// A drop in RSS smaller than this (KiB) is not counted as shrinking.
const SHRINK_KIB: u64 = 1024;

/// What to measure.
pub struct Params {
    /// VMs to start.
    pub n: usize,
    /// vCPUs per VM.
    pub cpus: u32,
    /// Memory per VM in MiB.
    pub memory: u32,
    /// Seconds over which idle CPU is measured.
    pub idle_secs: u64,
    /// Network mode.
    pub network: NetworkMode,
    /// Run the memory-reclaim check.
    pub reclaim: bool,
    /// JSON output.
    pub json: bool,
}

/// The VMs this bench made: deleted at the end, on error and on Ctrl-C.
type Fleet = Arc<Mutex<Vec<Vm>>>;

/// A started VM and its host processes.
struct Running {
    vm: Vm,
    qemu: u32,
    supervisor: u32,
}

/// Mean and percentiles of per-VM values.
#[derive(Serialize, Default)]
struct Dist {
    n: usize,
    mean: f64,
    p50: f64,
    p95: f64,
    max: f64,
}

impl Dist {
    /// Summarizes `values`.
    fn of(values: &[f64]) -> Dist {
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        Dist {
            n: v.len(),
            mean: v.iter().sum::<f64>() / v.len().max(1) as f64,
            p50: percentile(&v, 50.0),
            p95: percentile(&v, 95.0),
            max: v.last().copied().unwrap_or(0.0),
        }
    }
}

/// Idle CPU per VM, in % of one host core.
#[derive(Serialize, Default)]
struct IdleCpu {
    settle_secs: f64,
    window_secs: f64,
    qemu_pct: Dist,
    supervisor_pct: Dist,
    total_pct: Dist,
    /// The host's 1, 5 and 15 minute load averages at the end of the window.
    load_average: Option<[f64; 3]>,
    /// CPU time every process on the host used during the window (the VMs, this bench,
    /// anything else), in % of one core: what the idle VMs cost the host all together.
    host_busy_pct: Option<f64>,
}

/// Host memory per VM.
#[derive(Serialize, Default)]
struct Memory {
    qemu_pss_mib: Dist,
    supervisor_pss_mib: Dist,
    total_pss_mib: Dist,
    /// All VMs' PSS summed (shared pages counted once).
    sum_pss_mib: f64,
    mem_available_before_mib: Option<f64>,
    mem_available_after_mib: Option<f64>,
    /// (before - after) / started VMs.
    mem_available_drop_per_vm_mib: Option<f64>,
}

/// Whether a guest gives freed memory back: QEMU's RSS around a guest allocation.
#[derive(Serialize, Default)]
struct Reclaim {
    /// How the VM started: "template" (RAM a copy-on-write map of the template's file) or
    /// "cold boot" (anonymous RAM).
    start: &'static str,
    memory_mib: u32,
    alloc_mib: u32,
    rss_idle_mib: f64,
    rss_after_free_mib: f64,
    rss_after_wait_mib: f64,
    /// Since the allocation ended, when RSS last shrank (None: it never did).
    stopped_shrinking_after_secs: Option<f64>,
    watched_secs: f64,
}

#[derive(Serialize)]
struct Report {
    #[serde(flatten)]
    setting: Setting,
    network: String,
    template: String,
    template_build_ms: Option<f64>,
    requested: usize,
    started: usize,
    start_error: Option<String>,
    phases: Vec<Stat>,
    answered: usize,
    not_answered: Vec<String>,
    idle_cpu: IdleCpu,
    memory: Memory,
    reclaim: Vec<Reclaim>,
    reclaim_error: Option<String>,
    delete_errors: Vec<String>,
}

/// Host clock ticks per second (the unit of /proc/PID/stat's times).
fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU time (utime + stime, fields 14 and 15) of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it start at field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The value in KiB of the line `key` (e.g. `Pss:`) of a /proc file.
fn kib_field(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l[key.len()..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// KiB to MiB.
fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The host's load averages.
fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// The host's MemAvailable in KiB.
fn mem_available() -> Option<u64> {
    kib_field("/proc/meminfo", "MemAvailable:")
}

/// QEMU's resident memory in KiB.
fn rss(pid: u32) -> Option<u64> {
    kib_field(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// Creates and starts one VM from the template (recorded in `fleet` at once); returns it
/// with its pids and the time from create to ready.
fn start_one(rt: &Runtime, cfg: &VmConfig, fleet: &Fleet) -> Result<(Running, Duration)> {
    let t0 = Instant::now();
    let vm = rt.create_ephemeral(cfg.clone())?;
    if let Ok(mut f) = fleet.lock() {
        f.push(vm.clone());
    }
    let st = vm.start()?;
    let took = t0.elapsed();
    anyhow::ensure!(
        !cfg.snapshot || matches!(st.restored, Some(smolvm::Base::Template { .. })),
        "VM {} booted cold instead of resuming the template (see `smolvm logs {}`)",
        vm.id(),
        vm.id()
    );
    let rec = vm.info()?;
    let (Some(qemu), Some(supervisor)) = (rec.qemu_pid, rec.supervisor_pid) else {
        anyhow::bail!("VM {} is running but has no recorded pids", vm.id());
    };
    Ok((
        Running {
            vm,
            qemu,
            supervisor,
        },
        took,
    ))
}

/// Step 1: starts up to `n` VMs one after another, stopping at the first failure.
fn start_all(
    rt: &Runtime,
    cfg: &VmConfig,
    p: &Params,
    fleet: &Fleet,
) -> (Vec<Running>, Vec<Duration>, Option<String>) {
    let (mut vms, mut times) = (Vec::new(), Vec::new());
    for i in 0..p.n {
        match start_one(rt, cfg, fleet) {
            Ok((r, took)) => {
                vms.push(r);
                times.push(took);
            }
            Err(e) => {
                let msg = format!("start {} of {} failed: {e:#}", i + 1, p.n);
                if !p.json {
                    eprintln!("{msg}; measuring the {} that started", vms.len());
                }
                return (vms, times, Some(msg));
            }
        }
        if !p.json && ((i + 1) % 10 == 0 || i + 1 == p.n) {
            eprintln!(
                "started {}/{} (last ready in {})",
                i + 1,
                p.n,
                ms(times.last().copied().unwrap_or_default())
            );
        }
    }
    (vms, times, None)
}

/// Step 2: each VM's QEMU and supervisor CPU time over `window`, as % of one core.
fn idle_cpu(vms: &[Running], window: Duration) -> IdleCpu {
    let read = || -> Vec<(Option<u64>, Option<u64>)> {
        vms.iter()
            .map(|r| (cpu_ticks(r.qemu), cpu_ticks(r.supervisor)))
            .collect()
    };
    let first = read();
    let host0 = crate::bench_start::host_cpu_ticks();
    let t0 = Instant::now();
    std::thread::sleep(window);
    let last = read();
    let host1 = crate::bench_start::host_cpu_ticks();
    let secs = t0.elapsed().as_secs_f64();
    let host_busy_pct = host0
        .zip(host1)
        .map(|((b0, _), (b1, _))| b1.saturating_sub(b0) as f64 / clock_ticks() / secs * 100.0);
    let pct = |a: u64, b: u64| b.saturating_sub(a) as f64 / clock_ticks() / secs * 100.0;
    let (mut q, mut s, mut t) = (Vec::new(), Vec::new(), Vec::new());
    for ((q0, s0), (q1, s1)) in first.into_iter().zip(last) {
        if let (Some(q0), Some(s0), Some(q1), Some(s1)) = (q0, s0, q1, s1) {
            q.push(pct(q0, q1));
            s.push(pct(s0, s1));
            t.push(pct(q0, q1) + pct(s0, s1));
        }
    }
    IdleCpu {
        settle_secs: SETTLE.as_secs_f64(),
        window_secs: secs,
        qemu_pct: Dist::of(&q),
        supervisor_pct: Dist::of(&s),
        total_pct: Dist::of(&t),
        load_average: load_average(),
        host_busy_pct,
    }
}

/// Step 3: PSS of each VM's QEMU and supervisor, and the MemAvailable cross-check.
fn memory(vms: &[Running], before: Option<u64>, after: Option<u64>) -> Memory {
    let pss = |pid: u32| kib_field(&format!("/proc/{pid}/smaps_rollup"), "Pss:");
    let (mut q, mut s, mut t) = (Vec::new(), Vec::new(), Vec::new());
    for r in vms {
        if let (Some(qk), Some(sk)) = (pss(r.qemu), pss(r.supervisor)) {
            q.push(mib(qk));
            s.push(mib(sk));
            t.push(mib(qk + sk));
        }
    }
    let drop = match (before, after) {
        (Some(b), Some(a)) if !vms.is_empty() => Some((mib(b) - mib(a)) / vms.len() as f64),
        _ => None,
    };
    Memory {
        qemu_pss_mib: Dist::of(&q),
        supervisor_pss_mib: Dist::of(&s),
        sum_pss_mib: t.iter().sum(),
        total_pss_mib: Dist::of(&t),
        mem_available_before_mib: before.map(mib),
        mem_available_after_mib: after.map(mib),
        mem_available_drop_per_vm_mib: drop,
    }
}

/// Step 4: runs `echo` in every VM in turn; returns the times of those that answered and
/// the VMs that did not, with why.
fn answer(vms: &[Running]) -> (Vec<Duration>, Vec<String>) {
    let opts = ExecOptions::argv(["echo", "ok"]).timeout(Duration::from_secs(30));
    let (mut times, mut failed) = (Vec::new(), Vec::new());
    for r in vms {
        let t = Instant::now();
        match r.vm.exec(&opts) {
            Ok(out) if out.exit_code == Some(0) && out.stdout == b"ok\n" => times.push(t.elapsed()),
            Ok(out) => failed.push(format!(
                "{}: exit {:?}, output {:?}",
                r.vm.id(),
                out.exit_code,
                out.stdout_text()
            )),
            Err(e) => failed.push(format!("{}: {e}", r.vm.id())),
        }
    }
    (times, failed)
}

/// Step 5: one more VM of at least 512 MiB (resumed from its template, or booted cold with
/// `cfg.snapshot` off); QEMU's RSS idle, after the guest allocates and frees 200 MiB, and
/// while the host waits for it to shrink.
fn reclaim(rt: &Runtime, cfg: &VmConfig, fleet: &Fleet) -> Result<Reclaim> {
    let (r, _) = start_one(rt, cfg, fleet).context("starting the reclaim VM")?;
    std::thread::sleep(Duration::from_secs(2));
    let read = || rss(r.qemu).context("reading QEMU's RSS");
    let idle = read()?;
    let script =
        format!("b = bytearray({RECLAIM_ALLOC_MIB}*1024*1024); import time; time.sleep(0.2)");
    let out = r
        .vm
        .exec(&ExecOptions::argv(["python3", "-c", &script]).timeout(Duration::from_secs(120)))?;
    anyhow::ensure!(
        out.exit_code == Some(0),
        "python3 in the guest failed ({:?}): {}",
        out.exit_code,
        String::from_utf8_lossy(&out.stderr)
    );
    let t0 = Instant::now();
    let after_free = read()?;
    let (mut low, mut last_shrink) = (after_free, None);
    while t0.elapsed() < RECLAIM_WAIT {
        let since = last_shrink.unwrap_or(Duration::ZERO);
        if t0.elapsed().saturating_sub(since) >= RECLAIM_STABLE {
            break;
        }
        std::thread::sleep(RECLAIM_POLL);
        let now = read()?;
        if now + SHRINK_KIB <= low {
            last_shrink = Some(t0.elapsed());
        }
        low = low.min(now);
    }
    Ok(Reclaim {
        start: if cfg.snapshot {
            "template"
        } else {
            "cold boot"
        },
        memory_mib: cfg.mem_size_mib,
        alloc_mib: RECLAIM_ALLOC_MIB,
        rss_idle_mib: mib(idle),
        rss_after_free_mib: mib(after_free),
        rss_after_wait_mib: mib(read()?),
        stopped_shrinking_after_secs: last_shrink.map(|d| d.as_secs_f64()),
        watched_secs: t0.elapsed().as_secs_f64(),
    })
}

/// Step 6: deletes every VM of `fleet`; returns the delete times and failures.
fn delete_all(fleet: &Fleet) -> (Vec<Duration>, Vec<String>) {
    let vms = fleet
        .lock()
        .map(|mut f| std::mem::take(&mut *f))
        .unwrap_or_default();
    let (mut times, mut failed) = (Vec::new(), Vec::new());
    for vm in vms {
        let t = Instant::now();
        match vm.delete() {
            Ok(_) => times.push(t.elapsed()),
            Err(e) => failed.push(format!("{}: {e}", vm.id())),
        }
    }
    (times, failed)
}

/// Makes Ctrl-C delete every VM of `fleet` before exiting.
fn delete_on_ctrl_c(fleet: &Fleet) {
    let fleet = fleet.clone();
    let _ = ctrlc::set_handler(move || {
        eprintln!("interrupted: deleting the bench's VMs");
        let _ = delete_all(&fleet);
        std::process::exit(130);
    });
}

/// Warms the templates the bench resumes (its shape, and the reclaim VM's) before anything
/// is timed; returns the first's name and how long building took, if it was built.
fn warm(
    rt: &Runtime,
    cfg: &VmConfig,
    reclaim_cfg: Option<&VmConfig>,
) -> Result<(String, Option<f64>)> {
    let t = Instant::now();
    let (template, built) = rt.warm_template(cfg).context("preparing the template")?;
    let build_ms = built.then(|| t.elapsed().as_secs_f64() * 1000.0);
    if let Some(rc) = reclaim_cfg {
        rt.warm_template(rc)
            .context("preparing the reclaim VM's template")?;
    }
    Ok((template.meta.name, build_ms))
}

/// Runs the bench.
pub fn run(p: &Params) -> Result<()> {
    let rt = Runtime::open()?;
    let cfg = VmConfig {
        vcpu_count: p.cpus,
        mem_size_mib: p.memory,
        network: p.network,
        ..Default::default()
    };
    cfg.validate()?;
    let reclaim_cfg = VmConfig {
        mem_size_mib: p.memory.max(RECLAIM_MIN_MEM_MIB),
        ..cfg.clone()
    };
    let (template, build_ms) = warm(&rt, &cfg, p.reclaim.then_some(&reclaim_cfg))?;
    if !p.json {
        let how = match build_ms {
            Some(b) => format!("built in {}", ms(Duration::from_secs_f64(b / 1000.0))),
            None => "already built".into(),
        };
        eprintln!("template {template} {how}; starting {} VMs", p.n);
    }
    let fleet: Fleet = Arc::new(Mutex::new(Vec::new()));
    delete_on_ctrl_c(&fleet);
    let report = measure(&rt, p, &cfg, &reclaim_cfg, &fleet);
    let (del, delete_errors) = delete_all(&fleet);
    let mut report = report?;
    report.phases.push(stat("delete", &del));
    report.delete_errors = delete_errors;
    report.template = template;
    report.template_build_ms = build_ms;
    if p.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    let problems = report.start_error.is_some() as usize
        + report.not_answered.len()
        + report.reclaim_error.is_some() as usize
        + report.delete_errors.len();
    anyhow::ensure!(problems == 0, "{problems} problem(s); see the report");
    Ok(())
}

/// Steps 1 to 5; the VMs it makes are left in `fleet` for the caller to delete.
fn measure(
    rt: &Runtime,
    p: &Params,
    cfg: &VmConfig,
    reclaim_cfg: &VmConfig,
    fleet: &Fleet,
) -> Result<Report> {
    let before = mem_available();
    let (vms, create, start_error) = start_all(rt, cfg, p, fleet);
    let mut idle = IdleCpu::default();
    let mut mem = Memory::default();
    let (mut answers, mut not_answered) = (Vec::new(), Vec::new());
    if !vms.is_empty() {
        std::thread::sleep(SETTLE);
        let after = mem_available();
        if !p.json {
            eprintln!("measuring idle CPU for {} s", p.idle_secs);
        }
        idle = idle_cpu(&vms, Duration::from_secs(p.idle_secs));
        mem = memory(&vms, before, after);
        (answers, not_answered) = answer(&vms);
    }
    let (reclaim_report, reclaim_error) = if p.reclaim {
        if !p.json {
            eprintln!("checking whether a guest gives freed memory back");
        }
        let cold = VmConfig {
            snapshot: false,
            ..reclaim_cfg.clone()
        };
        let mut done = Vec::new();
        let mut error = None;
        for c in [reclaim_cfg, &cold] {
            match reclaim(rt, c, fleet) {
                Ok(r) => done.push(r),
                Err(e) => error = Some(format!("{e:#}")),
            }
        }
        (done, error)
    } else {
        (Vec::new(), None)
    };
    Ok(Report {
        setting: Setting::here(p.cpus, p.memory),
        network: p.network.to_string(),
        template: String::new(),
        template_build_ms: None,
        requested: p.n,
        started: vms.len(),
        start_error,
        phases: vec![
            stat("create+start to ready", &create),
            stat("answer (echo)", &answers),
        ],
        answered: answers.len(),
        not_answered,
        idle_cpu: idle,
        memory: mem,
        reclaim: reclaim_report,
        reclaim_error,
        delete_errors: Vec::new(),
    })
}

/// A row of the per-VM table: name, then mean, p50, p95 and max with `unit`.
fn dist_row(name: &str, d: &Dist, unit: &str) -> Vec<String> {
    let f = |v: f64| format!("{v:.2} {unit}");
    vec![
        name.to_string(),
        d.n.to_string(),
        f(d.mean),
        f(d.p50),
        f(d.p95),
        f(d.max),
    ]
}

/// Prints the report as tables and lines.
fn print_report(r: &Report) {
    println!(
        "smolvm bench density: {} VMs of {} MiB, {} vCPU, resumed from template {}",
        r.started, r.setting.memory_mib, r.setting.vcpus, r.template
    );
    r.setting.print(&format!(", network {}", r.network));
    if let Some(e) = &r.start_error {
        println!("started {} of {}: {e}", r.started, r.requested);
    }
    print_stats(&r.phases);
    println!("answered: {} of {}", r.answered, r.started);
    for f in &r.not_answered {
        println!("  did not answer: {f}");
    }
    println!();
    let i = &r.idle_cpu;
    println!(
        "per VM (idle CPU in % of one host core over {:.0} s, after {:.0} s settling):",
        i.window_secs, i.settle_secs
    );
    let m = &r.memory;
    table::print(&[
        ["", "n", "mean", "p50", "p95", "max"]
            .map(String::from)
            .to_vec(),
        dist_row("idle CPU, QEMU", &i.qemu_pct, "%"),
        dist_row("idle CPU, supervisor", &i.supervisor_pct, "%"),
        dist_row("idle CPU, total", &i.total_pct, "%"),
        dist_row("PSS, QEMU", &m.qemu_pss_mib, "MiB"),
        dist_row("PSS, supervisor", &m.supervisor_pss_mib, "MiB"),
        dist_row("PSS, total", &m.total_pss_mib, "MiB"),
    ]);
    if let Some([a, b, c]) = i.load_average {
        println!("host load average after the idle window: {a:.2} {b:.2} {c:.2}");
    }
    if let Some(h) = r.idle_cpu.host_busy_pct {
        println!(
            "host CPU used by everything during the idle window: {h:.1} % of one core ({:.2} % per VM)",
            h / r.started.max(1) as f64
        );
    }
    println!("PSS of all VMs together: {:.1} MiB", m.sum_pss_mib);
    if let (Some(b), Some(a), Some(d)) = (
        m.mem_available_before_mib,
        m.mem_available_after_mib,
        m.mem_available_drop_per_vm_mib,
    ) {
        println!("host MemAvailable: {b:.0} MiB before, {a:.0} MiB after: {d:.1} MiB per VM");
    }
    print_reclaim(r);
    for e in &r.delete_errors {
        println!("delete failed: {e}");
    }
}

/// Prints the reclaim check's lines.
fn print_reclaim(r: &Report) {
    if let Some(e) = &r.reclaim_error {
        println!("memory given back: check failed: {e}");
    }
    for c in &r.reclaim {
        println!(
        "memory given back ({}, {} MiB VM, {} MiB allocated and freed in the guest): QEMU RSS {:.1} MiB idle, {:.1} MiB after, {:.1} MiB after waiting {:.1} s ({})",
        c.start,
        c.memory_mib,
        c.alloc_mib,
        c.rss_idle_mib,
        c.rss_after_free_mib,
        c.rss_after_wait_mib,
        c.watched_secs,
        match c.stopped_shrinking_after_secs {
            Some(s) => format!("stopped shrinking after {s:.1} s"),
            None => "it did not shrink".into(),
        }
    );
    }
}

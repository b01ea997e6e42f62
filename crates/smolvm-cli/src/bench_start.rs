//! `smolvm bench start`: time to interactive (create to the first command's output), cold
//! boots and template resumes interleaved in one run, then concurrent resumes; prints
//! p50/p95, the ratios and the accelerator.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use smolvm::{ExecOptions, NetworkMode, Runtime, VmConfig};

use crate::bench::{print_stats, stat, Setting, Stat};
use crate::table::ms;

/// What to measure.
pub struct Params {
    /// Starts of each kind.
    pub runs: usize,
    /// Starts at once from the template.
    pub concurrent: usize,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory: u32,
    /// Network mode.
    pub network: NetworkMode,
    /// JSON output.
    pub json: bool,
}

#[derive(Serialize)]
struct Report {
    #[serde(flatten)]
    setting: Setting,
    network: String,
    template_build_ms: Option<f64>,
    phases: Vec<Stat>,
    cold_over_template_p50: f64,
    concurrent_p95_over_single_p50: Option<f64>,
    concurrent_host_cpu: Option<HostCpu>,
}

/// How busy the host's CPUs were while the starts ran at once: if they were busy the whole
/// time, the starts waited on CPU; idle CPU time means they waited on something else.
#[derive(Serialize)]
struct HostCpu {
    wall_ms: f64,
    cores: usize,
    /// CPU time all processes used meanwhile (user, system, irq, steal excluded).
    busy_ms: f64,
    /// busy / (cores x wall).
    busy_fraction: f64,
    /// busy / starts.
    busy_ms_per_start: f64,
}

impl HostCpu {
    fn since(t0: Instant, cpu0: Option<(u64, u64)>, starts: usize) -> Option<HostCpu> {
        let wall = t0.elapsed().as_secs_f64() * 1000.0;
        let ((busy0, _), (busy1, _)) = (cpu0?, host_cpu_ticks()?);
        // SAFETY: sysconf only reads a system constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let busy_ms = busy1.saturating_sub(busy0) as f64 * 1000.0 / hz;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Some(HostCpu {
            wall_ms: wall,
            cores,
            busy_ms,
            busy_fraction: busy_ms / (wall * cores as f64).max(1.0),
            busy_ms_per_start: busy_ms / starts.max(1) as f64,
        })
    }
}

/// The host's busy and idle clock ticks so far, from the first line of `/proc/stat`.
pub(crate) fn host_cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let idle = v.get(3)? + v.get(4)?;
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?;
    Some((busy, idle))
}

/// One start: create, start, run `echo`, until its output is back; then delete (untimed).
/// Returns the time and what the VM resumed from.
fn one(rt: &Runtime, cfg: &VmConfig) -> Result<(Duration, Option<smolvm::Base>)> {
    let t0 = Instant::now();
    let vm = rt.create_ephemeral(cfg.clone())?;
    let res = (|| {
        let st = vm.start()?;
        let out = vm.exec(&ExecOptions::argv(["echo", "ready"]))?;
        anyhow::ensure!(
            out.stdout == b"ready\n",
            "unexpected output {:?}",
            out.stdout_text()
        );
        Ok((t0.elapsed(), st.restored))
    })();
    let deleted = vm.delete();
    let r = res?;
    deleted?;
    Ok(r)
}

fn p50(samples: &[Duration]) -> f64 {
    stat("", samples).p50_ms
}

/// Runs the bench.
pub fn run(p: &Params) -> Result<()> {
    let rt = Runtime::open()?;
    let base = VmConfig {
        vcpu_count: p.cpus,
        mem_size_mib: p.memory,
        network: p.network,
        ..Default::default()
    };
    base.validate()?;
    let cold_cfg = VmConfig {
        snapshot: false,
        ..base.clone()
    };
    let t = Instant::now();
    let (template, built) = rt.warm_template(&base).context("preparing the template")?;
    let build_ms = built.then(|| t.elapsed().as_secs_f64() * 1000.0);
    if !p.json {
        eprintln!(
            "template {} {}",
            template.meta.name,
            match build_ms {
                Some(b) => format!("built in {}", ms(Duration::from_secs_f64(b / 1000.0))),
                None => "already built".into(),
            }
        );
    }
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for i in 0..p.runs.max(1) {
        let (c, from) = one(&rt, &cold_cfg)?;
        anyhow::ensure!(from.is_none(), "a cold start resumed from {from:?}");
        let (w, from) = one(&rt, &base)?;
        anyhow::ensure!(
            matches!(from, Some(smolvm::Base::Template { .. })),
            "a template start booted cold (see `smolvm logs`)"
        );
        cold.push(c);
        warm.push(w);
        if !p.json {
            eprintln!(
                "run {}/{}: cold {}, template {}",
                i + 1,
                p.runs,
                ms(c),
                ms(w)
            );
        }
    }
    let mut together = Vec::new();
    let mut host_cpu = None;
    if p.concurrent > 0 {
        let (t0, cpu0) = (Instant::now(), host_cpu_ticks());
        let gate = Arc::new(Barrier::new(p.concurrent));
        let results: Vec<Result<(Duration, Option<smolvm::Base>)>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..p.concurrent)
                .map(|_| {
                    let gate = gate.clone();
                    let (rt, cfg) = (&rt, &base);
                    s.spawn(move || {
                        gate.wait();
                        one(rt, cfg)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a start thread panicked")))
                })
                .collect()
        });
        for r in results {
            let (d, from) = r.context("a concurrent start failed")?;
            anyhow::ensure!(from.is_some(), "a concurrent start booted cold");
            together.push(d);
        }
        host_cpu = HostCpu::since(t0, cpu0, p.concurrent);
    }
    let mut phases = vec![
        stat("cold boot to first output", &cold),
        stat("template resume to first output", &warm),
    ];
    let concurrent_phase: &'static str = match p.concurrent {
        8 => "8 template resumes at once",
        _ => "template resumes at once",
    };
    if !together.is_empty() {
        phases.push(stat(concurrent_phase, &together));
    }
    let ratio = p50(&cold) / p50(&warm).max(0.001);
    let conc_ratio =
        (!together.is_empty()).then(|| stat("", &together).p95_ms / p50(&warm).max(0.001));
    let report = Report {
        setting: Setting::here(p.cpus, p.memory),
        network: p.network.to_string(),
        template_build_ms: build_ms,
        phases,
        cold_over_template_p50: ratio,
        concurrent_p95_over_single_p50: conc_ratio,
        concurrent_host_cpu: host_cpu,
    };
    if p.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "smolvm bench start: {} cold and {} template starts interleaved, {} at once",
        cold.len(),
        warm.len(),
        together.len()
    );
    report.setting.print(&format!(", network {}", p.network));
    print_stats(&report.phases);
    println!("template vs cold (p50): {ratio:.1}x faster");
    if let Some(c) = conc_ratio {
        println!(
            "{} at once, p95 / single template start p50: {c:.1}x",
            together.len()
        );
    }
    if let Some(h) = &report.concurrent_host_cpu {
        println!(
            "host CPU while they ran: {:.0} ms busy in {:.0} ms on {} cores ({:.0} % busy), {:.0} ms of CPU per start",
            h.busy_ms,
            h.wall_ms,
            h.cores,
            h.busy_fraction * 100.0,
            h.busy_ms_per_start
        );
    }
    Ok(())
}

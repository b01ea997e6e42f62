//! `smolvm bench`: lifecycle phase timings as p50/p95 tables, naming the accelerator and
//! the machine.

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Subcommand;
use serde::Serialize;
use smolvm::{ExecOptions, Runtime, VmConfig};

use crate::table::{self, ms};

/// Bench subcommands.
#[derive(Subcommand)]
pub enum BenchCmd {
    /// Full VM lifecycles: create+start, ready, exec, stop+delete, total; plus exec round trips.
    Lifecycle {
        /// Number of lifecycles.
        #[arg(short = 'n', long, default_value_t = 5)]
        runs: usize,
        /// Number of `true` round trips on one running VM.
        #[arg(long, default_value_t = 100)]
        exec_runs: usize,
        /// vCPUs per VM.
        #[arg(long, default_value_t = smolvm::config::DEFAULT_VCPUS)]
        cpus: u32,
        /// Memory per VM in MiB.
        #[arg(long, default_value_t = smolvm::config::DEFAULT_MEM_MIB)]
        memory: u32,
        /// Boot every VM cold instead of resuming the image's template.
        #[arg(long)]
        cold: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Time to interactive (create to first command output), booting cold and resuming
    /// the image's template, side by side; then N starts from the template at once.
    Start {
        /// Starts of each kind (cold, template), interleaved.
        #[arg(short = 'n', long, default_value_t = 10)]
        runs: usize,
        /// VMs started from the template at once (0 skips it).
        #[arg(long, default_value_t = 8)]
        concurrent: usize,
        #[command(flatten)]
        shape: crate::ShapeArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// How many idle VMs this host holds: starts N VMs from the image's template, then
    /// measures their idle CPU, host memory (PSS), that each answers, and whether a guest
    /// gives freed memory back; deletes them all.
    Density {
        /// VMs to start, one after another.
        #[arg(short = 'n', long = "vms", value_name = "N", default_value_t = 20)]
        n: usize,
        /// Memory per VM in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// vCPUs per VM.
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Seconds over which idle CPU is measured (after 5 s settling).
        #[arg(long, default_value_t = 30)]
        idle_secs: u64,
        /// Network mode: none, auto, nat or user.
        #[arg(long, default_value = "none")]
        network: String,
        /// Skip the check that a guest gives freed memory back.
        #[arg(long)]
        no_reclaim: bool,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Serialize)]
pub(crate) struct Stat {
    phase: &'static str,
    n: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p95_ms: f64,
    min_ms: f64,
    max_ms: f64,
}

/// Where a bench ran: the accelerator (and why), the machine, QEMU and the VM's shape.
#[derive(Serialize)]
pub(crate) struct Setting {
    accelerator: String,
    accelerator_reason: String,
    machine: String,
    qemu: String,
    pub(crate) vcpus: u32,
    pub(crate) memory_mib: u32,
}

impl Setting {
    /// Describes this host for VMs of `vcpus` and `memory_mib`.
    pub(crate) fn here(vcpus: u32, memory_mib: u32) -> Setting {
        let accel = smolvm::hypervisor::detect_accelerator();
        Setting {
            accelerator: accel.accelerator.to_string(),
            accelerator_reason: accel.reason,
            machine: machine(),
            qemu: qemu_version(),
            vcpus,
            memory_mib,
        }
    }

    /// Prints the accelerator and machine lines of a report (`extra` ends the second).
    pub(crate) fn print(&self, extra: &str) {
        println!(
            "accelerator: {} ({})",
            self.accelerator, self.accelerator_reason
        );
        println!(
            "machine: {}; {}; VM {} vCPU, {} MiB{extra}",
            self.machine, self.qemu, self.vcpus, self.memory_mib
        );
    }
}

#[derive(Serialize)]
struct Report {
    #[serde(flatten)]
    setting: Setting,
    phases: Vec<Stat>,
}

/// The `p`th percentile of `sorted` (nearest rank; 0 when empty).
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub(crate) fn stat(phase: &'static str, samples: &[Duration]) -> Stat {
    let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    Stat {
        phase,
        n: v.len(),
        p50_ms: percentile(&v, 50.0),
        p95_ms: percentile(&v, 95.0),
        min_ms: v.first().copied().unwrap_or(0.0),
        max_ms: v.last().copied().unwrap_or(0.0),
    }
}

/// A one-line description of this host.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map(|kib| kib / (1024 * 1024))
        .unwrap_or(0);
    format!("{cpu}, {cores} cores, {mem_gib} GiB")
}

fn qemu_version() -> String {
    std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.to_string()))
        .unwrap_or_else(|| "unknown".into())
}

/// Prints phase statistics as a table.
pub(crate) fn print_stats(stats: &[Stat]) {
    let mut rows = vec![vec![
        "phase".to_string(),
        "n".into(),
        "p50".into(),
        "p95".into(),
        "min".into(),
        "max".into(),
    ]];
    for s in stats {
        let f = |v: f64| ms(Duration::from_secs_f64(v / 1000.0));
        rows.push(vec![
            s.phase.to_string(),
            s.n.to_string(),
            f(s.p50_ms),
            f(s.p95_ms),
            f(s.min_ms),
            f(s.max_ms),
        ]);
    }
    table::print(&rows);
}

/// Runs a bench subcommand.
pub fn run(cmd: BenchCmd) -> Result<()> {
    let (runs, exec_runs, cpus, memory, cold, json) = match cmd {
        BenchCmd::Lifecycle {
            runs,
            exec_runs,
            cpus,
            memory,
            cold,
            json,
        } => (runs, exec_runs, cpus, memory, cold, json),
        BenchCmd::Start {
            runs,
            concurrent,
            shape,
            json,
        } => {
            return crate::bench_start::run(&crate::bench_start::Params {
                runs,
                concurrent,
                cpus: shape.cpus,
                memory: shape.memory,
                network: shape.network.parse()?,
                json,
            })
        }
        BenchCmd::Density {
            n,
            memory,
            cpus,
            idle_secs,
            network,
            no_reclaim,
            json,
        } => {
            return crate::bench_density::run(&crate::bench_density::Params {
                n,
                cpus,
                memory,
                idle_secs,
                network: network.parse()?,
                reclaim: !no_reclaim,
                json,
            })
        }
    };
    let rt = Runtime::open()?;
    let cfg = VmConfig {
        vcpu_count: cpus,
        mem_size_mib: memory,
        snapshot: !cold,
        ..Default::default()
    };
    cfg.validate()?;
    let (mut cs, mut ready, mut exec, mut del, mut total) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..runs.max(1) {
        let t0 = Instant::now();
        let vm = rt.create_ephemeral(cfg.clone())?;
        let created = t0.elapsed();
        let st = match vm.start() {
            Ok(st) => st,
            Err(e) => {
                let _ = vm.delete();
                return Err(e.into());
            }
        };
        let te = Instant::now();
        let out = vm.exec(&ExecOptions::argv(["echo", "hello from smolvm"]));
        let exec_t = te.elapsed();
        let td = Instant::now();
        vm.delete()?;
        let del_t = td.elapsed();
        let out = out?;
        anyhow::ensure!(
            out.stdout == b"hello from smolvm\n",
            "unexpected output {:?}",
            out.stdout_text()
        );
        cs.push(created + st.create_start);
        ready.push(created + st.ready);
        exec.push(exec_t);
        del.push(del_t);
        total.push(t0.elapsed());
        if !json {
            eprintln!(
                "run {}/{}: ready in {} ({})",
                i + 1,
                runs,
                ms(st.ready),
                st.accelerator
            );
        }
    }
    // Warm exec round trips on one running VM.
    let mut rtt = Vec::new();
    if exec_runs > 0 {
        let vm = rt.create_ephemeral(cfg.clone())?;
        let res = (|| {
            vm.start()?;
            let opts = ExecOptions::argv(["true"]);
            for _ in 0..exec_runs {
                let t = Instant::now();
                let out = vm.exec(&opts)?;
                rtt.push(t.elapsed());
                if out.exit_code != Some(0) {
                    return Err(smolvm::Error::Agent {
                        kind: smolvm::ErrorKind::Io,
                        message: format!("`true` exited with {:?}", out.exit_code),
                    });
                }
            }
            Ok(())
        })();
        vm.delete()?;
        res?;
    }
    let mut phases = vec![
        stat("create+start", &cs),
        stat("ready (agent handshake)", &ready),
        stat("command execution (echo)", &exec),
        stat("stop+delete", &del),
        stat("full lifecycle", &total),
    ];
    if !rtt.is_empty() {
        phases.push(stat("exec round trip (true, warm)", &rtt));
    }
    let report = Report {
        setting: Setting::here(cpus, memory),
        phases,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "smolvm bench lifecycle: {} lifecycles ({}), {} exec round trips",
        runs,
        if cold {
            "cold boots"
        } else {
            "resumed from the image's template"
        },
        rtt.len()
    );
    report.setting.print("");
    print_stats(&report.phases);
    Ok(())
}

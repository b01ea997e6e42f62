//! The benchmarks run end to end with real VMs (tiny sizes: they check that a bench works
//! and cleans up, not how fast anything is).

mod common;

use common::cli;

#[test]
fn bench_density_starts_measures_and_removes_its_vms() {
    let out = cli(&[
        "bench",
        "density",
        "-n",
        "2",
        "--idle-secs",
        "1",
        "--no-reclaim",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["started"], 2, "{r}");
    assert_eq!(r["answered"], 2, "{r}");
    assert!(r["accelerator"].is_string(), "{r}");
    for field in ["qemu_pss_mib", "supervisor_pss_mib"] {
        let mean = r["memory"][field]["mean"].as_f64().unwrap_or(0.0);
        assert!(mean > 0.0, "{field}: {r}");
    }
    assert_eq!(r["idle_cpu"]["qemu_pct"]["n"], 2, "{r}");
    // Every VM it made is gone.
    let ls = cli(&["ls", "--json"]);
    let vms: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(vms.as_array().map(|a| a.len()), Some(0), "{vms}");
}

//! `smolvm._native.Vm`: one VM of the runtime, seen from Python. Every blocking call
//! releases the GIL; the object may be shared between threads.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use smolvm::snapshot::{Kind, Saved};
use smolvm::{Owner, Runtime, Vm as RtVm};

use crate::config;
use crate::errors::{to_py, MapPy};
use crate::exec::{self, ExecStream};

/// The process's runtime, opened on first use (paths come from the environment then).
static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);

/// The process's runtime.
pub fn runtime(py: Python<'_>) -> PyResult<Runtime> {
    let mut rt = RUNTIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = rt.as_ref() {
        return Ok(r.clone());
    }
    let opened = py.allow_threads(Runtime::open).map_py(py)?;
    *rt = Some(opened.clone());
    Ok(opened)
}

/// A VM handle.
#[pyclass(module = "smolvm._native", frozen)]
pub struct Vm {
    vm: RtVm,
}

#[pymethods]
impl Vm {
    /// Records a new VM from config fields (validated by the runtime). `owned`: the VM
    /// belongs to this process and is deleted if the process dies before `detach()`.
    #[staticmethod]
    fn create(py: Python<'_>, fields: &Bound<'_, PyDict>, owned: bool) -> PyResult<Vm> {
        let cfg = config::from_dict(py, fields)?;
        let rt = runtime(py)?;
        let vm = py
            .allow_threads(move || {
                if owned {
                    rt.create_ephemeral(cfg)
                } else {
                    rt.create(cfg)
                }
            })
            .map_py(py)?;
        Ok(Vm { vm })
    }

    /// A new running VM that resumed from snapshot `name`, and its start timings: `fields`
    /// are the options given (a `None` is not given), honoured or refused by the runtime's
    /// rules (`SnapshotOverrides`); a refusal names the option and creates nothing, and a VM
    /// that does not start is deleted. `owned` as in `create`.
    #[staticmethod]
    fn create_started_from_snapshot<'py>(
        py: Python<'py>,
        name: String,
        fields: &Bound<'py, PyDict>,
        owned: bool,
    ) -> PyResult<(Vm, Bound<'py, PyDict>)> {
        let mut overrides = config::overrides(py, fields)?;
        overrides.owner = if owned { Owner::current() } else { None };
        let rt = runtime(py)?;
        let (vm, t) = py
            .allow_threads(move || rt.create_started_from_snapshot(&name, overrides))
            .map_py(py)?;
        Ok((Vm { vm }, timings_dict(py, t)?))
    }

    /// A handle on an existing VM.
    #[staticmethod]
    fn open(py: Python<'_>, vm_id: String) -> PyResult<Vm> {
        let rt = runtime(py)?;
        let vm = py.allow_threads(move || rt.get(&vm_id)).map_py(py)?;
        Ok(Vm { vm })
    }

    /// The VM's id.
    #[getter]
    fn id(&self) -> String {
        self.vm.id().to_string()
    }

    /// Boots the VM (no-op when running); returns the phase timings.
    fn start<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let t = py.allow_threads(|| self.vm.start()).map_py(py)?;
        timings_dict(py, t)
    }

    /// Stops the VM (a clean guest shutdown first unless `graceful` is false).
    #[pyo3(signature = (graceful=true))]
    fn stop(&self, py: Python<'_>, graceful: bool) -> PyResult<()> {
        py.allow_threads(|| self.vm.stop(graceful)).map_py(py)
    }

    /// Deletes the VM; returns where a retained disk went.
    fn delete(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let kept = py.allow_threads(|| self.vm.delete()).map_py(py)?;
        Ok(kept.map(|p| p.display().to_string()))
    }

    /// Freezes the VM's vCPUs (guest clocks and timers stop); commands are refused until
    /// `resume`.
    fn pause(&self, py: Python<'_>) -> PyResult<()> {
        py.allow_threads(|| self.vm.pause()).map_py(py)
    }

    /// Lets a paused VM run again.
    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        py.allow_threads(|| self.vm.resume()).map_py(py)
    }

    /// Saves the running (or paused) VM as snapshot `name`; returns its description.
    fn snapshot<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyDict>> {
        let saved = py.allow_threads(|| self.vm.snapshot(&name)).map_py(py)?;
        let size = py.allow_threads(|| saved.size_bytes());
        saved_dict(py, &saved, size)
    }

    /// `n` new running VMs continuing from this one's present state (same owner).
    fn fork(&self, py: Python<'_>, n: i64) -> PyResult<Vec<Vm>> {
        let n = usize::try_from(n).map_err(|_| {
            to_py(
                py,
                smolvm::Error::InvalidConfig {
                    field: "n",
                    value: n.to_string(),
                    allowed: format!("1 to {} forks at once", smolvm::snapshot::ops::MAX_FORKS),
                },
            )
        })?;
        let vms = py.allow_threads(|| self.vm.fork(n)).map_py(py)?;
        Ok(vms.into_iter().map(|vm| Vm { vm }).collect())
    }

    /// Unties the VM from this process: it outlives it.
    fn detach(&self, py: Python<'_>) -> PyResult<()> {
        py.allow_threads(|| self.vm.set_owner(None)).map_py(py)
    }

    /// The VM's record: state (reconciled), error, ip, accelerator, config, times.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = py.allow_threads(|| self.vm.info()).map_py(py)?;
        let d = PyDict::new(py);
        d.set_item("vm_id", &r.id)?;
        d.set_item("state", r.state.as_str())?;
        d.set_item("error", &r.error)?;
        d.set_item("ip", r.ip.map(|ip| ip.to_string()))?;
        d.set_item("accelerator", r.accelerator.map(|a| a.to_string()))?;
        d.set_item("dir", r.dir.display().to_string())?;
        d.set_item("disk_path", r.disk_path.display().to_string())?;
        d.set_item("created_at", r.created_at)?;
        d.set_item("started_at", r.started_at)?;
        d.set_item("stopped_at", r.stopped_at)?;
        d.set_item("owned", r.owner.is_some())?;
        d.set_item("config", config::to_dict(py, &r.config)?)?;
        Ok(d)
    }

    /// Runs a command to its end; returns exit_code, stdout, stderr, truncated, duration.
    #[pyo3(signature = (command, timeout=None, env=None, cwd=None, stdin=None, on_stdout=None, on_stderr=None, max_output_bytes=None))]
    #[allow(clippy::too_many_arguments)]
    fn run<'py>(
        &self,
        py: Python<'py>,
        command: &Bound<'py, PyAny>,
        timeout: Option<f64>,
        env: Option<BTreeMap<String, String>>,
        cwd: Option<String>,
        stdin: Option<Vec<u8>>,
        on_stdout: Option<PyObject>,
        on_stderr: Option<PyObject>,
        max_output_bytes: Option<u64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let req = exec::request(py, command, timeout, env, cwd, stdin, max_output_bytes)?;
        exec::run(py, &self.vm, req, on_stdout, on_stderr)
    }

    /// Starts a command whose output is read chunk by chunk.
    #[pyo3(signature = (command, timeout=None, env=None, cwd=None, stdin=None))]
    fn stream(
        &self,
        py: Python<'_>,
        command: &Bound<'_, PyAny>,
        timeout: Option<f64>,
        env: Option<BTreeMap<String, String>>,
        cwd: Option<String>,
        stdin: Option<Vec<u8>>,
    ) -> PyResult<ExecStream> {
        let req = exec::request(py, command, timeout, env, cwd, stdin, None)?;
        ExecStream::start(&self.vm, req)
    }

    /// Sets persistent environment variables (merged with the present ones unless
    /// `merge` is false); returns the whole set.
    #[pyo3(signature = (vars, merge=true))]
    fn set_env_vars(
        &self,
        py: Python<'_>,
        vars: BTreeMap<String, String>,
        merge: bool,
    ) -> PyResult<BTreeMap<String, String>> {
        py.allow_threads(|| self.vm.set_env_vars(&vars, merge))
            .map_py(py)
    }

    /// Removes persistent environment variables; returns the rest.
    fn unset_env_vars(
        &self,
        py: Python<'_>,
        names: Vec<String>,
    ) -> PyResult<BTreeMap<String, String>> {
        py.allow_threads(|| self.vm.unset_env_vars(&names))
            .map_py(py)
    }

    /// The persistent environment variables.
    fn env_vars(&self, py: Python<'_>) -> PyResult<BTreeMap<String, String>> {
        py.allow_threads(|| self.vm.env_vars()).map_py(py)
    }

    /// Writes bytes to a guest file (atomically; `mode` sets its permissions).
    #[pyo3(signature = (path, data, mode=None))]
    fn write_file(
        &self,
        py: Python<'_>,
        path: String,
        data: Vec<u8>,
        mode: Option<u32>,
    ) -> PyResult<()> {
        py.allow_threads(|| self.vm.write_file(&path, &data, mode))
            .map_py(py)
    }

    /// Reads a guest file (refused when over `max_bytes`).
    fn read_file<'py>(
        &self,
        py: Python<'py>,
        path: String,
        max_bytes: u64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let data = py
            .allow_threads(|| self.vm.read_file(&path, max_bytes))
            .map_py(py)?;
        Ok(PyBytes::new(py, &data))
    }

    /// Copies a host file into the guest; returns the guest path.
    fn upload(&self, py: Python<'_>, local: PathBuf, remote: String) -> PyResult<String> {
        py.allow_threads(|| self.vm.upload(&local, &remote))
            .map_py(py)
    }

    /// Copies a guest file to the host; returns the host path.
    fn download(
        &self,
        py: Python<'_>,
        remote: String,
        local: PathBuf,
        max_bytes: u64,
    ) -> PyResult<String> {
        let p = py
            .allow_threads(|| self.vm.download(&remote, &local, max_bytes))
            .map_py(py)?;
        Ok(p.display().to_string())
    }

    /// Serves the guest's `guest_port` (on its loopback) on the host; returns the forward.
    #[pyo3(signature = (guest_port, host_port=None, bind=None))]
    fn expose_local<'py>(
        &self,
        py: Python<'py>,
        guest_port: i64,
        host_port: Option<i64>,
        bind: Option<String>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let guest = port(py, "guest_port", guest_port, false)?;
        let host = host_port
            .map(|p| port(py, "host_port", p, true))
            .transpose()?;
        let bind = bind
            .map(|b| {
                b.parse::<std::net::IpAddr>().map_err(|_| {
                    to_py(
                        py,
                        smolvm::Error::InvalidConfig {
                            field: "bind",
                            value: b.clone(),
                            allowed: "an IP address of this host, e.g. 127.0.0.1".into(),
                        },
                    )
                })
            })
            .transpose()?;
        let f = py
            .allow_threads(|| self.vm.expose_local(guest, host, bind))
            .map_py(py)?;
        forward_dict(py, &f)
    }

    /// Removes the forwards on `host_port`.
    fn unexpose(&self, py: Python<'_>, host_port: i64) -> PyResult<()> {
        let p = port(py, "host_port", host_port, false)?;
        py.allow_threads(|| self.vm.unexpose(p)).map_py(py)
    }

    /// The VM's recorded forwards.
    fn forwards<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let fs = py.allow_threads(|| self.vm.forwards()).map_py(py)?;
        fs.iter().map(|f| forward_dict(py, f)).collect()
    }
}

fn port(py: Python<'_>, field: &'static str, p: i64, zero_ok: bool) -> PyResult<u16> {
    match u16::try_from(p) {
        Ok(v) if v != 0 || zero_ok => Ok(v),
        _ => Err(to_py(
            py,
            smolvm::Error::InvalidConfig {
                field,
                value: p.to_string(),
                allowed: if zero_ok {
                    "a port from 1 to 65535, or None/0 for any free port".into()
                } else {
                    "a port from 1 to 65535".into()
                },
            },
        )),
    }
}

/// A start's timings as the SDK shows them (`restored`: `"template:IMAGE/KEY"`,
/// `"snapshot:NAME"` or None).
fn timings_dict(py: Python<'_>, t: smolvm::StartTimings) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("create_start", t.create_start.as_secs_f64())?;
    d.set_item("ready", t.ready.as_secs_f64())?;
    d.set_item("accelerator", t.accelerator.to_string())?;
    d.set_item("already_running", t.already_running)?;
    d.set_item("kernel_release", t.guest.kernel_release)?;
    d.set_item("guest_boot_ms", t.guest.boot_ms)?;
    d.set_item("clocksource", t.guest.clocksource)?;
    d.set_item("restored", t.restored.map(|b| b.to_string()))?;
    Ok(d)
}

/// A saved state's description (`SnapshotInfo` fields).
fn saved_dict<'py>(py: Python<'py>, s: &Saved, size_bytes: u64) -> PyResult<Bound<'py, PyDict>> {
    let m = &s.meta;
    let d = PyDict::new(py);
    d.set_item("name", &m.name)?;
    d.set_item(
        "kind",
        match m.kind {
            Kind::Template => "template",
            Kind::Snapshot => "snapshot",
            Kind::Fork => "fork",
        },
    )?;
    d.set_item("image", &m.image)?;
    d.set_item("vcpu_count", m.vcpus)?;
    d.set_item("mem_size_mib", m.mem_mib)?;
    d.set_item("source_vm", &m.source_vm)?;
    d.set_item("created_at", m.created_at)?;
    d.set_item("size_bytes", size_bytes)?;
    d.set_item("path", s.dir.display().to_string())?;
    d.set_item("accelerator", m.accelerator.to_string())?;
    Ok(d)
}

/// Every named snapshot (and states kept for forks), by name.
#[pyfunction]
pub fn list_snapshots<'py>(py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
    let rt = runtime(py)?;
    let listed = py
        .allow_threads(|| {
            rt.snapshots().map(|all| {
                all.into_iter()
                    .map(|s| {
                        let size = s.size_bytes();
                        (s, size)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .map_py(py)?;
    listed
        .iter()
        .map(|(s, size)| saved_dict(py, s, *size))
        .collect()
}

/// The named snapshot's description.
#[pyfunction]
pub fn open_snapshot<'py>(py: Python<'py>, name: String) -> PyResult<Bound<'py, PyDict>> {
    let rt = runtime(py)?;
    let (saved, size) = py
        .allow_threads(|| {
            smolvm::snapshot::open_named(rt.paths(), &name).map(|s| {
                let size = s.size_bytes();
                (s, size)
            })
        })
        .map_py(py)?;
    saved_dict(py, &saved, size)
}

/// Removes a named snapshot; refused (SnapshotError) while VMs build on it.
#[pyfunction]
pub fn delete_snapshot(py: Python<'_>, name: String) -> PyResult<()> {
    let rt = runtime(py)?;
    py.allow_threads(|| rt.remove_snapshot(&name)).map_py(py)
}

fn forward_dict<'py>(py: Python<'py>, f: &smolvm::ForwardInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("host_addr", &f.host_addr)?;
    d.set_item("host_port", f.host_port)?;
    d.set_item("guest_port", f.guest_port)?;
    Ok(d)
}

/// Every VM: a list of `info()`-like dicts (state reconciled).
#[pyfunction]
pub fn list_vms(py: Python<'_>) -> PyResult<Vec<(String, String)>> {
    let rt = runtime(py)?;
    let vms = py.allow_threads(|| rt.list()).map_err(|e| to_py(py, e))?;
    Ok(vms
        .into_iter()
        .map(|v| (v.record.id, v.record.state.as_str().to_string()))
        .collect())
}

//! `VMConfig` fields (a Python dict) to and from the runtime's `VmConfig`. Types are checked
//! here; every range and rule is the runtime's own `VmConfig::validate`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyInt, PyString};
use smolvm::{Error, SnapshotOverrides, VmConfig};

use crate::errors::to_py;

/// The fields a `VMConfig` accepts, in the order they are shown.
pub const FIELDS: &[&str] = &[
    "vm_id",
    "vcpu_count",
    "mem_size_mib",
    "image",
    "kernel_path",
    "initrd_path",
    "rootfs_path",
    "boot_args",
    "disk_mode",
    "disk_size_mib",
    "disk_path",
    "retain_disk_on_delete",
    "env_vars",
    "network",
    "egress",
    "allow_egress",
    "deny_egress",
    "snapshot",
];

fn bad(py: Python<'_>, field: &'static str, v: &Bound<'_, PyAny>, allowed: &str) -> PyErr {
    let value = v
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "?".into());
    to_py(
        py,
        Error::InvalidConfig {
            field,
            value: value.chars().take(200).collect(),
            allowed: allowed.into(),
        },
    )
}

fn string(py: Python<'_>, field: &'static str, v: &Bound<'_, PyAny>) -> PyResult<String> {
    if !v.is_instance_of::<PyString>() {
        return Err(bad(py, field, v, "a string"));
    }
    v.extract::<String>()
        .map_err(|_| bad(py, field, v, "a valid UTF-8 string"))
}

fn strings(py: Python<'_>, field: &'static str, v: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    if v.is_instance_of::<PyString>() {
        return Err(bad(
            py,
            field,
            v,
            "a list of strings (CIDR or CIDR:PORT), not one string",
        ));
    }
    let items: Vec<Bound<'_, PyAny>> = v
        .try_iter()
        .map_err(|_| bad(py, field, v, "a list of strings (CIDR or CIDR:PORT)"))?
        .collect::<PyResult<_>>()?;
    items.iter().map(|i| string(py, field, i)).collect()
}

fn int<T: for<'a> FromPyObject<'a>>(
    py: Python<'_>,
    field: &'static str,
    v: &Bound<'_, PyAny>,
) -> PyResult<T> {
    if v.is_instance_of::<PyBool>() || !v.is_instance_of::<PyInt>() {
        return Err(bad(py, field, v, "an integer"));
    }
    v.extract::<T>()
        .map_err(|_| bad(py, field, v, "an integer in range"))
}

fn path(py: Python<'_>, field: &'static str, v: &Bound<'_, PyAny>) -> PyResult<PathBuf> {
    let os = py.import("os")?;
    let s = os
        .call_method1("fspath", (v,))
        .map_err(|_| bad(py, field, v, "a path (str or os.PathLike)"))?;
    s.extract::<PathBuf>()
        .map_err(|_| bad(py, field, v, "a text path"))
}

/// The field named `key`, or a refusal listing the fields.
fn known(py: Python<'_>, key: String) -> PyResult<&'static str> {
    FIELDS.iter().copied().find(|f| *f == key).ok_or_else(|| {
        to_py(
            py,
            Error::InvalidConfig {
                field: "config",
                value: key,
                allowed: format!("one of the fields: {}", FIELDS.join(", ")),
            },
        )
    })
}

fn boolean(py: Python<'_>, field: &'static str, v: &Bound<'_, PyAny>) -> PyResult<bool> {
    if !v.is_instance_of::<PyBool>() {
        return Err(bad(py, field, v, "True or False"));
    }
    v.extract()
}

fn env_vars(py: Python<'_>, v: &Bound<'_, PyAny>) -> PyResult<BTreeMap<String, String>> {
    let d = v
        .downcast::<PyDict>()
        .map_err(|_| bad(py, "env_vars", v, "a dict of str to str"))?;
    let mut vars = BTreeMap::new();
    for (name, value) in d.iter() {
        let name = string(py, "env_vars", &name)?;
        if value.is_none() {
            return Err(bad(
                py,
                "env_vars",
                &value,
                &format!("a string value for {name:?} (None is not a value)"),
            ));
        }
        vars.insert(name, string(py, "env_vars", &value)?);
    }
    Ok(vars)
}

/// Builds and validates a runtime config from `fields`; unknown names are refused.
pub fn from_dict(py: Python<'_>, fields: &Bound<'_, PyDict>) -> PyResult<VmConfig> {
    apply(py, VmConfig::default(), fields)
}

/// `base` with `fields` set on it (a `None` value keeps the base's), validated; unknown
/// names are refused.
fn apply(py: Python<'_>, base: VmConfig, fields: &Bound<'_, PyDict>) -> PyResult<VmConfig> {
    let mut c = base;
    for (k, v) in fields.iter() {
        let key: String = k.extract()?;
        let field = known(py, key)?;
        if v.is_none() {
            // None means "the default" (or the base's value) for every field.
            continue;
        }
        match field {
            "vm_id" => c.vm_id = Some(string(py, field, &v)?),
            "vcpu_count" => c.vcpu_count = int(py, field, &v)?,
            "mem_size_mib" => c.mem_size_mib = int(py, field, &v)?,
            "image" => c.image = string(py, field, &v)?,
            "kernel_path" => c.kernel_path = Some(path(py, field, &v)?),
            "initrd_path" => c.initrd_path = Some(path(py, field, &v)?),
            "rootfs_path" => c.rootfs_path = Some(path(py, field, &v)?),
            "disk_path" => c.disk_path = Some(path(py, field, &v)?),
            "boot_args" => c.boot_args = Some(string(py, field, &v)?),
            "disk_mode" => {
                c.disk_mode = string(py, field, &v)?.parse().map_err(|e| to_py(py, e))?
            }
            "network" => c.network = string(py, field, &v)?.parse().map_err(|e| to_py(py, e))?,
            "egress" => c.egress = string(py, field, &v)?.parse().map_err(|e| to_py(py, e))?,
            "allow_egress" => c.allow_egress = strings(py, field, &v)?,
            "deny_egress" => c.deny_egress = strings(py, field, &v)?,
            "disk_size_mib" => c.disk_size_mib = Some(int(py, field, &v)?),
            "retain_disk_on_delete" => c.retain_disk_on_delete = boolean(py, field, &v)?,
            "snapshot" => c.snapshot = boolean(py, field, &v)?,
            "env_vars" => c.env_vars = env_vars(py, &v)?,
            _ => {}
        }
    }
    c.validate().map_err(|e| to_py(py, e))?;
    Ok(c)
}

/// The options given for a VM made from a snapshot (`SmolVM.from_snapshot(name, **fields)`):
/// each field converted to its type, `None` meaning "not given"; unknown names are refused.
/// What becomes of each is the runtime's rule ([`smolvm::SnapshotOverrides`]).
pub fn overrides(py: Python<'_>, fields: &Bound<'_, PyDict>) -> PyResult<SnapshotOverrides> {
    let mut o = SnapshotOverrides::default();
    for (k, v) in fields.iter() {
        let key: String = k.extract()?;
        let field = known(py, key)?;
        if v.is_none() {
            continue;
        }
        match field {
            "vm_id" => o.vm_id = Some(string(py, field, &v)?),
            "vcpu_count" => o.vcpu_count = Some(int(py, field, &v)?),
            "mem_size_mib" => o.mem_size_mib = Some(int(py, field, &v)?),
            "image" => o.image = Some(string(py, field, &v)?),
            "kernel_path" => o.kernel_path = Some(path(py, field, &v)?),
            "initrd_path" => o.initrd_path = Some(path(py, field, &v)?),
            "rootfs_path" => o.rootfs_path = Some(path(py, field, &v)?),
            "disk_path" => o.disk_path = Some(path(py, field, &v)?),
            "boot_args" => o.boot_args = Some(string(py, field, &v)?),
            "disk_mode" => {
                o.disk_mode = Some(string(py, field, &v)?.parse().map_err(|e| to_py(py, e))?)
            }
            "network" => {
                o.network = Some(string(py, field, &v)?.parse().map_err(|e| to_py(py, e))?)
            }
            "egress" => o.egress = Some(string(py, field, &v)?.parse().map_err(|e| to_py(py, e))?),
            "allow_egress" => o.allow_egress = Some(strings(py, field, &v)?),
            "deny_egress" => o.deny_egress = Some(strings(py, field, &v)?),
            "disk_size_mib" => o.disk_size_mib = Some(int(py, field, &v)?),
            "retain_disk_on_delete" => o.retain_disk_on_delete = Some(boolean(py, field, &v)?),
            "snapshot" => o.snapshot = Some(boolean(py, field, &v)?),
            "env_vars" => o.env_vars = env_vars(py, &v)?,
            _ => {}
        }
    }
    Ok(o)
}

/// The config as a dict of every field (defaults filled in; paths as strings).
pub fn to_dict<'py>(py: Python<'py>, c: &VmConfig) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let p = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    d.set_item("vm_id", &c.vm_id)?;
    d.set_item("vcpu_count", c.vcpu_count)?;
    d.set_item("mem_size_mib", c.mem_size_mib)?;
    d.set_item("image", &c.image)?;
    d.set_item("kernel_path", p(&c.kernel_path))?;
    d.set_item("initrd_path", p(&c.initrd_path))?;
    d.set_item("rootfs_path", p(&c.rootfs_path))?;
    d.set_item("boot_args", &c.boot_args)?;
    d.set_item("disk_mode", c.disk_mode.to_string())?;
    d.set_item("disk_size_mib", c.disk_size_mib)?;
    d.set_item("disk_path", p(&c.disk_path))?;
    d.set_item("retain_disk_on_delete", c.retain_disk_on_delete)?;
    d.set_item("env_vars", c.env_vars.clone())?;
    d.set_item("network", c.network.to_string())?;
    d.set_item("egress", c.egress.to_string())?;
    d.set_item("allow_egress", c.allow_egress.clone())?;
    d.set_item("deny_egress", c.deny_egress.clone())?;
    d.set_item("snapshot", c.snapshot)?;
    Ok(d)
}

/// Validates `fields` and returns them complete, as the runtime will use them.
#[pyfunction]
pub fn validate_config<'py>(
    py: Python<'py>,
    fields: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyDict>> {
    let c = from_dict(py, fields)?;
    to_dict(py, &c)
}

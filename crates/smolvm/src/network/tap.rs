//! Persistent TAP devices through `/dev/net/tun` ioctls (no helper process).

use std::os::fd::AsRawFd;

use crate::error::{Error, Result};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn attach(name: &str) -> std::io::Result<std::fs::File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "interface names are 1 to 15 bytes",
        ));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which IfReq lays out (40 bytes).
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

fn set_persist(f: &std::fs::File, on: bool) -> std::io::Result<()> {
    // SAFETY: TUNSETPERSIST takes an integer argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETPERSIST as _, on as libc::c_ulong) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Creates the persistent TAP `name` (or takes over one left unattached by a crash).
pub fn create(name: &str) -> Result<()> {
    let f = attach(name).map_err(|e| {
        Error::Network(format!(
            "cannot create TAP device {name} through /dev/net/tun: {e} \
             (nat networking needs root or CAP_NET_ADMIN; use --network user otherwise)"
        ))
    })?;
    set_persist(&f, true)
        .map_err(|e| Error::Network(format!("cannot make TAP device {name} persistent: {e}")))
}

/// Deletes the TAP `name` (its address and routes go with it). One that does not exist is
/// fine; one still attached to a running QEMU is refused by the kernel (busy).
pub fn delete(name: &str) -> Result<()> {
    if !exists(name) {
        return Ok(());
    }
    // A QEMU just killed may hold it for a moment more.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let f = loop {
        match attach(name) {
            Ok(f) => break f,
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => {
                return Err(Error::Network(format!(
                    "cannot delete TAP device {name}: {e} (is a QEMU still attached to it?)"
                )))
            }
        }
    };
    set_persist(&f, false)
        .map_err(|e| Error::Network(format!("cannot delete TAP device {name}: {e}")))
}

/// Whether the network interface `name` exists.
pub fn exists(name: &str) -> bool {
    !name.contains('/') && std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Whether a process (a QEMU) has the TAP open: the kernel turns its carrier on while one
/// is attached.
pub fn attached(name: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{name}/carrier")).is_ok_and(|s| s.trim() == "1")
}

/// Interfaces whose names start with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

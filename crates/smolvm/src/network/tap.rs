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

/// Whether the network interface `name` exists in this process's network namespace (not
/// through /sys, which shows the namespace that mounted it).
pub fn exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// Whether a process (a QEMU) has the TAP open: the kernel turns its carrier on while one
/// is attached (our TAPs are always up), so the interface is `RUNNING`.
pub fn attached(name: &str) -> bool {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return false;
    }
    // SAFETY: a plain datagram socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return false;
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: SIOCGIFFLAGS fills the flags of one `struct ifreq`; fd is ours.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req) };
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    let running = libc::IFF_RUNNING as libc::c_short;
    rc == 0 && req.flags & running != 0
}

/// Interfaces of this network namespace whose names start with `prefix` (from
/// /proc/net/dev, which follows the reading process's namespace).
pub fn list(prefix: &str) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/net/dev").unwrap_or_default();
    let mut v: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim().to_string()))
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

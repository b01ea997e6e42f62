//! Network setup inside the guest: the loopback interface, and the first Ethernet interface
//! as the host describes it on the kernel command line (`smolvm.ip`, `smolvm.gw`,
//! `smolvm.dns`, `smolvm.mtu`; see `smolvm_protocol::boot`).
//!
//! Everything is done with ioctls on an `AF_INET` socket: the agent is one static binary
//! and cannot count on an `ip` binary in the guest.

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use smolvm_protocol::boot::GuestNet;

use crate::error::{AgentError, Result};

/// Where the guest's resolver reads its name servers.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// Where the kernel lists the network interfaces.
pub const SYS_CLASS_NET: &str = "/sys/class/net";
/// How long to wait for an Ethernet interface to appear (virtio_net is loaded by then; its
/// device usually exists at once).
pub const ETHERNET_WAIT: Duration = Duration::from_secs(1);
/// Interval between looks for it.
const ETHERNET_POLL: Duration = Duration::from_millis(2);

/// Brings up `lo` (no `ip` binary needed).
/// The kernel gives `lo` its 127.0.0.1/8 and ::1 addresses when it comes up.
pub fn bring_up_loopback() -> Result<()> {
    IfControl::open()?.set_up("lo")
}

/// Configures the first Ethernet interface (`eth0` in practice) as `net` says, waiting up
/// to [`ETHERNET_WAIT`] for it to appear. Returns the interface's name and how long it
/// took to appear.
pub fn configure_ethernet(net: &GuestNet) -> Result<(String, Duration)> {
    let start = Instant::now();
    let name = wait_for_ethernet(Path::new(SYS_CLASS_NET), ETHERNET_WAIT)?;
    let waited = start.elapsed();
    configure_interface(&name, net)?;
    Ok((name, waited))
}

/// Waits for an interface named `eth<N>` to appear under `dir` (`/sys/class/net`); returns
/// the one with the lowest number.
pub fn wait_for_ethernet(dir: &Path, wait: Duration) -> Result<String> {
    let start = Instant::now();
    loop {
        let names = fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        if let Some(name) = first_ethernet(names.iter().map(String::as_str)) {
            return Ok(name.to_owned());
        }
        if start.elapsed() >= wait {
            return Err(AgentError::NoEthernet {
                dir: dir.to_owned(),
                waited_ms: wait.as_millis() as u64,
            });
        }
        std::thread::sleep(ETHERNET_POLL);
    }
}

/// The `eth<N>` name with the lowest `N` (so `eth2` comes before `eth10`).
fn first_ethernet<'a>(names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    names
        .filter_map(|name| {
            let digits = name.strip_prefix("eth")?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some((digits.parse::<u64>().ok()?, name))
        })
        .min()
        .map(|(_, name)| name)
}

/// Gives interface `name` the MTU, address and prefix of `net`, brings it up, adds a
/// link-scope host route to the gateway when the gateway lies outside the prefix (e.g. a
/// /32 address with an on-link gateway), and a default route via the gateway.
pub fn configure_interface(name: &str, net: &GuestNet) -> Result<()> {
    let ctl = IfControl::open()?;
    ctl.set_mtu(name, net.mtu)?;
    ctl.set_addr(name, net.addr)?;
    ctl.set_netmask(name, net.netmask())?;
    ctl.set_up(name)?;
    if !net.gateway_in_prefix() {
        ctl.add_route(
            &host_route(net.gateway),
            name,
            "a host route to the gateway",
        )?;
    }
    ctl.add_route(&default_route(net.gateway), name, "the default route")?;
    Ok(())
}

/// Writes `/etc/resolv.conf` (or `path`) atomically, mode 0644, naming `servers`.
pub fn write_resolv_conf(path: &Path, servers: &[Ipv4Addr]) -> Result<()> {
    let tmp = temp_path(path);
    let what = |verb: &str| format!("{verb} {}", tmp.display());
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(|e| AgentError::io(what("create"), e))?;
    let written = file
        .write_all(resolv_conf(servers).as_bytes())
        // The umask may have taken bits away.
        .and_then(|()| file.set_permissions(fs::Permissions::from_mode(0o644)))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(AgentError::io(format!("write {}", path.display()), e));
    }
    Ok(())
}

/// The contents of `/etc/resolv.conf` for `servers`.
fn resolv_conf(servers: &[Ipv4Addr]) -> String {
    let mut text = String::from(
        "# Written by smolvm-agent at boot from smolvm.dns on the kernel command line.\n",
    );
    for server in servers {
        text.push_str(&format!("nameserver {server}\n"));
    }
    text
}

/// A file beside `path` to write before renaming it over `path`.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.smolvm-tmp"))
}

/// An `AF_INET` socket for interface and route ioctls.
struct IfControl(OwnedFd);

impl IfControl {
    fn open() -> Result<Self> {
        socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map(Self)
        .map_err(|e| AgentError::sys("open a socket for interface control", e))
    }

    /// Runs an interface ioctl; the kernel reads (and for `SIOCG*` writes) `req`.
    fn call(&self, request: libc::c_ulong, req: &mut libc::ifreq, what: String) -> Result<()> {
        // SAFETY: the socket is open and `req` is a valid ifreq naming an interface; every
        // request used here reads or writes only the ifreq.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), request, req as *mut libc::ifreq) };
        Errno::result(rc)
            .map(drop)
            .map_err(|e| AgentError::sys(what, e))
    }

    fn set_up(&self, name: &str) -> Result<()> {
        let mut req = ifreq(name)?;
        self.call(
            libc::SIOCGIFFLAGS,
            &mut req,
            format!("read the flags of {name}"),
        )?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        self.call(libc::SIOCSIFFLAGS, &mut req, format!("bring {name} up"))
    }

    fn set_mtu(&self, name: &str, mtu: u16) -> Result<()> {
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        self.call(
            libc::SIOCSIFMTU,
            &mut req,
            format!("set the MTU of {name} to {mtu}"),
        )
    }

    fn set_addr(&self, name: &str, addr: Ipv4Addr) -> Result<()> {
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_addr = sockaddr(addr);
        self.call(
            libc::SIOCSIFADDR,
            &mut req,
            format!("set the address of {name} to {addr}"),
        )
    }

    fn set_netmask(&self, name: &str, mask: Ipv4Addr) -> Result<()> {
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_netmask = sockaddr(mask);
        self.call(
            libc::SIOCSIFNETMASK,
            &mut req,
            format!("set the netmask of {name} to {mask}"),
        )
    }

    /// Adds `route` through interface `dev`; a route that already exists is fine.
    fn add_route(&self, route: &libc::rtentry, dev: &str, what: &str) -> Result<()> {
        let dev = interface_name(dev)?;
        let mut route = *route;
        route.rt_dev = dev.as_ptr() as *mut libc::c_char;
        // SAFETY: the socket is open, `route` is a valid rtentry and `rt_dev` points to a
        // NUL-terminated name that outlives the call; the kernel only reads them.
        let rc = unsafe {
            libc::ioctl(
                self.0.as_raw_fd(),
                libc::SIOCADDRT,
                &route as *const libc::rtentry,
            )
        };
        match Errno::result(rc) {
            Ok(_) | Err(Errno::EEXIST) => Ok(()),
            Err(e) => Err(AgentError::sys(format!("add {what}"), e)),
        }
    }
}

/// An interface name as the kernel takes it: non-empty, at most 15 bytes, no NUL.
fn interface_name(name: &str) -> Result<CString> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(AgentError::InterfaceName(name.to_owned()));
    }
    CString::new(name).map_err(|_| AgentError::InterfaceName(name.to_owned()))
}

/// An all-zero ifreq naming interface `name`.
fn ifreq(name: &str) -> Result<libc::ifreq> {
    let name = interface_name(name)?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes_with_nul()) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

/// `addr` as the generic `sockaddr` the interface and route ioctls take (an `AF_INET`
/// `sockaddr_in` with port 0, laid out in place).
fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let mut data = [0 as libc::c_char; 14];
    // sockaddr_in: 2 bytes of port (0), then the address in network order.
    for (dst, src) in data[2..6].iter_mut().zip(addr.octets()) {
        *dst = src as libc::c_char;
    }
    libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data: data,
    }
}

/// An all-zero rtentry (no device yet).
fn rtentry(dst: Ipv4Addr, gateway: Ipv4Addr, genmask: Ipv4Addr, flags: u16) -> libc::rtentry {
    // SAFETY: rtentry is plain old data (a null `rt_dev` means no device); all-zero is valid.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(dst);
    rt.rt_gateway = sockaddr(gateway);
    rt.rt_genmask = sockaddr(genmask);
    rt.rt_flags = flags;
    rt
}

/// A link-scope route to the single address `to` (no gateway: it is on the link).
fn host_route(to: Ipv4Addr) -> libc::rtentry {
    rtentry(
        to,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::BROADCAST,
        libc::RTF_UP | libc::RTF_HOST,
    )
}

/// The default route via `gateway`.
fn default_route(gateway: Ipv4Addr) -> libc::rtentry {
    rtentry(
        Ipv4Addr::UNSPECIFIED,
        gateway,
        Ipv4Addr::UNSPECIFIED,
        libc::RTF_UP | libc::RTF_GATEWAY,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr_of(sa: &libc::sockaddr) -> Ipv4Addr {
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(&sa.sa_data[..2], &[0, 0]);
        let b: Vec<u8> = sa.sa_data[2..6].iter().map(|&c| c as u8).collect();
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    #[test]
    fn sockaddr_is_an_inet_address_in_network_order() {
        let sa = sockaddr(Ipv4Addr::new(172, 16, 200, 7));
        assert_eq!(addr_of(&sa), Ipv4Addr::new(172, 16, 200, 7));
        assert!(sa.sa_data[6..].iter().all(|&c| c == 0));
        // The same bytes as the kernel's struct sockaddr_in.
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(Ipv4Addr::new(172, 16, 200, 7)).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: both are 16-byte plain old data.
        let as_generic: libc::sockaddr = unsafe { std::mem::transmute(sin) };
        assert_eq!(as_generic.sa_data, sa.sa_data);
    }

    #[test]
    fn routes_have_the_right_shape() {
        let host = host_route(Ipv4Addr::new(172, 16, 0, 1));
        assert_eq!(host.rt_flags, libc::RTF_UP | libc::RTF_HOST);
        assert_eq!(addr_of(&host.rt_dst), Ipv4Addr::new(172, 16, 0, 1));
        assert_eq!(addr_of(&host.rt_genmask), Ipv4Addr::BROADCAST);
        assert_eq!(addr_of(&host.rt_gateway), Ipv4Addr::UNSPECIFIED);
        let default = default_route(Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(default.rt_flags, libc::RTF_UP | libc::RTF_GATEWAY);
        assert_eq!(addr_of(&default.rt_dst), Ipv4Addr::UNSPECIFIED);
        assert_eq!(addr_of(&default.rt_genmask), Ipv4Addr::UNSPECIFIED);
        assert_eq!(addr_of(&default.rt_gateway), Ipv4Addr::new(10, 0, 2, 2));
        assert!(default.rt_dev.is_null());
    }

    #[test]
    fn interface_names_are_checked() {
        let req = ifreq("eth0").unwrap();
        assert_eq!(
            &req.ifr_name[..5],
            &[b'e' as _, b't' as _, b'h' as _, b'0' as _, 0]
        );
        ifreq("fifteen-bytes-x").unwrap();
        for bad in ["", "sixteen-bytes-xx", "eth\x001"] {
            let err = ifreq(bad).unwrap_err();
            assert!(
                matches!(err, AgentError::InterfaceName(_)),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn first_ethernet_is_the_lowest_numbered_eth() {
        let pick = |names: &[&'static str]| first_ethernet(names.iter().copied());
        assert_eq!(pick(&["lo", "eth10", "eth2", "sit0"]), Some("eth2"));
        assert_eq!(pick(&["eth1", "eth0"]), Some("eth0"));
        assert_eq!(
            pick(&["lo", "eth", "ethx", "eth0x", "veth0", "enp0s3"]),
            None
        );
        assert_eq!(pick(&[]), None);
    }

    #[test]
    fn waits_for_an_ethernet_interface_then_gives_up() {
        let dir = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let err = wait_for_ethernet(dir.path(), Duration::from_millis(30)).unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert!(err.to_string().contains("within 30 ms"), "{err}");
        std::fs::create_dir(dir.path().join("lo")).unwrap();
        std::fs::create_dir(dir.path().join("eth1")).unwrap();
        std::fs::create_dir(dir.path().join("eth0")).unwrap();
        assert_eq!(
            wait_for_ethernet(dir.path(), Duration::ZERO).unwrap(),
            "eth0"
        );
        // A missing directory is like an empty one.
        assert!(wait_for_ethernet(&dir.path().join("none"), Duration::ZERO).is_err());
    }

    #[test]
    fn resolv_conf_is_replaced_atomically_with_mode_0644() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(&path, "# placeholder\n").unwrap();
        std::fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let servers = [Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(1, 1, 1, 1)];
        write_resolv_conf(&path, &servers).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with('#'));
        assert!(
            text.ends_with("nameserver 10.0.2.3\nnameserver 1.1.1.1\n"),
            "{text}"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        // A symlink (e.g. to a resolver's file) is replaced, not written through.
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "keep\n").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        write_resolv_conf(&path, &servers[..1]).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep\n");
        assert!(!std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        // Nothing left beside it.
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["elsewhere", "resolv.conf"]);
        // An unwritable place is an error naming the file, not a panic.
        let err =
            write_resolv_conf(&dir.path().join("no/such/dir/resolv.conf"), &servers).unwrap_err();
        assert!(err.to_string().contains("resolv.conf"), "{err}");
    }

    /// Runs `ip ARGS` (in this thread's network namespace); its stdout.
    fn ip(args: &str) -> String {
        let out = std::process::Command::new("ip")
            .args(args.split(' '))
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Moves this test's thread into a fresh network namespace with a veth pair `vtest0` /
    /// `vtest1` (children it spawns inherit it). False, and nothing done, where that is not
    /// possible (not root, no `ip`, no veth support).
    fn private_netns_with_veth() -> bool {
        // SAFETY: unshare only changes this thread's namespaces.
        if unsafe { libc::geteuid() } != 0 || unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!("skipped: needs root to make a private network namespace");
            return false;
        }
        let made = std::process::Command::new("ip")
            .args([
                "link", "add", "vtest0", "type", "veth", "peer", "name", "vtest1",
            ])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !made {
            eprintln!("skipped: cannot make a veth pair (no `ip` or no veth support)");
            return false;
        }
        ip("link set vtest1 up");
        true
    }

    /// The real ioctls, on a veth in a private network namespace: a /32 address with an
    /// on-link gateway outside it (the host's `nat` mode), and a /24 (`user` mode).
    #[test]
    fn configures_an_interface_in_a_private_netns() {
        std::thread::spawn(|| {
            if !private_netns_with_veth() {
                return;
            }
            let nat = GuestNet {
                addr: Ipv4Addr::new(172, 16, 3, 7),
                prefix: 32,
                gateway: Ipv4Addr::new(172, 16, 0, 1),
                dns: vec![],
                mtu: 1400,
            };
            configure_interface("vtest0", &nat).unwrap();
            let link = ip("link show vtest0");
            assert!(link.contains("mtu 1400") && link.contains(",UP"), "{link}");
            let addr = ip("-4 addr show vtest0");
            assert!(addr.contains("inet 172.16.3.7/32"), "{addr}");
            let routes = ip("-4 route");
            assert!(
                routes.contains("default via 172.16.0.1 dev vtest0"),
                "{routes}"
            );
            assert!(
                routes.contains("172.16.0.1 dev vtest0 scope link"),
                "{routes}"
            );
            // Again: nothing fails on routes that exist already.
            configure_interface("vtest0", &nat).unwrap();
            bring_up_loopback().unwrap();
            // An interface that does not exist is an error naming it.
            let err = configure_interface("nosuch0", &nat).unwrap_err();
            assert!(err.to_string().contains("nosuch0"), "{err}");
        })
        .join()
        .unwrap();
        std::thread::spawn(|| {
            if !private_netns_with_veth() {
                return;
            }
            configure_interface("vtest0", &GuestNet::user_mode()).unwrap();
            let addr = ip("-4 addr show vtest0");
            assert!(addr.contains("inet 10.0.2.15/24"), "{addr}");
            let routes = ip("-4 route");
            assert!(
                routes.contains("default via 10.0.2.2 dev vtest0"),
                "{routes}"
            );
            assert!(routes.contains("10.0.2.0/24 dev vtest0"), "{routes}");
            assert!(ip("link show vtest0").contains("mtu 1500"));
        })
        .join()
        .unwrap();
    }
}

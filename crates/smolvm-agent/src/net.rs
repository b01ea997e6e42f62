//! Network setup inside the guest: the loopback interface, and the first Ethernet interface
//! as the host describes it on the kernel command line (`smolvm.ip`, `smolvm.gw`,
//! `smolvm.dns`, `smolvm.mtu`; see `smolvm_protocol::boot`).
//!
//! A guest restored from a snapshot gets a new identity from the host's
//! `HostMessage::Network` ([`reconfigure_ethernet`]): the same configuration, replacing
//! whatever addresses, routes and neighbours the interface had.
//!
//! Everything is done with ioctls on an `AF_INET` socket (and, to list routes and
//! neighbours, `/proc`): the agent is one static binary and cannot count on an `ip` binary
//! in the guest.

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

/// Gives the first Ethernet interface found under `sys_class_net` (`/sys/class/net`) the
/// configuration `net`, replacing what it had (see [`reconfigure_interface`]), and writes
/// `resolv_conf` (`/etc/resolv.conf`) when `net` names DNS servers. Waits up to
/// [`ETHERNET_WAIT`] for the interface. Returns its name.
///
/// This answers the host's `Network` request, sent to a guest restored from a snapshot
/// whose network configuration is the snapshot's.
pub fn reconfigure_ethernet(
    sys_class_net: &Path,
    resolv_conf: &Path,
    net: &GuestNet,
) -> Result<String> {
    net.validate()?;
    let name = wait_for_ethernet(sys_class_net, ETHERNET_WAIT)?;
    reconfigure_interface(&name, net)?;
    if !net.dns.is_empty() {
        write_resolv_conf(resolv_conf, &net.dns)?;
    }
    Ok(name)
}

/// Configures interface `name` as [`configure_interface`] does, after removing what it had:
/// every IPv4 address (the kernel then drops the routes through it and its neighbour table),
/// any IPv4 route still through it, and every neighbour (ARP) entry on it and for the new
/// gateway, whose link-layer address may have changed (a restored guest's host side is a
/// new device with a new MAC address). Applying the same configuration again succeeds.
pub fn reconfigure_interface(name: &str, net: &GuestNet) -> Result<()> {
    let ctl = IfControl::open()?;
    ctl.remove_addresses(name)?;
    for route in routes_through(name)? {
        ctl.delete_route(&route, name)?;
    }
    for addr in neighbours_on(name)?
        .into_iter()
        .chain(std::iter::once(net.gateway))
    {
        ctl.forget_neighbour(addr, name)?;
    }
    configure_interface(name, net)
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

/// The kernel's IPv4 routes (main table) of this thread's network namespace.
const PROC_ROUTE: &str = "/proc/thread-self/net/route";
/// The kernel's ARP table of this thread's network namespace.
const PROC_ARP: &str = "/proc/thread-self/net/arp";
/// Most addresses removed from one interface before giving up (a guard against a kernel
/// that would not remove them, never reached in practice).
const MAX_ADDRESSES: usize = 256;

/// One line of [`PROC_ROUTE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Route {
    dst: Ipv4Addr,
    gateway: Ipv4Addr,
    mask: Ipv4Addr,
    flags: u16,
    metric: u32,
}

/// The IPv4 routes through interface `name`, from [`PROC_ROUTE`].
fn routes_through(name: &str) -> Result<Vec<Route>> {
    let text = fs::read_to_string(PROC_ROUTE)
        .map_err(|e| AgentError::io(format!("read {PROC_ROUTE}"), e))?;
    Ok(parse_routes(&text, name))
}

/// The routes through `dev` in the text of `/proc/net/route` (lines it cannot read are
/// skipped). Addresses are printed as the hex of the raw 32-bit word, in host byte order.
fn parse_routes(text: &str, dev: &str) -> Vec<Route> {
    let word = |s: &str| u32::from_str_radix(s, 16).ok();
    let addr = |s: &str| word(s).map(|w| Ipv4Addr::from(w.to_ne_bytes()));
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || f[0] != dev {
                return None;
            }
            Some(Route {
                dst: addr(f[1])?,
                gateway: addr(f[2])?,
                flags: u16::from_str_radix(f[3], 16).ok()?,
                metric: f[6].parse().ok()?,
                mask: addr(f[7])?,
            })
        })
        .collect()
}

/// The addresses with a neighbour (ARP) entry on interface `name`, from [`PROC_ARP`].
fn neighbours_on(name: &str) -> Result<Vec<Ipv4Addr>> {
    let text =
        fs::read_to_string(PROC_ARP).map_err(|e| AgentError::io(format!("read {PROC_ARP}"), e))?;
    Ok(parse_neighbours(&text, name))
}

/// The addresses with an entry on `dev` in the text of `/proc/net/arp` (address first,
/// device last on each line).
fn parse_neighbours(text: &str, dev: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 2 || f.last() != Some(&dev) {
                return None;
            }
            f[0].parse().ok()
        })
        .collect()
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

    /// The first IPv4 address of `name`; `None` when it has none.
    fn first_addr(&self, name: &str) -> Result<Option<Ipv4Addr>> {
        let mut req = ifreq(name)?;
        // SAFETY: the socket is open and `req` is a valid ifreq; the kernel writes the
        // address into the ifreq.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), libc::SIOCGIFADDR, &mut req) };
        match Errno::result(rc) {
            // SAFETY: SIOCGIFADDR filled the address member of the union.
            Ok(_) => Ok(Some(inet_addr(unsafe { &req.ifr_ifru.ifru_addr }))),
            Err(Errno::EADDRNOTAVAIL) => Ok(None),
            Err(e) => Err(AgentError::sys(format!("read the address of {name}"), e)),
        }
    }

    /// Removes every IPv4 address of `name` (setting 0.0.0.0 removes the first one). When
    /// the last one goes, the kernel drops the routes through `name` and its neighbours.
    fn remove_addresses(&self, name: &str) -> Result<()> {
        for _ in 0..MAX_ADDRESSES {
            let Some(addr) = self.first_addr(name)? else {
                return Ok(());
            };
            let mut req = ifreq(name)?;
            req.ifr_ifru.ifru_addr = sockaddr(Ipv4Addr::UNSPECIFIED);
            self.call(
                libc::SIOCSIFADDR,
                &mut req,
                format!("remove the address {addr} of {name}"),
            )?;
        }
        Err(AgentError::sys(
            format!("remove the addresses of {name} (still some after {MAX_ADDRESSES})"),
            Errno::EBUSY,
        ))
    }

    /// Deletes `route` (as listed by the kernel) through interface `dev`; one that is gone
    /// already is fine.
    fn delete_route(&self, route: &Route, dev: &str) -> Result<()> {
        let flags = route.flags & (libc::RTF_UP | libc::RTF_GATEWAY | libc::RTF_HOST);
        let mut rt = rtentry(route.dst, route.gateway, route.mask, flags);
        // The kernel reads `rt_metric - 1` as the priority to match; 0 matches any.
        rt.rt_metric = route
            .metric
            .checked_add(1)
            .and_then(|m| libc::c_short::try_from(m).ok())
            .unwrap_or(0);
        let what = format!(
            "delete the route to {}/{} via {} on {dev}",
            route.dst,
            u32::from(route.mask).leading_ones(),
            route.gateway
        );
        match self.route_ioctl(libc::SIOCDELRT, &rt, dev, &what) {
            Err(AgentError::Sys {
                source: Errno::ESRCH,
                ..
            }) => Ok(()),
            other => other,
        }
    }

    /// Drops the neighbour (ARP) entry for `addr` on interface `dev`; none is fine.
    fn forget_neighbour(&self, addr: Ipv4Addr, dev: &str) -> Result<()> {
        let name = interface_name(dev)?;
        // SAFETY: arpreq is plain old data; all-zero is a valid value.
        let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
        req.arp_pa = sockaddr(addr);
        for (dst, src) in req.arp_dev.iter_mut().zip(name.as_bytes_with_nul()) {
            *dst = *src as libc::c_char;
        }
        // SAFETY: the socket is open and `req` is a valid arpreq; the kernel only reads it.
        let rc = unsafe {
            libc::ioctl(
                self.0.as_raw_fd(),
                libc::SIOCDARP,
                &req as *const libc::arpreq,
            )
        };
        match Errno::result(rc) {
            Ok(_) | Err(Errno::ENXIO) => Ok(()),
            Err(e) => Err(AgentError::sys(
                format!("forget the neighbour {addr} on {dev}"),
                e,
            )),
        }
    }

    /// Adds `route` through interface `dev`; a route that already exists is fine.
    fn add_route(&self, route: &libc::rtentry, dev: &str, what: &str) -> Result<()> {
        match self.route_ioctl(libc::SIOCADDRT, route, dev, &format!("add {what}")) {
            Err(AgentError::Sys {
                source: Errno::EEXIST,
                ..
            }) => Ok(()),
            other => other,
        }
    }

    /// Runs a route ioctl (`SIOCADDRT`, `SIOCDELRT`) for `route` through interface `dev`.
    fn route_ioctl(
        &self,
        request: libc::c_ulong,
        route: &libc::rtentry,
        dev: &str,
        what: &str,
    ) -> Result<()> {
        let dev = interface_name(dev)?;
        let mut route = *route;
        route.rt_dev = dev.as_ptr() as *mut libc::c_char;
        // SAFETY: the socket is open, `route` is a valid rtentry and `rt_dev` points to a
        // NUL-terminated name that outlives the call; the kernel only reads them.
        let rc =
            unsafe { libc::ioctl(self.0.as_raw_fd(), request, &route as *const libc::rtentry) };
        Errno::result(rc)
            .map(drop)
            .map_err(|e| AgentError::sys(what, e))
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

/// The IPv4 address in a generic `sockaddr` the kernel filled (0.0.0.0 for another family).
fn inet_addr(sa: &libc::sockaddr) -> Ipv4Addr {
    if sa.sa_family != libc::AF_INET as libc::sa_family_t {
        return Ipv4Addr::UNSPECIFIED;
    }
    Ipv4Addr::new(
        sa.sa_data[2] as u8,
        sa.sa_data[3] as u8,
        sa.sa_data[4] as u8,
        sa.sa_data[5] as u8,
    )
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

    #[test]
    fn parses_the_kernels_route_and_arp_tables() {
        let routes =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t0100A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            eth1\t00000000\t0102000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            eth0\t0100A8C0\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
            eth0\tgarbage\n";
        let on_eth0 = parse_routes(routes, "eth0");
        let host = |a, b, c, d| Ipv4Addr::new(a, b, c, d);
        assert_eq!(
            on_eth0,
            [
                Route {
                    dst: Ipv4Addr::UNSPECIFIED,
                    gateway: host(192, 168, 0, 1),
                    mask: Ipv4Addr::UNSPECIFIED,
                    flags: libc::RTF_UP | libc::RTF_GATEWAY,
                    metric: 100,
                },
                Route {
                    dst: host(192, 168, 0, 1),
                    gateway: Ipv4Addr::UNSPECIFIED,
                    mask: Ipv4Addr::BROADCAST,
                    flags: libc::RTF_UP | libc::RTF_HOST,
                    metric: 0,
                },
            ]
        );
        assert!(parse_routes(routes, "eth2").is_empty());
        assert!(parse_routes("", "eth0").is_empty());
        let arp =
            "IP address       HW type     Flags       HW address            Mask     Device\n\
            10.0.2.2         0x1         0x2         52:55:0a:00:02:02     *        eth0\n\
            172.16.0.1       0x1         0x0         00:00:00:00:00:00     *        eth1\n\
            10.0.2.3         0x1         0x2         52:55:0a:00:02:03     *        eth0\n\
            not-an-address   0x1         0x2         52:55:0a:00:02:03     *        eth0\n";
        assert_eq!(
            parse_neighbours(arp, "eth0"),
            [host(10, 0, 2, 2), host(10, 0, 2, 3)]
        );
        assert_eq!(parse_neighbours(arp, "eth1"), [host(172, 16, 0, 1)]);
        assert!(parse_neighbours(arp, "eth").is_empty());
    }

    #[test]
    fn reconfiguring_checks_the_configuration_first() {
        let dir = tempfile::tempdir().unwrap();
        let bad = GuestNet {
            prefix: 33,
            ..GuestNet::user_mode()
        };
        let err =
            reconfigure_ethernet(dir.path(), &dir.path().join("resolv.conf"), &bad).unwrap_err();
        assert!(err.to_string().contains("prefix"), "{err}");
        // No interface: an error naming where it looked, after a bounded wait (the bound is
        // `wait_for_ethernet`'s, tested above).
        let err = reconfigure_ethernet(
            &dir.path().join("none"),
            &dir.path().join("resolv.conf"),
            &GuestNet::user_mode(),
        )
        .unwrap_err();
        assert!(matches!(err, AgentError::NoEthernet { .. }), "{err}");
        assert!(!dir.path().join("resolv.conf").exists());
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
    /// `vtest1` (children it spawns inherit it). Fails the test, saying why, where that is
    /// not possible (not root, no `ip`, no veth support).
    fn private_netns_with_veth() {
        // SAFETY: geteuid has no preconditions; unshare only changes this thread's
        // namespaces.
        if unsafe { libc::geteuid() } != 0 || unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            panic!(
                "this test needs root to make a private network namespace ({}): run it as \
                 root, as scripts/test does",
                std::io::Error::last_os_error()
            );
        }
        let made = std::process::Command::new("ip")
            .args([
                "link", "add", "vtest0", "type", "veth", "peer", "name", "vtest1",
            ])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            made,
            "cannot make a veth pair: this test needs `ip` (iproute2, which scripts/install-deps \
             installs) and a kernel with veth support"
        );
        ip("link set vtest1 up");
    }

    /// A `nat`-mode configuration: a /32 address with an on-link gateway outside it.
    fn nat_net() -> GuestNet {
        GuestNet {
            addr: Ipv4Addr::new(172, 16, 3, 7),
            prefix: 32,
            gateway: Ipv4Addr::new(172, 16, 0, 1),
            dns: vec![],
            mtu: 1400,
        }
    }

    /// The real ioctls, on a veth in a private network namespace: a /32 address with an
    /// on-link gateway outside it (the host's `nat` mode), and a /24 (`user` mode).
    #[test]
    fn configures_an_interface_in_a_private_netns() {
        std::thread::spawn(|| {
            private_netns_with_veth();
            let nat = nat_net();
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
            private_netns_with_veth();
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

    /// What `ip` shows of the addresses, routes and neighbours in this thread's namespace.
    fn state(dev: &str) -> (String, String, String) {
        (
            ip(&format!("-4 addr show {dev}")),
            ip("-4 route"),
            ip(&format!("-4 neigh show dev {dev}")),
        )
    }

    /// The real ioctls again: a guest configured at boot (or not at all) gets a new
    /// identity; only the new address and routes remain and the old neighbours are gone.
    #[test]
    fn reconfigures_an_interface_in_a_private_netns() {
        std::thread::spawn(|| {
            private_netns_with_veth();
            let nat = nat_net();
            configure_interface("vtest0", &nat).unwrap();
            // What a guest may have accumulated: a second address, a route of its own, the
            // old gateway's and the new gateway's (stale) link-layer addresses.
            ip("addr add 192.168.9.9/24 dev vtest0");
            ip("route add 198.51.100.0/24 via 172.16.0.1 dev vtest0");
            ip("neigh replace 172.16.0.1 lladdr 02:00:00:00:00:01 dev vtest0 nud permanent");
            ip("neigh replace 10.0.2.2 lladdr 02:00:00:00:00:02 dev vtest0 nud reachable");
            let (addr, routes, neigh) = state("vtest0");
            assert!(addr.contains("192.168.9.9/24"), "{addr}");
            assert!(routes.contains("198.51.100.0/24"), "{routes}");
            assert!(neigh.contains("02:00:00:00:00:01"), "{neigh}");

            let user = GuestNet::user_mode();
            reconfigure_interface("vtest0", &user).unwrap();
            let (addr, routes, neigh) = state("vtest0");
            let inets: Vec<&str> = addr.lines().filter(|l| l.contains("inet ")).collect();
            assert_eq!(inets.len(), 1, "{addr}");
            assert!(inets[0].contains("inet 10.0.2.15/24"), "{addr}");
            let routes: Vec<&str> = routes.lines().map(str::trim).collect();
            assert_eq!(routes.len(), 2, "{routes:?}");
            assert!(
                routes.contains(&"default via 10.0.2.2 dev vtest0"),
                "{routes:?}"
            );
            assert!(
                routes
                    .iter()
                    .any(|r| r.starts_with("10.0.2.0/24 dev vtest0")),
                "{routes:?}"
            );
            assert!(!neigh.contains("02:00:00:00:00:0"), "{neigh}");
            assert!(!neigh.contains("172.16.0.1"), "{neigh}");
            assert!(ip("link show vtest0").contains("mtu 1500"));

            // The same configuration again succeeds and changes nothing.
            let before = state("vtest0");
            reconfigure_interface("vtest0", &user).unwrap();
            assert_eq!(state("vtest0"), before);

            // Back to the /32 with an off-prefix gateway: its host route comes back.
            reconfigure_interface("vtest0", &nat).unwrap();
            let (addr, routes, _) = state("vtest0");
            assert!(addr.contains("inet 172.16.3.7/32"), "{addr}");
            assert!(!addr.contains("10.0.2.15"), "{addr}");
            let routes: Vec<&str> = routes.lines().map(str::trim).collect();
            assert_eq!(
                routes,
                [
                    "default via 172.16.0.1 dev vtest0",
                    "172.16.0.1 dev vtest0 scope link"
                ]
            );
            // An interface that does not exist is an error naming it.
            let err = reconfigure_interface("nosuch0", &nat).unwrap_err();
            assert!(err.to_string().contains("nosuch0"), "{err}");
        })
        .join()
        .unwrap();
        // A template that booted without a network: the interface is down, unconfigured.
        std::thread::spawn(|| {
            private_netns_with_veth();
            reconfigure_interface("vtest0", &GuestNet::user_mode()).unwrap();
            let (addr, routes, _) = state("vtest0");
            assert!(addr.contains("inet 10.0.2.15/24"), "{addr}");
            assert!(
                routes.contains("default via 10.0.2.2 dev vtest0"),
                "{routes}"
            );
            assert!(ip("link show vtest0").contains(",UP"));
        })
        .join()
        .unwrap();
        // An interface up without an address, with a route and neighbours of its own: the
        // kernel drops nothing by itself here (removing an interface's last address, or
        // changing its netmask, would make it flush them; /24 in 192.168/16 is the netmask
        // the kernel gives anyway), so the explicit deletions must.
        std::thread::spawn(|| {
            private_netns_with_veth();
            let lan = GuestNet {
                addr: Ipv4Addr::new(192, 168, 5, 15),
                prefix: 24,
                gateway: Ipv4Addr::new(192, 168, 5, 1),
                dns: vec![],
                mtu: 1500,
            };
            ip("link set vtest0 up");
            ip("route add 198.51.100.0/24 dev vtest0 metric 7");
            ip("neigh replace 198.51.100.9 lladdr 02:00:00:00:00:09 dev vtest0 nud permanent");
            ip("neigh replace 192.168.5.1 lladdr 02:00:00:00:00:01 dev vtest0 nud permanent");
            let (_, routes, neigh) = state("vtest0");
            assert!(routes.contains("198.51.100.0/24"), "{routes}");
            assert!(neigh.contains("02:00:00:00:00:09"), "{neigh}");
            reconfigure_interface("vtest0", &lan).unwrap();
            let (addr, routes, neigh) = state("vtest0");
            assert!(addr.contains("inet 192.168.5.15/24"), "{addr}");
            assert!(!routes.contains("198.51.100.0/24"), "{routes}");
            assert!(
                routes.contains("default via 192.168.5.1 dev vtest0"),
                "{routes}"
            );
            assert!(!neigh.contains("02:00:00:00:00:0"), "{neigh}");
        })
        .join()
        .unwrap();
    }
}

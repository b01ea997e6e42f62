//! The guest's network configuration as the host passes it on the kernel command line.
//!
//! This is a contract between the host (which writes the parameters) and the agent (which
//! reads them from `/proc/cmdline` at boot), not a wire message: it does not change
//! [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).
//!
//! The parameters are
//!
//! ```text
//! smolvm.ip=A.B.C.D/P smolvm.gw=A.B.C.D [smolvm.dns=A.B.C.D[,A.B.C.D[,A.B.C.D]]] smolvm.mtu=N
//! ```
//!
//! Without `smolvm.ip` the guest configures no interface besides loopback.

use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use crate::ProtocolError;

/// Kernel parameter holding the guest's address and prefix length (`A.B.C.D/P`).
pub const PARAM_IP: &str = "smolvm.ip";
/// Kernel parameter holding the default gateway (`A.B.C.D`).
pub const PARAM_GW: &str = "smolvm.gw";
/// Kernel parameter holding the DNS servers (`A.B.C.D[,A.B.C.D...]`).
pub const PARAM_DNS: &str = "smolvm.dns";
/// Kernel parameter holding the interface MTU (decimal).
pub const PARAM_MTU: &str = "smolvm.mtu";

/// Most DNS servers a guest takes (glibc's resolver reads at most three `nameserver` lines).
pub const MAX_DNS: usize = 3;
/// MTUs a guest accepts: IPv4's minimum reassembly size up to jumbo frames.
pub const MTU_RANGE: RangeInclusive<u16> = 576..=9000;
/// MTU used when `smolvm.mtu` is absent.
pub const DEFAULT_MTU: u16 = 1500;

/// How the guest configures its first Ethernet interface.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestNet {
    /// The guest's address.
    pub addr: Ipv4Addr,
    /// Its prefix length (0..=32). A `/32` address with a gateway outside it is valid: the
    /// guest then reaches the gateway through a link-scope host route.
    pub prefix: u8,
    /// The default gateway.
    pub gateway: Ipv4Addr,
    /// DNS servers for `/etc/resolv.conf`, at most [`MAX_DNS`]; empty leaves the image's file.
    pub dns: Vec<Ipv4Addr>,
    /// The interface MTU, within [`MTU_RANGE`].
    pub mtu: u16,
}

impl GuestNet {
    /// QEMU user-mode networking (slirp): its fixed guest address, gateway and DNS server.
    pub fn user_mode() -> Self {
        Self {
            addr: Ipv4Addr::new(10, 0, 2, 15),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            dns: vec![Ipv4Addr::new(10, 0, 2, 3)],
            mtu: DEFAULT_MTU,
        }
    }

    /// The kernel arguments that carry this configuration, separated by single spaces:
    /// `smolvm.ip=A.B.C.D/P smolvm.gw=A.B.C.D [smolvm.dns=A,B] smolvm.mtu=N`.
    pub fn to_kernel_args(&self) -> String {
        let mut args = format!(
            "{PARAM_IP}={}/{} {PARAM_GW}={}",
            self.addr, self.prefix, self.gateway
        );
        if !self.dns.is_empty() {
            let dns: Vec<String> = self.dns.iter().map(Ipv4Addr::to_string).collect();
            args.push_str(&format!(" {PARAM_DNS}={}", dns.join(",")));
        }
        args.push_str(&format!(" {PARAM_MTU}={}", self.mtu));
        args
    }

    /// Parses the values of the `smolvm.ip`, `smolvm.gw`, `smolvm.dns` and `smolvm.mtu`
    /// parameters (without the `name=`), as found on the kernel command line.
    ///
    /// Returns `Ok(None)` when none of them is given (the guest has no network to configure)
    /// and an error when `smolvm.ip` is missing but another is given, when `smolvm.gw` is
    /// missing, or when any value is malformed or out of range. A missing `smolvm.mtu` means
    /// [`DEFAULT_MTU`]; a missing `smolvm.dns` means no DNS servers.
    pub fn from_params(
        ip: Option<&str>,
        gw: Option<&str>,
        dns: Option<&str>,
        mtu: Option<&str>,
    ) -> Result<Option<GuestNet>, ProtocolError> {
        let Some(ip) = ip else {
            let given = [(PARAM_GW, gw), (PARAM_DNS, dns), (PARAM_MTU, mtu)]
                .into_iter()
                .find_map(|(name, v)| v.map(|v| (name, v)));
            return match given {
                None => Ok(None),
                Some((name, value)) => Err(invalid(
                    name,
                    value,
                    format!("{PARAM_IP} is missing; without an address the guest has no network"),
                )),
            };
        };
        let (addr, prefix) = parse_cidr(ip)?;
        let gw_value = gw.ok_or_else(|| {
            invalid(
                PARAM_GW,
                "",
                format!("missing; {PARAM_IP} needs a default gateway beside it"),
            )
        })?;
        let gateway = parse_addr(PARAM_GW, gw_value, gw_value)?;
        let dns = match dns {
            None => Vec::new(),
            Some(list) => parse_dns(list)?,
        };
        let mtu = match mtu {
            None => DEFAULT_MTU,
            Some(value) => parse_mtu(value)?,
        };
        let net = GuestNet {
            addr,
            prefix,
            gateway,
            dns,
            mtu,
        };
        net.validate()?;
        Ok(Some(net))
    }

    /// This configuration with the `smolvm.*` network parameters found in `args` (a kernel
    /// command line; the last of each wins) laid over it, as a guest booted with this
    /// configuration's arguments followed by `args` would see it.
    pub fn overridden_by(&self, args: &str) -> Result<GuestNet, ProtocolError> {
        let own = self.to_kernel_args();
        let line = format!("{own} {args}");
        let last = |name: &str| {
            line.split_whitespace()
                .rev()
                .filter_map(|t| t.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v)
        };
        let net = GuestNet::from_params(
            last(PARAM_IP),
            last(PARAM_GW),
            last(PARAM_DNS),
            last(PARAM_MTU),
        )?;
        Ok(net.unwrap_or_else(|| self.clone()))
    }

    /// Checks the values a caller may have built by hand: what [`GuestNet::from_params`]
    /// would refuse after a round trip through [`GuestNet::to_kernel_args`].
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let ip = format!("{}/{}", self.addr, self.prefix);
        if self.prefix > 32 {
            return Err(invalid(PARAM_IP, &ip, "the prefix length must be 0..=32"));
        }
        check_unicast(PARAM_IP, &ip, self.addr)?;
        let gw = self.gateway.to_string();
        check_unicast(PARAM_GW, &gw, self.gateway)?;
        if self.gateway == self.addr {
            return Err(invalid(
                PARAM_GW,
                &gw,
                "the gateway must differ from the guest's own address",
            ));
        }
        if self.dns.len() > MAX_DNS {
            return Err(invalid(
                PARAM_DNS,
                &self.dns.len().to_string(),
                format!("at most {MAX_DNS} DNS servers are allowed"),
            ));
        }
        for server in &self.dns {
            check_unicast(PARAM_DNS, &server.to_string(), *server)?;
        }
        if !MTU_RANGE.contains(&self.mtu) {
            return Err(invalid(
                PARAM_MTU,
                &self.mtu.to_string(),
                mtu_range_reason(),
            ));
        }
        Ok(())
    }

    /// The netmask of [`GuestNet::prefix`], e.g. 255.255.255.0 for 24.
    pub fn netmask(&self) -> Ipv4Addr {
        let prefix = u32::from(self.prefix.min(32));
        let bits = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
        Ipv4Addr::from(bits)
    }

    /// Whether the gateway lies inside the guest's prefix. When it does not (e.g. a `/32`
    /// address), the guest needs a link-scope host route to it before the default route.
    pub fn gateway_in_prefix(&self) -> bool {
        let mask = u32::from(self.netmask());
        u32::from(self.addr) & mask == u32::from(self.gateway) & mask
    }
}

fn invalid(param: &'static str, value: &str, reason: impl Into<String>) -> ProtocolError {
    ProtocolError::InvalidBootParam {
        param,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

fn mtu_range_reason() -> String {
    format!(
        "the MTU must be {}..={}",
        MTU_RANGE.start(),
        MTU_RANGE.end()
    )
}

/// Parses `A.B.C.D/P`.
fn parse_cidr(value: &str) -> Result<(Ipv4Addr, u8), ProtocolError> {
    let Some((addr, prefix)) = value.split_once('/') else {
        return Err(invalid(
            PARAM_IP,
            value,
            "expected ADDRESS/PREFIX, e.g. 10.0.2.15/24",
        ));
    };
    let addr = parse_addr(PARAM_IP, value, addr)?;
    let prefix = parse_decimal(prefix)
        .and_then(|p| u8::try_from(p).ok())
        .filter(|p| *p <= 32)
        .ok_or_else(|| invalid(PARAM_IP, value, "the prefix length must be a number 0..=32"))?;
    Ok((addr, prefix))
}

/// Parses one dotted-quad address; `whole` is the parameter's value, for the message.
fn parse_addr(param: &'static str, whole: &str, text: &str) -> Result<Ipv4Addr, ProtocolError> {
    text.parse::<Ipv4Addr>().map_err(|_| {
        invalid(
            param,
            whole,
            format!("{text:?} is not an IPv4 address (expected A.B.C.D)"),
        )
    })
}

fn parse_dns(list: &str) -> Result<Vec<Ipv4Addr>, ProtocolError> {
    let parts: Vec<&str> = list.split(',').collect();
    if parts.len() > MAX_DNS {
        return Err(invalid(
            PARAM_DNS,
            list,
            format!(
                "{} servers given; at most {MAX_DNS} are allowed",
                parts.len()
            ),
        ));
    }
    parts
        .into_iter()
        .map(|part| parse_addr(PARAM_DNS, list, part))
        .collect()
}

fn parse_mtu(value: &str) -> Result<u16, ProtocolError> {
    parse_decimal(value)
        .and_then(|m| u16::try_from(m).ok())
        .filter(|m| MTU_RANGE.contains(m))
        .ok_or_else(|| invalid(PARAM_MTU, value, mtu_range_reason()))
}

/// A plain decimal number: ASCII digits only (no sign, no spaces), at most 5 of them.
fn parse_decimal(text: &str) -> Option<u32> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn check_unicast(param: &'static str, value: &str, addr: Ipv4Addr) -> Result<(), ProtocolError> {
    let why = if addr.is_unspecified() {
        "the unspecified address 0.0.0.0"
    } else if addr.is_loopback() {
        "a loopback address"
    } else if addr.is_multicast() {
        "a multicast address"
    } else if addr.is_broadcast() {
        "the broadcast address"
    } else {
        return Ok(());
    };
    Err(invalid(
        param,
        value,
        format!("{addr} is {why}; a unicast address is needed"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits kernel args back into the four parameter values.
    fn params(args: &str) -> [Option<&str>; 4] {
        let mut out = [None; 4];
        for word in args.split(' ') {
            let (key, value) = word.split_once('=').unwrap();
            let slot = match key {
                PARAM_IP => 0,
                PARAM_GW => 1,
                PARAM_DNS => 2,
                PARAM_MTU => 3,
                other => panic!("unexpected parameter {other}"),
            };
            out[slot] = Some(value);
        }
        out
    }

    fn parse(args: &str) -> Result<Option<GuestNet>, ProtocolError> {
        let [ip, gw, dns, mtu] = params(args);
        GuestNet::from_params(ip, gw, dns, mtu)
    }

    fn err(ip: Option<&str>, gw: Option<&str>, dns: Option<&str>, mtu: Option<&str>) -> String {
        match GuestNet::from_params(ip, gw, dns, mtu) {
            Err(e) => e.to_string(),
            Ok(v) => panic!("accepted {ip:?} {gw:?} {dns:?} {mtu:?} as {v:?}"),
        }
    }

    #[test]
    fn user_mode_args() {
        assert_eq!(
            GuestNet::user_mode().to_kernel_args(),
            "smolvm.ip=10.0.2.15/24 smolvm.gw=10.0.2.2 smolvm.dns=10.0.2.3 smolvm.mtu=1500"
        );
        assert!(GuestNet::user_mode().gateway_in_prefix());
        assert_eq!(
            GuestNet::user_mode().netmask(),
            Ipv4Addr::new(255, 255, 255, 0)
        );
    }

    #[test]
    fn round_trip() {
        let nets = [
            GuestNet::user_mode(),
            GuestNet {
                addr: Ipv4Addr::new(172, 16, 3, 7),
                prefix: 32,
                gateway: Ipv4Addr::new(172, 16, 0, 1),
                dns: vec![],
                mtu: 576,
            },
            GuestNet {
                addr: Ipv4Addr::new(192, 168, 1, 2),
                prefix: 0,
                gateway: Ipv4Addr::new(192, 168, 1, 1),
                dns: vec![
                    Ipv4Addr::new(1, 1, 1, 1),
                    Ipv4Addr::new(8, 8, 8, 8),
                    Ipv4Addr::new(9, 9, 9, 9),
                ],
                mtu: 9000,
            },
        ];
        for net in nets {
            net.validate().unwrap();
            let args = net.to_kernel_args();
            assert_eq!(parse(&args).unwrap(), Some(net), "{args}");
        }
    }

    #[test]
    fn slash_32_gateway_is_off_prefix() {
        let net = parse("smolvm.ip=172.16.3.7/32 smolvm.gw=172.16.0.1")
            .unwrap()
            .unwrap();
        assert_eq!(net.netmask(), Ipv4Addr::new(255, 255, 255, 255));
        assert!(!net.gateway_in_prefix());
        assert_eq!(net.mtu, DEFAULT_MTU);
        assert!(net.dns.is_empty());
        let zero = GuestNet {
            prefix: 0,
            ..net.clone()
        };
        assert_eq!(zero.netmask(), Ipv4Addr::UNSPECIFIED);
        assert!(zero.gateway_in_prefix());
    }

    #[test]
    fn nothing_given_is_no_network() {
        assert_eq!(GuestNet::from_params(None, None, None, None).unwrap(), None);
    }

    #[test]
    fn refuses_garbage() {
        let gw = Some("10.0.2.2");
        for (ip, gw, dns, mtu, needle) in [
            (None, gw, None, None, "smolvm.ip is missing"),
            (None, None, None, Some("1500"), "smolvm.ip is missing"),
            (Some("10.0.2.15/24"), None, None, None, "smolvm.gw"),
            (Some("10.0.2.15"), gw, None, None, "ADDRESS/PREFIX"),
            (Some("10.0.2.15/"), gw, None, None, "0..=32"),
            (Some("10.0.2.15/33"), gw, None, None, "0..=32"),
            (Some("10.0.2.15/+8"), gw, None, None, "0..=32"),
            (Some("10.0.2.15/024000"), gw, None, None, "0..=32"),
            (Some("10.0.2.256/24"), gw, None, None, "not an IPv4"),
            (Some("10.0.2/24"), gw, None, None, "not an IPv4"),
            (Some(" 10.0.2.15/24"), gw, None, None, "not an IPv4"),
            (Some("0.0.0.0/24"), gw, None, None, "unspecified"),
            (Some("127.0.0.2/8"), gw, None, None, "loopback"),
            (Some("224.0.0.1/24"), gw, None, None, "multicast"),
            (Some("10.0.2.15/24"), Some("gw"), None, None, "not an IPv4"),
            (
                Some("10.0.2.15/24"),
                Some("10.0.2.15"),
                None,
                None,
                "differ",
            ),
            (
                Some("10.0.2.15/24"),
                Some("255.255.255.255"),
                None,
                None,
                "broadcast",
            ),
            (Some("10.0.2.15/24"), gw, Some(""), None, "not an IPv4"),
            (
                Some("10.0.2.15/24"),
                gw,
                Some("1.1.1.1,"),
                None,
                "not an IPv4",
            ),
            (
                Some("10.0.2.15/24"),
                gw,
                Some("1.1.1.1,,8.8.8.8"),
                None,
                "not an IPv4",
            ),
            (
                Some("10.0.2.15/24"),
                gw,
                Some("1.1.1.1,2.2.2.2,3.3.3.3,4.4.4.4"),
                None,
                "at most 3",
            ),
            (
                Some("10.0.2.15/24"),
                gw,
                Some("0.0.0.0"),
                None,
                "unspecified",
            ),
            (Some("10.0.2.15/24"), gw, None, Some("575"), "576..=9000"),
            (Some("10.0.2.15/24"), gw, None, Some("9001"), "576..=9000"),
            (Some("10.0.2.15/24"), gw, None, Some("70000"), "576..=9000"),
            (Some("10.0.2.15/24"), gw, None, Some("-1500"), "576..=9000"),
            (Some("10.0.2.15/24"), gw, None, Some("1500b"), "576..=9000"),
            (Some("10.0.2.15/24"), gw, None, Some(""), "576..=9000"),
        ] {
            let msg = err(ip, gw, dns, mtu);
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
            assert!(msg.contains("smolvm."), "{msg:?} names no parameter");
        }
    }

    #[test]
    fn validate_refuses_hand_built_values() {
        let bad = [
            GuestNet {
                prefix: 33,
                ..GuestNet::user_mode()
            },
            GuestNet {
                mtu: 100,
                ..GuestNet::user_mode()
            },
            GuestNet {
                dns: vec![Ipv4Addr::new(10, 0, 2, 3); 4],
                ..GuestNet::user_mode()
            },
            GuestNet {
                gateway: Ipv4Addr::new(10, 0, 2, 15),
                ..GuestNet::user_mode()
            },
        ];
        for net in bad {
            assert!(net.validate().is_err(), "{net:?}");
        }
    }

    #[test]
    fn user_arguments_override_the_hosts_network() {
        let net = GuestNet::user_mode();
        let same = net.overridden_by("quiet foo=bar").unwrap();
        assert_eq!(same, net);
        let mtu = net.overridden_by("smolvm.mtu=1400").unwrap();
        assert_eq!(mtu.mtu, 1400);
        assert_eq!(mtu.addr, net.addr);
        let moved = net
            .overridden_by("smolvm.ip=10.0.2.20/24 smolvm.mtu=1300 smolvm.mtu=1280")
            .unwrap();
        assert_eq!(moved.addr, Ipv4Addr::new(10, 0, 2, 20));
        assert_eq!(moved.mtu, 1280);
        assert!(net.overridden_by("smolvm.mtu=64").is_err());
    }
}

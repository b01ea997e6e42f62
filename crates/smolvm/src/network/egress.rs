//! Egress policy entries: `A.B.C.D`, `A.B.C.D/N`, either optionally with `:PORT` (the
//! port applies to TCP and UDP). Parsed into typed rules before anything is created.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Ranges a guest may not reach unless an `allow_egress` entry opens them: link-local
/// (cloud metadata), the private ranges (which hold the host and its neighbours),
/// loopback, "this network", multicast and reserved.
pub const DEFAULT_BLOCKS: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// One parsed egress entry: a network (host bits cleared) and, optionally, one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRule {
    /// Network address (host bits cleared).
    pub net: Ipv4Addr,
    /// Prefix length, 0 to 32.
    pub prefix: u8,
    /// Destination port (TCP and UDP), or every port.
    pub port: Option<u16>,
}

impl EgressRule {
    /// Parses one entry; `field` names the config field in the error.
    pub fn parse(field: &'static str, s: &str) -> Result<EgressRule> {
        let bad = |why: &str| {
            Error::InvalidConfig {
            field,
            value: s.to_string(),
            allowed: format!(
                "an IPv4 address or CIDR, optionally with :PORT (e.g. 203.0.113.7, 203.0.113.0/24, 203.0.113.7:443){why}"
            ),
        }
        };
        let t = s.trim();
        let (net, port) = match t.rsplit_once(':') {
            Some((n, p)) => {
                let port: u16 = p.parse().map_err(|_| bad(": bad port"))?;
                if port == 0 {
                    return Err(bad(": port 0"));
                }
                (n, Some(port))
            }
            None => (t, None),
        };
        let (addr, prefix) = match net.split_once('/') {
            Some((a, p)) => (a, p.parse::<u8>().map_err(|_| bad(": bad prefix"))?),
            None => (net, 32),
        };
        if prefix > 32 {
            return Err(bad(": the prefix is at most 32"));
        }
        let addr: Ipv4Addr = addr.parse().map_err(|_| {
            bad(if addr.chars().any(|c| c.is_ascii_alphabetic()) {
                ": host names are not supported, give addresses"
            } else {
                ""
            })
        })?;
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        Ok(EgressRule {
            net: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
            port,
        })
    }

    /// The network in nftables syntax (`203.0.113.0/24`, or a bare address for /32).
    pub fn cidr(&self) -> String {
        if self.prefix == 32 {
            self.net.to_string()
        } else {
            format!("{}/{}", self.net, self.prefix)
        }
    }
}

impl std::fmt::Display for EgressRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.cidr()),
            None => f.write_str(&self.cidr()),
        }
    }
}

/// Parses a list of entries of the config field `field`.
pub fn parse_list(field: &'static str, entries: &[String]) -> Result<Vec<EgressRule>> {
    entries
        .iter()
        .map(|e| EgressRule::parse(field, e))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_entries() {
        let p = |s| EgressRule::parse("allow_egress", s).unwrap();
        assert_eq!(p("203.0.113.7").to_string(), "203.0.113.7");
        assert_eq!(p("203.0.113.7/32").to_string(), "203.0.113.7");
        assert_eq!(p("203.0.113.0/24").to_string(), "203.0.113.0/24");
        // Host bits are cleared.
        assert_eq!(p("203.0.113.9/24").to_string(), "203.0.113.0/24");
        assert_eq!(p("0.0.0.0/0").to_string(), "0.0.0.0/0");
        let r = p("10.1.2.3:443");
        assert_eq!((r.cidr().as_str(), r.port), ("10.1.2.3", Some(443)));
        assert_eq!(p("10.0.0.0/8:53").to_string(), "10.0.0.0/8:53");
    }

    #[test]
    fn bad_entries_name_the_field_and_the_value() {
        for bad in [
            "",
            "203.0.113",
            "203.0.113.0/33",
            "203.0.113.0/x",
            "203.0.113.1:0",
            "203.0.113.1:70000",
            "example.com",
            "example.com:443",
            "::1",
            "2001:db8::/32",
            "1.2.3.4/24/1",
        ] {
            let e = EgressRule::parse("deny_egress", bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains("deny_egress"), "{bad:?}: {e}");
            assert!(e.contains(&format!("{bad:?}")), "{bad:?}: {e}");
        }
        let e = EgressRule::parse("allow_egress", "example.com")
            .unwrap_err()
            .to_string();
        assert!(e.contains("host names are not supported"), "{e}");
    }
}

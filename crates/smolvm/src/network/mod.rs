//! `nat` networking: a persistent TAP per VM, an address from [`POOL_CIDR`] allocated in
//! the state database, and nftables rules in our own table (masquerade out, VM-to-VM and
//! VM-to-host dropped, a per-VM egress chain). What a VM gets is derivable from the store
//! (TAP and chain names come from its address), so delete and `gc` can remove it all.

pub mod alloc;
pub mod egress;
pub mod nft;
pub mod tap;

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{EgressDefault, VmConfig};
use crate::error::{Error, Result};
pub use alloc::{tap_name, GATEWAY, POOL_CIDR};
pub use egress::EgressRule;

/// Prefix of every interface (and per-VM nft chain) smolvm creates.
pub const TAP_PREFIX: &str = "smv";
/// MTU of a guest's interface.
pub const GUEST_MTU: u16 = 1500;
/// Longest wait for one `ip` or `nft` run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the supervisor needs to wire one `nat` VM: written into its launch spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatPlan {
    /// The TAP device (and per-VM chain) name.
    pub tap: String,
    /// The guest's address (a /32; its gateway is [`GATEWAY`]).
    pub addr: Ipv4Addr,
    /// What happens to traffic no entry matches.
    pub egress: EgressDefault,
    /// Destinations opened (before the default blocks).
    pub allow: Vec<EgressRule>,
    /// Destinations closed (checked first).
    pub deny: Vec<EgressRule>,
    /// Resolvers the guest is given (and allowed to reach on port 53).
    pub dns: Vec<Ipv4Addr>,
}

impl NatPlan {
    /// The plan for a VM with `config` at `addr`.
    pub fn new(config: &VmConfig, addr: Ipv4Addr) -> Result<NatPlan> {
        let allow = egress::parse_list("allow_egress", &config.allow_egress)?;
        let deny = egress::parse_list("deny_egress", &config.deny_egress)?;
        // Resolvers are handed to the guest when it may reach them.
        let dns = host_resolvers()
            .into_iter()
            .filter(|d| {
                config.egress == EgressDefault::Allow
                    || allow.iter().any(|a| {
                        a.port.is_none_or(|p| p == 53) && alloc::contains(a.net, a.prefix, *d)
                    })
            })
            .collect();
        Ok(NatPlan {
            tap: tap_name(addr),
            addr,
            egress: config.egress,
            allow,
            deny,
            dns,
        })
    }
}

/// The host's IPv4 resolvers that a guest can use through NAT (loopback ones, such as
/// systemd-resolved's stub, are useless to a guest and left out).
pub fn host_resolvers() -> Vec<Ipv4Addr> {
    for path in ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"] {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let found: Vec<Ipv4Addr> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
            .filter(|a| !a.is_loopback() && !a.is_unspecified())
            .take(3)
            .collect();
        if !found.is_empty() {
            return found;
        }
    }
    Vec::new()
}

/// Whether this process can run `nat` VMs: root or CAP_NET_ADMIN, `/dev/net/tun` opens,
/// and `nft` and `ip` are installed. `Err` says what is missing.
pub fn nat_available() -> std::result::Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root && !has_cap_net_admin() {
        return Err("not root and no CAP_NET_ADMIN".into());
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        return Err(format!("/dev/net/tun: {e}"));
    }
    for (tool, pkg) in [("nft", "nftables"), ("ip", "iproute2")] {
        if crate::util::which(tool).is_none() {
            return Err(format!("`{tool}` is not installed (Debian package {pkg})"));
        }
    }
    Ok(())
}

fn has_cap_net_admin() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

/// Creates the VM's TAP, its gateway address and /32 route, and its nft rules; turns on
/// IPv4 forwarding if it was off. Undone by [`teardown`].
pub fn setup(plan: &NatPlan) -> Result<()> {
    let t0 = Instant::now();
    enable_forwarding()?;
    // The rules name the TAP, they do not need it to exist: install them meanwhile.
    let rules = {
        let plan = plan.clone();
        std::thread::spawn(move || nft::apply_vm(&plan))
    };
    let link = tap::create(&plan.tap).and_then(|()| {
        let batch = format!(
            "link set dev {tap} up\naddr replace {GATEWAY}/32 dev {tap}\nroute replace {addr}/32 dev {tap} src {GATEWAY}\n",
            tap = plan.tap,
            addr = plan.addr
        );
        run_tool("ip", &["-batch", "-"], Some(&batch), "iproute2").map(|_| ())
    });
    let rules = rules
        .join()
        .unwrap_or_else(|_| Err(Error::Network("installing the nft rules panicked".into())));
    let done = link.and(rules);
    if let Err(e) = done {
        let _ = teardown(&plan.tap);
        return Err(e);
    }
    tracing::info!(tap = %plan.tap, addr = %plan.addr, ms = t0.elapsed().as_secs_f64() * 1e3, "nat network set up");
    Ok(())
}

/// Removes the VM's TAP (with its address and route) and its nft chain and map element.
/// Idempotent; both steps are tried even when one fails.
pub fn teardown(tap: &str) -> Result<()> {
    let t0 = Instant::now();
    // Both wait for an RCU grace period in the kernel: run them side by side.
    let rules = crate::util::which("nft").is_some().then(|| {
        let tap = tap.to_string();
        std::thread::spawn(move || nft::remove_vm(&tap))
    });
    let a = tap::delete(tap);
    let b = match rules {
        Some(h) => h
            .join()
            .unwrap_or_else(|_| Err(Error::Network("removing the nft rules panicked".into()))),
        None => Ok(()),
    };
    tracing::info!(%tap, ms = t0.elapsed().as_secs_f64() * 1e3, "nat network removed");
    a.and(b)
}

/// Sets net.ipv4.ip_forward to 1 when it is 0 (logged; never reset: other software may
/// rely on it once on).
fn enable_forwarding() -> Result<()> {
    const P: &str = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(P).is_ok_and(|s| s.trim() == "1") {
        return Ok(());
    }
    std::fs::write(P, b"1").map_err(|e| {
        Error::Network(format!(
            "cannot enable IPv4 forwarding ({P}): {e}; nat networking needs it"
        ))
    })?;
    tracing::warn!("enabled IPv4 forwarding (net.ipv4.ip_forward=1) for nat networking");
    Ok(())
}

/// Runs a host tool with optional stdin, a timeout, and its stderr in the error.
pub(crate) fn run_tool(
    tool: &str,
    args: &[&str],
    input: Option<&str>,
    package: &str,
) -> Result<String> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::MissingTool {
                tool: tool.into(),
                package: package.into(),
            },
            _ => Error::Network(format!("cannot run {tool}: {e}")),
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        let _ = stdin.write_all(text.as_bytes());
    }
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let mut stderr = String::new();
    if let Some(e) = err.as_mut() {
        // Bounded by the process: it ends, or is killed below when it hangs.
        let deadline = Instant::now() + TOOL_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(500))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Network(format!(
                        "{tool} {} did not finish within {} s",
                        args.join(" "),
                        TOOL_TIMEOUT.as_secs()
                    )));
                }
            }
        }
        let _ = e.read_to_string(&mut stderr);
    }
    let status = child
        .wait()
        .map_err(|e| Error::Network(format!("waiting for {tool}: {e}")))?;
    let stdout = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(Error::Network(format!(
            "{tool} {} failed ({status}): {}",
            args.join(" "),
            stderr.trim()
        )));
    }
    Ok(stdout)
}

/// A VM's network as `inspect` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkInfo {
    /// The mode (`nat`, `user` or `none`).
    pub mode: crate::config::NetworkMode,
    /// Default egress policy.
    pub egress: EgressDefault,
    /// `allow_egress` entries, normalized.
    pub allow_egress: Vec<String>,
    /// `deny_egress` entries, normalized.
    pub deny_egress: Vec<String>,
    /// The guest's address (`nat`).
    pub ip: Option<Ipv4Addr>,
    /// The guest's gateway (`nat`).
    pub gateway: Option<Ipv4Addr>,
    /// The VM's TAP device (`nat`).
    pub tap: Option<String>,
    /// Resolvers the guest is given (`nat`).
    pub dns: Vec<Ipv4Addr>,
    /// The VM's nftables chain: as installed while it runs, else as it would be.
    pub rules: Option<String>,
    /// What the mode can and cannot enforce.
    pub note: String,
}

impl NetworkInfo {
    /// Describes the network of a VM with `config` and, in `nat` mode, address `addr`.
    pub fn new(config: &VmConfig, addr: Option<Ipv4Addr>) -> Result<NetworkInfo> {
        use crate::config::NetworkMode;
        let plan = match (config.network, addr) {
            (NetworkMode::Nat, Some(a)) => Some(NatPlan::new(config, a)?),
            _ => None,
        };
        let rules = plan.as_ref().map(|p| {
            let live = tap::exists(&p.tap)
                .then(|| {
                    run_tool(
                        "nft",
                        &["list", "chain", "inet", "smolvm", &p.tap],
                        None,
                        "nftables",
                    )
                    .ok()
                })
                .flatten();
            live.unwrap_or_else(|| {
                nft::render_vm(p)
                    .lines()
                    .filter(|l| l.contains(&format!(" {} ", p.tap)) || l.ends_with(&p.tap))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        });
        let note = match config.network {
            NetworkMode::Nat => "nat: own TAP and address; VM-to-VM and VM-to-host traffic dropped; link-local, private ranges and the host blocked unless allowed".into(),
            NetworkMode::User => match config.egress {
                EgressDefault::Deny => "user (QEMU slirp) with egress deny: restrict=on, the guest has no traffic out at all".into(),
                EgressDefault::Allow => "user (QEMU slirp): no filtering; the guest can reach everything the host can, including the host's loopback services through 10.0.2.2; use nat for an egress policy".into(),
            },
            NetworkMode::None | NetworkMode::Auto => "no network device".into(),
        };
        Ok(NetworkInfo {
            mode: config.network,
            egress: config.egress,
            allow_egress: plan
                .as_ref()
                .map(|p| p.allow.iter().map(|r| r.to_string()).collect())
                .unwrap_or_else(|| config.allow_egress.clone()),
            deny_egress: plan
                .as_ref()
                .map(|p| p.deny.iter().map(|r| r.to_string()).collect())
                .unwrap_or_else(|| config.deny_egress.clone()),
            ip: addr,
            gateway: plan.as_ref().map(|_| GATEWAY),
            tap: plan.as_ref().map(|p| p.tap.clone()),
            dns: plan.as_ref().map(|p| p.dns.clone()).unwrap_or_default(),
            rules,
            note,
        })
    }
}

//! nftables rules for `nat` VMs, in our own table `inet smolvm`. Rendering is pure (text in,
//! text out, unit-tested); applying is one `nft -f -` per change, so each change is one
//! atomic transaction.

use std::fmt::Write;
use std::net::Ipv4Addr;

use super::egress::{EgressRule, DEFAULT_BLOCKS};
use super::{NatPlan, POOL_CIDR, TAP_PREFIX};
use crate::config::EgressDefault;
use crate::error::Result;

/// Our table (family `inet`: IPv4 and IPv6).
pub const TABLE: &str = "inet smolvm";
/// The verdict map from a VM's TAP name to its chain.
pub const VMAP: &str = "vms";

/// Creates the table and (re)writes its base chains. Idempotent: base chains are flushed
/// and refilled in the same transaction, so running it again (or from two VMs at once)
/// leaves one copy of each rule; per-VM chains and map elements are kept.
pub fn render_base() -> String {
    let w = format!("\"{TAP_PREFIX}*\"");
    let mut s = String::new();
    let _ = writeln!(s, "add table {TABLE}");
    let _ = writeln!(s, "add map {TABLE} {VMAP} {{ type ifname : verdict ; }}");
    // Forward: VM to VM dropped; into VMs only replies; from a VM through its own chain.
    let _ = writeln!(
        s,
        "add chain {TABLE} forward {{ type filter hook forward priority filter ; policy accept ; }}"
    );
    let _ = writeln!(s, "flush chain {TABLE} forward");
    for rule in [
        format!("iifname {w} oifname {w} drop"),
        format!("oifname {w} ct state established,related accept"),
        format!("oifname {w} drop"),
        format!("iifname {w} meta nfproto ipv6 drop"),
        format!("iifname {w} iifname vmap @{VMAP}"),
        format!("iifname {w} drop"),
    ] {
        let _ = writeln!(s, "add rule {TABLE} forward {rule}");
    }
    // Input: the host itself is closed to guests (forwards use the agent channel).
    let _ = writeln!(
        s,
        "add chain {TABLE} input {{ type filter hook input priority filter ; policy accept ; }}"
    );
    let _ = writeln!(s, "flush chain {TABLE} input");
    let _ = writeln!(
        s,
        "add rule {TABLE} input iifname {w} ct state established,related accept"
    );
    let _ = writeln!(s, "add rule {TABLE} input iifname {w} drop");
    // Masquerade what leaves through anything but a VM interface.
    let _ = writeln!(
        s,
        "add chain {TABLE} postrouting {{ type nat hook postrouting priority srcnat ; policy accept ; }}"
    );
    let _ = writeln!(s, "flush chain {TABLE} postrouting");
    let _ = writeln!(
        s,
        "add rule {TABLE} postrouting ip saddr {POOL_CIDR} oifname != {w} masquerade"
    );
    s
}

fn match_rule(r: &EgressRule) -> String {
    match r.port {
        Some(p) => format!(
            "ip daddr {} meta l4proto {{ tcp, udp }} th dport {p}",
            r.cidr()
        ),
        None => format!("ip daddr {}", r.cidr()),
    }
}

/// Installs the VM's chain and map element. Fast path: the VM's part only (a few ms);
/// when that fails because our table is not there yet, the base and the VM's part
/// together, in one transaction.
pub fn apply_vm(plan: &NatPlan) -> Result<()> {
    let full = render_vm(plan);
    // render_vm = render_base + the VM's part; the VM's part alone fails (and changes
    // nothing) when the table or map is missing, so the base is then never skipped.
    let vm_part = &full[render_base().len()..];
    if apply(vm_part).is_ok() {
        return Ok(());
    }
    apply(&full)
}

/// Removes the VM's map element and chain: the plain deletes first, and when one of them
/// is already gone, the idempotent form ([`render_teardown`]).
pub fn remove_vm(tap: &str) -> Result<()> {
    let plain =
        format!("delete element {TABLE} {VMAP} {{ \"{tap}\" }}\ndelete chain {TABLE} {tap}\n");
    if apply(&plain).is_ok() {
        return Ok(());
    }
    apply(&render_teardown(tap))
}

/// The VM's chain and map element (after [`render_base`]): its own source address only;
/// `deny_egress` dropped; `allow_egress` accepted (before the default blocks, so an allow
/// entry can open a private range); DNS to the host's resolvers when egress is allowed;
/// the default blocks dropped; then the default policy.
pub fn render_vm(plan: &NatPlan) -> String {
    let c = &plan.tap;
    let mut s = render_base();
    let _ = writeln!(s, "add chain {TABLE} {c}");
    let _ = writeln!(s, "flush chain {TABLE} {c}");
    let mut rule = |r: String| {
        let _ = writeln!(s, "add rule {TABLE} {c} {r}");
    };
    rule(format!("ip saddr != {} drop", plan.addr));
    for d in &plan.deny {
        rule(format!("{} drop", match_rule(d)));
    }
    for a in &plan.allow {
        rule(format!("{} accept", match_rule(a)));
    }
    if plan.egress == EgressDefault::Allow && !plan.dns.is_empty() {
        rule(format!(
            "ip daddr {} meta l4proto {{ tcp, udp }} th dport 53 accept",
            set(&plan.dns)
        ));
    }
    rule(format!("ip daddr {{ {} }} drop", DEFAULT_BLOCKS.join(", ")));
    rule(
        match plan.egress {
            EgressDefault::Allow => "accept",
            EgressDefault::Deny => "drop",
        }
        .into(),
    );
    let _ = writeln!(s, "add element {TABLE} {VMAP} {{ \"{c}\" : jump {c} }}");
    s
}

/// Removes the VM's map element and chain. It first (re)creates both, in the same
/// transaction, so the deletes never fail on something already gone: idempotent.
pub fn render_teardown(tap: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "add table {TABLE}");
    let _ = writeln!(s, "add map {TABLE} {VMAP} {{ type ifname : verdict ; }}");
    let _ = writeln!(s, "add chain {TABLE} {tap}");
    let _ = writeln!(s, "flush chain {TABLE} {tap}");
    let _ = writeln!(s, "add element {TABLE} {VMAP} {{ \"{tap}\" : jump {tap} }}");
    let _ = writeln!(s, "delete element {TABLE} {VMAP} {{ \"{tap}\" }}");
    let _ = writeln!(s, "delete chain {TABLE} {tap}");
    s
}

fn set(addrs: &[Ipv4Addr]) -> String {
    if addrs.len() == 1 {
        addrs[0].to_string()
    } else {
        format!(
            "{{ {} }}",
            addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// Applies a ruleset as one transaction (`nft -f -`).
pub fn apply(ruleset: &str) -> Result<()> {
    super::run_tool("nft", &["-f", "-"], Some(ruleset), "nftables").map(|_| ())
}

/// Names of the per-VM chains in our table (none when the table does not exist).
pub fn vm_chains() -> Vec<String> {
    let Ok(out) = super::run_tool(
        "nft",
        &["list", "table", "inet", "smolvm"],
        None,
        "nftables",
    ) else {
        return Vec::new();
    };
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("chain "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(TAP_PREFIX))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::egress::EgressRule;

    fn plan(egress: EgressDefault, allow: &[&str], deny: &[&str]) -> NatPlan {
        NatPlan {
            tap: "smv0002".into(),
            addr: Ipv4Addr::new(172, 16, 0, 2),
            egress,
            allow: allow
                .iter()
                .map(|a| EgressRule::parse("allow_egress", a).unwrap())
                .collect(),
            deny: deny
                .iter()
                .map(|a| EgressRule::parse("deny_egress", a).unwrap())
                .collect(),
            dns: vec![Ipv4Addr::new(10, 255, 255, 53)],
        }
    }

    fn vm_rules(text: &str) -> Vec<&str> {
        text.lines()
            .filter_map(|l| l.strip_prefix("add rule inet smolvm smv0002 "))
            .collect()
    }

    #[test]
    fn base_is_idempotent_and_isolates_vms() {
        let b = render_base();
        // Every base chain is flushed before its rules are added.
        for chain in ["forward", "input", "postrouting"] {
            let flush = b
                .find(&format!("flush chain inet smolvm {chain}\n"))
                .unwrap();
            let first = b.find(&format!("add rule inet smolvm {chain} ")).unwrap();
            assert!(flush < first, "{chain}");
        }
        assert!(b.contains("add rule inet smolvm forward iifname \"smv*\" oifname \"smv*\" drop\n"));
        assert!(b.contains("add rule inet smolvm forward oifname \"smv*\" drop\n"));
        assert!(b.contains("add rule inet smolvm input iifname \"smv*\" drop\n"));
        assert!(b.contains(
            "add rule inet smolvm postrouting ip saddr 172.16.0.0/16 oifname != \"smv*\" masquerade\n"
        ));
    }

    #[test]
    fn allow_by_default_blocks_private_ranges_and_metadata() {
        let text = render_vm(&plan(EgressDefault::Allow, &[], &[]));
        let r = vm_rules(&text);
        assert_eq!(r[0], "ip saddr != 172.16.0.2 drop");
        assert_eq!(
            r[1],
            "ip daddr 10.255.255.53 meta l4proto { tcp, udp } th dport 53 accept"
        );
        assert!(
            r[2].starts_with("ip daddr { 0.0.0.0/8, 10.0.0.0/8,"),
            "{}",
            r[2]
        );
        assert!(r[2].contains("169.254.0.0/16") && r[2].ends_with("} drop"));
        assert_eq!(r[3], "accept");
        assert_eq!(r.len(), 4);
        assert!(text.ends_with("add element inet smolvm vms { \"smv0002\" : jump smv0002 }\n"));
    }

    #[test]
    fn explicit_entries_come_before_the_default_blocks() {
        let text = render_vm(&plan(
            EgressDefault::Deny,
            &["203.0.113.1", "10.1.0.0/16:5432"],
            &["203.0.113.0/24:25"],
        ));
        let r = vm_rules(&text);
        assert_eq!(
            r,
            vec![
                "ip saddr != 172.16.0.2 drop",
                "ip daddr 203.0.113.0/24 meta l4proto { tcp, udp } th dport 25 drop",
                "ip daddr 203.0.113.1 accept",
                "ip daddr 10.1.0.0/16 meta l4proto { tcp, udp } th dport 5432 accept",
                r[4],
                "drop",
            ]
        );
        assert!(r[4].starts_with("ip daddr { 0.0.0.0/8"));
        // No resolver rule when egress is denied (an allow entry can open it).
        assert!(!text.contains("dport 53"));
    }

    #[test]
    fn teardown_never_fails_on_what_is_gone() {
        let t = render_teardown("smv0002");
        let add = t.find("add chain inet smolvm smv0002").unwrap();
        let del = t.find("delete chain inet smolvm smv0002").unwrap();
        assert!(add < del);
        assert!(t.contains("delete element inet smolvm vms { \"smv0002\" }"));
    }
}

//! `nat` networking with real VMs. These tests create TAP devices, routes and nftables
//! rules, so they run only inside a private network namespace (scripts/test runs the suite
//! under `unshare --net`); anywhere else they fail, saying how to run them. "The internet" is a second namespace
//! joined by a veth pair: 203.0.113.1 and 203.0.113.5 there, 203.0.113.2 here (the host).

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use smolvm::{EgressDefault, NetworkMode, Vm, VmConfig};

/// The port every simulated server listens on.
const PORT: u16 = 8080;
/// The port of the service bound on the host itself (this namespace).
const HOST_PORT: u16 = 8081;

// Tests here share the address pool and the nft table: one at a time (`serial()`).

/// Fails the test unless it may touch networking: root, in a namespace with no interface
/// but loopback and our own (TAPs `smv*`, the veth `nt*` to "the internet").
fn private_namespace() {
    smolvm_testing::require_private_netns(&["smv", "nt"]);
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect("run a tool");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TCP server that answers every connection with the peer's address and closes.
const SERVER: &str = concat!(
    "import socket\n",
    "s = socket.socket()\n",
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n",
    "s.bind(('0.0.0.0', 8080))\n",
    "s.listen(64)\n",
    "while True:\n",
    "    c, a = s.accept()\n",
    "    c.sendall(a[0].encode())\n",
    "    c.close()\n",
);

/// The simulated internet: a namespace holding the server, joined by veth `nt0`/`nt1`.
static NET: OnceLock<u32> = OnceLock::new();

fn internet() {
    NET.get_or_init(|| {
        let mut cmd = Command::new("unshare");
        cmd.args(["--net", "--", "python3", "-c", SERVER])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: prctl is async-signal-safe; the server dies with this test process.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        // PR_SET_PDEATHSIG follows the spawning *thread*: spawn from one that lives as long
        // as this process.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let child: Child = cmd.spawn().expect("start the internet namespace");
            let _ = tx.send(child.id());
            std::mem::forget(child);
            loop {
                std::thread::park();
            }
        });
        let pid: u32 = rx.recv().expect("the internet namespace");
        let pid_s = pid.to_string();
        // Wait until the child has its own namespace.
        let mine = std::fs::read_link("/proc/self/ns/net").unwrap();
        poll_until(secs(10), "the internet namespace", || {
            std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|n| n != mine)
        });
        let _ = Command::new("ip").args(["link", "del", "nt0"]).output();
        run(
            "ip",
            &["link", "add", "nt0", "type", "veth", "peer", "name", "nt1"],
        );
        run("ip", &["link", "set", "nt1", "netns", &pid_s]);
        run("ip", &["addr", "add", "203.0.113.2/24", "dev", "nt0"]);
        run("ip", &["link", "set", "nt0", "up"]);
        let ns = |args: &[&str]| {
            let mut a = vec!["-t", pid_s.as_str(), "-n", "ip"];
            a.extend_from_slice(args);
            run("nsenter", &a);
        };
        ns(&["link", "set", "lo", "up"]);
        ns(&["addr", "add", "203.0.113.1/24", "dev", "nt1"]);
        ns(&["addr", "add", "203.0.113.5/24", "dev", "nt1"]);
        ns(&["link", "set", "nt1", "up"]);
        // A service on the host itself (every address of this namespace).
        let l = TcpListener::bind(("0.0.0.0", HOST_PORT)).expect("bind the host service");
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let mut c = c;
                let _ = c.write_all(b"host");
            }
        });
        // The server is up when it answers here.
        poll_until(secs(10), "the internet's server", || {
            std::net::TcpStream::connect_timeout(
                &(Ipv4Addr::new(203, 0, 113, 1), PORT).into(),
                Duration::from_millis(200),
            )
            .is_ok()
        });
        pid
    });
}

/// Boots a VM and waits until its eth0 is operational: the guest kernel activates an
/// interface's queue up to a second after it comes up, and drops what is sent before.
fn boot_net(config: VmConfig) -> Vm {
    let vm = boot(config);
    poll_until(secs(10), "the guest's eth0 to be up", || {
        sh(&vm, "cat /sys/class/net/eth0/operstate").trim() == "up"
    });
    vm
}

fn nat(egress: EgressDefault, allow: &[&str]) -> VmConfig {
    VmConfig {
        network: NetworkMode::Nat,
        egress,
        allow_egress: allow.iter().map(|s| s.to_string()).collect(),
        ..small()
    }
}

/// What the guest gets from `addr:port` (the peer address the server saw), or `None`
/// when the connection fails.
fn fetch(vm: &Vm, addr: &str, port: u16) -> Option<String> {
    let line = format!(
        "import socket\ntry:\n    s = socket.create_connection(('{addr}', {port}), timeout=2)\n    print(s.recv(100).decode())\nexcept OSError as e:\n    print('FAIL', e)\n"
    );
    let out = vm
        .exec(&smolvm::ExecOptions::argv(["python3", "-c", &line]))
        .expect("exec");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!text.starts_with("FAIL") && !text.is_empty()).then_some(text)
}

fn ip_of(vm: &Vm) -> String {
    vm.info()
        .unwrap()
        .ip
        .expect("a nat VM has an address")
        .to_string()
}

fn smv_links() -> Vec<String> {
    smolvm_testing::links()
        .into_iter()
        .filter(|n| n.starts_with("smv"))
        .collect()
}

fn nft_vm_chains() -> Vec<String> {
    let out = Command::new("nft")
        .args(["list", "table", "inet", "smolvm"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("chain smv")
                .map(|s| format!("smv{s}"))
        })
        .chain(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("jump smv"))
                .map(|l| l.trim().to_string()),
        )
        .collect()
}

#[test]
fn a_guest_reaches_the_internet_through_nat_and_nothing_private() {
    private_namespace();
    let _g = serial();
    internet();
    let vm = boot_net(nat(EgressDefault::Allow, &[]));
    let ip = ip_of(&vm);
    assert!(ip.starts_with("172.16."), "{ip}");
    // The guest's interface carries the address the store recorded.
    assert!(sh(&vm, "ip -4 addr show").contains(&format!("{ip}/32")));
    // Through NAT: the server sees the host's address, not the guest's.
    assert_eq!(
        fetch(&vm, "203.0.113.1", PORT).as_deref(),
        Some("203.0.113.2")
    );
    // The host itself, the gateway, cloud metadata: blocked.
    for (addr, port) in [
        ("203.0.113.2", HOST_PORT),
        ("172.16.0.1", HOST_PORT),
        ("169.254.169.254", 80),
    ] {
        assert_eq!(fetch(&vm, addr, port), None, "{addr}:{port} reachable");
    }
    // ... while the host's service is up (seen from the host).
    let mut s = std::net::TcpStream::connect(("127.0.0.1", HOST_PORT)).unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert_eq!(got, "host");
    let info = vm.network_info().unwrap();
    let rules = info.rules.unwrap();
    assert!(rules.contains("169.254.0.0/16"), "{rules}");
    vm.delete().unwrap();
}

#[test]
fn two_vms_cannot_reach_each_other() {
    private_namespace();
    let _g = serial();
    internet();
    let a = boot_net(nat(EgressDefault::Allow, &[]));
    let b = boot_net(nat(EgressDefault::Allow, &[]));
    let (ipa, ipb) = (ip_of(&a), ip_of(&b));
    assert_ne!(ipa, ipb);
    let serve = format!(
        "nohup python3 -c \"{}\" >/dev/null 2>&1 &",
        SERVER.replace('"', "\\\"")
    );
    sh(&b, &serve);
    // The server in b is up: b reaches it on its own address.
    poll_until(secs(30), "the server in guest b to answer b itself", || {
        fetch(&b, &ipb, PORT).is_some()
    });
    assert_eq!(fetch(&a, &ipb, PORT), None, "VM {ipa} reached VM {ipb}");
    a.delete().unwrap();
    b.delete().unwrap();
}

#[test]
fn egress_deny_opens_exactly_what_is_allowed() {
    private_namespace();
    let _g = serial();
    internet();
    let vm = boot_net(nat(EgressDefault::Deny, &["203.0.113.1/32"]));
    assert_eq!(
        fetch(&vm, "203.0.113.1", PORT).as_deref(),
        Some("203.0.113.2")
    );
    assert_eq!(fetch(&vm, "203.0.113.5", PORT), None);
    vm.delete().unwrap();
    // Allow by default, one address denied.
    let vm = boot_net(VmConfig {
        deny_egress: vec!["203.0.113.5".into()],
        ..nat(EgressDefault::Allow, &[])
    });
    assert!(fetch(&vm, "203.0.113.1", PORT).is_some());
    assert_eq!(fetch(&vm, "203.0.113.5", PORT), None);
    vm.delete().unwrap();
}

#[test]
fn an_address_past_the_first_24_has_a_working_route() {
    private_namespace();
    let _g = serial();
    internet();
    let rt = runtime();
    let store = smolvm::store::Store::open(&rt.paths().db_path()).unwrap();
    // Hold the first 300 addresses for VMs that do not exist.
    let placeholders: Vec<String> = (0..300).map(|i| format!("placeholder-{i}")).collect();
    for p in &placeholders {
        store.allocate_address(p).unwrap();
    }
    let vm = boot_net(nat(EgressDefault::Allow, &[]));
    let ip: Ipv4Addr = ip_of(&vm).parse().unwrap();
    assert!(ip.octets()[2] >= 1, "{ip} is in the first /24");
    assert_eq!(
        fetch(&vm, "203.0.113.1", PORT).as_deref(),
        Some("203.0.113.2")
    );
    vm.delete().unwrap();
    // gc releases the placeholders (their VMs do not exist).
    let report = rt.gc().unwrap();
    assert!(report.released_addresses.len() >= 300, "{report:?}");
    assert!(store.addresses().unwrap().is_empty());
}

#[test]
fn concurrent_creates_get_distinct_addresses() {
    private_namespace();
    let _g = serial();
    let handles: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(|| runtime().create(nat(EgressDefault::Allow, &[])).unwrap()))
        .collect();
    let vms: Vec<Vm> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ips: std::collections::BTreeSet<String> = vms.iter().map(ip_of).collect();
    assert_eq!(ips.len(), 8, "{ips:?}");
    for vm in vms {
        vm.delete().unwrap();
    }
}

#[test]
fn setup_and_teardown_leave_nothing() {
    private_namespace();
    let _g = serial();
    let rt = runtime();
    let mut setup = Duration::ZERO;
    let mut teardown = Duration::ZERO;
    const N: u32 = 20;
    for _ in 0..N {
        let vm = rt
            .create(nat(EgressDefault::Allow, &["198.51.100.0/24"]))
            .unwrap();
        let addr: Ipv4Addr = ip_of(&vm).parse().unwrap();
        let cfg = vm.info().unwrap().config;
        let plan = smolvm::network::NatPlan::new(&cfg, addr).unwrap();
        let t = Instant::now();
        smolvm::network::setup(&plan).unwrap();
        setup += t.elapsed();
        assert!(smv_links().contains(&plan.tap));
        let t = Instant::now();
        smolvm::network::teardown(&plan.tap).unwrap();
        teardown += t.elapsed();
        vm.delete().unwrap();
    }
    eprintln!(
        "nat network per VM: setup {:.1} ms, teardown {:.1} ms (mean of {N})",
        setup.as_secs_f64() * 1e3 / N as f64,
        teardown.as_secs_f64() * 1e3 / N as f64
    );
    assert!(smv_links().is_empty(), "{:?}", smv_links());
    assert!(nft_vm_chains().is_empty(), "{:?}", nft_vm_chains());
    let store = smolvm::store::Store::open(&rt.paths().db_path()).unwrap();
    assert!(store.addresses().unwrap().is_empty());
    // The times above are logged, not asserted (the goal is 30 ms per VM; most of a
    // teardown is the kernel's RCU grace periods, which stretch on a loaded host).
}

#[test]
fn a_started_and_deleted_vm_and_a_crashed_one_leave_nothing() {
    private_namespace();
    let _g = serial();
    let rt = runtime();
    // Delete of a running VM.
    let vm = boot_net(nat(EgressDefault::Allow, &[]));
    let tap = vm.network_info().unwrap().tap.unwrap();
    assert!(smv_links().contains(&tap));
    vm.delete().unwrap();
    assert!(smv_links().is_empty(), "{:?}", smv_links());
    assert!(nft_vm_chains().is_empty(), "{:?}", nft_vm_chains());
    // A supervisor killed: its TAP and chain stay until gc.
    let vm = boot_net(nat(EgressDefault::Allow, &[]));
    let tap = vm.network_info().unwrap().tap.unwrap();
    let sup = vm.info().unwrap().supervisor_pid.unwrap();
    // SAFETY: kill(2) of the VM's supervisor, a child of a process we started.
    unsafe {
        libc::kill(sup as i32, libc::SIGKILL);
    }
    poll_until(secs(10), "the supervisor to die", || {
        !smolvm::supervisor::is_running(vm.dir())
    });
    poll_until(secs(10), "QEMU to let go of the TAP", || {
        !smolvm::network::tap::attached(&tap)
    });
    assert!(smv_links().contains(&tap));
    let report = rt.gc().unwrap();
    assert!(report.removed_taps.contains(&tap), "{report:?}");
    assert!(smv_links().is_empty(), "{:?}", smv_links());
    assert!(nft_vm_chains().is_empty(), "{:?}", nft_vm_chains());
    vm.delete().unwrap();
    let store = smolvm::store::Store::open(&rt.paths().db_path()).unwrap();
    assert!(store.addresses().unwrap().is_empty());
}

#[test]
fn user_mode_cannot_filter_but_egress_deny_cuts_it_off() {
    private_namespace();
    let _g = serial();
    internet();
    let user = VmConfig {
        network: NetworkMode::User,
        ..small()
    };
    // Documented: slirp cannot filter, so the host's own services answer at 10.0.2.2.
    let vm = boot_net(user.clone());
    assert_eq!(fetch(&vm, "10.0.2.2", HOST_PORT).as_deref(), Some("host"));
    vm.delete().unwrap();
    // egress deny is QEMU's restrict=on: nothing at all leaves the guest.
    let vm = boot_net(VmConfig {
        egress: EgressDefault::Deny,
        ..user
    });
    assert_eq!(fetch(&vm, "10.0.2.2", HOST_PORT), None);
    vm.delete().unwrap();
}

#[test]
fn cli_flags_reach_the_config_and_inspect_and_ls_show_the_network() {
    private_namespace();
    let _g = serial();
    let out = cli(&[
        "create",
        "--no-start",
        "--network",
        "nat",
        "--egress",
        "deny",
        "--allow",
        "203.0.113.9/24:443",
        "--deny",
        "203.0.113.7",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let inspect: serde_json::Value =
        serde_json::from_slice(&cli(&["inspect", &id]).stdout).unwrap();
    let net = &inspect["network"];
    assert_eq!(net["mode"], "nat", "{net}");
    assert_eq!(net["egress"], "deny", "{net}");
    assert_eq!(net["allow_egress"][0], "203.0.113.0/24:443", "{net}");
    assert_eq!(net["deny_egress"][0], "203.0.113.7", "{net}");
    let ip = net["ip"].as_str().unwrap().to_string();
    assert!(ip.starts_with("172.16."), "{net}");
    let rules = net["rules"].as_str().unwrap();
    assert!(
        rules.contains("ip daddr 203.0.113.0/24 meta l4proto { tcp, udp } th dport 443 accept"),
        "{rules}"
    );
    let ls = String::from_utf8_lossy(&cli(&["ls"]).stdout).to_string();
    assert!(ls.contains(&ip), "{ls}");
    // Bad entries and lists in user mode are usage errors (exit 2) naming the field.
    for (args, want) in [
        (
            &["create", "--no-start", "--allow", "nope"][..],
            "allow_egress",
        ),
        (
            &[
                "create",
                "--no-start",
                "--network",
                "user",
                "--deny",
                "1.2.3.4",
            ][..],
            "need network nat",
        ),
        (
            &["create", "--no-start", "--egress", "maybe"][..],
            "allow, deny",
        ),
    ] {
        let out = cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert!(cli(&["rm", &id]).status.success());
    let store = smolvm::store::Store::open(&runtime().paths().db_path()).unwrap();
    assert!(store.addresses().unwrap().is_empty());
}

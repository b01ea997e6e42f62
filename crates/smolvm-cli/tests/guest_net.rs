//! The guest configures its own network from the kernel command line (`smolvm.ip`,
//! `smolvm.gw`, `smolvm.dns`, `smolvm.mtu`), with real VMs: `user` mode gets QEMU slirp's
//! 10.0.2.15/24 via 10.0.2.2 with DNS 10.0.2.3, recorded as the VM's address; `none` has no
//! interface to configure and says nothing about it; a bad parameter is logged and the VM
//! still boots. Traffic stays inside this process's network namespace: slirp's 10.0.2.2 is
//! the host's loopback.

mod common;

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};

use common::{boot, cli, sh, small};
use smolvm::{NetworkMode, Vm, VmConfig};

/// These tests are about the kernel command line, read at a cold boot (VMs resumed from a
/// template get their network from the host instead: see tests/snapshot.rs and network.rs).
fn user_mode(boot_args: Option<&str>) -> VmConfig {
    VmConfig {
        network: NetworkMode::User,
        boot_args: boot_args.map(str::to_owned),
        snapshot: false,
        ..small()
    }
}

/// The agent's lines in the VM's console log.
fn agent_log(vm: &Vm) -> String {
    std::fs::read_to_string(vm.console_log())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("smolvm-agent"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn user_mode_guest_configures_eth0_from_the_kernel_command_line() {
    // A service on the host's loopback, which slirp shows the guest as 10.0.2.2.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.write_all(b"hello guest").unwrap();
    });

    let vm = boot(user_mode(None));
    // First command after boot: the network works as soon as the agent answers.
    let got = sh(
        &vm,
        &format!(
            "python3 -c \"import socket; s = socket.create_connection(('10.0.2.2', {port}), 10); \
             print(s.recv(100).decode())\""
        ),
    );
    assert_eq!(got.trim(), "hello guest");
    server.join().unwrap();

    let addr = sh(&vm, "ip -4 addr show eth0");
    assert!(addr.contains("inet 10.0.2.15/24 "), "{addr}");
    let routes = sh(&vm, "ip -4 route");
    assert!(routes.contains("default via 10.0.2.2 dev eth0"), "{routes}");
    let resolv = sh(&vm, "cat /etc/resolv.conf");
    assert!(resolv.contains("nameserver 10.0.2.3\n"), "{resolv}");
    assert_eq!(
        sh(
            &vm,
            "stat -c %a /etc/resolv.conf && cat /sys/class/net/eth0/mtu"
        ),
        "644\n1500\n"
    );
    let log = agent_log(&vm);
    assert!(
        log.contains("eth0: 10.0.2.15/24 mtu 1500, default via 10.0.2.2"),
        "{log}"
    );
    assert!(!log.contains("not configured"), "{log}");

    // The host records the address: Vm::info, `ls --json`, `inspect`.
    assert_eq!(vm.info().unwrap().ip, Some([10, 0, 2, 15].into()));
    let ls = cli(&["ls", "--json"]);
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert!(ls.contains("\"10.0.2.15\""), "{ls}");
    let inspect = cli(&["inspect", vm.id()]);
    let inspect = String::from_utf8_lossy(&inspect.stdout);
    assert!(inspect.contains("\"ip\": \"10.0.2.15\""), "{inspect}");

    // A stopped and restarted guest configures itself again.
    vm.stop(false).unwrap();
    common::start(&vm);
    assert!(sh(&vm, "ip -4 addr show eth0").contains("inet 10.0.2.15/24 "));
    assert_eq!(vm.info().unwrap().ip, Some([10, 0, 2, 15].into()));
    let id = vm.id().to_owned();
    vm.delete().unwrap();
    assert!(matches!(
        common::runtime().get(&id),
        Err(smolvm::Error::VmNotFound(_))
    ));
}

#[test]
fn no_network_means_no_interface_and_no_complaint() {
    let vm = boot(VmConfig {
        network: NetworkMode::None,
        ..small()
    });
    // Only loopback, up with its address; no route but loopback's.
    assert_eq!(sh(&vm, "ls /sys/class/net"), "lo\n");
    assert!(sh(&vm, "ip -4 addr show lo").contains("inet 127.0.0.1/8"));
    assert_eq!(sh(&vm, "ip -4 route"), "");
    // The image's placeholder is left alone.
    let resolv = sh(&vm, "cat /etc/resolv.conf");
    assert!(!resolv.contains("nameserver"), "{resolv}");
    let log = agent_log(&vm);
    assert!(
        !log.contains("eth") && !log.contains("not configured"),
        "{log}"
    );
    assert_eq!(vm.info().unwrap().ip, None);
    vm.delete().unwrap();
}

#[test]
fn user_boot_args_override_and_bad_values_are_not_fatal() {
    // The user's arguments come last, so they win: a smaller MTU.
    let vm = boot(user_mode(Some("smolvm.mtu=1400")));
    assert_eq!(sh(&vm, "cat /sys/class/net/eth0/mtu"), "1400\n");
    assert!(sh(&vm, "ip -4 addr show eth0").contains("inet 10.0.2.15/24 "));
    vm.delete().unwrap();

    // A malformed value: the guest says why, leaves eth0 alone and still runs commands.
    let vm = boot(user_mode(Some("smolvm.mtu=64")));
    let log = agent_log(&vm);
    assert!(
        log.contains("network not configured") && log.contains("smolvm.mtu"),
        "{log}"
    );
    assert_eq!(sh(&vm, "ip -4 addr show eth0"), "");
    assert_eq!(sh(&vm, "echo still here"), "still here\n");
    vm.delete().unwrap();
}

//! The QEMU `microvm` backend (Debian's `qemu-system-x86`): its command line here, the
//! running machine in `machine` (QMP in `qmp`, saving and loading state in `migrate`).

mod machine;
mod migrate;
mod qmp;

pub use machine::QemuVmm;

use super::{Accelerator, Endpoints, LaunchSpec};
use crate::config::NetworkMode;
use crate::error::{Error, Result};

/// Kernel arguments every guest gets. `reboot=t panic=-1` with `-no-reboot` makes any guest
/// crash or reboot end the QEMU process, so the host sees it at once.
pub const BASE_BOOT_ARGS: &str =
    "console=ttyS0 reboot=t panic=-1 quiet loglevel=3 8250.nr_uarts=1 random.trust_cpu=on";

/// Kernel arguments that stop an idle guest from waking itself (and so its host) for
/// nothing; each wakeup of an idle vCPU costs the host about half a millisecond under TCG.
/// Measured on an idle 2-vCPU guest under TCG: 1.5 % of a host core with the clocksource
/// alone, 0.4 % with these. The soft-lockup watchdog (`nowatchdog`: a timer every 4 s per
/// vCPU; the host's deadlines watch the guest instead), pressure stall accounting (`psi=0`:
/// work every 2 s), proactive compaction (kcompactd wakes every 0.5 s; it only matters for
/// huge pages) and RCU callbacks on the idle vCPUs (`rcu_nocbs`, added per VM, lets their
/// tick stop) go.
pub const IDLE_BOOT_ARGS: &str = "nowatchdog psi=0 sysctl.vm.compaction_proactiveness=0";

/// Why `path` cannot be handed to QEMU, if it cannot: QEMU reads a comma in an option value
/// as the start of another option (`file=/x,backing.file.filename=/etc/shadow` would open
/// what the name says), so paths with commas are refused, as are paths that are not UTF-8 or
/// hold control characters (they would be mangled on the way).
pub fn check_path(path: &std::path::Path) -> std::result::Result<&str, &'static str> {
    let Some(text) = path.to_str() else {
        return Err("it is not UTF-8");
    };
    if text.contains(',') {
        return Err("it contains a comma, which QEMU reads as an option separator");
    }
    if text.chars().any(char::is_control) {
        return Err("it contains a control character");
    }
    Ok(text)
}

/// Every path the command line of `spec` names, with what it is (for the error).
fn named_paths<'a>(
    spec: &'a LaunchSpec,
    ep: &'a Endpoints,
) -> Vec<(&'static str, &'a std::path::Path)> {
    let mut paths: Vec<(&'static str, &std::path::Path)> = vec![
        ("kernel", &spec.kernel),
        ("initramfs", &spec.initrd),
        ("disk", &spec.disk),
        ("console socket", &ep.console),
        ("monitor socket", &ep.control),
        ("agent socket", &ep.agent),
    ];
    if let Some(out) = &spec.template_out {
        paths.push(("template directory", out));
    }
    if let Some(r) = &spec.restore {
        paths.push(("saved state", &r.memory));
        if let Some(ram) = &r.ram {
            paths.push(("template RAM file", ram));
        }
    }
    paths
}

/// QEMU's `-sandbox` (seccomp) setting for every VM.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The minimal firmware for microvm, when installed (Debian ships qboot in qemu-system-data).
pub fn firmware() -> Option<std::path::PathBuf> {
    [
        "/usr/share/qemu/bios-microvm.bin",
        "/usr/share/qemu/qboot.rom",
    ]
    .iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.is_file())
}

/// The QEMU microvm backend.
#[derive(Debug, Default)]
pub struct QemuMicrovm;

impl QemuMicrovm {
    /// Changes whenever the machine's device list changes: a saved machine state loads only
    /// into the same devices, so template keys include it. 2: the free-page-reporting balloon.
    pub const DEVICES_GENERATION: u32 = 2;

    /// Path of `qemu-system-x86_64`, or an error naming the Debian package.
    pub fn binary() -> Result<std::path::PathBuf> {
        crate::util::which("qemu-system-x86_64").ok_or_else(|| Error::MissingTool {
            tool: "qemu-system-x86_64".into(),
            package: "qemu-system-x86".into(),
        })
    }

    /// The kernel command line for a spec.
    pub fn boot_args(spec: &LaunchSpec) -> String {
        if let Some(r) = &spec.restore {
            return r.cmdline.clone();
        }
        let mut args = format!(
            "{BASE_BOOT_ARGS} smolvm.root=/dev/vda smolvm.hostname={}",
            spec.id
        );
        args.push(' ');
        args.push_str(&Self::machine_args(
            spec.accelerator,
            spec.tsc_khz,
            spec.vcpus,
        ));
        if let Some(net) = &spec.guest_net {
            args.push(' ');
            args.push_str(&net.to_kernel_args());
        }
        // Last, so the user's arguments win over ours.
        if let Some(extra) = &spec.extra_boot_args {
            args.push(' ');
            args.push_str(extra);
        }
        args
    }

    /// The kernel arguments smolvm adds for the machine (not the per-VM identity or network):
    /// a real clocksource, then what keeps an idle guest asleep. Template keys include them.
    pub fn machine_args(accel: Accelerator, tsc_khz: Option<u64>, vcpus: u32) -> String {
        let clock = Self::clock_args(accel, tsc_khz);
        let idle = format!("{IDLE_BOOT_ARGS} rcu_nocbs=0-{}", vcpus.saturating_sub(1));
        if clock.is_empty() {
            idle
        } else {
            format!("{clock} {idle}")
        }
    }

    /// Kernel arguments that give the guest a real clocksource on `accel`.
    ///
    /// Under TCG the guest's `rdtsc` reads the host's TSC (stopped while the VM is paused,
    /// carried across save and restore), so it is monotonic and in step on every vCPU, but
    /// the guest kernel cannot verify it: it marks the TSC unstable and falls back to
    /// `refined-jiffies`, which keeps no high-resolution timers, so every idle vCPU takes
    /// 250 emulated timer ticks a second forever. `tsc=reliable` trusts it (no watchdog),
    /// which lets the tick stop when idle; `tsc_early_khz` gives its rate, without which
    /// calibration against the PIT hangs about half of all boots (DESIGN.md §2).
    /// Under KVM the guest finds kvm-clock itself: nothing to add.
    pub fn clock_args(accel: Accelerator, tsc_khz: Option<u64>) -> String {
        match (accel, tsc_khz) {
            (Accelerator::Kvm | Accelerator::None, _) => String::new(),
            (Accelerator::Tcg, Some(khz)) => format!("tsc=reliable tsc_early_khz={khz}"),
            (Accelerator::Tcg, None) => "tsc=reliable".to_owned(),
        }
    }

    /// The full argument list (without the program), or an error naming a path that
    /// cannot be given to QEMU safely (see [`check_path`]).
    pub fn checked_args(spec: &LaunchSpec, ep: &Endpoints) -> Result<Vec<String>> {
        for (what, path) in named_paths(spec, ep) {
            if let Err(why) = check_path(path) {
                return Err(Error::StartFailed {
                    id: spec.id.clone(),
                    reason: format!(
                        "the {what} path {} cannot be given to QEMU: {why}; move it (or set \
                         SMOLVM_HOME / SMOLVM_IMAGE_DIR to a directory whose path has none)",
                        path.display()
                    ),
                });
            }
        }
        Ok(Self::args(spec, ep))
    }

    /// The full argument list (without the program); the paths must have passed
    /// [`check_path`] ([`Self::checked_args`] does that).
    pub fn args(spec: &LaunchSpec, ep: &Endpoints) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        Self::machine_and_accel(&mut a, spec);
        Self::memory(&mut a, spec);
        Self::kernel_and_sockets(&mut a, spec, ep);
        Self::devices(&mut a, ep);
        Self::network(&mut a, spec);
        Self::incoming(&mut a, spec);
        a
    }

    /// The machine type, its firmware, the accelerator and the CPU model.
    fn machine_and_accel(a: &mut Vec<String>, spec: &LaunchSpec) {
        let mut push = |s: &str| a.push(s.to_string());
        push("-M");
        match firmware() {
            // qboot jumps straight to the kernel; the trimmed machine boots fastest with it.
            // Keep the RTC: without it the guest kernel waits 1 s twice probing for one
            // (measured under TCG: /init reached at 1.1 s with it, 3.2 s without).
            Some(fw) => {
                push("microvm,x-option-roms=off,rtc=on,pit=off,pic=off,isa-serial=on,memory-backend=ram");
                push("-bios");
                push(&fw.display().to_string());
            }
            // Debian lacks bios-microvm.bin, and SeaBIOS hangs on the trimmed machine.
            None => push("microvm,memory-backend=ram"),
        }
        match spec.accelerator {
            Accelerator::Kvm => {
                push("-accel");
                push("kvm");
                push("-cpu");
                push("host");
            }
            Accelerator::Tcg | Accelerator::None => {
                push("-accel");
                push(if spec.vcpus > 1 {
                    "tcg,thread=multi"
                } else {
                    "tcg"
                });
                push("-cpu");
                push("max");
            }
        }
    }

    /// Guest RAM, and what backs it.
    fn memory(a: &mut Vec<String>, spec: &LaunchSpec) {
        let mut push = |s: &str| a.push(s.to_string());
        push("-m");
        push(&spec.mem_mib.to_string());
        // Guest RAM is an object named `ram` in every VM, so a state saved by one loads in
        // another: plain memory; a file shared with the host while a template is made (its
        // RAM then stays in the file); a private copy-on-write map of a template's file in
        // VMs resumed from it (they share its pages until they write them).
        push("-object");
        push(&match (
            &spec.template_out,
            spec.restore.as_ref().and_then(|r| r.ram.as_ref()),
        ) {
            (Some(dir), _) => format!(
                "memory-backend-file,id=ram,size={}M,mem-path={},share=on",
                spec.mem_mib,
                dir.join(crate::snapshot::files::RAM).display()
            ),
            (None, Some(ram)) => format!(
                "memory-backend-file,id=ram,size={}M,mem-path={},share=off,readonly=on,rom=off",
                spec.mem_mib,
                ram.display()
            ),
            (None, None) => format!("memory-backend-ram,id=ram,size={}M", spec.mem_mib),
        });
    }

    /// vCPUs, the kernel, its command line, the console and the monitor, the root disk.
    fn kernel_and_sockets(a: &mut Vec<String>, spec: &LaunchSpec, ep: &Endpoints) {
        let mut push = |s: &str| a.push(s.to_string());
        push("-smp");
        push(&spec.vcpus.to_string());
        // QEMU's own seccomp filter: no obsolete system calls, no privilege changes, no
        // processes spawned, no scheduler or resource changes.
        if super::jail::enabled() {
            push("-sandbox");
            push(SANDBOX);
        }
        for s in [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ] {
            push(s);
        }
        push("-kernel");
        push(&spec.kernel.display().to_string());
        push("-initrd");
        push(&spec.initrd.display().to_string());
        push("-append");
        push(&Self::boot_args(spec));
        push("-chardev");
        push(&format!("socket,id=con,path={}", ep.console.display()));
        push("-serial");
        push("chardev:con");
        push("-chardev");
        push(&format!("socket,id=qmp,path={}", ep.control.display()));
        push("-mon");
        push("chardev=qmp,mode=control");
        push("-drive");
        push(&format!(
            "id=root,file={},format={},if=none,discard=unmap{}",
            spec.disk.display(),
            spec.disk_format,
            // A disk of an image marked shareable may be open in several VMs at once.
            if spec.lock_disk {
                ""
            } else {
                ",file.locking=off"
            }
        ));
    }

    /// The virtio devices every VM has: block, the agent port, rng, the balloon.
    fn devices(a: &mut Vec<String>, ep: &Endpoints) {
        let mut push = |s: &str| a.push(s.to_string());
        push("-device");
        push("virtio-blk-device,drive=root");
        push("-device");
        push("virtio-serial-device,max_ports=2");
        push("-chardev");
        push(&format!("socket,id=agent,path={}", ep.agent.display()));
        push("-device");
        push(&format!(
            "virtserialport,chardev=agent,name={}",
            smolvm_protocol::AGENT_PORT_NAME
        ));
        push("-object");
        push("rng-random,id=rng0,filename=/dev/urandom");
        push("-device");
        push("virtio-rng-device,rng=rng0");
        // Free page reporting: the guest tells QEMU which pages it freed (in 2 MiB blocks,
        // a couple of seconds after), and QEMU drops them, so memory a guest used once goes
        // back to the host. No balloon is ever inflated.
        push("-device");
        push("virtio-balloon-device,free-page-reporting=on");
    }

    /// The network device and what is behind it.
    fn network(a: &mut Vec<String>, spec: &LaunchSpec) {
        let mut push = |s: &str| a.push(s.to_string());
        match (spec.network, &spec.nat) {
            (NetworkMode::User, _) => {
                push("-netdev");
                // With egress denied, slirp gives the guest no way out at all.
                push(if spec.restrict_user_net {
                    "user,id=n0,restrict=on"
                } else {
                    "user,id=n0"
                });
                push("-device");
                push("virtio-net-device,netdev=n0");
            }
            (NetworkMode::Nat, Some(nat)) => {
                push("-netdev");
                push(&format!(
                    "tap,id=n0,ifname={},script=no,downscript=no",
                    nat.tap
                ));
                push("-device");
                push("virtio-net-device,netdev=n0");
            }
            _ if spec.unplugged_nic => {
                push("-device");
                push("virtio-net-device");
            }
            _ => {}
        }
    }

    /// Where a restored VM loads its state from.
    fn incoming(a: &mut Vec<String>, spec: &LaunchSpec) {
        let mut push = |s: &str| a.push(s.to_string());
        if let Some(r) = &spec.restore {
            push("-incoming");
            if r.ram.is_some() {
                // The supervisor turns on `x-ignore-shared` first (RAM is the mapped file).
                push("defer");
            } else {
                push(&format!("file:{}", r.memory.display()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn endpoints() -> Endpoints {
        Endpoints {
            agent: "/a".into(),
            console: "/c".into(),
            control: "/q".into(),
            console_log: "/c.log".into(),
            log: "/s.log".into(),
        }
    }

    fn spec(accel: Accelerator) -> LaunchSpec {
        LaunchSpec {
            id: "vm-1".into(),
            vcpus: 2,
            mem_mib: 256,
            kernel: "/k".into(),
            initrd: "/i".into(),
            disk: "/d.qcow2".into(),
            disk_format: "qcow2".into(),
            extra_boot_args: None,
            guest_net: None,
            network: NetworkMode::None,
            vmm: crate::hypervisor::VmmKind::Qemu,
            accelerator: accel,
            tsc_khz: Some(2_596_132),
            db_path: PathBuf::from("/db"),
            ready_timeout_secs: 60,
            state_dir: PathBuf::from("/state"),
            lock_disk: true,
            nat: None,
            restrict_user_net: false,
            unplugged_nic: false,
            restore: None,
            template_out: None,
        }
    }

    #[test]
    fn nat_attaches_to_its_tap_and_passes_the_guest_address() {
        let ep = endpoints();
        let mut s = spec(Accelerator::Tcg);
        s.network = NetworkMode::Nat;
        s.nat = Some(crate::network::NatPlan {
            tap: "smv0002".into(),
            addr: "172.16.0.2".parse().unwrap(),
            egress: crate::config::EgressDefault::Allow,
            allow: vec![],
            deny: vec![],
            dns: vec![],
        });
        s.guest_net = Some(smolvm_protocol::boot::GuestNet {
            addr: "172.16.0.2".parse().unwrap(),
            prefix: 32,
            gateway: crate::network::GATEWAY,
            dns: vec![],
            mtu: 1500,
        });
        let a = QemuMicrovm::args(&s, &ep).join(" ");
        assert!(a.contains("-netdev tap,id=n0,ifname=smv0002,script=no,downscript=no"));
        assert!(
            a.contains("smolvm.ip=172.16.0.2/32 smolvm.gw=172.16.0.1"),
            "{a}"
        );
        s.network = NetworkMode::User;
        s.restrict_user_net = true;
        let a = QemuMicrovm::args(&s, &ep).join(" ");
        assert!(a.contains("-netdev user,id=n0,restrict=on"), "{a}");
    }

    #[test]
    fn a_restore_keeps_the_saved_command_line_and_loads_the_state() {
        let ep = endpoints();
        let mut s = spec(Accelerator::Tcg);
        s.restore = Some(super::super::RestoreFrom {
            memory: "/t/memory".into(),
            cmdline: "console=ttyS0 smolvm.hostname=template".into(),
            ram: None,
        });
        s.unplugged_nic = true;
        assert_eq!(
            QemuMicrovm::boot_args(&s),
            "console=ttyS0 smolvm.hostname=template"
        );
        let a = QemuMicrovm::args(&s, &ep).join(" ");
        assert!(
            a.ends_with("-device virtio-net-device -incoming file:/t/memory"),
            "{a}"
        );
    }

    #[test]
    fn tsc_hint_and_trust_only_under_tcg() {
        let tcg = QemuMicrovm::boot_args(&spec(Accelerator::Tcg));
        assert!(tcg.contains(" tsc=reliable tsc_early_khz=2596132"), "{tcg}");
        let kvm = QemuMicrovm::boot_args(&spec(Accelerator::Kvm));
        assert!(!kvm.contains("tsc"), "{kvm}");
        for args in [tcg, kvm] {
            assert!(
                args.contains(
                    " nowatchdog psi=0 sysctl.vm.compaction_proactiveness=0 rcu_nocbs=0-1"
                ),
                "{args}"
            );
        }
    }

    #[test]
    fn guest_network_goes_on_the_kernel_command_line_before_user_args() {
        let none = QemuMicrovm::boot_args(&spec(Accelerator::Kvm));
        assert!(!none.contains("smolvm.ip"), "{none}");
        let user = LaunchSpec {
            network: NetworkMode::User,
            guest_net: Some(smolvm_protocol::boot::GuestNet::user_mode()),
            extra_boot_args: Some("smolvm.mtu=1400".into()),
            ..spec(Accelerator::Kvm)
        };
        let args = QemuMicrovm::boot_args(&user);
        assert!(
            args.ends_with(
                " smolvm.ip=10.0.2.15/24 smolvm.gw=10.0.2.2 smolvm.dns=10.0.2.3 smolvm.mtu=1500 \
                 smolvm.mtu=1400"
            ),
            "{args}"
        );
    }

    #[test]
    fn freed_ram_is_reported_except_where_it_maps_a_template() {
        let ep = endpoints();
        let mut s = spec(Accelerator::Tcg);
        let a = QemuMicrovm::args(&s, &ep).join(" ");
        assert!(
            a.contains("-device virtio-balloon-device,free-page-reporting=on"),
            "{a}"
        );
        // Booted cold: anonymous RAM.
        assert!(s.can_discard_ram());
        // A named snapshot or fork loads its RAM from the stream: anonymous too.
        s.restore = Some(super::super::RestoreFrom {
            memory: "/s/memory".into(),
            cmdline: String::new(),
            ram: None,
        });
        assert!(s.can_discard_ram());
        // Resumed from a template: a private map of the template's read-only file.
        if let Some(r) = s.restore.as_mut() {
            r.ram = Some("/t/ram".into());
        }
        assert!(!s.can_discard_ram());
        // Making a template: its own file, shared; holes in it are free pages.
        s.restore = None;
        s.template_out = Some("/t".into());
        assert!(s.can_discard_ram());
    }

    #[test]
    fn cpu_model_follows_accelerator() {
        let ep = endpoints();
        let tcg = QemuMicrovm::args(&spec(Accelerator::Tcg), &ep).join(" ");
        assert!(tcg.contains("-cpu max") && tcg.contains("tcg,thread=multi"));
        let kvm = QemuMicrovm::args(&spec(Accelerator::Kvm), &ep).join(" ");
        assert!(kvm.contains("-accel kvm -cpu host"));
        assert!(!kvm.contains("virtio-net"));
    }

    #[test]
    fn a_path_that_would_inject_options_is_refused_naming_it() {
        assert_eq!(
            check_path(std::path::Path::new("/var/x.qcow2")),
            Ok("/var/x.qcow2")
        );
        for bad in [
            "/data/x,backing.file.filename=/etc/shadow",
            "/data/x,file.locking=off",
            "/data/line\nbreak",
        ] {
            assert!(check_path(std::path::Path::new(bad)).is_err(), "{bad}");
        }
        let ep = endpoints();
        let mut s = spec(Accelerator::Tcg);
        s.disk = "/data/x,backing.file.filename=/etc/shadow".into();
        let e = QemuMicrovm::checked_args(&s, &ep).unwrap_err().to_string();
        assert!(e.contains("disk path") && e.contains("comma"), "{e}");
        let mut s = spec(Accelerator::Tcg);
        s.restore = Some(crate::hypervisor::RestoreFrom {
            memory: "/s/mem,offset=9".into(),
            cmdline: String::new(),
            ram: None,
        });
        let e = QemuMicrovm::checked_args(&s, &ep).unwrap_err().to_string();
        assert!(e.contains("saved state"), "{e}");
        assert!(QemuMicrovm::checked_args(&spec(Accelerator::Tcg), &ep).is_ok());
    }
}

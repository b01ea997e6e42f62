//! Templates and snapshots with real VMs: a new VM resumes from its image's template, a
//! snapshot keeps files and running processes, pause freezes the guest, clones get their
//! own identity, failed restores are clear and leave nothing, and racing template builders
//! make one template.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;
use smolvm::snapshot::template;
use smolvm::{Error, SnapshotOverrides, VmConfig, VmState};

/// A background job that appends a line to /tmp/ticks every 100 ms.
const TICKER: &str =
    "nohup sh -c 'while true; do echo t >> /tmp/ticks; sleep 0.1; done' >/dev/null 2>&1 &";

fn ticks(vm: &smolvm::Vm) -> usize {
    sh(vm, "cat /tmp/ticks 2>/dev/null | wc -l")
        .trim()
        .parse()
        .unwrap_or(0)
}

/// A shape no other test uses, so its template is this test's own.
fn own_shape(mem: u32) -> VmConfig {
    VmConfig {
        mem_size_mib: mem,
        ..small()
    }
}

/// Removes the template of `config` (if any), so a test starts without one.
fn drop_template(config: &VmConfig) {
    let dir = template::templates_dir(&runtime().paths().images_dir, &config.image);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let prefix = format!("{}c-{}m-", config.vcpu_count, config.mem_size_mib);
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

#[test]
fn a_new_vm_resumes_from_the_template_and_cold_boots_when_asked() {
    let vm = runtime().create(small()).unwrap();
    let st = vm.start().unwrap();
    let base = st.restored.clone().expect("resumed from a template");
    let from = base.to_string();
    assert!(
        from.starts_with("template:default/1c-256m-nonet-"),
        "{from}"
    );
    // The template's identity is gone: this VM's hostname, a clock near the host's.
    assert_eq!(sh(&vm, "hostname").trim(), vm.id());
    let guest: i64 = sh(&vm, "date +%s").trim().parse().unwrap();
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (guest - host).abs() <= 5,
        "guest clock {guest}, host {host}"
    );
    assert_eq!(vm.info().unwrap().base, Some(base));
    vm.delete().unwrap();

    let cold = runtime()
        .create(VmConfig {
            snapshot: false,
            ..small()
        })
        .unwrap();
    let st = cold.start().unwrap();
    assert_eq!(st.restored, None, "snapshot=false boots cold");
    assert_eq!(sh(&cold, "echo ok").trim(), "ok");
    cold.delete().unwrap();
}

#[test]
fn a_file_and_a_background_process_survive_a_snapshot() {
    let rt = runtime();
    let vm = fresh_vm();
    sh(&vm, "echo precious > /var/tmp/data.txt");
    sh(&vm, TICKER);
    poll_until(secs(10), "the ticker", || ticks(&vm) >= 2);
    let t0 = Instant::now();
    let saved = vm.snapshot("keep").unwrap();
    eprintln!("snapshot in {:?}", t0.elapsed());
    // Private files: directory 0700, files 0400 (they hold the guest's memory).
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&saved.dir), 0o700);
    for f in ["memory", "disk.qcow2", "meta.json"] {
        assert_eq!(mode(&saved.dir.join(f)), 0o400, "{f}");
    }
    // The source goes on.
    let before = ticks(&vm);
    poll_until(secs(10), "the source's ticker to go on", || {
        ticks(&vm) > before
    });

    let clone = rt
        .create_from_snapshot("keep", SnapshotOverrides::default())
        .unwrap();
    let st = clone.start().unwrap();
    assert_eq!(st.restored, Some(smolvm::Base::snapshot("keep")));
    assert_eq!(sh(&clone, "cat /var/tmp/data.txt").trim(), "precious");
    let n = ticks(&clone);
    assert!(
        n >= 2,
        "the clone has the ticks written before the snapshot"
    );
    poll_until(secs(10), "the clone's ticker to go on", || {
        ticks(&clone) > n
    });
    assert_eq!(sh(&clone, "hostname").trim(), clone.id());

    // In use: removal refused, naming the VM; then allowed.
    let e = rt.remove_snapshot("keep").unwrap_err().to_string();
    assert!(e.contains(clone.id()), "{e}");
    clone.delete().unwrap();
    vm.delete().unwrap();
    rt.remove_snapshot("keep").unwrap();
    assert!(!saved.dir.exists());
}

#[test]
fn pause_freezes_clock_driven_work_and_resume_continues_it() {
    let vm = fresh_vm();
    sh(&vm, TICKER);
    poll_until(secs(10), "the ticker", || ticks(&vm) >= 2);
    vm.pause().unwrap();
    assert_eq!(vm.info().unwrap().state, VmState::Paused);
    // Commands are refused while paused, with what to do.
    let e = vm
        .exec(&smolvm::ExecOptions::shell("true"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("paused") && e.contains("resume"), "{e}");
    vm.resume().unwrap();
    let n0 = ticks(&vm);
    vm.pause().unwrap();
    // Time passing while paused is the point here: there is no event to wait for.
    std::thread::sleep(Duration::from_millis(1500));
    vm.resume().unwrap();
    let n1 = ticks(&vm);
    // 1.5 s paused would be ~15 ticks running; frozen, at most the one in flight (plus
    // the time to run the two commands).
    assert!(n1 <= n0 + 4, "ticks went on while paused: {n0} -> {n1}");
    poll_until(secs(10), "the ticker to continue", || ticks(&vm) >= n1 + 3);
    assert_eq!(vm.info().unwrap().state, VmState::Running);
    vm.delete().unwrap();
}

/// Serializes this binary's `gc` runs, so a test can plant leftovers and see its own gc
/// sweep them (another test's gc would sweep them first).
static GC_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A turn at `gc` held for a whole test.
struct GcTurn {
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl GcTurn {
    fn take() -> Self {
        GcTurn {
            _turn: GC_TURN.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Runs gc within this turn.
    fn gc(&self, rt: &smolvm::Runtime) -> smolvm::GcReport {
        rt.gc().unwrap()
    }
}

/// Runs gc in its turn.
fn gc(rt: &smolvm::Runtime) -> smolvm::GcReport {
    GcTurn::take().gc(rt)
}

#[test]
fn forks_share_the_state_but_not_the_identity() {
    let vm = fresh_vm();
    sh(&vm, "echo parent > /var/tmp/from-parent");
    // `gc` runs over and over meanwhile: it must take no part of a fork for a leftover
    // (the forks' disks are remade by `qemu-img` before they start).
    let forking = std::sync::atomic::AtomicBool::new(true);
    let (forks, gc_runs) = std::thread::scope(|s| {
        let gc = s.spawn(|| {
            let mut runs = 0;
            while forking.load(std::sync::atomic::Ordering::Relaxed) {
                gc(&runtime());
                runs += 1;
            }
            runs
        });
        let forks = vm.fork(2);
        forking.store(false, std::sync::atomic::Ordering::Relaxed);
        (forks, gc.join().unwrap())
    });
    let forks = forks.unwrap();
    assert!(gc_runs > 0);
    assert_eq!(forks.len(), 2);
    let (a, b) = (&forks[0], &forks[1]);
    for f in [a, b] {
        assert_eq!(sh(f, "cat /var/tmp/from-parent").trim(), "parent");
        assert_eq!(sh(f, "hostname").trim(), f.id());
    }
    assert_ne!(a.id(), b.id());
    let rand = |v: &smolvm::Vm| sh(v, "head -c 32 /dev/urandom | od -An -tx1");
    assert_ne!(rand(a), rand(b), "clones must not share random state");
    // The forks' state is removed with the last fork.
    let Some(smolvm::Base::Snapshot { name }) = a.info().unwrap().base else {
        panic!("a fork builds on a snapshot");
    };
    assert!(runtime()
        .snapshots()
        .unwrap()
        .iter()
        .any(|s| s.meta.name == name));
    for f in &forks {
        f.delete().unwrap();
    }
    assert!(!runtime()
        .snapshots()
        .unwrap()
        .iter()
        .any(|s| s.meta.name == name));
    vm.delete().unwrap();
}

#[test]
fn failed_restores_are_clear_and_leave_nothing() {
    let rt = runtime();
    // A corrupt template: the VM boots cold instead, and the template is made again.
    let shape = own_shape(272);
    drop_template(&shape);
    let (t, built) = rt.warm_template(&shape).unwrap();
    assert!(built);
    let mem = t.memory();
    std::fs::set_permissions(&mem, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&mem, b"QEVM garbage, not a migration stream").unwrap();
    let vm = rt.create(shape.clone()).unwrap();
    let st = vm.start().unwrap();
    assert_eq!(st.restored, None, "fell back to a cold boot");
    assert_eq!(sh(&vm, "echo ok").trim(), "ok");
    assert!(!t.dir.exists(), "the broken template was dropped");
    vm.delete().unwrap();
    drop_template(&shape);

    // A snapshot whose memory file is missing: refused before anything is made.
    let src = fresh_vm();
    let saved = src.snapshot("broken").unwrap();
    let count = || {
        rt.list()
            .unwrap()
            .iter()
            .filter(|v| v.record.base == Some(smolvm::Base::snapshot("broken")))
            .count()
    };
    std::fs::rename(saved.memory(), saved.dir.join("memory.away")).unwrap();
    let e = rt
        .create_from_snapshot("broken", SnapshotOverrides::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("memory") && e.contains("missing"), "{e}");
    assert_eq!(count(), 0, "no VM was made");

    // A corrupt memory file: the start fails clearly and the VM is deleted whole.
    std::fs::rename(saved.dir.join("memory.away"), saved.memory()).unwrap();
    std::fs::set_permissions(saved.memory(), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(saved.memory(), vec![0u8; 4096]).unwrap();
    let vm = rt
        .create_from_snapshot("broken", SnapshotOverrides::default())
        .unwrap();
    let e = vm.start().unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, Error::StartFailed { .. }), "{text}");
    assert!(
        text.contains("migration") || text.contains("saved state"),
        "{text}"
    );
    let (id, dir) = (vm.id().to_string(), vm.dir().to_path_buf());
    vm.delete().unwrap();
    assert_gone(&id, &dir);

    // A shape that differs from the snapshot's: refused naming the field.
    let e = rt
        .create_from_snapshot(
            "broken",
            SnapshotOverrides {
                vcpu_count: Some(2),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidConfig {
                field: "vcpu_count",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(count(), 0);
    src.delete().unwrap();
    rt.remove_snapshot("broken").unwrap();
    let e = rt.remove_snapshot("broken").unwrap_err();
    assert!(matches!(e, Error::SnapshotNotFound(_)), "{e}");
}

#[test]
fn racing_template_builders_make_one_template() {
    let shape = own_shape(288);
    drop_template(&shape);
    let children: Vec<_> = (0..4)
        .map(|_| {
            std::process::Command::new(bin())
                .args([
                    "image",
                    "warm",
                    "default",
                    "--cpus",
                    "1",
                    "--memory",
                    "288",
                    "--network",
                    "none",
                ])
                .env("SMOLVM_HOME", state_dir())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let mut built = 0;
    let mut dirs = std::collections::BTreeSet::new();
    for o in &outs {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        if err.contains("built template") {
            built += 1;
        }
        dirs.insert(String::from_utf8_lossy(&o.stdout).trim().to_string());
    }
    assert_eq!(built, 1, "exactly one process built it");
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let tdir = template::templates_dir(&runtime().paths().images_dir, "default");
    let leftovers: Vec<String> = std::fs::read_dir(&tdir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".b-") || n.contains(".rm-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // `image ls` counts it with the image's templates.
    let ls = String::from_utf8_lossy(&cli(&["image", "ls"]).stdout).into_owned();
    assert!(ls.lines().next().unwrap().contains("TEMPLATES"), "{ls}");
    let row = ls.lines().find(|l| l.starts_with("default ")).unwrap();
    let count: usize = row.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(count >= 1, "{ls}");
    drop_template(&shape);
}

#[test]
fn the_cli_saves_lists_restores_and_removes_snapshots() {
    let vm = fresh_vm();
    sh(&vm, "echo cli > /var/tmp/mark");
    let out = cli(&["snapshot", "create", vm.id(), "cli-snap"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ls = cli(&["snapshot", "ls"]);
    let text = String::from_utf8_lossy(&ls.stdout);
    assert!(
        text.contains("cli-snap") && text.contains(vm.id()),
        "{text}"
    );
    // A mismatched shape is a usage error naming the field; nothing is made.
    let bad = cli(&["create", "--from-snapshot", "cli-snap", "--cpus", "3"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("vcpu_count"));
    let made = cli(&[
        "create",
        "--from-snapshot",
        "cli-snap",
        "--name",
        "from-cli",
    ]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let clone = runtime().get("from-cli").unwrap();
    assert_eq!(sh(&clone, "cat /var/tmp/mark").trim(), "cli");
    let refused = cli(&["snapshot", "rm", "cli-snap"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("from-cli"));
    assert!(cli(&["rm", "from-cli"]).status.success());
    assert!(cli(&["snapshot", "rm", "cli-snap"]).status.success());
    let ls = cli(&["snapshot", "ls"]);
    assert!(!String::from_utf8_lossy(&ls.stdout).contains("cli-snap"));
    // Pause and resume from the shell.
    assert!(cli(&["pause", vm.id()]).status.success());
    assert_eq!(vm.info().unwrap().state, VmState::Paused);
    assert!(cli(&["resume", vm.id()]).status.success());
    assert_eq!(sh(&vm, "echo back").trim(), "back");
    vm.delete().unwrap();
}

#[test]
fn a_resumed_guest_gets_its_network_and_the_users_kernel_arguments_still_win() {
    let vm = boot(VmConfig {
        network: smolvm::NetworkMode::User,
        boot_args: Some("smolvm.mtu=1400".into()),
        ..small()
    });
    assert!(vm.info().unwrap().base.is_some(), "resumed from a template");
    assert!(sh(&vm, "ip -4 addr show eth0").contains("inet 10.0.2.15/24 "));
    assert!(sh(&vm, "ip -4 route").contains("default via 10.0.2.2 dev eth0"));
    assert_eq!(sh(&vm, "cat /sys/class/net/eth0/mtu"), "1400\n");
    assert!(sh(&vm, "cat /etc/resolv.conf").contains("nameserver 10.0.2.3"));
    vm.delete().unwrap();
}

#[test]
fn gc_removes_what_dead_snapshot_writers_and_forks_left() {
    let rt = runtime();
    // No other test's gc may sweep what this one plants before its own gc runs.
    let gc_exclusive = GcTurn::take();
    // A pid that is surely gone: a child that already exited.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let snaps = rt.paths().state_dir.join("snapshots");
    std::fs::create_dir_all(&snaps).unwrap();
    let half = snaps.join(format!(".half.tmp-{dead}"));
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join("memory"), b"partial").unwrap();
    let tdir = template::templates_dir(&rt.paths().images_dir, "default");
    std::fs::create_dir_all(&tdir).unwrap();
    let build = tdir.join(format!(".b-{dead}-0badf00d"));
    std::fs::create_dir_all(&build).unwrap();
    // A live writer's work is left alone.
    let live = snaps.join(format!(".busy.tmp-{}", std::process::id()));
    std::fs::create_dir_all(&live).unwrap();

    let report = gc_exclusive.gc(&rt);
    assert!(!half.exists() && !build.exists(), "{report:?}");
    assert!(report.removed_dirs.contains(&half), "{report:?}");
    assert!(live.exists());
    std::fs::remove_dir_all(&live).unwrap();
}

/// A private copy of the default image without templates (hard links: instant), in
/// `/tmp/smolvm-img-PID-TAG`, so changing it or its templates touches nothing else; and a
/// runtime that uses it.
fn private_image(tag: &str) -> (std::path::PathBuf, smolvm::Runtime) {
    let images = std::path::PathBuf::from(format!("/tmp/smolvm-img-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&images);
    std::fs::create_dir_all(&images).unwrap();
    let src = runtime().paths().images_dir.join("default");
    let copied = std::process::Command::new("cp")
        .arg("-al")
        .arg(&src)
        .arg(images.join("default"))
        .status()
        .unwrap();
    assert!(copied.success());
    let _ = std::fs::remove_dir_all(images.join("default/templates"));
    let rt = smolvm::Runtime::with_paths(smolvm::Paths {
        state_dir: state_dir().clone(),
        images_dir: images.clone(),
    })
    .unwrap();
    (images, rt)
}

/// A new small VM of `rt`, started; and the template it resumed from.
fn resumed(rt: &smolvm::Runtime) -> (smolvm::Vm, String) {
    let vm = rt.create(small()).unwrap();
    let from = vm
        .start()
        .unwrap()
        .restored
        .expect("resumed from a template")
        .to_string();
    (vm, from)
}

#[test]
fn a_changed_image_gets_a_new_template_and_gc_drops_the_old_one() {
    let (images, rt) = private_image("changed");
    let start = |rt: &smolvm::Runtime| {
        let (vm, from) = resumed(rt);
        assert_eq!(sh(&vm, "echo ok").trim(), "ok");
        vm.delete().unwrap();
        from
    };
    let first = start(&rt);
    // The image changes: its kernel is replaced by a copy (a new file, same bytes).
    let kernel = images.join("default/vmlinux");
    let fresh = images.join("default/vmlinux.new");
    std::fs::copy(&kernel, &fresh).unwrap();
    std::fs::rename(&fresh, &kernel).unwrap();
    let second = start(&rt);
    assert_ne!(
        first, second,
        "a changed image must not serve its old template"
    );
    let report = gc(&rt);
    let old_key = first.rsplit('/').next().unwrap().to_string();
    assert!(
        report
            .removed_saved_states
            .iter()
            .any(|s| s.contains(&old_key)),
        "{report:?}"
    );
    let tdir = template::templates_dir(&images, "default");
    assert!(!tdir.join(&old_key).exists());
    assert!(tdir.join(second.rsplit('/').next().unwrap()).exists());
    std::fs::remove_dir_all(&images).unwrap();
}

#[test]
fn templates_past_the_cap_go_and_no_vm_or_snapshot_needs_its_template_or_image() {
    let (images, rt) = private_image("trim");
    let tdir = template::templates_dir(&images, "default");
    let rootfs = images.join("default/rootfs.ext4");
    let (vm, from) = resumed(&rt);
    let key = from.rsplit('/').next().unwrap().to_string();
    sh(&vm, "echo kept > /var/tmp/keep.txt && sync");
    // The VM's disk: a copy of the template's, on the VM's own link to the image's root
    // file system.
    let chain = smolvm::disk::backing_chain(&vm.dir().join("disk.qcow2")).unwrap();
    assert_eq!(chain.len(), 2, "{chain:?}");
    assert_eq!(chain[1].0, vm.dir().join("rootfs.ext4"));
    assert!(smolvm::disk::same_file(&chain[1].0, &rootfs));
    // A snapshot's disk: the same, on the snapshot's own link.
    let snap = format!("trim-{}", std::process::id());
    let saved = vm.snapshot(&snap).unwrap();
    let chain = smolvm::disk::backing_chain(&saved.disk()).unwrap();
    assert_eq!(chain.len(), 2, "{chain:?}");
    assert_eq!(chain[1].0, saved.dir.join("rootfs.ext4"));

    // Five more templates (copies), every one idle for hours; the VM's is the oldest.
    let hour = Duration::from_secs(3600);
    let now = std::time::SystemTime::now();
    let age = |dir: &std::path::Path, hours: u32| {
        let f = std::fs::File::open(dir).unwrap();
        f.set_modified(now - hour * hours).unwrap();
    };
    let mut copies = Vec::new();
    for i in 1..=5u32 {
        let copy = tdir.join(format!("1c-256m-net-copy{i}"));
        let ok = std::process::Command::new("cp")
            .args(["-a", "--sparse=always"])
            .arg(tdir.join(&key))
            .arg(&copy)
            .status()
            .unwrap();
        assert!(ok.success());
        age(&copy, 6 - i);
        copies.push(copy);
    }
    age(&tdir.join(&key), 10);
    let report = gc(&rt);
    // Six templates, four kept: the VM's (10 h idle) and copy1 (5 h) go.
    assert!(!tdir.join(&key).exists(), "{report:?}");
    assert!(!copies[0].exists(), "{report:?}");
    assert!(copies[1..].iter().all(|c| c.exists()), "{report:?}");
    for gone in [key.as_str(), "copy1"] {
        assert!(
            report
                .removed_saved_states
                .iter()
                .any(|s| s.ends_with(gone)),
            "{report:?}"
        );
    }
    // Without its template the snapshot still restores.
    let clone = rt
        .create_from_snapshot(&snap, SnapshotOverrides::default())
        .unwrap();
    clone.start().unwrap();
    assert_eq!(sh(&clone, "cat /var/tmp/keep.txt"), "kept\n");

    // The image is rebuilt (here: its root file system replaced by an empty one). A VM made
    // before boots (cold) on the root file system it was made with; the running VM
    // restarts with its file.
    let waiting = rt.create(small()).unwrap();
    let size = std::fs::metadata(&rootfs).unwrap().len();
    let blank = images.join("default/rootfs.new");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(size)
        .unwrap();
    std::fs::rename(&blank, &rootfs).unwrap();
    let st = waiting.start().unwrap();
    assert_eq!(
        st.restored, None,
        "a template of the new image does not fit"
    );
    assert_eq!(sh(&waiting, "echo ok"), "ok\n");
    vm.stop(true).unwrap();
    vm.start().unwrap();
    assert_eq!(sh(&vm, "cat /var/tmp/keep.txt"), "kept\n");
    for v in [clone, waiting, vm] {
        let (id, dir) = (v.id().to_string(), v.dir().to_path_buf());
        v.delete().unwrap();
        assert_gone(&id, &dir);
    }
    rt.remove_snapshot(&snap).unwrap();
    std::fs::remove_dir_all(&images).unwrap();
}

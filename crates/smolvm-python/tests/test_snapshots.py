"""Saved VM states from Python: snapshot, from_snapshot, pause/resume, fork, cold boots.

One source VM (the default shape, so it resumes from the image's template; no network) runs
a ticker writing a line every 0.2 s; most tests build on it or on its snapshot ``s1``. The
fork test uses a second VM on a ``nat`` network. The tests run in file order: the last use
of ``s1`` deletes it."""

import os
import stat
import time

import pytest

from conftest import SMALL, STATE, wait_for
from smolvm import (
    SmolVM,
    SnapshotInfo,
    VMConfig,
    VMState,
    delete_snapshot,
    get_snapshot,
    list_snapshots,
)
from smolvm import _native
from smolvm.exceptions import (
    CommandExecutionUnavailableError,
    SmolVMError,
    SnapshotError,
    SnapshotNotFoundError,
    ValidationError,
)

DATA = "/var/tmp/data.txt"
TICKS = "/tmp/ticks"
CONTENT = "saved before the snapshot\n" * 100
TICKER = f"nohup sh -c 'while true; do date +%s%N >> {TICKS}; sleep 0.2; done' >/dev/null 2>&1 &"


def ticks(vm: SmolVM) -> int:
    r = vm.run(f"cat {TICKS} 2>/dev/null | wc -l")
    assert r.ok, r
    return int(r.output)


def ticker_pids(vm: SmolVM) -> str:
    # The ticker's shell (no pgrep -f needed: match its command line in /proc).
    return vm.run(
        "for p in /proc/[0-9]*; do grep -qs 'date +%s%N' $p/cmdline && echo ${p#/proc/}; done"
    ).output


def with_ticker(vm: SmolVM) -> SmolVM:
    vm.start()
    vm.write_file(DATA, CONTENT)
    assert vm.run(TICKER).ok
    assert wait_for(lambda: ticks(vm) >= 2, timeout=20)
    return vm


@pytest.fixture(scope="module")
def source():
    vm = with_ticker(SmolVM(network="none"))
    yield vm
    vm.delete()


@pytest.fixture(scope="module")
def nat_vm():
    vm = with_ticker(SmolVM(network="nat"))
    yield vm
    vm.delete()


@pytest.fixture(scope="module")
def s1(source):
    info = source.snapshot("s1")
    yield info
    try:
        delete_snapshot("s1")
    except SnapshotNotFoundError:
        pass


def test_config_field():
    assert VMConfig().snapshot is True
    assert VMConfig(snapshot=False).snapshot is False
    with pytest.raises(ValidationError) as e:
        VMConfig(snapshot="no")
    assert e.value.field == "snapshot"


def test_source_resumed_from_the_template(source):
    t = source.last_start_timings
    assert t is not None and (t["restored"] or "").startswith("template:default/2c-512m-nonet"), t
    # A real clocksource, never a ticking jiffies clock (2 vCPUs under TCG used to get one).
    assert t["clocksource"] == ("kvm-clock" if t["accelerator"] == "kvm" else "tsc"), t


def test_snapshot_is_saved_privately(source, s1):
    assert isinstance(s1, SnapshotInfo)
    assert (s1.name, s1.kind, s1.image) == ("s1", "snapshot", "default")
    assert (s1.vcpu_count, s1.mem_size_mib) == (2, 512)
    assert s1.source_vm == source.vm_id
    assert abs(s1.created_at - time.time()) < 600 and s1.size_bytes > 0
    assert s1.path.startswith(STATE)
    assert stat.S_IMODE(os.stat(s1.path).st_mode) == 0o700
    files = os.listdir(s1.path)
    assert {"memory", "disk.qcow2", "meta.json"} <= set(files), files
    for f in ("memory", "disk.qcow2", "meta.json"):
        assert stat.S_IMODE(os.stat(os.path.join(s1.path, f)).st_mode) == 0o400, f
    assert [s.name for s in list_snapshots() if s.kind == "snapshot"] == ["s1"]
    assert get_snapshot("s1") == list_snapshots()[0]
    # The source goes on running.
    assert source.status == VMState.RUNNING and source.run("true").ok


def test_snapshot_errors(source, s1):
    before = _native.list_vms()
    with pytest.raises(SnapshotNotFoundError) as e:
        SmolVM.from_snapshot("nope")
    assert isinstance(e.value, SnapshotError) and isinstance(e.value, SmolVMError)
    assert e.value.name == "nope" and "nope" in str(e.value)
    with pytest.raises(SnapshotNotFoundError):
        get_snapshot("nope")
    with pytest.raises(ValidationError) as e:
        SmolVM.from_snapshot("s1", vcpu_count=1)
    assert e.value.field == "vcpu_count" and "vcpu_count" in str(e.value), str(e.value)
    with pytest.raises(ValidationError) as e:
        SmolVM.from_snapshot("s1", mem_size_mib=1024)
    assert e.value.field == "mem_size_mib"
    with pytest.raises(ValidationError) as e:
        SmolVM.from_snapshot("s1", snapshot=False)
    assert e.value.field == "snapshot"
    with pytest.raises(ValidationError) as e:
        SmolVM.from_snapshot("s1", no_such_field=1)
    assert e.value.field == "config"
    with pytest.raises(ValidationError) as e:
        source.snapshot("bad/name")
    assert "snapshot name" in str(e.value)
    with pytest.raises(ValidationError):
        source.snapshot("s1")  # taken
    with pytest.raises(ValidationError):
        source.fork(0)
    assert _native.list_vms() == before


def test_from_snapshot_keeps_files_and_processes(source, s1):
    before = ticks(source)
    vm = SmolVM.from_snapshot("s1")
    try:
        assert vm.status == VMState.RUNNING and vm.vm_id != source.vm_id
        assert vm.info["owned"] is True and vm.get_ip() is None
        assert vm.last_start_timings["restored"] == "snapshot:s1"
        assert vm.config.vcpu_count == 2 and vm.config.network == "none"
        assert vm.read_file(DATA).decode() == CONTENT
        assert ticker_pids(vm), "the ticker did not survive the restore"
        n = ticks(vm)
        assert n >= 2
        assert wait_for(lambda: ticks(vm) > n + 1, timeout=20), "the ticker stopped"
        # Its own file from here on: the source does not see the copy's ticks.
        vm.write_file("/var/tmp/only-here", "x")
        assert not source.run("test -e /var/tmp/only-here").ok
        assert ticks(source) >= before

        with pytest.raises(SnapshotError) as e:
            delete_snapshot("s1")
        assert vm.vm_id in str(e.value), str(e.value)
    finally:
        vm.delete()
    delete_snapshot("s1")
    assert [s.name for s in list_snapshots()] == []
    with pytest.raises(SnapshotNotFoundError):
        SmolVM.from_snapshot("s1")


def test_pause_stops_the_guest_and_resume_continues(source):
    before = ticks(source)
    source.pause()
    try:
        assert source.status == VMState.PAUSED
        time.sleep(1.5)
        with pytest.raises(CommandExecutionUnavailableError) as e:
            source.run("true")
        assert "paused" in str(e.value), str(e.value)
        assert source.status == VMState.PAUSED
    finally:
        source.resume()
    assert source.status == VMState.RUNNING
    after = ticks(source)
    # 1.5 s running would have been ~7 lines; paused, at most the one in flight.
    assert after - before <= 1, (before, after)
    assert wait_for(lambda: ticks(source) >= after + 2, timeout=20), "no ticks after resume"


def test_fork_gives_running_copies_with_their_own_identity(nat_vm):
    source = nat_vm
    forks = source.fork(2)
    try:
        assert len(forks) == 2
        a, b = forks
        assert len({a.vm_id, b.vm_id, source.vm_id}) == 3
        for f in forks:
            assert f.status == VMState.RUNNING
            assert f.info["owned"] is True
            assert f.read_file(DATA).decode() == CONTENT
            assert ticker_pids(f)
        hostnames = {vm.run("hostname").output for vm in (source, a, b)}
        assert len(hostnames) == 3, hostnames
        rand = [f.run("head -c 32 /dev/urandom | od -An -tx1").output for f in forks]
        assert rand[0] != rand[1], rand
        ips = [vm.get_ip() for vm in (source, a, b)]
        assert None not in ips and len(set(ips)) == 3, ips
        # Each guest has the address it is recorded with.
        for f in forks:
            assert f.get_ip() in f.run("ip -4 -o addr show").stdout
        assert any(s.kind == "fork" for s in list_snapshots())
        # Context-manager use deletes a fork on exit.
        with a:
            pass
        assert a.vm_id not in [v for v, _ in _native.list_vms()]
    finally:
        for f in forks:
            try:
                f.delete()
            except SmolVMError:
                pass
    # The state the forks were made from goes with the last of them.
    assert not any(s.kind == "fork" for s in list_snapshots())
    assert source.run("true").ok


def test_snapshot_false_boots_cold():
    with SmolVM(snapshot=False, network="none", **SMALL) as vm:
        t = vm.last_start_timings
        assert t is not None and t["restored"] is None, t
        assert vm.config.snapshot is False
        assert vm.run("echo cold").output == "cold"


def test_a_nat_snapshot_restores_only_on_nat(nat_vm):
    # The guest's network device negotiated features only a TAP has (vnet_hdr): the
    # runtime refuses another network up front, naming the field, and makes nothing.
    nat_vm.snapshot("n1")
    try:
        before = {s.name for s in list_snapshots()}
        for mode in ("none", "user"):
            with pytest.raises(ValidationError) as e:
                SmolVM.from_snapshot("n1", network=mode)
            assert e.value.field == "network", e.value
            assert "nat" in str(e.value)
        assert {s.name for s in list_snapshots()} == before
        with SmolVM.from_snapshot("n1", network="nat") as vm:
            assert vm.read_file(DATA).decode() == CONTENT
            assert vm.get_ip() not in (None, nat_vm.get_ip())
    finally:
        delete_snapshot("n1")

"""``SmolVM.from_snapshot(name, **overrides)`` with every option: each is honoured or refused
with ``ValidationError`` naming it (``field``), by the runtime's rules, the same as
``smolvm create --from-snapshot`` (crates/smolvm-cli/tests/from_snapshot.rs). A refusal
leaves no VM and no VM directory. One snapshot (a small VM on user-mode networking with an
environment variable) serves the file."""

import os

import pytest

from conftest import SMALL, STATE
from smolvm import SmolVM, delete_snapshot
from smolvm import _native
from smolvm.exceptions import ValidationError

NAME = "pfs"


@pytest.fixture(scope="module")
def snap():
    vm = SmolVM(network="user", env_vars={"KEPT": "from-source"}, **SMALL)
    vm.start()
    try:
        vm.write_file("/var/tmp/mark", "saved\n")
        vm.snapshot(NAME)
    finally:
        vm.delete()
    yield NAME
    delete_snapshot(NAME)


def vm_dirs():
    try:
        return sorted(os.listdir(os.path.join(STATE, "vms")))
    except FileNotFoundError:
        return []


@pytest.fixture(scope="module")
def a_file():
    path = os.path.join(STATE, "some-file")
    with open(path, "w") as f:
        f.write("x")
    return path


REFUSED = [
    # (overrides, the option named, the value named)
    (dict(vcpu_count=2), "vcpu_count", "2"),
    (dict(mem_size_mib=1024), "mem_size_mib", "1024"),
    (dict(image="other"), "image", "other"),
    (dict(boot_args="loglevel=7"), "boot_args", "loglevel=7"),
    (dict(disk_size_mib=4096), "disk_size_mib", "4096"),
    (dict(disk_mode="shared"), "disk_mode", "shared"),
    (dict(disk_path="FILE"), "disk_path", "FILE"),
    (dict(kernel_path="FILE"), "kernel_path", "FILE"),
    (dict(initrd_path="FILE"), "initrd_path", "FILE"),
    (dict(rootfs_path="FILE"), "rootfs_path", "FILE"),
    (dict(snapshot=False), "snapshot", "false"),
    # Taken on user mode: its saved state holds slirp's.
    (dict(network="none"), "network", "none"),
    # Honoured options with values no VM may have: the usual errors.
    (dict(vm_id="Not An Id"), "vm_id", "Not An Id"),
    (dict(env_vars={"1X": "y"}), "env_vars", "1X"),
    (dict(network="carrier-pigeon"), "network", "carrier-pigeon"),
    (dict(egress="maybe"), "egress", "maybe"),
    (dict(network="user", allow_egress=["203.0.113.0/24"]), "allow_egress", "203.0.113.0/24"),
    (dict(network="user", deny_egress=["203.0.113.0/24"]), "deny_egress", "203.0.113.0/24"),
    (dict(retain_disk_on_delete="yes"), "retain_disk_on_delete", "yes"),
    (dict(no_such_field=1), "config", "no_such_field"),
]


@pytest.mark.parametrize(
    "overrides,option,value", REFUSED, ids=[f"{i}-{r[1]}" for i, r in enumerate(REFUSED)]
)
def test_an_option_that_cannot_apply_is_refused_naming_it(snap, a_file, overrides, option, value):
    overrides = {k: (a_file if v == "FILE" else v) for k, v in overrides.items()}
    value = a_file if value == "FILE" else value
    before = (_native.list_vms(), vm_dirs())
    with pytest.raises(ValidationError) as e:
        SmolVM.from_snapshot(snap, **overrides)
    assert e.value.field == option, str(e.value)
    assert value in str(e.value), str(e.value)
    assert (_native.list_vms(), vm_dirs()) == before


def test_the_snapshots_own_values_and_the_honoured_options_apply(snap):
    vm = SmolVM.from_snapshot(
        snap,
        vm_id="pfs-copy",
        env_vars={"ADDED": "yes", "KEPT": "overridden"},
        retain_disk_on_delete=True,
        network="user",
        egress="deny",
        # The snapshot's own: accepted.
        vcpu_count=1,
        mem_size_mib=256,
        image="default",
        disk_mode="isolated",
        snapshot=True,
    )
    try:
        assert vm.vm_id == "pfs-copy"
        assert vm.last_start_timings is not None
        assert vm.last_start_timings["restored"] == f"snapshot:{snap}"
        assert vm.read_file("/var/tmp/mark") == b"saved\n"
        # The environment is merged: the given variables over the saved guest's.
        assert vm.run("echo $ADDED $KEPT").output == "yes overridden"
        c = vm.config
        assert (c.network, c.egress, c.retain_disk_on_delete) == ("user", "deny", True)
        # With a vm_id it is not this process's.
        assert vm.info["owned"] is False
    finally:
        kept = vm.delete()
    assert kept is not None and kept.endswith("pfs-copy.qcow2"), kept
    assert os.path.isfile(kept)
    disks = os.path.dirname(kept)
    for f in os.listdir(disks):
        if f.startswith("pfs-copy"):
            os.remove(os.path.join(disks, f))


def test_without_options_a_restored_vm_keeps_the_snapshots_network_and_environment(snap):
    with SmolVM.from_snapshot(snap) as vm:
        assert vm.info["owned"] is True
        assert vm.config.network == "user" and vm.get_ip() == "10.0.2.15"
        assert vm.config.retain_disk_on_delete is False
        assert vm.run("echo $KEPT").output == "from-source"
    assert vm.vm_id not in [v for v, _ in _native.list_vms()]

"""Shared set-up: a private smolvm state directory for the whole run (set before smolvm
opens its runtime), one booted VM for tests that only run commands, and a check at the end
that no VM, process or file was left behind."""

import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

STATE = os.path.join(tempfile.gettempdir(), f"smolvm-py-{os.getpid()}")
os.environ["SMOLVM_HOME"] = STATE
os.makedirs(STATE, exist_ok=True)

import smolvm  # noqa: E402  (after SMOLVM_HOME is set)
from smolvm import _native  # noqa: E402

#: Small VMs keep TCG boots quick on a 2-core host.
SMALL = dict(vcpu_count=1, mem_size_mib=256)


# The Python counterparts of the `smolvm-testing` crate's helpers (one conftest for the
# whole suite): `processes_of` (its `processes_mentioning`), `wait_for` (`poll_until`, which
# returns the last value for the caller to assert on) and `require_private_netns`.


def processes_of(state_dir: str):
    """Live pids whose command line mentions the state directory (supervisors, QEMUs)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                named = state_dir.encode() in f.read()
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[-1].split()[0] == "Z"
        except (OSError, IndexError):
            continue
        if named and not zombie:
            out.append(int(pid))
    return out


def require_private_netns(ours=("smv", "nt")):
    """Fails the calling test unless it runs as root in a network namespace of its own (only
    loopback and interfaces named ``ours*``): tests that make TAPs or nft rules must never
    touch the host's network."""
    how = (
        "run them as root in a fresh network namespace, as scripts/test does: "
        "unshare --net sh -c 'ip link set lo up && .venv/bin/python -m pytest ...'"
    )
    if os.geteuid() != 0:
        pytest.fail(f"these tests need root: {how}", pytrace=False)
    # /proc/self/net/dev, not /sys/class/net: under `unshare --net` alone /sys is the host's.
    with open("/proc/self/net/dev") as f:
        links = [line.split(":", 1)[0].strip() for line in f if ":" in line]
    foreign = [n for n in links if n != "lo" and not n.startswith(tuple(ours))]
    if foreign:
        pytest.fail(
            f"these tests change the network, so they refuse to run outside a private network "
            f"namespace (this one has {foreign}): {how}",
            pytrace=False,
        )


def wait_for(pred, timeout=20.0, step=0.1):
    """Polls ``pred`` until it is true or ``timeout`` passes; returns its last value."""
    until = time.time() + timeout
    while True:
        v = pred()
        if v or time.time() > until:
            return v
        time.sleep(step)


def http_get(url: str, timeout=20.0) -> str:
    """GETs ``url`` (retrying while a server in a guest starts); the body as text."""
    import urllib.request

    until = time.time() + timeout
    while True:
        try:
            return urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            if time.time() > until:
                raise
            time.sleep(0.2)


def python(code: str, timeout=120, **kw):
    """Runs ``code`` in a fresh Python process sharing this run's state directory."""
    env = dict(os.environ, SMOLVM_HOME=STATE)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout, **kw
    )


@pytest.fixture(scope="session")
def shared_vm():
    """One running VM shared by the tests that only run commands in it."""
    vm = smolvm.SmolVM(**SMALL)
    vm.start()
    yield vm
    vm.delete()


def pytest_sessionfinish(session, exitstatus):
    # Whatever a failed test left: delete it, then insist nothing is running.
    for vm_id, _state in _native.list_vms():
        try:
            _native.Vm.open(vm_id).delete()
        except Exception as e:  # noqa: BLE001
            print(f"cleanup of {vm_id} failed: {e}", file=sys.stderr)
    left = wait_for(lambda: not processes_of(STATE), timeout=10) or processes_of(STATE)
    shutil.rmtree(STATE, ignore_errors=True)
    if left is not True and left:
        print(f"processes left behind: {left}", file=sys.stderr)
        session.exitstatus = 1

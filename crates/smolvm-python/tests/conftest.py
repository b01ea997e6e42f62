"""Shared set-up: a private smolvm state directory for the whole run (set before smolvm
opens its runtime), one booted VM for tests that only run commands, and a check at the end
that no VM, process or file was left behind."""

import os
import shutil
import subprocess
import sys
import time

import pytest

STATE = f"/tmp/smolvm-py-{os.getpid()}"
os.environ["SMOLVM_HOME"] = STATE
os.makedirs(STATE, exist_ok=True)

import smolvm  # noqa: E402  (after SMOLVM_HOME is set)
from smolvm import _native  # noqa: E402

#: Small VMs keep TCG boots quick on a 2-core host.
SMALL = dict(vcpu_count=1, mem_size_mib=256)


def processes_of(state_dir: str):
    """Pids whose command line mentions the state directory (supervisors, QEMUs)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if state_dir.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            pass
    return out


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

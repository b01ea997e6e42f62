"""The SDK beyond the seeds: validation, files, streaming, threads, interruption,
reconnection from another process, and who owns a VM."""

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import SMALL, STATE, http_get, processes_of, python, wait_for
from smolvm import CommandResult, SmolVM, VMConfig, VMState
from smolvm import _native
from smolvm.exceptions import (
    CommandExecutionUnavailableError,
    FileTransferError,
    OperationTimeoutError,
    SmolVMError,
    ValidationError,
    VMAlreadyExistsError,
    VMNotFoundError,
)


# -- validation: clear errors naming the field, nothing created -----------------------


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(vcpu_count=0), "vcpu_count"),
        (dict(vcpu_count=33), "vcpu_count"),
        (dict(vcpu_count="2"), "vcpu_count"),
        (dict(vcpu_count=True), "vcpu_count"),
        (dict(mem_size_mib=64), "mem_size_mib"),
        (dict(disk_mode="cloned"), "disk_mode"),
        (dict(network="bridge"), "network"),
        (dict(vm_id="Bad Name!"), "vm_id"),
        (dict(env_vars={"1BAD": "x"}), "env_vars"),
        (dict(env_vars={"OK": None}), "env_vars"),
        (dict(kernel_path="/nonexistent/vmlinux"), "kernel_path"),
        (dict(retain_disk_on_delete="yes"), "retain_disk_on_delete"),
    ],
)
def test_bad_config_names_the_field(fields, field):
    with pytest.raises(ValidationError) as e:
        VMConfig(**fields)
    assert isinstance(e.value, ValueError) and isinstance(e.value, SmolVMError)
    assert e.value.field == field and field in str(e.value), str(e.value)


def test_bad_config_creates_nothing():
    before = _native.list_vms()
    with pytest.raises(ValidationError):
        SmolVM(mem_size_mib=1)
    with pytest.raises(TypeError):
        SmolVM(no_such_field=1)
    assert _native.list_vms() == before


def test_config_defaults_and_redaction():
    c = VMConfig()
    assert (c.vcpu_count, c.mem_size_mib, c.disk_mode, c.image) == (2, 512, "isolated", "default")
    assert "hunter2" not in repr(VMConfig(env_vars={"PW": "hunter2"}))
    assert c.replace(vcpu_count=3).vcpu_count == 3
    with pytest.raises(AttributeError):
        c.vcpu_count = 4


def test_run_argument_errors(shared_vm):
    for bad in ["", "   ", []]:
        with pytest.raises(ValueError):
            shared_vm.run(bad)
    with pytest.raises(ValidationError) as e:
        shared_vm.run("true", timeout=-1)
    assert e.value.field == "timeout"
    with pytest.raises(ValidationError):
        shared_vm.run("true", env={"A=B": "x"})


def test_unknown_and_duplicate_ids():
    with pytest.raises(VMNotFoundError) as e:
        SmolVM.from_id("no-such-vm")
    assert e.value.vm_id == "no-such-vm"
    vm = SmolVM(vm_id="dup-test", **SMALL)
    try:
        with pytest.raises(VMAlreadyExistsError):
            SmolVM(vm_id="dup-test", **SMALL)
    finally:
        vm.delete()


# -- commands -------------------------------------------------------------------------


def test_result_fields(shared_vm):
    r = shared_vm.run("printf '  hi  \\n'; echo warn >&2; exit 5")
    assert isinstance(r, CommandResult)
    assert (r.exit_code, r.ok, r.output, r.stdout, r.stderr) == (5, False, "hi", "  hi  \n", "warn\n")
    assert r.duration > 0 and r.truncated is False
    assert shared_vm.run(["echo", "a b", "$HOME"]).stdout == "a b $HOME\n"
    assert shared_vm.run("pwd", cwd="/tmp").output == "/tmp"
    assert shared_vm.run("echo $X", env={"X": "1"}).output == "1"
    assert shared_vm.run("wc -c", stdin=b"\x00" * 70000).output == "70000"
    assert shared_vm.run("kill -9 $$").exit_code == 137


def test_output_cap(shared_vm):
    r = shared_vm.run("head -c 100000 /dev/zero", max_output_bytes=1000)
    assert r.truncated and len(r.stdout_bytes) == 1000


def test_timeout_kills_the_process_group(shared_vm):
    # The command runs 300 s: the call comes back (with the error) only because the 1 s
    # timeout ended it.
    with pytest.raises(OperationTimeoutError) as e:
        shared_vm.run("echo started; sleep 300 & sleep 301", timeout=1)
    assert e.value.timeout_seconds == 1 and e.value.stdout == b"started\n"
    assert wait_for(lambda: shared_vm.run("pgrep -x sleep").exit_code == 1, timeout=30)


def test_callbacks_get_output_as_it_comes(shared_vm):
    seen = []
    r = shared_vm.run(
        "for i in 1 2 3; do echo $i; sleep 0.3; done; echo done >&2",
        on_stdout=lambda s: seen.append((time.time(), "out", s)),
        on_stderr=lambda s: seen.append((time.time(), "err", s)),
    )
    assert r.stdout == "1\n2\n3\n" and r.stderr == "done\n"
    outs = [t for t, k, _ in seen if k == "out"]
    assert "".join(s for _, k, s in seen if k == "out") == "1\n2\n3\n"
    assert outs[-1] - outs[0] > 0.4, "chunks arrived together, not as they came"


def test_callback_exception_kills_the_command(shared_vm):
    def boom(_):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        shared_vm.run("echo x; exec sleep 200", on_stdout=boom)
    assert wait_for(lambda: shared_vm.run("pgrep -x sleep").exit_code == 1, timeout=30)


def test_stream(shared_vm):
    s = shared_vm.stream("echo a; sleep 0.3; echo b >&2; exit 7")
    chunks = [(c.stream, c.data) for c in s]
    assert chunks == [("stdout", b"a\n"), ("stderr", b"b\n")]
    assert s.result.exit_code == 7
    # Leaving early kills the command.
    with shared_vm.stream("while true; do echo tick; sleep 0.1; done") as s:
        assert next(iter(s)).text == "tick\n"
    assert wait_for(lambda: shared_vm.run("pgrep -f 'echo [t]ick'").exit_code == 1, timeout=30)


def test_many_threads_one_vm(shared_vm):
    results, errors = {}, []
    shared_vm.run("rm -rf /tmp/many && mkdir /tmp/many")

    def work(i):
        # Each run waits (up to 30 s) until all 16 have started: with the GIL held while
        # waiting, they would run one at a time and the first would wait alone.
        try:
            results[i] = shared_vm.run(
                f"touch /tmp/many/{i}; n=0; while [ $(ls /tmp/many | wc -l) -lt 16 ]; do "
                f"n=$((n+1)); [ $n -gt 600 ] && {{ echo alone; exit 0; }}; sleep 0.05; done; "
                f"echo {i}"
            ).output
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == {i: str(i) for i in range(16)}


# -- files ----------------------------------------------------------------------------


def test_write_and_read_files(shared_vm):
    shared_vm.write_file("/tmp/py/a.txt", "héllo\n")
    assert shared_vm.read_file("/tmp/py/a.txt") == "héllo\n".encode()
    assert shared_vm.run("stat -c %a /tmp/py/a.txt").output == "644"
    shared_vm.write_file("/tmp/py/run.sh", b"#!/bin/sh\necho ran\n", mode=0o755)
    assert shared_vm.run("/tmp/py/run.sh").output == "ran"
    shared_vm.write_file("/tmp/py/empty", b"")
    assert shared_vm.read_file("/tmp/py/empty") == b""
    with pytest.raises(FileTransferError) as e:
        shared_vm.read_file("/tmp/py/a.txt", max_bytes=3)
    assert "limit" in str(e.value)
    with pytest.raises(FileTransferError):
        shared_vm.read_file("/tmp/py/missing")
    with pytest.raises(FileTransferError):
        shared_vm.read_file("/tmp")
    with pytest.raises(ValidationError):
        shared_vm.write_file("relative/path", b"x")
    with pytest.raises(ValidationError):
        shared_vm.write_file("/tmp/x", b"x", mode=0o17777)


def test_upload_and_download_big_file(shared_vm, tmp_path):
    src = tmp_path / "big.bin"
    data = os.urandom(8 << 20)
    src.write_bytes(data)
    os.chmod(src, 0o640)
    assert shared_vm.upload(src, "/tmp/up/") == "/tmp/up/big.bin"
    assert shared_vm.run("sha256sum /tmp/up/big.bin | cut -d' ' -f1").output == hashlib.sha256(data).hexdigest()
    assert shared_vm.run("stat -c %a /tmp/up/big.bin").output == "640"
    out = shared_vm.download("/tmp/up/big.bin", tmp_path / "back")
    assert out == str(tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o640)
    with pytest.raises(FileTransferError):
        shared_vm.download("/tmp/up/big.bin", tmp_path / "small", max_bytes=1024)
    assert not (tmp_path / "small").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".smolvm")]


# -- lifetime, reconnection, interruption ---------------------------------------------


def test_reconnect_from_a_second_process():
    vm = SmolVM(vm_id="py-reconnect", **SMALL)
    try:
        vm.start()
        vm.run("echo from-first > /tmp/mark")
        r = python(
            "from smolvm import SmolVM, VMState\n"
            "vm = SmolVM.from_id('py-reconnect')\n"
            "assert vm.status == VMState.RUNNING\n"
            "print(vm.run('cat /tmp/mark').output)\n"
            "with vm:\n"
            "    pass\n"  # a reconnected VM is not deleted on exit
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "from-first"
        assert vm.status == VMState.RUNNING
    finally:
        vm.delete()


def test_owned_vm_dies_with_its_process_unless_closed():
    r = python(
        "import os\n"
        "from smolvm import SmolVM\n"
        "a = SmolVM(vcpu_count=1, mem_size_mib=256).start()\n"
        "b = SmolVM(vcpu_count=1, mem_size_mib=256).start()\n"
        "b.close()\n"
        "print(a.vm_id, b.vm_id, flush=True)\n"
        "os._exit(0)\n"  # no cleanup code runs
    )
    assert r.returncode == 0, r.stderr
    a, b = r.stdout.split()
    ids = lambda: [i for i, _ in _native.list_vms()]  # noqa: E731
    assert wait_for(lambda: a not in ids(), timeout=20), "the owned VM outlived its process"
    assert b in ids()
    kept = SmolVM.from_id(b)
    assert kept.status == VMState.RUNNING and kept.run("true").ok
    kept.delete()


def test_ctrl_c_interrupts_run_and_leaves_no_orphan():
    r = python(
        "import os, signal, threading, time\n"
        "from smolvm import SmolVM\n"
        "vm = SmolVM(vcpu_count=1, mem_size_mib=256).start()\n"
        "threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
        "t0 = time.time()\n"
        "try:\n"
        "    vm.run('sleep 300', timeout=None)\n"
        "    print('not interrupted')\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', round(time.time() - t0, 1))\n"
        "print('left', vm.run('pgrep -x sleep || true').output or 'none')\n"
        "vm.delete()\n"
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    # `sleep 300` was interrupted (the child's 120 s limit is the deadline); how long that
    # took is in its output, not asserted.
    assert lines[0].startswith("interrupted"), r.stdout
    assert lines[1] == "left none"


def test_status_states():
    vm = SmolVM(**SMALL)
    try:
        assert vm.status == VMState.CREATED
        vm.start()
        assert vm.status == "running"
        vm.stop()
        assert vm.status == VMState.STOPPED
        with pytest.raises(CommandExecutionUnavailableError) as e:
            vm.run("true")
        assert "stopped" in e.value.reason
        vm.start()
        assert vm.run("true").ok
    finally:
        vm.delete()
    assert wait_for(lambda: not processes_of(f"{STATE}/vms/{vm.vm_id}"), timeout=10)


def test_expose_local(shared_vm):
    import socket

    shared_vm.write_file("/srv/p/index.html", "from the guest\n")
    shared_vm.run("cd /srv/p && nohup python3 -m http.server 8123 --bind 127.0.0.1 >/dev/null 2>&1 &")
    port = shared_vm.expose_local(8123)
    assert 1024 <= port <= 65535
    assert http_get(f"http://127.0.0.1:{port}/") == "from the guest\n"
    assert {"host_addr": "127.0.0.1", "host_port": port, "guest_port": 8123} in shared_vm.list_forwards()
    # Another process sees the forward and can use it (it belongs to the VM, not to us).
    r = python(
        "import urllib.request\n"
        f"print(urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=10).read().decode(), end='')\n"
    )
    assert r.stdout == "from the guest\n", r.stderr
    shared_vm.unexpose_local(port)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    for bad in [0, 70000, -1]:
        with pytest.raises(ValidationError) as e:
            shared_vm.expose_local(bad)
        assert e.value.field == "guest_port"
    with pytest.raises(ValidationError):
        shared_vm.expose_local(80, bind="not-an-ip")

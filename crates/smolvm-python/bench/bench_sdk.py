"""Benchmark of the Python SDK, side by side with the CLI in one run: VM lifecycle phases,
warm command round trips (SDK `run` vs `smolvm exec` processes), and file throughput.
Prints tables with p50/p95, the accelerator and the machine.

    .venv/bin/python crates/smolvm-python/bench/bench_sdk.py [-n 5] [--runs 100]
"""

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time

from smolvm import SmolVM


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def row(name, xs, unit="ms"):
    scale = 1000 if unit == "ms" else 1
    print(f"{name:<34} {pct(xs, 50) * scale:>10.1f} {pct(xs, 95) * scale:>10.1f}  {unit}")


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5, help="full lifecycles")
    ap.add_argument("--runs", type=int, default=100, help="warm round trips")
    ap.add_argument("--mib", type=int, default=32, help="file size for throughput")
    a = ap.parse_args()

    create, ready, first, teardown, total = [], [], [], [], []
    accel = "?"
    for _ in range(a.n):
        t0 = time.perf_counter()
        vm = SmolVM()
        t1 = time.perf_counter()
        timings = vm.start().last_start_timings
        accel = timings["accelerator"]
        t2 = time.perf_counter()
        vm.run("echo hi")
        t3 = time.perf_counter()
        vm.delete()
        t4 = time.perf_counter()
        create.append(t1 - t0)
        ready.append(t2 - t1)
        first.append(t3 - t2)
        teardown.append(t4 - t3)
        total.append(t4 - t0)

    vm = SmolVM().start()
    try:
        sdk, sdk_sh = [], []
        for _ in range(a.runs):
            t = time.perf_counter()
            vm.run(["true"])
            sdk.append(time.perf_counter() - t)
            t = time.perf_counter()
            vm.run("true")
            sdk_sh.append(time.perf_counter() - t)
        smolvm_bin = os.path.join(os.path.dirname(__import__("smolvm").__file__), "_bin", "smolvm")
        cli = []
        for _ in range(max(10, a.runs // 5)):
            t = time.perf_counter()
            subprocess.run([smolvm_bin, "exec", vm.vm_id, "--", "true"], check=True)
            cli.append(time.perf_counter() - t)

        data = os.urandom(a.mib << 20)
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "src")
            with open(src, "wb") as f:
                f.write(data)
            up, down = [], []
            for _ in range(3):
                t = time.perf_counter()
                vm.upload(src, "/tmp/bench.bin")
                up.append(a.mib / (time.perf_counter() - t))
                t = time.perf_counter()
                vm.download("/tmp/bench.bin", os.path.join(d, "back"))
                down.append(a.mib / (time.perf_counter() - t))
    finally:
        vm.delete()

    print(f"smolvm Python SDK benchmark: accelerator {accel}, {cpu_model()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, default VM (2 vCPU, 512 MiB)")
    print(f"\n{'phase (' + str(a.n) + ' lifecycles)':<34} {'p50':>10} {'p95':>10}")
    row("SmolVM() (create)", create)
    row("start() (to agent ready)", ready)
    row("first run('echo hi')", first)
    row("delete()", teardown)
    row("full lifecycle", total)
    print(f"\n{'warm round trip of `true`':<34} {'p50':>10} {'p95':>10}")
    row(f"SDK vm.run(['true']) x{len(sdk)}", sdk)
    row(f"SDK vm.run('true') (bash -c) x{len(sdk_sh)}", sdk_sh)
    row(f"CLI `smolvm exec` x{len(cli)}", cli)
    print(f"ratio CLI process / SDK call, both argv (p50): {pct(cli, 50) / pct(sdk, 50):.1f}x")
    print(f"\n{'file throughput (' + str(a.mib) + ' MiB)':<34} {'p50':>10} {'p95':>10}")
    row("upload", up, unit="MiB/s")
    row("download", down, unit="MiB/s")


if __name__ == "__main__":
    main()

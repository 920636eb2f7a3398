#!/usr/bin/env python3
"""Containers (backend nspawn) next to VMs on the same machine, in one run.

  boot      start → first command returned, for a container node and a QEMU node started
            together (both boot at once, as in a test's start_all), then each alone
  rtt       succeed("true") round trips on each
  rss       an idle container's processes (VmRSS summed), and with unshare and systemd-nspawn
            (what the suite runner budgets, suite/budget.py CONTAINER_MIB), vs the QEMU process
  suite     (--suite) `ntng test examples/suite` with its nodes as containers, then as VMs:
            wall time and the suite's summary line each.  kernel.py stays a VM in both (it
            checks the VM's vCPU count; a container sees the host's cores).

Usage: .venv/bin/python bench/containers.py [--rounds 50] [--accel auto|kvm|tcg] [--suite]
Prints a markdown table.  Not a test: numbers vary with the machine and the accelerator.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ntng import runner  # noqa: E402
from ntng.driver import Driver  # noqa: E402
from ntng.machine import Machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADER = ('#: nodes.box = { backend = "nspawn"; };\n'
          '#: nodes.vm = { memory = 512; };\n')


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def same_pidns(pid: int) -> list[int]:
    ns = os.readlink(f"/proc/{pid}/ns/pid")
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(proc / "ns/pid") == ns:
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def suite_run(tmp: Path, containers: bool, accel: str) -> tuple[float, str]:
    """examples/suite copied, its nodes made containers (all but kernel.py) or left VMs; run
    by `ntng test` with its default parallelism.  Wall time and the summary line."""
    kind = "containers" if containers else "vms"
    suite = tmp / f"suite-{kind}"
    shutil.copytree(ROOT / "examples/suite", suite)
    if containers:
        for test in suite.glob("*.py"):
            if test.name != "kernel.py":
                test.write_text(test.read_text().replace("#: nodes.machine = {", '#: nodes.machine = { backend = "nspawn";'))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "ntng.cli", "test", str(suite), "--accel", accel,
                        "-o", str(tmp / f"out-{kind}")], capture_output=True, text=True, timeout=3600)
    took = time.monotonic() - t0
    lines = (r.stdout + r.stderr).strip().splitlines()
    return took, f"exit {r.returncode}: {lines[-1] if lines else ''}"


def first_command(m: Machine, t0: float) -> float:
    m.succeed("true")
    return time.monotonic() - t0


def rtt_ms(m: Machine, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        m.succeed("true")
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    ap.add_argument("--suite", action="store_true", help="also run examples/suite as containers and as VMs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ntng-bench-containers-") as d:
        tmp = Path(d)
        script = tmp / "bench.py"
        script.write_text(HEADER)
        spec, choice = runner.prepare(runner.RunOptions(script=script, accel=args.accel), tmp)
        driver = Driver(spec, tmp / "out", runner.DEFAULT_BOOT_TIMEOUT * choice.timeout_scale, log=lambda _m: None)
        by = {m.name: m for m in driver.machines}
        box, vm = by["box"], by["vm"]
        rows: list[tuple[str, str, str]] = []
        try:
            t0 = time.monotonic()
            box.start()
            vm.start()
            together = (first_command(box, t0), first_command(vm, t0))
            rows.append(("start → first command, both started together (s)",
                         f"{together[0]:.2f}", f"{together[1]:.1f}"))
            for m in (box, vm):
                m.crash()
            t0 = time.monotonic()
            alone_box = first_command(box, t0)
            box.crash()
            t0 = time.monotonic()
            alone_vm = first_command(vm, t0)
            box.succeed("true")
            rows.append(("start → first command, alone (s)", f"{alone_box:.2f}", f"{alone_vm:.1f}"))
            box.wait_for_unit("multi-user.target")
            vm.wait_for_unit("multi-user.target")
            rows.append((f"succeed(\"true\") median of {args.rounds} (ms)",
                         f"{rtt_ms(box, args.rounds):.1f}", f"{rtt_ms(vm, args.rounds):.1f}"))
            init = box.backend.container_init()  # type: ignore[attr-defined]
            assert init is not None and vm.backend.pid is not None
            rows.append(("idle RSS (MiB; container: its processes, VM: QEMU)",
                         f"{rss_kib(same_pidns(init)) / 1024:.0f}", f"{rss_kib([vm.backend.pid]) / 1024:.0f}"))
            assert box.backend.proc is not None
            unshare = box.backend.proc.pid
            nspawn = [int(c) for c in Path(f"/proc/{unshare}/task/{unshare}/children").read_text().split()]
            outer = [unshare, *nspawn, *same_pidns(init)]
            rows.append(("idle RSS with unshare and systemd-nspawn (MiB)", f"{rss_kib(outer) / 1024:.0f}", "–"))
        finally:
            driver.release()
        if args.suite:
            for containers in (True, False):
                took, summary = suite_run(tmp, containers, choice.accel)
                print(f"examples/suite as {'containers' if containers else 'VMs'}: {took:.1f}s wall; {summary}",
                      flush=True)
    print(f"| accelerator for the VM: {choice.accel} | container (nspawn) | VM (QEMU) |")
    print("|---|---|---|")
    for what, c, v in rows:
        print(f"| {what} | {c} | {v} |")


if __name__ == "__main__":
    main()

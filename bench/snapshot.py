#!/usr/bin/env python3
"""Snapshots and clones (QEMU): cold boot vs restore, and clones per minute.

One guest (1 vCPU, 1 GiB):
  cold      start → first command answered (`true`), booting from the image
  save      machine.snapshot(): how long the origin is paused (stream, RAM file, disk copy)
  restore   per clone, start_from_snapshot(snap, [name]) → first command answered
  rate      clones per minute: --clones clones started one after another, each up, then
            released (their QEMU killed, state removed), wall time

Usage: .venv/bin/python bench/snapshot.py [--clones 4] [-v]
Prints a markdown table.  Not a test: numbers vary with the machine and the accelerator.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ntng import runner  # noqa: E402
from ntng.driver import Driver  # noqa: E402


def measure(clones: int, verbose: bool) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="ntng-bench-snap-") as tmp:
        script = Path(tmp) / "snap.py"
        script.write_text("#: nodes.a = { };\n")
        state = Path(tmp) / "state"
        state.mkdir()
        spec, choice = runner.prepare(runner.RunOptions(script=script), state)
        with Driver(spec, Path(tmp) / "out", runner.DEFAULT_BOOT_TIMEOUT * choice.timeout_scale,
                    log=lambda msg: print(msg, file=sys.stderr, flush=True) if verbose else None) as d:
            a = d.machines[0]
            t0 = time.monotonic()
            a.run(["true"])
            cold = time.monotonic() - t0
            snap = a.snapshot("ready")
            restores = []
            t_all = time.monotonic()
            for n in range(clones):
                t1 = time.monotonic()
                (c,) = d.start_from_snapshot(snap, [f"c{n}"])
                c.run(["true"])
                restores.append(time.monotonic() - t1)
                c.release()
            rate = clones / (time.monotonic() - t_all) * 60
            return {"accel": choice.accel, "cold": cold, "save": snap.save_seconds,
                    "memory_mb": snap.memory_bytes / 1e6, "ram_mb": snap.ram_bytes / 1e6, "restores": restores, "rate": rate}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clones", type=int, default=4)
    ap.add_argument("-v", "--verbose", action="store_true", help="the runner's log (phase timings) on stderr")
    args = ap.parse_args()
    r = measure(args.clones, args.verbose)
    restores = r["restores"]
    assert isinstance(restores, list)
    med = statistics.median(restores)
    cold = float(r["cold"])  # type: ignore[arg-type]
    print(f"| measure ({r['accel']}, 1 vCPU, 1 GiB) | value |")
    print("|---|---|")
    print(f"| cold boot → first command | {cold:.1f} s |")
    print(f"| snapshot: origin paused (migration stream {r['memory_mb']:.0f} MB, RAM file {r['ram_mb']:.0f} MB, "
          f"disk copy) | {r['save']:.2f} s |")
    print(f"| restore → first command, median of {len(restores)} (min / max) | "
          f"{med:.2f} s ({min(restores):.2f} / {max(restores):.2f}) |")
    print(f"| restore / cold boot | {100 * med / cold:.1f} % |")
    print(f"| clones per minute (one after another, each up then released) | {r['rate']:.0f} |")


if __name__ == "__main__":
    main()

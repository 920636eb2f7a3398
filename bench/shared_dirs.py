#!/usr/bin/env python3
"""Copy benchmark on one real guest: the backdoor protocol vs a 9p share vs a virtiofs share,
on the same files, both directions.

  small   many small files (default 2000 x 4 KiB) in one directory
  large   one large file (default 200 MB)

Each copy is the Machine API's own path: copy_from_host / copy_from_machine through the
protocol (FILE_PUT/FILE_GET per file), or through a share (python/ntng/shares.py: the host
stages into the share, `cp -a` in the guest to or from its disk).  Every copy is checked
(file count, sha256 of the large file) outside the timing.

Usage: .venv/bin/python bench/shared_dirs.py [--small-files 2000] [--small-kib 4] [--large-mb 200]
Prints a markdown table.  Not a test: numbers vary with the machine and the accelerator.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ntng import runner, shares  # noqa: E402
from ntng.driver import Driver  # noqa: E402
from ntng.machine import Machine  # noqa: E402

METHODS = ("protocol", "9p", "virtiofs")


def header(host: Path) -> str:
    return (
        "#: nodes.machine = {\n"
        f'#:   sharedDirs.p9 = {{ source = "{host}/p9"; target = "/mnt/p9"; }};\n'
        f'#:   sharedDirs.vfs = {{ source = "{host}/vfs"; target = "/mnt/vfs"; type = "virtiofs"; }};\n'
        "#: };\n"
    )


def make_small(root: Path, count: int, size: int) -> None:
    root.mkdir(parents=True)
    for i in range(count):
        (root / f"f{i:05d}").write_bytes(os.urandom(size))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def timed(fn: Callable[..., None], *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def share_of(m: Machine, tag: str) -> dict[str, Any]:
    return next(s for s in m.plan["shares"] if s["tag"] == tag)


def to_guest(m: Machine, method: str, src: Path, target: str) -> None:
    if method == "protocol":
        m.copy_from_host(str(src), target)
    else:
        shares.to_guest(m, share_of(m, "p9" if method == "9p" else "vfs"), src, target)


def from_guest(m: Machine, method: str, source: str, dest: Path) -> None:
    if method == "protocol":
        m.copy_from_machine(source, str(dest.relative_to(m.out_dir)))
    else:
        dest.mkdir(parents=True, exist_ok=True)
        shares.from_guest(m, share_of(m, "p9" if method == "9p" else "vfs"), source, dest)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small-files", type=int, default=2000)
    ap.add_argument("--small-kib", type=int, default=4)
    ap.add_argument("--large-mb", type=int, default=200)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--accel", default=os.environ.get("NTNG_ACCEL", "auto"))
    args = ap.parse_args()
    methods = args.methods.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="ntng-bench-shares-"))
    host = tmp / "host"
    for d in ("p9", "vfs"):
        (host / d).mkdir(parents=True)
    small, large = tmp / "data" / "small", tmp / "data" / "large"
    make_small(small, args.small_files, args.small_kib * 1024)
    with open(large, "wb") as f:
        for _ in range(args.large_mb):
            f.write(os.urandom(1 << 20))
    large_sum = sha256(large)
    small_mb = args.small_files * args.small_kib * 1024 / 1e6
    large_mb = args.large_mb * (1 << 20) / 1e6

    script = tmp / "bench.py"
    script.write_text(header(host))
    spec, choice = runner.prepare(runner.RunOptions(script=script, accel=args.accel), tmp)
    driver = Driver(spec, tmp / "out", runner.DEFAULT_BOOT_TIMEOUT * choice.timeout_scale,
                    log=lambda _m: None)
    m = driver.machines[0]
    rows: list[tuple[str, str, str, str]] = []

    def row(what: str, method: str, seconds: float, mb: float, files: int) -> None:
        rows.append((what, method, f"{mb / seconds:.1f}", f"{files / seconds:.0f}" if files > 1 else "–"))
        print(f"{what:28} {method:9} {seconds:7.2f} s  {mb / seconds:7.1f} MB/s  {files / seconds:7.0f} files/s",
              file=sys.stderr, flush=True)

    try:
        m.start()
        m.wait_until_succeeds("systemctl is-system-running | grep -qE 'running|degraded'", 600)
        # The guest's own copies, for the guest → host direction (made once, outside timing).
        m.copy_from_host(str(small), "/root/src/small")
        m.copy_from_host(str(large), "/root/src/large")
        for method in methods:
            dst = f"/root/in-{method}"
            t = timed(to_guest, m, method, small, f"{dst}/small")
            assert m.succeed(f"ls {dst}/small | wc -l").strip() == str(args.small_files)
            row(f"host → guest, {args.small_files} x {args.small_kib} KiB", method, t, small_mb, args.small_files)
            t = timed(to_guest, m, method, large, f"{dst}/large")
            assert m.succeed(f"sha256sum < {dst}/large").split()[0] == large_sum
            row(f"host → guest, 1 x {args.large_mb} MB", method, t, large_mb, 1)
            m.succeed(f"rm -rf {dst}")

            out = m.out_dir / f"from-{method}"
            t = timed(from_guest, m, method, "/root/src/small", out)
            assert len(list((out / "small").iterdir())) == args.small_files
            row(f"guest → host, {args.small_files} x {args.small_kib} KiB", method, t, small_mb, args.small_files)
            t = timed(from_guest, m, method, "/root/src/large", out)
            assert sha256(out / "large") == large_sum
            row(f"guest → host, 1 x {args.large_mb} MB", method, t, large_mb, 1)
            shutil.rmtree(out)
    finally:
        driver.release()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\naccelerator: {choice.accel}; guest: 1 vCPU, 1 GiB\n")
    print("| copy | method | MB/s | files/s |")
    print("|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r[0], METHODS.index(r[1]))):
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Network between two guests: bridge + TAP (the default, root) vs rootless VDE switches.

For each mode, two guests on vlan 1:
  rtt       ping a → b, average of 50 (ms)
  tcp       a → b, 200 MiB from /dev/zero through nc (MB/s, timed inside the guest)
  link      what the host's tap counted for that transfer (tap mode only)

Usage: .venv/bin/python bench/network.py [--mb 200] [--modes tap,vde]
Prints a markdown table.  Not a test: numbers vary with the machine and the accelerator.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ntng import runner  # noqa: E402
from ntng.driver import Driver  # noqa: E402


def measure(mode: str, mb: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="ntng-bench-net-") as tmp:
        script = Path(tmp) / "net.py"
        script.write_text("#: nodes.a = { vlans = [ 1 ]; };\n#: nodes.b = { vlans = [ 1 ]; };\n")
        opts = runner.RunOptions(script=script, network=mode)
        state = Path(tmp) / "state"
        state.mkdir()
        spec, choice = runner.prepare(opts, state)
        with Driver(spec, Path(tmp) / "out", runner.DEFAULT_BOOT_TIMEOUT * choice.timeout_scale,
                    log=lambda _msg: None) as d:
            a, b = d.machines
            d.start_all()
            b.succeed("nc -lk -p 5000 >/dev/null 2>&1 </dev/null &")
            b.wait_for_open_port(5000)
            a.succeed("ping -c 3 -W 5 -q b")  # ARP and caches warm
            out = a.succeed("ping -c 50 -i 0.05 -q b")
            rtt = float(out.strip().splitlines()[-1].split("=")[1].split("/")[1])
            before = a.link_counters() if mode == "tap" else None
            t = a.succeed(f"s=$(date +%s.%N); head -c {mb}M /dev/zero | nc -N b 5000; e=$(date +%s.%N); "
                          "echo \"$e - $s\" | bc -l 2>/dev/null || python3 -c \"print($e - $s)\"")
            secs = float(t.strip().splitlines()[-1])
            row = {"rtt_ms": rtt, "mb_s": mb * 1.048576 / secs, "accel": choice.accel}
            if before is not None:
                row["link_mb"] = (a.link_counters() - before).tx_bytes / 1e6
            return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--modes", default="tap,vde")
    args = ap.parse_args()
    rows = {mode: measure(mode, args.mb) for mode in args.modes.split(",")}
    print(f"| guest a → guest b ({next(iter(rows.values()))['accel']}) | RTT (ms) | TCP (MB/s) | tap counted (MB) |")
    print("|---|---|---|---|")
    names = {"tap": "bridge + TAP (netns)", "vde": "VDE switch (rootless)"}
    for mode, r in rows.items():
        link = f"{r['link_mb']:.1f}" if "link_mb" in r else "n/a"
        print(f"| {names.get(mode, mode)} | {r['rtt_ms']:.2f} | {r['mb_s']:.1f} | {link} |")


if __name__ == "__main__":
    main()

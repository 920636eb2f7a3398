#!/usr/bin/env python3
"""Backdoor benchmarks on one real guest, each next to a baseline on the same VM.

  boot      cold start → first command returned
  rtt       PING and succeed("true") vs a raw echo over a second virtio-serial port, and vs a
            reimplementation of the NixOS driver's shell protocol (bash on a port, base64
            output, a second round trip for the exit status)
  copy      FILE_PUT / FILE_GET MB/s vs raw bytes over the same kind of port (C tools in
            the guest, so the baseline is the transport's ceiling)
  memory    the runner's peak RSS during the download

Usage: .venv/bin/python bench/backdoor.py [--rounds 200] [--copy-mb 64]
Prints a markdown table.  Not a test: numbers vary with the machine and the accelerator.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ntng import runner  # noqa: E402
from ntng.client import connect_unix  # noqa: E402
from ntng.driver import Driver  # noqa: E402
from ntng.machine import Machine  # noqa: E402

RAW = "org.ntng.raw"
SHELL = "org.ntng.shell"
HEADER = f'#: nodes.machine = {{ extraSerialPorts = [ "{RAW}" "{SHELL}" ]; }};\n'
ECHO = (
    "import os\n"
    f"fd = os.open('/dev/virtio-ports/{RAW}', os.O_RDWR)\n"
    "while True:\n"
    "    d = os.read(fd, 65536)\n"
    "    if d: os.write(fd, d)\n"
)


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def ms(samples: list[float]) -> str:
    return f"{pct(samples, 50) * 1000:.2f} / {pct(samples, 99) * 1000:.2f}"


def pings(client: Any, rounds: int) -> list[float]:
    """PING round trips as ping() reports them: from the send to the reader thread decoding the
    PONG (the raw echo's recv() has no thread handoff after it either)."""
    client.ping()
    return [client.ping() for _ in range(rounds)]


def timed(fn: object, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t0)
    return out


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("raw port closed")
        buf += chunk
    return bytes(buf)


def recv_line(s: socket.socket) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            raise ConnectionError("shell port closed")
        buf += chunk
    return bytes(buf)


def nixos_style_shell(m: Machine, rounds: int) -> list[float]:
    """The NixOS driver's command round trip: base64 output, then `echo ${PIPESTATUS[0]}`."""
    m.succeed(f"setsid bash -c 'exec bash --norc 0<>/dev/virtio-ports/{SHELL} 1>&0 2>/dev/null' "
              "</dev/null >/dev/null 2>&1 &")
    s = connect_unix(m.plan["sockets"][f"port:{SHELL}"], 10)
    time.sleep(1)

    def one() -> None:
        s.sendall(b"bash -c 'set -euo pipefail; true' | (base64 -w 0; echo)\n")
        recv_line(s)
        s.sendall(b"echo ${PIPESTATUS[0]}\n")
        assert recv_line(s).strip() == b"0"

    one()
    samples = timed(one, rounds)
    s.close()
    return samples


def raw_echo(m: Machine, rounds: int) -> tuple[list[float], socket.socket]:
    m.succeed(f"setsid python3 -c \"{ECHO}\" </dev/null >/dev/null 2>&1 &")
    s = connect_unix(m.plan["sockets"][f"port:{RAW}"], 10)
    msg = b"x" * 16
    s.sendall(msg)
    recv_exact(s, len(msg))

    def one() -> None:
        s.sendall(msg)
        recv_exact(s, len(msg))

    return timed(one, rounds), s


def raw_copy(m: Machine, s: socket.socket, nbytes: int) -> tuple[float, float]:
    """(host→guest MB/s, guest→host MB/s) of plain bytes over the raw port."""
    m.execute("pkill -f 'org.ntng.raw' || true")
    time.sleep(0.5)
    done = threading.Event()
    result: list[float] = []

    def guest_reader() -> None:
        m.succeed(f"head -c {nbytes} /dev/virtio-ports/{RAW} > /dev/null")
        result.append(time.perf_counter())
        done.set()

    t0 = time.perf_counter()
    threading.Thread(target=guest_reader, daemon=True).start()
    block = os.urandom(1 << 20)
    left = nbytes
    while left:
        n = min(left, len(block))
        s.sendall(block[:n])
        left -= n
    done.wait(600)
    up = nbytes / (result[0] - t0) / 1e6
    t0 = time.perf_counter()
    writer = threading.Thread(
        target=lambda: m.succeed(f"head -c {nbytes} /dev/urandom > /tmp/raw.bin; "
                                 f"cat /tmp/raw.bin > /dev/virtio-ports/{RAW}"), daemon=True)
    writer.start()
    got = 0
    first = None
    while got < nbytes:
        chunk = s.recv(1 << 20)
        if first is None:
            first = time.perf_counter()
        got += len(chunk)
    down = nbytes / (time.perf_counter() - (first or t0)) / 1e6
    writer.join(60)
    return up, down


def old_agent_client(m: Machine, tmp: Path, ref: str) -> Any:
    """The agent of git `ref` (and its protocol.py) started in the guest on the raw port, and a
    client for it: A/B against the image's agent on the same VM, interleaved."""
    import subprocess

    from ntng.client import BackdoorClient

    root = Path(__file__).resolve().parents[1]
    old = tmp / "old-agent"
    old.mkdir(exist_ok=True)
    for src, name in (("backdoor/ntng_agent.py", "ntng_agent.py"), ("python/ntng/protocol.py", "protocol.py")):
        data = subprocess.run(["git", "show", f"{ref}:{src}"], cwd=root, check=True,
                              capture_output=True).stdout
        (old / name).write_bytes(data)
        m.connect().put_file(old / name, f"/tmp/old-agent/{name}")
    m.succeed(f"setsid python3 /tmp/old-agent/ntng_agent.py --device /dev/virtio-ports/{RAW} "
              "</dev/null >/dev/null 2>&1 &")
    client = BackdoorClient(connect_unix(m.plan["sockets"][f"port:{RAW}"], 10), name="old-agent",
                            key=m.connect().key)
    client.wait_ready(60)
    return client


def breakdown(m: Machine, tmp: Path, rounds: int, ref: str) -> None:
    """Where succeed("true")'s time goes: the agent's steps timed in the guest, the host's
    round trips, and (with `ref`) the agent of git `ref` against the image's, interleaved."""
    from ntng import protocol as P

    steps = Path(__file__).resolve().parent / "agent_steps.py"
    client = m.connect()
    client.put_file(steps, "/tmp/agent_steps.py")
    out = m.succeed(f"python3 /tmp/agent_steps.py {rounds}", timeout=1800)
    rows = [tuple(line.split("\t")) for line in out.splitlines() if "\t" in line]
    print_table(("step (in the guest, median)", "ms", ""), [(a, b, "") for a, b in rows])
    old = old_agent_client(m, tmp, ref) if ref else None
    req_sh = P.Exec(argv=["bash", "-c", "set -euo pipefail; true"], timeout_ms=900_000)
    req_true = P.Exec(argv=["true"], timeout_ms=900_000)
    cases: dict[str, Any] = {
        "PING": lambda: client.ping(),
        'succeed("true")': lambda: m.succeed("true"),
        'EXEC `bash -c` (client.execute)': lambda: client.execute(req_sh),
        'run(["true"])': lambda: m.run(["true"]),
        "EXEC /bin/true (client.execute)": lambda: client.execute(req_true),
    }
    agent_time: dict[str, list[float]] = {"bash": [], "true": []}
    if old is not None:
        cases.update({
            f"[{ref}] PING": lambda: old.ping(),
            f"[{ref}] EXEC `bash -c`": lambda: old.execute(req_sh),
            f"[{ref}] EXEC /bin/true": lambda: old.execute(req_true),
        })
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        agent_time["bash"].append(client.execute(req_sh).duration)
        agent_time["true"].append(client.execute(req_true).duration)
    print(f"\nload average: {os.getloadavg()}\n")
    host_rows = [(k, f"{pct(v, 50) * 1000:.2f}", f"p90 {pct(v, 90) * 1000:.2f}") for k, v in samples.items()]
    host_rows += [(f"EXIT.duration_us ({k}: agent spawn → EXIT built)", f"{pct(v, 50) * 1000:.2f}", "")
                  for k, v in agent_time.items()]
    print_table(("host-side round trip (median)", "ms", ""), host_rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--copy-mb", type=int, default=64)
    ap.add_argument("--accel", default=os.environ.get("NTNG_ACCEL", "auto"))
    ap.add_argument("--breakdown", action="store_true", help="where a command's time goes (only)")
    ap.add_argument("--ab", default="", metavar="GIT_REF",
                    help="with --breakdown: also run the agent of GIT_REF in the guest, interleaved")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ntng-bench-"))
    script = tmp / "bench.py"
    script.write_text(HEADER)
    spec, choice = runner.prepare(runner.RunOptions(script=script, accel=args.accel), tmp)
    driver = Driver(spec, tmp / "out", runner.DEFAULT_BOOT_TIMEOUT * choice.timeout_scale,
                    log=lambda _m: None)
    m = driver.machines[0]
    rows: list[tuple[str, str, str]] = []
    try:
        t0 = time.perf_counter()
        m.start()
        m.succeed("true")
        rows.append(("cold boot → first command", f"{time.perf_counter() - t0:.1f} s", ""))
        m.wait_until_succeeds("systemctl is-system-running | grep -qE 'running|degraded'", 300)
        if args.breakdown:
            breakdown(m, tmp, args.rounds, args.ab)
            return
        client = m.connect()
        ping = pings(client, args.rounds)
        true_cmd = timed(lambda: m.succeed("true"), max(20, args.rounds // 4))
        argv_true = timed(lambda: m.run(["true"]), max(20, args.rounds // 4))
        shell = nixos_style_shell(m, max(20, args.rounds // 4))
        echo, raw = raw_echo(m, args.rounds)
        rows += [
            ("PING round trip p50/p99 (ms)", ms(ping), f"raw echo {ms(echo)}"),
            ('succeed("true") p50/p99 (ms)', ms(true_cmd), f"NixOS-style shell {ms(shell)}"),
            ('run(["true"]) (argv, no bash) p50/p99 (ms)', ms(argv_true), ""),
        ]
        nbytes = args.copy_mb << 20
        src = tmp / "up.bin"
        with open(src, "wb") as f:
            for _ in range(args.copy_mb):
                f.write(os.urandom(1 << 20))
        t = time.perf_counter()
        client.put_file(src, "/root/up.bin")
        up = nbytes / (time.perf_counter() - t) / 1e6
        m.succeed(f"head -c {nbytes} /dev/urandom > /root/down.bin")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t = time.perf_counter()
        client.get_file("/root/down.bin", tmp / "down.bin")
        down = nbytes / (time.perf_counter() - t) / 1e6
        rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        assert hashlib.sha256((tmp / "down.bin").read_bytes()).hexdigest() == \
            m.succeed("sha256sum /root/down.bin").split()[0]
        # The ceiling of any sha256-verified copy: hashing the bytes once in the guest.
        hashed = m.run(["sha256sum", "/root/down.bin"])
        sha_mbs = nbytes / hashed.duration / 1e6
        raw_up, raw_down = raw_copy(m, raw, nbytes)
        rows += [
            (f"copy host→guest, {args.copy_mb} MB (MB/s)", f"{up:.1f}",
             f"raw port {raw_up:.1f} ({up / raw_up:.0%})"),
            (f"copy guest→host, {args.copy_mb} MB (MB/s)", f"{down:.1f}",
             f"raw port {raw_down:.1f} ({down / raw_down:.0%})"),
            ("sha256 of the same bytes in the guest (`sha256sum`, MB/s)", f"{sha_mbs:.1f}",
             f"raw port / sha256: {raw_up / sha_mbs:.1f}x / {raw_down / sha_mbs:.1f}x"),
            ("runner peak RSS during the download (MB)", f"{rss_peak:.0f}", f"before: {rss_before:.0f}"),
        ]
    finally:
        driver.release()
    print(f"\naccelerator: {choice.accel} ({choice.reason.splitlines()[0][:80]})\n")
    print_table(("measure", "nixos-test-ng", "baseline"), rows)


def print_table(header: tuple[str, ...], rows: list[tuple[str, str, str]]) -> None:
    """A markdown table, as the README holds the numbers."""
    for row in (header, tuple("---" for _ in header), *rows):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

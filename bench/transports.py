#!/usr/bin/env python3
"""Backdoor transports compared on real guests: virtio-serial port vs hybrid vsock
(vhost-user-vsock-pci + vhost-device-vsock), each next to a raw baseline on the same transport.

  rtt    PING round trip vs a raw 16-byte echo (virtio-serial: a second port; vsock: a second
         vsock port through the same hybrid socket)
  copy   FILE_PUT / FILE_GET MB/s vs raw bytes over the same transport (guest side: C tools
         on the serial port, a small Python sink/source on vsock)

Usage: .venv/bin/python bench/transports.py [--rounds 200] [--copy-mb 64]
Prints a markdown table.  Not a test: numbers vary with the machine and the accelerator.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from backdoor import RAW, ms, pings, print_table, raw_copy, raw_echo, recv_exact, timed  # noqa: E402
from ntng import runner, vsock  # noqa: E402
from ntng.driver import Driver  # noqa: E402
from ntng.machine import Machine  # noqa: E402

ECHO_PORT, SINK_PORT, SOURCE_PORT = 5000, 5001, 5002
# One guest process serving three vsock ports: echo, sink (reads N bytes, answers "k"), source
# (sends N bytes); N is the first line the host sends.
VSOCK_SERVER = f"""
import socket, threading
def serve(port, handle):
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.bind((socket.VMADDR_CID_ANY, port)); s.listen()
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
def echo(c):
    while (d := c.recv(65536)):
        c.sendall(d)
def size(c):
    line = b""
    while not line.endswith(b"\\n"):
        line += c.recv(1)
    return int(line)
def sink(c):
    n = size(c)
    while n > 0:
        n -= len(c.recv(min(n, 1 << 20)))
    c.sendall(b"k")
def source(c):
    n = size(c); block = bytes(1 << 20)
    while n > 0:
        c.sendall(block[:min(n, len(block))]); n -= min(n, len(block))
for port, handle in (({ECHO_PORT}, echo), ({SINK_PORT}, sink)):
    threading.Thread(target=serve, args=(port, handle), daemon=True).start()
serve({SOURCE_PORT}, source)
"""


def vsock_raw(m: Machine, rounds: int, nbytes: int) -> tuple[list[float], float, float]:
    """(echo round trips, host→guest MB/s, guest→host MB/s) over raw vsock streams."""
    m.succeed(f"cat > /tmp/vsock_server.py <<'EOF'\n{VSOCK_SERVER}\nEOF\n"
              "setsid python3 /tmp/vsock_server.py </dev/null >/dev/null 2>&1 &")
    uds = m.plan["backdoor"]["uds"]

    def connect(port: int) -> socket.socket:
        return vsock.connect_hybrid(uds, port, timeout=30)

    echo = connect(ECHO_PORT)
    msg = b"x" * 16

    def one() -> None:
        echo.sendall(msg)
        recv_exact(echo, len(msg))

    one()
    rtts = timed(one, rounds)
    echo.close()
    block = os.urandom(1 << 20)
    s = connect(SINK_PORT)
    t0 = time.perf_counter()
    s.sendall(f"{nbytes}\n".encode())
    left = nbytes
    while left:
        s.sendall(block[:min(left, len(block))])
        left -= min(left, len(block))
    recv_exact(s, 1)
    up = nbytes / (time.perf_counter() - t0) / 1e6
    s.close()
    s = connect(SOURCE_PORT)
    t0 = time.perf_counter()
    s.sendall(f"{nbytes}\n".encode())
    got = 0
    while got < nbytes:
        chunk = s.recv(1 << 20)
        if not chunk:
            raise ConnectionError("vsock source closed early")
        got += len(chunk)
    down = nbytes / (time.perf_counter() - t0) / 1e6
    s.close()
    return rtts, up, down


def protocol_numbers(m: Machine, rounds: int, nbytes: int, tmp: Path) -> tuple[list[float], float, float]:
    client = m.connect()
    ping = pings(client, rounds)
    src = tmp / "up.bin"
    src.write_bytes(os.urandom(nbytes))
    t = time.perf_counter()
    client.put_file(src, "/root/up.bin")
    up = nbytes / (time.perf_counter() - t) / 1e6
    m.succeed(f"head -c {nbytes} /dev/urandom > /root/down.bin")
    t = time.perf_counter()
    client.get_file("/root/down.bin", tmp / "down.bin")
    down = nbytes / (time.perf_counter() - t) / 1e6
    return ping, up, down


def bench(transport: str, args: argparse.Namespace, tmp: Path) -> list[tuple[str, str, str]]:
    extra = f'extraSerialPorts = [ "{RAW}" ]; ' if transport == "virtio-serial" else ""
    script = tmp / f"{transport}.py"
    script.write_text(f'#: nodes.machine = {{ {extra}backdoor.transport = "{transport}"; }};\n')
    spec, choice = runner.prepare(runner.RunOptions(script=script, accel=args.accel), tmp / transport)
    driver = Driver(spec, tmp / "out", runner.DEFAULT_BOOT_TIMEOUT * choice.timeout_scale, log=lambda _m: None)
    m = driver.machines[0]
    nbytes = args.copy_mb << 20
    try:
        t0 = time.perf_counter()
        m.succeed("true")
        boot = time.perf_counter() - t0
        m.wait_until_succeeds("systemctl is-system-running | grep -qE 'running|degraded'", 300)
        ping, up, down = protocol_numbers(m, args.rounds, nbytes, tmp)
        if transport == "vsock":
            echo, raw_up, raw_down = vsock_raw(m, args.rounds, nbytes)
        else:
            echo, raw = raw_echo(m, args.rounds)
            raws = raw_copy(m, raw, nbytes)
            raw_up, raw_down = raws["up"], raws["down"]
            raw.close()
    finally:
        driver.release()
    return [
        (f"{transport}: cold boot → first command", f"{boot:.1f} s", ""),
        (f"{transport}: PING p50/p99 (ms)", ms(ping),
         f"raw echo {ms(echo)} (×{sorted(ping)[len(ping) // 2] / sorted(echo)[len(echo) // 2]:.2f})"),
        (f"{transport}: copy host→guest {args.copy_mb} MB (MB/s)", f"{up:.1f}", f"raw {raw_up:.1f} ({up / raw_up:.0%})"),
        (f"{transport}: copy guest→host {args.copy_mb} MB (MB/s)", f"{down:.1f}",
         f"raw {raw_down:.1f} ({down / raw_down:.0%})"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--copy-mb", type=int, default=64)
    ap.add_argument("--accel", default=os.environ.get("NTNG_ACCEL", "auto"))
    ap.add_argument("--transport", action="append", choices=["virtio-serial", "vsock"])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ntng-bench-"))
    atexit.register(shutil.rmtree, tmp, True)  # its copy files are hundreds of MB: never left behind
    rows: list[tuple[str, str, str]] = []
    for transport in args.transport or ["virtio-serial", "vsock"]:
        rows += bench(transport, args, tmp)
    print()
    print_table(("measure", "protocol", "raw baseline, same transport"), rows)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Interpreted lines, bytecodes and Python calls the agent runs per request, by function: under
TCG each costs the guest CPU (docs/benchmarks.md, the sixth round: ~2-3 us a line at the
margin, ~20-30 us a call), so these counts are the agent's own part of a command's round trip.  Runs natively or in a guest: the agent's serve() on a
socketpair in a thread traced with sys.settrace, the client (agent_steps.AgentClient) in
this one.  `python3 bench/agent_lines.py [N] [agent_dir]`.  stdlib only.
"""

from __future__ import annotations

import collections
import os
import socket
import sys
import threading
import time
from types import FrameType
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = int(os.environ.get("TOP", "25"))
N = int(sys.argv[1]) if len(sys.argv) > 1 else 50
AGENT_DIR = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "..", "backdoor")
sys.argv[1:] = ["1", AGENT_DIR]  # agent_steps reads its own arguments at import
sys.path[:0] = [HERE, AGENT_DIR, os.path.join(HERE, "..", "python", "ntng")]  # protocol.py
import agent_steps  # noqa: E402

import ntng_agent as A  # noqa: E402

Counts = collections.Counter[tuple[str, str]]
counts: Counts = collections.Counter()  # line events
opcodes: Counts = collections.Counter()  # bytecode instructions: lines are a proxy, these the work
calls: collections.Counter[str] = collections.Counter()
tracing = threading.Event()


def tracer(frame: FrameType, event: str, arg: Any) -> Any:
    if not tracing.is_set():
        return tracer
    frame.f_trace_opcodes = True
    key = (os.path.basename(frame.f_code.co_filename), frame.f_code.co_qualname)
    if event == "line":
        counts[key] += 1
    elif event == "opcode":
        opcodes[key] += 1
    elif event == "call":
        calls["python calls"] += 1
    return tracer


def traced(fn: Any) -> Any:
    def run(*args: Any) -> Any:
        sys.settrace(tracer)
        return fn(*args)
    return run


def measure(label: str, request: Any) -> None:
    request()  # warm-up: caches, kept workers
    time.sleep(0.05)
    counts.clear()
    opcodes.clear()
    calls.clear()
    tracing.set()
    for _ in range(N):
        request()
    time.sleep(0.05)  # the agent's last lines after its write
    tracing.clear()
    print(f"{label}: {sum(counts.values()) / N:.0f} lines, {sum(opcodes.values()) / N:.0f} bytecodes, "
          f"{calls['python calls'] / N:.0f} Python calls per request (lines / bytecodes by function)")
    for (file, fn), n in opcodes.most_common(TOP):
        print(f"  {counts[(file, fn)] / N:6.1f} {n / N:6.1f}  {file}:{fn}")


def main() -> None:
    os.chdir("/")  # the agent's own cwd: commands take the posix_spawn path
    threading.settrace(tracer)  # workers the agent starts
    host, guest = socket.socketpair()
    conn = A.Connection(guest.fileno(), guest.fileno())
    threading.Thread(target=traced(A.serve), args=(conn, time.time_ns()), daemon=True).start()
    client = agent_steps.AgentClient(host)
    measure("EXEC /bin/true", lambda: client.exec(["/bin/true"]))
    measure("EXEC true (PATH search)", lambda: client.exec(["true"]))
    measure("PING", client.ping)
    host.close()


if __name__ == "__main__":
    main()

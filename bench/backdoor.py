#!/usr/bin/env python3
"""Backdoor benchmarks on one real guest, each next to a baseline on the same VM.

  boot      cold start → first command returned
  rtt       PING and succeed("true") vs a raw echo over a second virtio-serial port, vs a
            minimal spawn server there (raw bytes, and our frames: the least a Python agent
            speaking this protocol pays), and vs a reimplementation of the NixOS driver's shell
            protocol (bash on a port, base64 output, a second round trip for the exit status);
            the in-guest spawn floors sampled by that long-running server in the same rounds
  copy      FILE_PUT / FILE_GET MB/s vs raw bytes over the same kind of port (C tools in
            the guest, so the baseline is the transport's ceiling), and the same file through
            a 9p and a virtiofs share (python/ntng/shares.py: staged on the host, `cp` in the guest)
  memory    the runner's peak RSS during the download

Usage: .venv/bin/python bench/backdoor.py [--rounds 200] [--copy-mb 64]
       (--breakdown, --idle, --after, --predecessor, --cpu, --gap, --copy-steps and --spawn-steps print one part each; --ab REF)
Prints a markdown table.  Not a test: numbers vary with the machine and the accelerator.
"""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import hashlib
import os
import random
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from shared_dirs import share_of  # noqa: E402  (bench/, this script's folder)

from ntng import protocol as P  # noqa: E402
from ntng import runner, shares  # noqa: E402
from ntng.client import connect_unix  # noqa: E402
from ntng.driver import Driver  # noqa: E402
from ntng.machine import Machine  # noqa: E402

RAW = "org.ntng.raw"
# What run(["true"]) and succeed("true") send, for the benches that drive a client directly.
RUN_TRUE = P.Exec(argv=["true"], timeout_ms=900_000)
SUCCEED_TRUE = P.Exec(argv=["bash", "-c", "set -euo pipefail; true"], timeout_ms=900_000)
# The same script with bash named by its path: no waiting shell takes it, its bash is spawned
# when the EXEC comes, as every command's was before the eleventh round.
BASH_ON_ARRIVAL = P.Exec(argv=["/bin/bash", "-c", "set -euo pipefail; true"], timeout_ms=900_000)
SHELL = "org.ntng.shell"
SHARES = (("p9", "9p"), ("vfs", "virtiofs"))  # tag, type


def header(tmp: Path) -> str:
    """The bench VM: two more ports (the raw peers) and the two share peers."""
    lines = [f'#:   extraSerialPorts = [ "{RAW}" "{SHELL}" ];']
    for tag, kind in SHARES:
        (tmp / "shares" / tag).mkdir(parents=True)
        lines.append(f'#:   sharedDirs.{tag} = {{ source = "{tmp}/shares/{tag}"; target = "/mnt/{tag}"; '
                     f'type = "{kind}"; }};')
    return "#: nodes.machine = {\n" + "\n".join(lines) + "\n#: };\n"


# The raw echo, and the least a Python agent on this port can do for a command: on `T` (or
# `B`) posix_spawn /bin/true (or bash -c) in its own session with stdout and stderr pipes,
# read both to EOF, reap, answer the exit code: no framing, no checks, no flow control.  The
# environment is a plain dict, as the agent's is: os.environ given to posix_spawn is converted
# in Python on every spawn (~0.9 ms under TCG; the floors and this server paid it until the
# seventh round, docs/benchmarks.md).  `S` and `P` (--gap) step from there toward the agent: `S` spawns the way the agent does
# (posix_spawn of the path its PATH lookup found, the signals it resets, stdin from /dev/null),
# `P` also waits the way it does (one poll over both pipes and the port, SCHED_BATCH, a WNOHANG
# reap); `Q` is `S` with the C library's PATH search (posix_spawnp of `true`), as the agent
# spawned before it looked names up itself.  `F` answers our protocol's frames: a PING with
# protocol.pong_for_ping, an EXEC checked and parsed, spawned and waited for as `P`, answered
# with the EXIT (protocol.exec_end): the least a Python agent
# speaking this protocol pays.  `f` samples the in-guest floors in this long-running process
# (posix_spawn + waitpid of `bash -c` and /bin/true, timed inside; a fresh python3 per sample
# was noisier than the spawn server it should bound, docs/benchmarks.md, the seventh round).
# They sit behind the T/B lookup, so the echo's path is the same few lines.
ECHO = (
    "import os, select, signal, struct, sys, time\n"
    "sys.path.insert(0, '/usr/lib/ntng-backdoor'); import protocol as Pr\n"
    "MAGIC = Pr.MAGIC; PING = Pr.FrameType.PING\n"
    f"fd = os.open('/dev/virtio-ports/{RAW}', os.O_RDWR)\n"
    "nul = os.open('/dev/null', os.O_RDONLY | os.O_CLOEXEC)\n"
    "env = dict(os.environ); env.setdefault('PATH', '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin')\n"
    "sigs = (signal.SIGPIPE, signal.SIGXFSZ); sp = os.sched_param(0)\n"
    "def spawn_ours(spawn=os.posix_spawn, exe='/usr/bin/true'):\n"
    "    r1, w1 = os.pipe(); r2, w2 = os.pipe()\n"
    "    pid = spawn(exe, ['true'], env, setsid=True, setsigdef=sigs, setsigmask=(), file_actions=[\n"
    "        (os.POSIX_SPAWN_DUP2, nul, 0), (os.POSIX_SPAWN_DUP2, w1, 1), (os.POSIX_SPAWN_DUP2, w2, 2)])\n"
    "    os.close(w1); os.close(w2)\n"
    "    return pid, r1, r2\n"
    "def S(*how):\n"
    "    pid, r1, r2 = spawn_ours(*how)\n"
    "    for r in (r1, r2):\n"
    "        while os.read(r, 65536): pass\n"
    "        os.close(r)\n"
    "    return bytes([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])])\n"
    "def Q():\n"
    "    return S(os.posix_spawnp, 'true')\n"
    "def P():\n"
    "    pid, r1, r2 = spawn_ours()\n"
    "    os.sched_setscheduler(0, os.SCHED_BATCH, sp)\n"
    "    po = select.poll(); po.register(r1, select.POLLIN); po.register(r2, select.POLLIN); po.register(fd, select.POLLIN)\n"
    "    left = {r1, r2}\n"
    "    while left:\n"
    "        for f, ev in po.poll(1000):\n"
    "            if f in left and (ev == select.POLLHUP or not os.read(f, 65536)):\n"
    "                po.unregister(f); left.discard(f)\n"
    "    got, status = os.waitpid(pid, os.WNOHANG)\n"
    "    if not got: got, status = os.waitpid(pid, 0)\n"
    "    os.sched_setscheduler(0, os.SCHED_OTHER, sp)\n"
    "    os.close(r1); os.close(r2)\n"
    "    return bytes([os.waitstatus_to_exitcode(status)])\n"
    "def F(d):\n"
    "    if d[5] == PING: return Pr.pong_for_ping(d)\n"
    "    f = Pr.lone_frame(d); rid = f.request_id\n"
    "    Pr.parse_exec(f.payload)\n"
    "    end = P()[0]\n"
    "    return Pr.exec_end(rid, end, 0, False, 0)\n"
    "def W():\n"
    "    t0 = time.perf_counter(); os.waitpid(os.posix_spawn('/bin/true', ['/bin/true'], env), 0)\n"
    "    return struct.pack('>d', time.perf_counter() - t0)\n"
    "def X():\n"
    "    t0 = time.perf_counter(); r1, w1 = os.pipe(); r2, w2 = os.pipe()\n"
    "    pid = os.posix_spawn('/bin/true', ['/bin/true'], env, setsid=True, file_actions=[\n"
    "        (os.POSIX_SPAWN_DUP2, w1, 1), (os.POSIX_SPAWN_DUP2, w2, 2)])\n"
    "    os.close(w1); os.close(w2)\n"
    "    for r in (r1, r2):\n"
    "        while os.read(r, 65536): pass\n"
    "        os.close(r)\n"
    "    os.waitpid(pid, 0)\n"
    "    return struct.pack('>d', time.perf_counter() - t0)\n"
    "def floors():\n"
    "    out = []\n"
    "    for argv in (['/bin/bash', '-c', 'set -euo pipefail; true'], ['/bin/true']):\n"
    "        t0 = time.perf_counter(); os.waitpid(os.posix_spawn(argv[0], argv, env), 0)\n"
    "        out.append(time.perf_counter() - t0)\n"
    "    return struct.pack('>dd', *out)\n"
    "argvs = {b'T': ['/bin/true'], b'B': ['/bin/bash', '-c', 'set -euo pipefail; true'], b'S': S, b'P': P, b'Q': Q,\n"
    "         b'f': floors, b'W': W, b'X': X}\n"
    "while True:\n"
    "    d = os.read(fd, 65536)\n"
    "    if d[:4] == MAGIC:\n"
    "        os.write(fd, F(d))\n"
    "        continue\n"
    "    argv = argvs.get(d)\n"
    "    if argv:\n"
    "        if type(argv) is not list:\n"
    "            d = argv()\n"
    "        else:\n"
    "            r1, w1 = os.pipe(); r2, w2 = os.pipe()\n"
    "            pid = os.posix_spawn(argv[0], argv, env, setsid=True, file_actions=[\n"
    "                (os.POSIX_SPAWN_DUP2, w1, 1), (os.POSIX_SPAWN_DUP2, w2, 2)])\n"
    "            os.close(w1); os.close(w2)\n"
    "            for r in (r1, r2):\n"
    "                while os.read(r, 65536): pass\n"
    "                os.close(r)\n"
    "            d = bytes([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])])\n"
    "    if d: os.write(fd, d)\n"
)


def raw_command_fn(s: socket.socket, which: bytes) -> Any:
    """A command through the raw spawn server above (ECHO): `T` /bin/true, `B` bash -c."""

    def one() -> None:
        s.sendall(which)
        assert recv_exact(s, 1) == b"\0"

    return one


def inside_fn(s: socket.socket, which: bytes, inside: list[float]) -> Any:
    """A spawn through the spawn server that times itself inside the guest (ECHO's `W`: the
    floor's posix_spawn + waitpid; `X`: `T`'s pipes too): the wall time around it, less the
    time inside, is what the port and the wake-ups add to a spawn."""

    def one() -> None:
        s.sendall(which)
        inside.append(struct.unpack(">d", recv_exact(s, 8))[0])

    return one


def framed_fn(s: socket.socket, request: bytes, answer: bytes) -> Any:
    """A request in our protocol's frames through the spawn server's `F` (ECHO), its answer
    checked byte for byte: a PING (answered by protocol.pong_for_ping) or an EXEC (parsed,
    spawned and waited for as `P`, answered with the EXIT)."""

    def one() -> None:
        s.sendall(request)
        got = recv_exact(s, len(answer))
        assert got == answer, f"the framed server answered {got!r}, expected {answer!r}"

    return one


def framed_exec_fn(s: socket.socket) -> Any:
    rid = 7
    answer = P.Exit(0, 0, False, 0).frame(rid)
    return framed_fn(s, P.Exec(argv=["true"], timeout_ms=900_000).frame(rid), answer)


def framed_ping_fn(s: socket.socket) -> Any:
    ping = P.ping_frame(os.urandom(8))
    pong = P.pong_for_ping(ping)
    assert pong is not None
    return framed_fn(s, ping, pong)


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


def raw_copy(m: Machine, s: socket.socket, nbytes: int) -> dict[str, float]:
    """MB/s of plain bytes over the raw port, each next to the protocol case it bounds:
    host→guest into /dev/null and into a file (put writes a file too), guest→host from a file
    (get) and from a command's pipe (`head /dev/zero | cat`, what stdout carries)."""
    m.execute("pkill -f 'org.ntng.raw' || true")
    time.sleep(0.5)
    m.succeed(f"head -c {nbytes} /dev/urandom > /tmp/raw.bin")

    def up(sink: str) -> float:
        done = threading.Event()
        result: list[float] = []

        def guest_reader() -> None:
            m.succeed(f"head -c {nbytes} /dev/virtio-ports/{RAW} > {sink}")
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
        return nbytes / (result[0] - t0) / 1e6

    def down(source: str) -> float:
        writer = threading.Thread(
            target=lambda: m.succeed(f"{source} > /dev/virtio-ports/{RAW}"), daemon=True)
        writer.start()
        got = 0
        first = None
        while got < nbytes:
            chunk = s.recv(1 << 20)
            if first is None:
                first = time.perf_counter()
            got += len(chunk)
        mbs = nbytes / (time.perf_counter() - (first or 0.0)) / 1e6
        writer.join(60)
        return mbs

    return {
        "up": up("/dev/null"),
        "up_file": up("/root/raw-up.bin"),
        "down": down("cat /tmp/raw.bin"),
        "down_pipe": down(f"head -c {nbytes} /dev/zero | cat"),
    }


# Per pid: ns on the CPU (schedstat, all threads), then user and system ticks (/proc/PID/stat,
# the whole process; the command's name has no spaces here); then the guest's busy ns.
CPU_OF = (
    "for p in \"$@\"; do cat /proc/$p/task/*/schedstat | awk '{s += $1} END {printf \"%.0f\\n\", s}'; "
    "awk '{print $14; print $15}' /proc/$p/stat; done; "
    "awk '/^cpu / {printf \"%.0f\\n\", ($2 + $3 + $4 + $7 + $8) * 10000000}' /proc/stat"
)


def guest_cpu(m: Machine, client: Any, rounds: int, old: Any = None) -> list[tuple[str, str, str]]:
    """Guest CPU per command, not wall time: the time on the CPU of every thread of our agent
    (/proc/PID/task/*/schedstat) over blocks of `rounds` run(["true"]), against the minimal
    Python spawn server (ECHO) serving the same number of /bin/true on the raw port, blocks
    interleaved; and the whole guest's busy time (/proc/stat) over each block.  Under TCG the
    guest's CPU is the cost, and this count does not move with the host's scheduling.  Each
    block's reading is one more command of the agent's (a 1/rounds overcount for it).  `old`:
    a client of an older agent (--ab, on the SHELL port), measured the same way in the same
    boot: across boots this guest's speed moves more than the changes measured."""
    step("guest CPU per command (schedstat)")
    echo_one, raw = raw_echo_fn(m)
    spawn_true = raw_command_fn(raw, b"T")
    procs = [m.succeed("systemctl show -p MainPID --value ntng-backdoor").strip(),
             m.run(["pgrep", "-f", f"virtio-ports/{RAW}"]).stdout.decode().split()[0]]
    who = {"ours": 0, "theirs": 1}
    pairs: list[tuple[str, list[tuple[str, Any]]]] = [
        ("PING", [("ours", client.ping), ("theirs", echo_one)]),
        ("command", [("ours", lambda: m.run(["true"])), ("theirs", spawn_true)]),
    ]
    if old is not None:
        procs.append(m.run(["pgrep", "-f", "old-agent/ntng_agent.py"]).stdout.decode().split()[0])
        who["old"] = 2
        req = P.Exec(argv=["true"], timeout_ms=900_000)
        pairs[0][1].append(("old", old.ping))
        pairs[1][1].append(("old", lambda: old.execute(req)))

    def cpu() -> list[int]:
        """per process: ns, user ticks, system ticks; then the guest's busy ns"""
        return [int(v) for v in m.run(["sh", "-c", CPU_OF, "sh", *procs]).stdout.decode().split()]

    busy_at = 3 * len(procs)

    def per_request(before: list[int], after: list[int], at: int) -> float:
        return (after[at] - before[at]) / rounds / 1e6

    def system_share(before: list[int], after: list[int], at: int) -> float:
        """% of the process's ticks (10 ms each: a block is ~100 ticks) spent in the kernel"""
        user, system = after[at + 1] - before[at + 1], after[at + 2] - before[at + 2]
        return system / max(1, user + system) * 100

    samples: dict[str, list[float]] = {}
    for _ in range(5):
        for kind, cases in pairs:
            for name, once in cases:
                c0 = cpu()
                for _ in range(rounds):
                    once()
                c1 = cpu()
                at = 3 * who[name]
                for label, value in ((f"{kind} {name}", per_request(c0, c1, at)),
                                     (f"{kind} system {name}", system_share(c0, c1, at)),
                                     (f"{kind} busy {name}", per_request(c0, c1, busy_at))):
                    samples.setdefault(label, []).append(value)
    raw.close()

    def spread(v: list[float]) -> str:
        return f"{pct(v, 50):.2f} (blocks {min(v):.2f}-{max(v):.2f})"

    v = samples
    rows = [
        (f'guest CPU per run(["true"]): our agent, all threads (ms; 5 blocks of {rounds})', spread(v["command ours"]),
         f"the minimal spawn server for /bin/true: {spread(v['command theirs'])}; ours over it "
         f"+ {pct(v['command ours'], 50) - pct(v['command theirs'], 50):.2f}"),
        (f"guest CPU per PING: our agent (ms; 5 blocks of {rounds})", spread(v["PING ours"]),
         f"the raw echo (the same process as the spawn server): {spread(v['PING theirs'])}"),
        ("PINGs: of which in the kernel (system time, %; /proc/PID/stat ticks)", spread(v["PING system ours"]),
         f"the raw echo: {spread(v['PING system theirs'])}"),
        ("commands: of which in the kernel (system time, %; /proc/PID/stat ticks)", spread(v["command system ours"]),
         f"the spawn server: {spread(v['command system theirs'])}"),
        ("the whole guest busy per command (ms; /proc/stat, 10 ms ticks)", spread(v["command busy ours"]),
         f"with the spawn server: {spread(v['command busy theirs'])}"),
    ]
    if old is not None:
        rows += [
            ('the older agent (--ab): guest CPU per EXEC ["true"] (ms)', spread(v["command old"]),
             f"ours {pct(v['command ours'], 50):.2f}: {pct(v['command ours'], 50) - pct(v['command old'], 50):+.2f}"),
            ("the older agent (--ab): guest CPU per PING (ms)", spread(v["PING old"]),
             f"ours {pct(v['PING ours'], 50):.2f}: {pct(v['PING ours'], 50) - pct(v['PING old'], 50):+.2f}"),
            ("the older agent (--ab): the whole guest busy per EXEC (ms)", spread(v["command busy old"]),
             f"ours {pct(v['command busy ours'], 50):.2f}"),
        ]
    return rows


def wall_gap(m: Machine, rounds: int, old: Any = None) -> list[tuple[str, str, str]]:
    """Where the wall time between run(["true"]) and the minimal spawn server goes: the spawn
    server in steps toward what the agent does (ECHO's `S`, `P`) and our agent with an absolute
    and a PATH-searched argv[0], interleaved sample by sample in rotated order on one VM, with
    the runner's own CPU per sample (time.process_time: all its threads).  `old`: a client of
    an older agent (--ab, on the SHELL port), its client.execute next to ours."""
    step("the wall-time gap to the spawn server, in steps")
    echo, raw = raw_echo_fn(m)
    inside: dict[str, list[float]] = {"W": [], "X": []}
    cases: dict[str, Any] = {
        "spawn server: posix_spawn /bin/true, blocking reads, waitpid (T)": raw_command_fn(raw, b"T"),
        "the agent's spawn before this PATH lookup: posix_spawnp `true` (glibc's search), signals reset, stdin /dev/null (Q)":
            raw_command_fn(raw, b"Q"),
        "+ the agent's spawn: posix_spawn of the path found, signals reset, stdin /dev/null (S)":
            raw_command_fn(raw, b"S"),
        "+ the agent's wait: one poll over pipes and port, SCHED_BATCH, WNOHANG reap (P)":
            raw_command_fn(raw, b"P"),
        "+ our protocol: the EXEC frame checked and parsed, the EXIT as a frame (F)":
            framed_exec_fn(raw),
        'our agent: run(["/bin/true"])': lambda: m.run(["/bin/true"]),
        'our agent: run(["true"])': lambda: m.run(["true"]),
    }
    ours = m.connect()
    cases['our agent: client.execute(["true"])'] = lambda: ours.execute(RUN_TRUE)
    agent_sock = None
    if old is None:  # the SHELL port is free: the agent's side alone, without the client's
        agent_exec, agent_sock = agent_exec_fn(m)
        cases['a second agent, one-thread raw socket: EXEC ["true"]'] = agent_exec
    else:
        cases['the older agent (--ab): client.execute(["true"])'] = lambda: old.execute(RUN_TRUE)
    timed_inside = {
        "W": "the floor through the port: posix_spawn /bin/true + waitpid, timed inside (W)",
        "X": "T timed inside: its pipes, reads to EOF and waitpid (X)",
    }
    cases["the raw echo (16 bytes; the same process)"] = echo
    cases.update({name: inside_fn(raw, key.encode(), inside[key]) for key, name in timed_inside.items()})
    for one in cases.values():
        one()
    wall: dict[str, list[float]] = {k: [] for k in cases}
    host: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            c0, t0 = time.process_time(), time.perf_counter()
            cases[name]()
            t1, c1 = time.perf_counter(), time.process_time()
            wall[name].append(t1 - t0)
            host[name].append(c1 - c0)
    raw.close()
    if agent_sock is not None:
        agent_sock.close()
    base = pct(wall[names[0]], 50)
    rows = []
    for name in names:
        w = pct(wall[name], 50)
        rows.append((f"{name}: median wall (ms)", f"{w * 1000:.2f}",
                     f"p90 {pct(wall[name], 90) * 1000:.2f}; over T + {(w - base) * 1000:.2f}; "
                     f"runner CPU {sum(host[name]) / len(host[name]) * 1000:.3f} ms"))
    for key, name in timed_inside.items():
        guest = pct(inside[key], 50)
        rows.append((f"{key}: the spawn inside the guest, median (ms)", f"{guest * 1000:.2f}",
                     f"the port and wake-ups around it: {(pct(wall[name], 50) - guest) * 1000:.2f} ms "
                     f"(wall less inside, medians)"))
    return rows


def old_agent_client(m: Machine, tmp: Path, ref: str, port: str = RAW) -> Any:
    """The agent of git `ref` (and its protocol.py) started in the guest on `port` (the raw
    one unless it is taken), and a client for it: A/B against the image's agent on the same
    VM, interleaved."""
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
    m.succeed(f"setsid python3 /tmp/old-agent/ntng_agent.py --device /dev/virtio-ports/{port} "
              "</dev/null >/dev/null 2>&1 &")
    # The same client options as the image's agent gets (direct writes in a TCG guest): the
    # bulk rows then compare agents, not options.
    client = BackdoorClient(connect_unix(m.plan["sockets"][f"port:{port}"], 10), name="old-agent",
                            key=m.connect().key, direct_writes=m.connect().direct_writes)
    client.wait_ready(60)
    return client


def copy_steps(m: Machine, copy_mb: int) -> None:
    """The agent's data path for get and put, step by step in the guest (bench/copy_steps.py),
    on the raw port: this side only drains or feeds it."""

    script = Path(__file__).resolve().parent / "copy_steps.py"
    m.connect().put_file(script, "/tmp/copy_steps.py")
    nbytes = copy_mb << 20
    m.succeed(f"head -c {nbytes} /dev/urandom > /root/steps-down.bin")
    s = connect_unix(m.plan["sockets"][f"port:{RAW}"], 10)
    port = f"/dev/virtio-ports/{RAW}"
    rows: list[tuple[str, str, str]] = []

    def drain() -> None:
        got = 0
        while got < nbytes:
            chunk = s.recv(1 << 20)
            if not chunk:
                return
            got += len(chunk)

    def feed() -> None:
        frame = P.encode_frame(P.FrameType.FILE_DATA, 1, os.urandom(P.DEFAULT_MAX_FRAME))
        for _ in range(nbytes // P.DEFAULT_MAX_FRAME):
            s.sendall(frame)

    for mode, other in (("get", drain), ("put", feed)):
        side = threading.Thread(target=other, daemon=True)
        side.start()
        path = "/root/steps-down.bin" if mode == "get" else "/root/steps-up.bin"
        out = m.succeed(f"python3 /tmp/copy_steps.py {mode} {port} {path} {nbytes}", timeout=900)
        side.join(60)
        rows += [(a, b, "") for a, b in (line.split("\t") for line in out.splitlines() if "\t" in line)]
    s.close()
    print_table(("step of a copy, in the guest", "ms per MiB", ""), rows)


STUCK_AFTER = 600.0  # a step running longer than this gets every thread's stack printed


def step(what: str) -> None:
    """Say on stderr which step runs (the tables go to stdout at the end, often buffered) and
    re-arm the watchdog: a step that sits past STUCK_AFTER prints every thread's stack, so a
    stuck run says where it waits (one run sat idle for 15 minutes, step unknown)."""
    print(f"bench: {what}", file=sys.stderr, flush=True)
    faulthandler.dump_traceback_later(STUCK_AFTER, exit=False)


def spawn_steps(m: Machine, rounds: int) -> list[tuple[str, str, str]]:
    """What capturing a command's output costs in the guest, from the spawn floor up
    (bench/spawn_steps.py, in the guest, variants interleaved)."""
    script = Path(__file__).resolve().parent / "spawn_steps.py"
    m.connect().put_file(script, "/tmp/spawn_steps.py")
    step("capturing output, step by step in the guest (spawn_steps.py)")
    out = m.succeed(f"python3 /tmp/spawn_steps.py {rounds}", timeout=1800)
    rows = [line.split("\t") for line in out.splitlines() if line.count("\t") == 2]
    return [(f"{name} (in the guest, ms)", p50, f"p25 {p25}") for name, p25, p50 in rows]


def breakdown(m: Machine, tmp: Path, rounds: int, ref: str) -> None:
    """Where succeed("true")'s time goes: the agent's steps timed in the guest, the host's
    round trips, and (with `ref`) the agent of git `ref` against the image's, interleaved."""

    steps = Path(__file__).resolve().parent / "agent_steps.py"
    client = m.connect()
    client.put_file(steps, "/tmp/agent_steps.py")
    step("the agent's steps in the guest (agent_steps.py)")
    out = m.succeed(f"python3 /tmp/agent_steps.py {rounds}", timeout=1800)
    rows = [tuple(line.split("\t")) for line in out.splitlines() if "\t" in line]
    print_table(("step (in the guest, median)", "ms", ""), [(a, b, "") for a, b in rows])
    step(f"round trips, interleaved{f' with the agent of {ref}' if ref else ''}")
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
    if old is not None:
        print()
        print_table(("bulk data, same VM, interleaved (MB/s, best of 3)", "this agent", f"[{ref}] agent"),
                    bulk_ab(m, client, old, tmp, 32))
        step("done")


def bulk_ab(m: Machine, new: Any, old: Any, tmp: Path, mb: int) -> list[tuple[str, str, str]]:
    """Copies both ways and a command's stdout, this agent (CRC-32 and sha256) against the old."""
    nbytes = mb << 20
    src = tmp / "ab.bin"
    src.write_bytes(os.urandom(nbytes))
    m.succeed(f"head -c {nbytes} /dev/urandom > /root/ab.bin")
    req = __import__("ntng.protocol", fromlist=["Exec"]).Exec(
        argv=["head", "-c", str(nbytes), "/dev/zero"], timeout_ms=900_000)

    def mbs(fn: Any, c: Any) -> float:
        t0 = time.perf_counter()
        fn(c)
        return nbytes / (time.perf_counter() - t0) / 1e6

    def sink(_b: bytes) -> None:
        pass

    cases = {
        "put (crc32)": lambda c: c.put_file(src, "/root/ab-up.bin"),
        "put (sha256)": lambda c: c.put_file(src, "/root/ab-up.bin", verify="sha256"),
        "get (crc32)": lambda c: c.get_file("/root/ab.bin", tmp / "ab-down.bin"),
        "get (sha256)": lambda c: c.get_file("/root/ab.bin", tmp / "ab-down.bin", verify="sha256"),
        f"stdout {mb} MB": lambda c: c.execute(req, on_stdout=sink),
    }
    best: dict[tuple[str, str], float] = {}
    for _ in range(3):
        for name, fn in cases.items():
            for who, c in (("new", new), ("old", old)):
                v = mbs(fn, c)
                best[(name, who)] = max(best.get((name, who), 0.0), v)
    return [(f"{name}, {mb} MB", f"{best[(name, 'new')]:.1f}", f"{best[(name, 'old')]:.1f}") for name in cases]


def floor_fn(s: socket.socket) -> Any:
    """One sample of the in-guest floors (ms), taken by the long-running spawn server (ECHO's
    `f`): posix_spawn + waitpid of `bash -c 'set -euo pipefail; true'` and of /bin/true,
    timed inside the guest (no pipes, no port)."""

    def one() -> tuple[float, float]:
        s.sendall(b"f")
        bash, true = struct.unpack(">dd", recv_exact(s, 16))
        return bash * 1000, true * 1000

    return one


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def ratios(m: Machine, client: Any, tmp: Path, rounds: int, copy_mb: int) -> list[tuple[str, str, str]]:
    """Every measure next to its floor or peer on this VM, in one run; round trips interleaved
    (one sample of each per round), so load bursts hit them alike."""
    step("round trips and the in-guest floors, interleaved")
    n = rounds  # every case once a round (the floors too: a request to the spawn server)
    floors: list[tuple[float, float]] = []
    s = socket_for_shell(m)
    echo_one, raw = raw_echo_fn(m)
    floor_sample = floor_fn(raw)
    # `succeed` runs in a shell the agent started after the previous `bash -c` (ShellWaiter);
    # in this rotation other cases come between, so it is ready.  The `*_b2b` cases time the
    # second of two requests, sent the moment the first answered: a succeed whose shell is
    # still loading; a `bash -c` the waiter does not take (argv[0] a path), spawned when its
    # EXEC comes as every command was before; run(["true"]) after a run(["true"]) and after
    # a succeed (a shell then loads beside it, at SCHED_IDLE).
    seconds: dict[str, list[float]] = {}

    def second_of(name: str, first: Any, timed: Any) -> Any:
        seconds[name] = []

        def one() -> None:
            first()
            t0 = time.perf_counter()
            timed()
            seconds[name].append(time.perf_counter() - t0)
        return one

    cases: dict[str, Any] = {
        "ping": lambda: client.ping(),
        "echo": echo_one,
        "succeed": lambda: m.succeed("true"),
        "succeed_b2b": second_of("succeed_b2b", lambda: m.succeed("true"), lambda: m.succeed("true")),
        "arrival_b2b": second_of("arrival_b2b", lambda: client.execute(BASH_ON_ARRIVAL),
                                 lambda: client.execute(BASH_ON_ARRIVAL)),
        "argv_b2b": second_of("argv_b2b", lambda: m.run(["true"]), lambda: m.run(["true"])),
        "argv_after_succeed": second_of("argv_after_succeed", lambda: m.succeed("true"),
                                        lambda: m.run(["true"])),
        # After 0.2 s of nothing (a test's own work, a poll's sleep): the guest idle meanwhile.
        "succeed_idle": second_of("succeed_idle", lambda: time.sleep(0.2), lambda: m.succeed("true")),
        "arrival_idle": second_of("arrival_idle", lambda: time.sleep(0.2), lambda: client.execute(BASH_ON_ARRIVAL)),
        "argv": lambda: m.run(["true"]),
        "shell": lambda: nixos_round_trip(s),
        "raw_true": raw_command_fn(raw, b"T"),
        "raw_bash": raw_command_fn(raw, b"B"),
        "framed_true": framed_exec_fn(raw),
        "framed_ping": framed_ping_fn(raw),
    }
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()
    order = list(cases.items())
    shuffle = random.Random(0)
    for _ in range(n):
        # A new order each round: what ran just before a case (our agent, or the spawn
        # server's process: then the case's own process starts cold under TCG) differs from
        # round to round.  Rotating one order left each case behind the same one: the PING
        # always came right after the framed echo, the framed echo after the framed EXEC in
        # its own process (warm), and --predecessor showed what that costs.
        for k, fn in shuffle.sample(order, len(order)):
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
        # In the same rounds (the floor sees the same load), three a round: `bash -c` alone
        # spreads over ±3 ms, more than the differences it bounds.
        floors += [floor_sample() for _ in range(3)]
    s.close()
    for name, timed in seconds.items():
        samples[name] = timed[len(timed) - n:]  # the timed second ones, not the pairs
    med = {k: pct(v, 50) * 1000 for k, v in samples.items()}
    floor_bash = pct([b for b, _ in floors], 50)
    floor_true = pct([t for _, t in floors], 50)
    # Bulk data: protocol copies and stdout, then the raw port both ways.
    nbytes = copy_mb << 20
    src = tmp / "up.bin"
    with open(src, "wb") as f:
        for _ in range(copy_mb):
            f.write(os.urandom(1 << 20))
    m.succeed(f"head -c {nbytes} /dev/urandom > /root/down.bin")

    def mbs(fn: Any) -> float:
        t = time.perf_counter()
        fn()
        return nbytes / (time.perf_counter() - t) / 1e6

    step("protocol copies and stdout")
    up = mbs(lambda: client.put_file(src, "/root/up.bin"))
    up_sha = mbs(lambda: client.put_file(src, "/root/up.bin", verify="sha256"))
    down = mbs(lambda: client.get_file("/root/down.bin", tmp / "down.bin"))
    down_sha = mbs(lambda: client.get_file("/root/down.bin", tmp / "down.bin", verify="sha256"))
    assert hashlib.sha256((tmp / "down.bin").read_bytes()).hexdigest() == \
        m.succeed("sha256sum /root/down.bin").split()[0]
    (tmp / "down.bin").unlink()
    out_mb = 100
    got = [0]

    def count(b: bytes) -> None:
        got[0] += len(b)

    rss0 = rss_mb()
    peak = [rss0]
    t = time.perf_counter()

    client.execute(P.Exec(argv=["head", "-c", f"{out_mb}M", "/dev/zero"]),
                   on_stdout=lambda b: (count(b), peak.__setitem__(0, max(peak[0], rss_mb()))))
    stdout = got[0] / (time.perf_counter() - t) / 1e6
    hashed = m.run(["sha256sum", "/root/down.bin"])
    sha_mbs = nbytes / hashed.duration / 1e6
    crc = m.run(["python3", "-c", "import zlib,sys; zlib.crc32(open(sys.argv[1],'rb').read())",
                 "/root/down.bin"])
    step("the same files through the shares")
    via_share = share_copies(m, src, "/root/down.bin")
    step("the raw port both ways")
    raws = raw_copy(m, raw, nbytes)
    raw_up, raw_down = raws["up"], raws["down"]
    p9_up, p9_down = (nbytes / t / 1e6 for t in via_share["9p"])
    vfs_up, vfs_down = (nbytes / t / 1e6 for t in via_share["virtiofs"])

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "not met"

    return [
        ("in-guest floor: spawn `bash -c 'set -euo pipefail; true'` (ms)", f"{floor_bash:.1f}", ""),
        ("in-guest floor: spawn /bin/true (ms)", f"{floor_true:.1f}", ""),
        ('succeed("true") median (ms)', f"{med['succeed']:.1f}",
         f"floor + {med['succeed'] - floor_bash:.1f}; target ≤ floor + 4: "
         f"{verdict(med['succeed'] <= floor_bash + 4)}; NixOS-style shell {med['shell']:.1f} "
         f"({med['shell'] / med['succeed']:.2f}x ours)"),
        ('succeed("true") sent the moment the one before answered, median (ms)', f"{med['succeed_b2b']:.1f}",
         f"floor + {med['succeed_b2b'] - floor_bash:.1f}; target ≤ floor + 4: {verdict(med['succeed_b2b'] <= floor_bash + 4)}"),
        ("the same, a `bash -c` spawned when its EXEC comes (argv[0] /bin/bash: no waiting shell), median (ms)",
         f"{med['arrival_b2b']:.1f}", f"floor + {med['arrival_b2b'] - floor_bash:.1f}"),
        ('succeed("true") / that `bash -c` sent after 0.2 s idle, median (ms)',
         f"{med['succeed_idle']:.1f} / {med['arrival_idle']:.1f}",
         f"floor + {med['succeed_idle'] - floor_bash:.1f} / + {med['arrival_idle'] - floor_bash:.1f}"),
        ('run(["true"]) sent the moment a run(["true"]) / a succeed answered, median (ms)',
         f"{med['argv_b2b']:.1f} / {med['argv_after_succeed']:.1f}",
         f"floor + {med['argv_b2b'] - floor_true:.1f} / + {med['argv_after_succeed'] - floor_true:.1f}"),
        ('run(["true"]) median (ms)', f"{med['argv']:.1f}",
         f"floor + {med['argv'] - floor_true:.1f}; target ≤ floor + 4: {verdict(med['argv'] <= floor_true + 4)}"),
        ("a minimal Python spawn server on a raw port: /bin/true / bash -c, median (ms)",
         f"{med['raw_true']:.1f} / {med['raw_bash']:.1f}",
         f"floor + {med['raw_true'] - floor_true:.1f} / + {med['raw_bash'] - floor_bash:.1f}: the least "
         f"any Python agent on this port pays; ours over it: run + {med['argv'] - med['raw_true']:.1f}, "
         f"succeed + {med['succeed'] - med['raw_bash']:.1f}"),
        ("the same server answering our frames (F): EXEC of `true` → its EXIT, median (ms)",
         f"{med['framed_true']:.1f}",
         f"floor + {med['framed_true'] - floor_true:.1f}: the least a Python agent speaking this protocol "
         f"pays (waiting as it must, the host watched); ours over it: run + {med['argv'] - med['framed_true']:.1f}"),
        ("PING median (ms)", f"{med['ping']:.2f}",
         f"raw echo {med['echo']:.2f} (×{med['ping'] / med['echo']:.2f}); target ≤ ×1.5: "
         f"{verdict(med['ping'] <= 1.5 * med['echo'])}; a framed echo (pong_for_ping in the echo's loop) "
         f"{med['framed_ping']:.2f} (×{med['framed_ping'] / med['echo']:.2f})"),
        (f"copy host→guest {copy_mb} MB, CRC-32 (MB/s)", f"{up:.1f}",
         f"raw port {raw_up:.1f} ({up / raw_up:.0%}); target ≥ 50%: {verdict(up >= raw_up / 2)}; "
         f"raw port into a file {raws['up_file']:.1f} ({up / raws['up_file']:.0%})"),
        (f"copy guest→host {copy_mb} MB, CRC-32 (MB/s)", f"{down:.1f}",
         f"raw port {raw_down:.1f} ({down / raw_down:.0%}); target ≥ 50%: {verdict(down >= raw_down / 2)}"),
        (f"the same {copy_mb} MB files through a 9p / virtiofs share: host→guest (MB/s)",
         f"{p9_up:.1f} / {vfs_up:.1f}",
         f"the protocol {up:.1f} ({up / p9_up:.0%} / {up / vfs_up:.0%}); target faster than 9p: {verdict(up > p9_up)}"),
        (f"the same {copy_mb} MB files through a 9p / virtiofs share: guest→host (MB/s)",
         f"{p9_down:.1f} / {vfs_down:.1f}",
         f"the protocol {down:.1f} ({down / p9_down:.0%} / {down / vfs_down:.0%}); target faster than 9p: "
         f"{verdict(down > p9_down)}"),
        (f"copy host→guest / guest→host {copy_mb} MB, verify=sha256 (MB/s)", f"{up_sha:.1f} / {down_sha:.1f}",
         f"{up_sha / raw_up:.0%} / {down_sha / raw_down:.0%} of the raw port"),
        (f"stdout {out_mb} MB (MB/s)", f"{stdout:.1f}",
         f"raw port guest→host {raw_down:.1f} ({stdout / raw_down:.0%}); target ≥ 50%: "
         f"{verdict(stdout >= raw_down / 2)}; the same output piped into the raw port "
         f"{raws['down_pipe']:.1f} ({stdout / raws['down_pipe']:.0%})"),
        (f"runner RSS while {out_mb} MB of stdout stream (MB)", f"peak {peak[0]:.0f}", f"before {rss0:.0f}"),
        ("in-guest bounds: `sha256sum` / zlib.crc32 of the same bytes (MB/s)",
         f"{sha_mbs:.1f} / {nbytes / crc.duration / 1e6:.1f}", "(crc32 timed with python3's start)"),
    ]


def share_copies(m: Machine, up: Path, down: str) -> dict[str, tuple[float, float]]:
    """Seconds to copy the host file `up` into the guest and the guest file `down` out, through
    each share as copy_from_host / copy_from_machine(via="share") do; each copy's size checked."""
    times: dict[str, tuple[float, float]] = {}
    want_down = int(m.succeed(f"stat -c %s {down}"))
    for tag, kind in SHARES:
        share = share_of(m, tag)
        t0 = time.perf_counter()
        shares.to_guest(m, share, up, f"/root/{tag}-up.bin")
        t_up = time.perf_counter() - t0
        assert int(m.succeed(f"stat -c %s /root/{tag}-up.bin")) == up.stat().st_size
        m.succeed(f"rm /root/{tag}-up.bin")
        dest = m.out_dir / f"via-{tag}"
        dest.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        shares.from_guest(m, share, down, dest)
        t_down = time.perf_counter() - t0
        got = dest / Path(down).name
        assert got.stat().st_size == want_down
        got.unlink()
        times[kind] = (t_up, t_down)
    return times


def socket_for_shell(m: Machine) -> socket.socket:
    m.succeed(f"setsid bash -c 'exec bash --norc 0<>/dev/virtio-ports/{SHELL} 1>&0 2>/dev/null' "
              "</dev/null >/dev/null 2>&1 &")
    s = connect_unix(m.plan["sockets"][f"port:{SHELL}"], 10)
    time.sleep(1)
    return s


def nixos_round_trip(s: socket.socket) -> None:
    """The NixOS driver's command round trip: base64 output, then `echo ${PIPESTATUS[0]}`."""
    s.sendall(b"bash -c 'set -euo pipefail; true' | (base64 -w 0; echo)\n")
    recv_line(s)
    s.sendall(b"echo ${PIPESTATUS[0]}\n")
    assert recv_line(s).strip() == b"0"


def raw_echo_fn(m: Machine) -> tuple[Any, socket.socket]:
    m.succeed(f"setsid python3 -c \"{ECHO}\" </dev/null >/dev/null 2>&1 &")
    s = connect_unix(m.plan["sockets"][f"port:{RAW}"], 10)
    one = raw_echo_on(s)
    one()
    return one, s


def raw_echo_on(s: socket.socket) -> Any:
    """16 bytes echoed by the spawn server (ECHO) on `s`."""
    msg = b"x" * 16

    def one() -> None:
        s.sendall(msg)
        recv_exact(s, len(msg))

    return one


def idle_pings(m: Machine, client: Any, rounds: int) -> list[tuple[str, str, str]]:
    """PING and the raw echo alternated, after 0, 20 and 200 ms of idleness each and right after
    a command: a round trip that follows idleness or another process costs more under TCG, and
    more for the agent than for the echo."""
    echo, s = raw_echo_fn(m)
    # The least a Python agent pays for a PING in our frames (both CRCs checked, the PONG
    # built): protocol.pong_for_ping in the echo's loop (ECHO's `F`), on the same port.
    framed = framed_ping_fn(s)
    framed()

    def timed(fn: Any) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def row(what: str, ping: list[float], raw: list[float], least: list[float]) -> tuple[str, str, str]:
        p, r, f = pct(ping, 50) * 1000, pct(raw, 50) * 1000, pct(least, 50) * 1000
        return (what, f"{p:.2f}", f"raw echo {r:.2f} (×{p / r:.2f}); framed echo {f:.2f} "
                f"(×{f / r:.2f} of the raw echo; PING ×{p / f:.2f} of it)")

    rows = []
    for gap in (0.0, 0.02, 0.2):
        ping: list[float] = []
        raw: list[float] = []
        least: list[float] = []
        for _ in range(rounds):
            time.sleep(gap)
            ping.append(timed(client.ping))
            time.sleep(gap)
            raw.append(timed(echo))
            time.sleep(gap)
            least.append(timed(framed))
        rows.append(row(f"PING after {gap * 1000:.0f} ms idle, median (ms)", ping, raw, least))
    # Right after a command: another process ran in the guest, and under TCG the address-space
    # switches flushed the emulated TLB and jump cache the agent's code was using.
    ping, raw, least = [], [], []
    for _ in range(rounds):
        m.succeed("true")
        ping.append(timed(client.ping))
        m.succeed("true")
        raw.append(timed(echo))
        m.succeed("true")
        least.append(timed(framed))
    rows.append(row('PING right after a succeed("true"), median (ms)', ping, raw, least))
    rows += ping_split(m, client, echo, framed, rounds * 3)
    s.close()
    return rows


def second_agent(m: Machine) -> socket.socket:
    """A second agent of this tree's image started in the guest on the SHELL port (its own
    process), and a raw socket to it (30 s timeout): the agent's side of a request timed from
    one host thread, without the client's."""
    m.succeed(f"setsid python3 /usr/lib/ntng-backdoor/ntng_agent.py --device /dev/virtio-ports/{SHELL} "
              "</dev/null >/dev/null 2>&1 &")
    s = connect_unix(m.plan["sockets"][f"port:{SHELL}"], 10)
    s.settimeout(30)
    return s


def agent_ping_fn(m: Machine) -> tuple[Any, socket.socket]:
    """PINGs to a second agent (second_agent) as the echoes are timed.  A PING is answered
    before any handshake, so the socket sends nothing else."""
    s = second_agent(m)
    ping = P.ping_frame(os.urandom(8))
    pong = P.pong_for_ping(ping)
    assert pong is not None
    while True:  # the agent's ANNOUNCE (and any repeat of it) comes first: skip to our PONG
        s.sendall(ping)
        got = s.recv(65536)
        if got.endswith(pong):
            break
        time.sleep(0.2)
    # PINGs sent while the agent started are answered late: their PONGs, left queued, would
    # answer the timed ones at once (a round trip of 0.07 ms was measured so).
    timeout = s.gettimeout()
    s.settimeout(0.5)
    try:
        while s.recv(65536):
            pass
    except TimeoutError:
        pass
    s.settimeout(timeout)
    return framed_fn(s, ping, pong), s


def after_succeed_ab(client: Any, old: Any, rounds: int) -> list[tuple[str, str, str]]:
    """A request sent the moment a succeed("true") answered, to this tree's agent (the image's)
    and to GIT_REF's on the same VM, interleaved: after such a command the agent starts the
    next one's bash (ShellWaiter), and the request lands while that shell loads."""
    agents = {"this tree's agent": client, "the older agent (--ab)": old}
    got: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for what, request in (("PING", lambda c: c.ping()), ('run(["true"])', lambda c: c.execute(RUN_TRUE))):
            for name, c in agents.items():
                c.execute(SUCCEED_TRUE)
                t0 = time.perf_counter()
                request(c)
                got.setdefault((what, name), []).append(time.perf_counter() - t0)
    return [(f"{what} sent the moment a succeed answered: {name}, median (ms)", f"{pct(v, 50) * 1000:.3f}",
             f"p90 {pct(v, 90) * 1000:.3f}") for (what, name), v in sorted(got.items())]


def after_answers(agents: dict[str, Any], rounds: int) -> list[tuple[str, str, str]]:
    """A PING, a run(["true"]) or a succeed("true") sent 0, 5 or 30 ms after a succeed or a
    run(["true"]) answered, each pair after 0.3 s idle (the waiting shell, if any, is ready
    then, and a succeed takes it and wants the next one): what a request pays when it comes
    while the next command's bash (ShellWaiter) loads.  Interleaved over `agents` (name →
    client), one VM."""
    firsts = {"a succeed": SUCCEED_TRUE, "a run": RUN_TRUE}
    seconds = {"PING": None, 'run(["true"])': RUN_TRUE, 'succeed("true")': SUCCEED_TRUE}
    got: dict[tuple[str, str, str, float], list[float]] = {}
    for _ in range(rounds):
        for second, request in seconds.items():
            for first, before in firsts.items():
                for gap in (0.0, 0.005, 0.03):
                    for name, c in agents.items():
                        time.sleep(0.3)
                        c.execute(before)
                        if gap:
                            time.sleep(gap)
                        t0 = time.perf_counter()
                        c.ping() if request is None else c.execute(request)
                        got.setdefault((second, first, name, gap), []).append(time.perf_counter() - t0)
    return [(f"{second} {gap * 1000:.0f} ms after {first} answered: {name}, median (ms)", f"{pct(v, 50) * 1000:.2f}",
             f"p90 {pct(v, 90) * 1000:.2f}") for (second, first, name, gap), v in got.items()]


def after_predecessors(m: Machine, client: Any, rounds: int) -> list[tuple[str, str, str]]:
    """Our run(["true"]) and PING, the framed server's EXEC of `true` (`F`), the framed and
    the raw echo, each timed the moment one of the ratio rotation's cases answered (50 ms
    after the pair before): what each pays for what ran just before it (a bash, the spawn
    server's process, our agent, idleness)."""
    _, raw = raw_echo_fn(m)
    timed: dict[str, Any] = {'run(["true"])': lambda: m.run(["true"]), "F, EXEC of true": framed_exec_fn(raw),
             "PING": lambda: client.ping(), "the framed echo": framed_ping_fn(raw),
             "the raw echo": raw_echo_on(raw)}
    before = {
        'our run(["true"])': lambda: m.run(["true"]),
        "our `bash -c` spawned on arrival": lambda: client.execute(BASH_ON_ARRIVAL),
        'our succeed("true")': lambda: m.succeed("true"),
        "our PING": lambda: client.ping(),
        "the spawn server's /bin/true (T)": raw_command_fn(raw, b"T"),
        "the spawn server's bash -c (B)": raw_command_fn(raw, b"B"),
        "F, EXEC of true": timed["F, EXEC of true"],
        "0.2 s idle": lambda: time.sleep(0.2),
    }
    got: dict[tuple[str, str], list[float]] = {}
    pairs = [(b, t) for b in before for t in timed]
    for r in range(rounds):
        for b, t in pairs[r % len(pairs):] + pairs[:r % len(pairs)]:
            time.sleep(0.05)
            before[b]()
            t0 = time.perf_counter()
            timed[t]()
            got.setdefault((t, b), []).append(time.perf_counter() - t0)
    raw.close()
    rows = []
    for t in timed:
        for b in before:
            v = got[(t, b)]
            rows.append((f"{t} right after {b}, median (ms)", f"{pct(v, 50) * 1000:.2f}", f"p90 {pct(v, 90) * 1000:.2f}"))
    return rows


def agent_exec_fn(m: Machine) -> tuple[Any, socket.socket]:
    """EXEC `true` to a second agent (second_agent): HELLO, then each request sent and its
    EXIT read on the same thread, with the protocol's Decoder."""
    s = second_agent(m)
    decoder = P.Decoder(P.DEFAULT_MAX_FRAME)

    def until(ftype: int) -> P.Frame:
        while True:
            for ev in decoder.events():
                if isinstance(ev, P.Frame) and ev.type == ftype:
                    return ev
            data = s.recv(1 << 20)
            if not data:
                raise ConnectionError("the second agent closed its port")
            decoder.feed(data)

    until(P.FrameType.ANNOUNCE)  # written once the agent has opened the port: HELLO is read then
    nonce = os.urandom(16)
    s.sendall(P.Hello(P.MIN_SESSION_VERSION, P.VERSION, nonce).frame(P.HANDSHAKE_REQUEST_ID))
    # The guest's agent reads the run's key (QEMU's fw_cfg file): prove it, as the client does.
    challenge = P.parse_message(until(P.FrameType.AUTH_CHALLENGE)).challenge
    proof = P.auth_proof(m.connect().key, P.AUTH_HOST, challenge, nonce)
    s.sendall(P.Auth(nonce, proof).frame(P.HANDSHAKE_REQUEST_ID))
    until(P.FrameType.HELLO_ACK)
    request = RUN_TRUE.frame(7)

    def one() -> None:
        s.sendall(request)
        end = P.Exit.parse(until(P.FrameType.EXIT).payload)
        assert end.code == 0, end

    return one, s


def ping_split(m: Machine, client: Any, echo: Any, framed: Any, rounds: int) -> list[tuple[str, str, str]]:
    """Whose PING time is it: the same round trip timed four ways, interleaved in rotated
    order: client.ping() to the image's agent, a raw socket to a second agent process, the
    framed echo (pong_for_ping in the echo's loop) and the raw echo."""
    agent_raw, s = agent_ping_fn(m)
    reported: list[float] = []  # what ping() returns: its send to the reader's decode of the PONG
    cases = {"client.ping(), the image's agent": lambda: reported.append(client.ping()),
             "raw socket, a second agent": agent_raw,
             "raw socket, the framed echo": framed, "raw socket, the raw echo": echo}
    got: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            cases[name]()
            got[name].append(time.perf_counter() - t0)
    s.close()
    raw = pct(got["raw socket, the raw echo"], 50)
    framed_ms = pct(got["raw socket, the framed echo"], 50)
    got["client.ping() as it reports itself (send → the reader decoded the PONG)"] = reported
    return [(f"PING split, rotated: {name}, median (ms)", f"{pct(v, 50) * 1000:.3f}",
             f"p90 {pct(v, 90) * 1000:.3f}; ×{pct(v, 50) / raw:.2f} of the raw echo, "
             f"×{pct(v, 50) / framed_ms:.2f} of the framed echo") for name, v in got.items()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--copy-mb", type=int, default=64)
    ap.add_argument("--accel", default=os.environ.get("NTNG_ACCEL", "auto"))
    ap.add_argument("--breakdown", action="store_true", help="where a command's time goes (only)")
    ap.add_argument("--idle", action="store_true", help="PING vs raw echo after idle periods (only)")
    ap.add_argument("--after", action="store_true",
                    help="requests sent 0, 5 and 30 ms after a succeed or a run answered (only; --ab: both agents)")
    ap.add_argument("--predecessor", action="store_true",
                    help="run([\"true\"]), PING, the framed server's EXEC and both echoes right after each of the ratio rotation's cases (only)")
    ap.add_argument("--cpu", action="store_true",
                    help="guest CPU per command: our agent against the minimal spawn server (only)")
    ap.add_argument("--gap", action="store_true",
                    help="the wall-time gap to the spawn server, in steps toward the agent (only)")
    ap.add_argument("--copy-steps", action="store_true",
                    help="the agent's get/put data path step by step in the guest (only)")
    ap.add_argument("--spawn-steps", action="store_true",
                    help="what capturing a command's output costs in the guest, step by step (only)")
    ap.add_argument("--ab", default="", metavar="GIT_REF",
                    help="with --breakdown, --cpu or --gap: also run the agent of GIT_REF in the guest, interleaved; with --idle: only requests right after a succeed, both agents")
    args = ap.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where it is now
    # `kill PID` unwinds like Ctrl-C: the VM released and the copies' temp folder removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    tmp = Path(tempfile.mkdtemp(prefix="ntng-bench-"))
    atexit.register(shutil.rmtree, tmp, True)  # its copy files are hundreds of MB: never left behind
    script = tmp / "bench.py"
    script.write_text(header(tmp))
    spec, choice = runner.prepare(runner.RunOptions(script=script, accel=args.accel), tmp)
    driver = Driver(spec, tmp / "out", runner.DEFAULT_BOOT_TIMEOUT * choice.timeout_scale,
                    log=lambda _m: None)
    m = driver.machines[0]
    rows: list[tuple[str, str, str]] = []
    try:
        t0 = time.perf_counter()
        step("boot")
        m.start()
        m.succeed("true")
        rows.append(("cold boot → first command", f"{time.perf_counter() - t0:.1f} s", ""))
        m.wait_until_succeeds("systemctl is-system-running | grep -qE 'running|degraded'", 300)
        if args.breakdown:
            breakdown(m, tmp, args.rounds, args.ab)
            return
        if args.copy_steps:
            copy_steps(m, args.copy_mb)
            return
        client = m.connect()
        if args.after:
            agents = {"this tree's agent": client}
            if args.ab:
                agents["the older agent (--ab)"] = old_agent_client(m, tmp, args.ab, SHELL)
            rows += after_answers(agents, max(5, args.rounds // 4))
        elif args.predecessor:
            rows += after_predecessors(m, client, max(5, args.rounds // 4))
        elif args.idle and args.ab:
            rows += after_succeed_ab(client, old_agent_client(m, tmp, args.ab, SHELL), args.rounds)
        elif args.idle:
            rows += idle_pings(m, client, max(10, args.rounds // 7))
        elif args.spawn_steps:
            rows += spawn_steps(m, args.rounds)
        elif args.cpu:
            old = old_agent_client(m, tmp, args.ab, SHELL) if args.ab else None
            rows += guest_cpu(m, client, args.rounds, old)
        elif args.gap:
            old = old_agent_client(m, tmp, args.ab, SHELL) if args.ab else None
            rows += wall_gap(m, args.rounds, old)
        else:
            rows += ratios(m, client, tmp, args.rounds, args.copy_mb)
    finally:
        driver.release()
        faulthandler.cancel_dump_traceback_later()
    print(f"\nload average: {os.getloadavg()}")
    print(f"\naccelerator: {choice.accel} ({choice.reason.splitlines()[0][:80]})\n")
    print_table(("measure", "nixos-test-ng", "baseline"), rows)


def print_table(header: tuple[str, ...], rows: list[tuple[str, str, str]]) -> None:
    """A markdown table, as the README holds the numbers."""
    for row in (header, tuple("---" for _ in header), *rows):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

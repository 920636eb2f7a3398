#!/usr/bin/env python3
"""Where a command's time goes inside the guest: each step the agent takes for one EXEC, timed
on its own (median of N), next to the in-guest spawn floors.  Runs IN the guest, next to the
agent's modules: `python3 agent_steps.py [N] [agent_dir]`; prints `step<TAB>ms` lines.
bench/backdoor.py copies it in and runs it (--breakdown).  stdlib only.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

N = int(sys.argv[1]) if len(sys.argv) > 1 else 30
sys.path.insert(0, sys.argv[2] if len(sys.argv) > 2 else "/usr/lib/ntng-backdoor")
import protocol as P  # noqa: E402

SCRIPT = "set -euo pipefail; true"
ARGV = ["bash", "-c", SCRIPT]
BASH = "/bin/bash"


def median(fn: Callable[[], object], n: int = N) -> float:
    fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    out.sort()
    return out[len(out) // 2] * 1000


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return e


def popen_run(argv: list[str]) -> None:
    """What the agent did per command: Popen with pipes, a poll loop to EOF, wait."""
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd="/", env=env(), start_new_session=True, bufsize=0)
    pump([p.stdout.fileno(), p.stderr.fileno()])  # type: ignore[union-attr]
    p.stdout.close()  # type: ignore[union-attr]
    p.stderr.close()  # type: ignore[union-attr]
    p.wait()


def pump(fds: list[int]) -> None:
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    left = set(fds)
    while left:
        for fd, _ in poller.poll():
            if not os.read(fd, 65536):
                poller.unregister(fd)
                left.discard(fd)


def spawn_run(argv: list[str], path: str) -> None:
    """posix_spawn with pipes (file actions), setsid, read to EOF, waitpid."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    null = os.open("/dev/null", os.O_RDONLY)
    pid = os.posix_spawn(path, argv, env(), setsid=True, file_actions=[
        (os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, w1, 1), (os.POSIX_SPAWN_DUP2, w2, 2)])
    for fd in (null, w1, w2):
        os.close(fd)
    pump([r1, r2])
    os.close(r1)
    os.close(r2)
    os.waitpid(pid, 0)


def bare_spawn(path: str, argv: list[str]) -> None:
    os.waitpid(os.posix_spawn(path, argv, os.environ), 0)


def after_process(fn: Callable[[], object]) -> float:
    """fn's time right after another process ran (not timed)."""
    bare_spawn("/bin/true", ["true"])
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def thread_roundtrip() -> None:
    t = threading.Thread(target=lambda: None, daemon=True)
    t.start()
    t.join()


def connect(path: str, server: subprocess.Popen[bytes], within: float = 60) -> socket.socket:
    """A connection to `server`'s unix socket at `path`, once it listens: the file appears at
    bind(), before listen(), and a connect in between is refused (under TCG that gap is wide)."""
    end = time.monotonic() + within
    while True:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if server.poll() is not None or time.monotonic() > end:
                server.kill()
                raise RuntimeError(f"{server.args} never listened on {path} "
                                   f"(exit status {server.poll()}, waited {within} s)") from None
            time.sleep(0.05)


def stop(sock: socket.socket, server: subprocess.Popen[bytes], path: str) -> None:
    """Close the connection, stop the helper and remove its socket file: nothing left behind."""
    sock.close()
    server.kill()
    server.wait()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class AgentClient:
    """The least client of the agent on a connected socket: HELLO (no key), EXEC, PING."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = P.Decoder()
        self.rid = 0
        self.sock.sendall(P.Hello(2, P.VERSION, b"n" * 16).frame(0))
        self.until(P.FrameType.HELLO_ACK)

    def until(self, ftype: int) -> P.Frame:
        while True:
            for ev in self.decoder.events():
                if isinstance(ev, P.Frame) and ev.type == ftype:
                    return ev
            self.decoder.feed(self.sock.recv(1 << 20))

    def exec(self, argv: list[str]) -> None:
        self.rid += 1
        self.sock.sendall(P.Exec(argv=argv, timeout_ms=900_000).frame(self.rid))
        self.until(P.FrameType.EXIT)

    def ping(self) -> None:
        self.sock.sendall(PING)
        self.until(P.FrameType.PONG)


class LocalAgent(AgentClient):
    """The agent itself, on a unix socket in the guest: its round trip without the transport
    and the host."""

    def __init__(self, agent_dir: str) -> None:
        path = f"/tmp/agent-steps-{os.getpid()}.sock"
        # Its output not ours: a helper left running after an error held this script's stdout,
        # and the EXEC that ran it then waited for that pipe to end (a bench run sat idle).
        self.path = path
        self.proc = subprocess.Popen([sys.executable, f"{agent_dir}/ntng_agent.py", "--unix", path],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        super().__init__(connect(path, self.proc))

    def close(self) -> None:
        stop(self.sock, self.proc, self.path)


PING = P.ping_frame(b"12345678")
RAW_ECHO = (
    "import os, socket, sys\n"
    "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1); c, _ = s.accept()\n"
    "while True:\n"
    "    d = os.read(c.fileno(), 65536)\n"
    "    if not d: break\n"
    "    os.write(c.fileno(), d)\n"
)


class RawEcho:
    """A python3 echo loop on a unix socket: the PING's floor inside the guest."""

    def __init__(self) -> None:
        path = f"/tmp/raw-echo-{os.getpid()}.sock"
        self.path = path
        self.proc = subprocess.Popen([sys.executable, "-c", RAW_ECHO, path],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.sock = connect(path, self.proc)

    def echo(self) -> None:
        self.sock.sendall(PING)
        got = 0
        while got < len(PING):
            got += len(self.sock.recv(65536))

    def close(self) -> None:
        stop(self.sock, self.proc, self.path)


def inline_exec_phases(agent_dir: str, argv: list[str], rounds: int) -> list[tuple[str, float]]:
    """One EXEC served inline by the agent's own code (serve() on a socketpair, the client a
    thread of this process, so no transport and no process switch but the command's), split
    into phases by timestamps taken in wrappers around the agent's functions: median ms each."""
    sys.path.insert(0, agent_dir)
    import ntng_agent as A

    os.chdir("/")  # the agent's own cwd: commands in it take the posix_spawn path

    stamps: dict[str, float] = {}

    def stamp(name: str, fn: Callable[..., object]) -> Callable[..., object]:
        def wrapped(*args: object, **kwargs: object) -> object:
            stamps.setdefault(name, time.perf_counter())
            result = fn(*args, **kwargs)
            stamps.setdefault(name + " returned", time.perf_counter())
            return result
        return wrapped

    A.Session.handle = stamp("handle", A.Session.handle)  # type: ignore[method-assign]
    A._spawn_fast = stamp("spawn", A._spawn_fast)
    # the first call after the inline pump: the command's output has ended
    A.Spawned.returned_within = stamp("end_pipes", A.Spawned.returned_within)  # type: ignore[method-assign]
    A.P.exec_end = stamp("report", A.P.exec_end)  # type: ignore[assignment]  # the EXIT being built
    A.Session.send_last = stamp("finish", A.Session.send_last)  # type: ignore[method-assign]
    host, guest = socket.socketpair()
    agent = threading.Thread(target=A.serve, args=(A.Connection(guest.fileno(), guest.fileno()),
                                                   time.time_ns()), daemon=True)
    agent.start()
    client = AgentClient(host)
    phases = [
        ("EXEC sent → the agent handles it (socketpair, decode)", "sent", "handle"),
        ("handle → posix_spawn called (parse, environment, task)", "handle", "spawn"),
        ("posix_spawn with pipes", "spawn", "spawn returned"),
        ("spawned → output ended (poll loop, inline)", "spawn returned", "end_pipes"),
        ("→ exit seen and reaped, pipes closed (inline)", "end_pipes", "report"),
        ("→ EXIT built, written, send_last() returned", "report", "finish returned"),
        ("reaped → the client decoded EXIT", "report", "got"),
    ]
    samples: dict[str, list[float]] = {name: [] for name, _, _ in phases}
    for round_no in range(rounds + 1):
        stamps.clear()
        stamps["sent"] = time.perf_counter()
        client.exec(argv)
        stamps["got"] = time.perf_counter()
        settle = time.monotonic() + 1  # the agent stamps "finish returned" after its write
        while "finish returned" not in stamps and time.monotonic() < settle:
            time.sleep(0.001)
        if round_no == 0 or not all(k in stamps for _, k, _ in phases):
            continue  # the first is a warm-up; a worker-served one has no inline phases
        for name, a, b in phases:
            samples[name].append(stamps[b] - stamps[a])
    host.close()
    out = []
    for name, _, _ in phases:
        v = sorted(samples[name]) or [float("nan")]
        out.append((f"inline EXEC {argv[0]}: {name}", v[len(v) // 2] * 1000))
    return out


def main() -> None:
    req = P.Exec(argv=ARGV, timeout_ms=900_000)
    frame = req.frame(7)
    exit_frame = P.Exit(0, 0, False, 1234).frame(7)

    def decode() -> None:
        d = P.Decoder()
        d.feed(frame)
        for _ in d.events():
            pass

    f = P.Frame(P.FrameType.EXEC, 7, frame[P.HEADER_SIZE:-P.TRAILER_SIZE])
    wfd = os.open("/dev/null", os.O_WRONLY)
    steps = [
        ("decode EXEC frame (Decoder)", decode),
        ("parse EXEC payload (construct, compiled)", lambda: P.parse_message(f)),
        ("environment dict", env),
        ("thread start + join", thread_roundtrip),
        ("build EXIT", lambda: P.Exit(0, 0, False, 1234).frame(7)),
        ("write one frame (3 syscalls -> 1)", lambda: os.write(wfd, exit_frame)),
        ("Popen+poll+wait `bash -c` (the Popen path)", lambda: popen_run(ARGV)),
        ("posix_spawn+poll+waitpid `bash -c`", lambda: spawn_run(ARGV, BASH)),
        ("floor: posix_spawn `bash -c` + waitpid", lambda: bare_spawn(BASH, ARGV)),
        ("Popen+poll+wait /bin/true (the Popen path)", lambda: popen_run(["/bin/true"])),
        ("posix_spawn+poll+waitpid /bin/true", lambda: spawn_run(["true"], "/bin/true")),
        ("floor: posix_spawn /bin/true + waitpid", lambda: bare_spawn("/bin/true", ["true"])),
    ]
    agent = LocalAgent(sys.argv[2] if len(sys.argv) > 2 else "/usr/lib/ntng-backdoor")
    try:
        echo = RawEcho()
    except BaseException:
        agent.close()
        raise
    try:
        measure(steps, agent, echo)
    finally:
        agent.close()
        echo.close()
    agent_dir = sys.argv[2] if len(sys.argv) > 2 else "/usr/lib/ntng-backdoor"
    for name, ms in inline_exec_phases(agent_dir, ["/bin/true"], N):
        print(f"{name}\t{ms:.3f}")


def measure(steps: list[tuple[str, Callable[[], object]]], agent: LocalAgent, echo: RawEcho) -> None:
    """Time each step, then print its median: the local agent's and the echo loop's steps added."""
    steps += [
        ("agent round trip on a unix socket: EXEC `bash -c` -> EXIT", lambda: agent.exec(ARGV)),
        ("agent round trip on a unix socket: EXEC /bin/true -> EXIT", lambda: agent.exec(["true"])),
        ("agent round trip on a unix socket: PING -> PONG", agent.ping),
        ("floor: python3 echo loop on a unix socket, the same bytes", echo.echo),
        # Under TCG every switch of address space flushes the emulated TLB and jump cache, so
        # the code a process runs after another ran pays for each page and block it touches:
        # the agent's PING (more interpreter code) against the echo loop's, both cold.
        ("agent PING right after another process ran (/bin/true)", lambda: after_process(agent.ping)),
        ("floor: the echo loop right after another process ran", lambda: after_process(echo.echo)),
    ]
    # Interleaved rounds: every step is measured in each round, the medians taken over rounds,
    # so a burst of host load hits all steps alike.
    samples: dict[str, list[float]] = {name: [] for name, _ in steps}
    for _, fn in steps:
        fn()
    for _ in range(N):
        for name, fn in steps:
            t0 = time.perf_counter()
            timed = fn()  # a float: the step timed its own part
            samples[name].append(timed if isinstance(timed, float) else time.perf_counter() - t0)
    for name, _ in steps:
        s = sorted(samples[name])
        print(f"{name}\t{s[len(s) // 2] * 1000:.3f}")


if __name__ == "__main__":
    main()

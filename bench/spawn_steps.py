#!/usr/bin/env python3
"""What capturing a command's output costs inside the guest, step by step from the floor: a
/bin/true spawned and reaped, then with two pipes made and closed, then handed to it, then read
to their end, then waited for the way the agent waits (one poll, SCHED_BATCH).  Every variant
runs once a round, in the same order, so the guest's drift is shared.  Runs IN the guest:
`python3 spawn_steps.py [ROUNDS]`; prints `step<TAB>p25 ms<TAB>p50 ms` lines.  bench/backdoor.py
copies it in and runs it (--spawn-steps).  stdlib only.
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Callable

ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
TRUE, ARGV = "/bin/true", ["true"]
PARAM = os.sched_param(0)


def floor() -> None:
    os.waitpid(os.posix_spawn(TRUE, ARGV, ENV), 0)


def make_pipes() -> tuple[int, int, int, int]:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    return r1, w1, r2, w2


def close_all(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def spawn_into(pipes: tuple[int, int, int, int]) -> int:
    r1, w1, r2, w2 = pipes
    pid = os.posix_spawn(TRUE, ARGV, ENV, setsid=True,
                         file_actions=[(os.POSIX_SPAWN_DUP2, w1, 1), (os.POSIX_SPAWN_DUP2, w2, 2)])
    close_all(w1, w2)
    return pid


def pipes_made() -> None:
    pipes = make_pipes()
    floor()
    close_all(*pipes)


def pipes_handed() -> None:
    pipes = make_pipes()
    os.waitpid(spawn_into(pipes), 0)
    close_all(pipes[0], pipes[2])


def read_to_end(pipes: tuple[int, int, int, int]) -> None:
    pid = spawn_into(pipes)
    for r in (pipes[0], pipes[2]):
        while os.read(r, 65536):
            pass
    os.waitpid(pid, 0)


def pipes_read() -> None:
    pipes = make_pipes()
    read_to_end(pipes)
    close_all(pipes[0], pipes[2])


def polled(pipes: tuple[int, int, int, int], poller: select.poll) -> None:
    pid = spawn_into(pipes)
    os.sched_setscheduler(0, os.SCHED_BATCH, PARAM)
    left = {pipes[0], pipes[2]}
    while left:
        for fd, ev in poller.poll(1000):
            if ev == select.POLLHUP or not os.read(fd, 65536):
                poller.unregister(fd)
                left.discard(fd)
    got, _ = os.waitpid(pid, os.WNOHANG)
    if not got:
        os.waitpid(pid, 0)


def agent_wait() -> None:
    """The agent's inline wait before the tenth round: pipes and poll made per command, the
    scheduling restored and the pipes closed before the answer."""
    pipes = make_pipes()
    poller = select.poll()
    poller.register(pipes[0], select.POLLIN)
    poller.register(pipes[2], select.POLLIN)
    polled(pipes, poller)
    os.sched_setscheduler(0, os.SCHED_OTHER, PARAM)
    close_all(pipes[0], pipes[2])


READY: list[tuple[tuple[int, int, int, int], select.poll]] = []


def ready() -> None:
    pipes, poller = READY.pop()
    polled(pipes, poller)


def make_ready() -> None:
    """What the tenth round does after the answer, off the timed path."""
    os.sched_setscheduler(0, os.SCHED_OTHER, PARAM)
    pipes = make_pipes()
    poller = select.poll()
    poller.register(pipes[0], select.POLLIN)
    poller.register(pipes[2], select.POLLIN)
    READY.append((pipes, poller))


STEPS: list[tuple[str, Callable[[], None]]] = [
    ("floor: posix_spawn /bin/true + waitpid", floor),
    ("+ two pipes made and closed (not handed over)", pipes_made),
    ("+ the pipes as its stdout and stderr, waitpid, read ends closed", pipes_handed),
    ("+ both read to their end before waitpid (the spawn server T)", pipes_read),
    ("the agent's inline wait before: pipes and poll made, SCHED_BATCH, closes before the answer", agent_wait),
    ("the agent's inline wait now: pipes and poll made ahead (ReadyPipes)", ready),
]


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    times: dict[str, list[float]] = {name: [] for name, _ in STEPS}
    make_ready()
    for _ in range(rounds + 1):
        for name, fn in STEPS:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            if fn is ready:
                make_ready()
    for name, samples in times.items():
        s = sorted(samples[1:])  # the first round warms up
        print(f"{name}\t{s[len(s) // 4] * 1000:.2f}\t{s[len(s) // 2] * 1000:.2f}")


if __name__ == "__main__":
    main()

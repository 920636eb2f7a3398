"""A stand-in VMM for runner tests, no VM: the "guest" is the REAL agent (backdoor/ntng_agent.py
--fd) in a child process on one end of a socketpair, started, watched and killed like a VMM (its
own session, PDEATHSIG).  SIGSTOP of that process is a guest that stops reading; its console is a
socketpair the test writes to (`console_in`).

`install()` makes backends.make build it and runner.prepare plan it, so the real Driver,
Machine, client and runner run unchanged on top.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "backdoor" / "ntng_agent.py"

from ntng import accel, backends, runner, testspec  # noqa: E402
from ntng.backends.vmm import VmmProcess  # noqa: E402


class AgentVmm(VmmProcess):
    name = "agent-vmm"
    reconnects = False

    def __init__(self, machine_name: str, plan: dict[str, Any],
                 preexec: Callable[[], None] | None = None, keep_disk: bool = False) -> None:
        super().__init__(machine_name, plan, preexec, keep_disk)
        self._backdoor: socket.socket | None = None
        self.console_in: socket.socket | None = None  # the guest's side of the console
        self._console: socket.socket | None = None
        self._console_thread: threading.Thread | None = None

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        host, guest = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT / "backdoor")])}
        self._spawn([sys.executable, str(AGENT), "--fd", str(guest.fileno())], "python",
                    pass_fds=(guest.fileno(),), env=env)
        guest.close()
        self._backdoor = host
        self._console, self.console_in = socket.socketpair()
        console = self._console
        self._console_thread = threading.Thread(
            target=self._pump_console, args=(lambda: console.recv(65536),), daemon=True)
        self._console_thread.start()

    def connect_backdoor(self, timeout: float) -> socket.socket:
        assert self._backdoor is not None
        return self._backdoor

    def quit(self) -> None:
        self.kill()

    def release(self) -> None:
        self.kill()
        for s in (self.console_in, self._console):
            if s is not None:
                s.close()
        if self._console_thread is not None:
            self._console_thread.join(2)


def plan(state: Path) -> dict[str, Any]:
    return {"backend": "agent-vmm", "stateDir": str(state), "files": {"disk": str(state / "disk.img"), "stderr": str(state / "vmm.stderr")}, "sockets": {},
            "prepare": [], "backdoor": {"transport": "fd"},
            "artifacts": {"consoleLog": str(state / "out" / "console.log"), "journal": str(state / "out" / "journal.log")}}


def make(machine_name: str, plan: dict[str, Any], preexec: Callable[[], None] | None = None,
         keep_disk: bool = False, **_options: Any) -> AgentVmm:
    return AgentVmm(machine_name, plan, preexec, keep_disk)


def install(global_timeout: float = 3600) -> None:
    """Backends and runner.prepare give every script one machine, `machine`, on an AgentVmm."""
    backends.make = make  # type: ignore[assignment]

    def prepare(opts: runner.RunOptions, state_root: Path) -> tuple[testspec.TestSpec, accel.AccelChoice]:
        script = opts.script.read_text()
        spec = testspec.TestSpec(opts.script, script, opts.script.stem, global_timeout, ["machine"],
                                 {"machine": plan(state_root / "machine")})
        return spec, accel.AccelChoice("kvm", "fake: the guest is the agent in a host process")

    runner.prepare = prepare  # type: ignore[assignment]

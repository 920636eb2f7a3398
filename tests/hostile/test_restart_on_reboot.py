"""Restart on reboot is the backend's policy (VmmProcess.restart_if_rebooted): where the plan
says a guest reboot ends the VMM (nixlib's restartOnReboot, QEMU -no-reboot) and it did, the
next command finds the VMM started again on the same disk; any other exit stays an error.
The VMM is silent_vmm's (the real agent in a child process), so Machine, Session and client
run unchanged."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import silent_vmm

from ntng import backends
from ntng.errors import BackdoorError
from ntng.machine import Machine

pytestmark = pytest.mark.timeout(60)


class RebootingVmm(silent_vmm.AgentVmm):
    """Exits "for a reboot" when the test says so (QEMU tells it by a SHUTDOWN event)."""

    for_reboot = False

    def exited_for_reboot(self) -> bool:
        return self.for_reboot


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[RebootingVmm]:
    vmms: list[RebootingVmm] = []

    def make(name: str, plan: dict[str, Any], preexec: Callable[[], None] | None = None,
             keep_disk: bool = False, **_options: Any) -> RebootingVmm:
        vmms.append(RebootingVmm(name, plan, preexec, keep_disk))
        return vmms[-1]

    monkeypatch.setattr(backends, "make", make)
    return vmms


def machine(tmp_path: Path, logged: list[str], restart: bool) -> Machine:
    plan = {**silent_vmm.plan(tmp_path / "state"), "restartOnReboot": restart}
    return Machine("m", plan, tmp_path / "out", boot_timeout=20, log=logged.append)


def end_vmm(m: Machine, for_reboot: bool) -> int:
    backend = m.backend
    assert isinstance(backend, RebootingVmm) and backend.pid is not None
    backend.for_reboot = for_reboot
    pid = backend.pid
    os.kill(pid, signal.SIGKILL)
    assert backend.wait_exit(5) is not None
    return pid


def say(m: Machine, text: bytes) -> None:
    console = m.backend.console_in  # type: ignore[attr-defined]
    console.sendall(text)


def test_a_vmm_that_exits_for_a_reboot_is_started_again(tmp_path: Path, made: list[RebootingVmm]) -> None:
    logged: list[str] = []
    m = machine(tmp_path, logged, restart=True)
    try:
        assert m.succeed("echo up") == "up\n"
        say(m, b"first run\n")
        m.wait_for_console_text("first run", timeout=5)
        backend = m.backend
        old_pid = end_vmm(m, for_reboot=True)
        assert m.succeed("echo again") == "again\n"
        # The same backend started its VMM again, on the disk it had.
        assert m.backend is backend and backend.pid not in (None, old_pid) and backend.keep_disk
        assert m.booted and len(made) == 2  # made at construction and by start(), not again
        assert any("agent-vmm started again on the same disk" in line for line in logged), logged
        say(m, b"second run\n")
        m.wait_for_console_text("second run", timeout=5)
        assert "first run" not in m.get_console_log()  # the kept lines are the new run's
    finally:
        m.release()
    console = (tmp_path / "state" / "out" / "console.log").read_text()  # silent_vmm.plan's artifacts
    assert console.index("first run") < console.index("second run")  # console.log goes on


@pytest.mark.parametrize(("restart", "for_reboot"), [(False, True), (True, False)],
                         ids=["plan-without-restartOnReboot", "exit-not-for-a-reboot"])
def test_any_other_exit_is_an_error(tmp_path: Path, made: list[RebootingVmm], restart: bool,
                                    for_reboot: bool) -> None:
    logged: list[str] = []
    m = machine(tmp_path, logged, restart)
    try:
        assert m.succeed("echo up") == "up\n"
        old_pid = end_vmm(m, for_reboot)
        with pytest.raises(BackdoorError):
            m.succeed("echo again")
        assert m.backend.pid == old_pid and not m.backend.alive()
        assert not any("started again" in line for line in logged)
    finally:
        m.release()

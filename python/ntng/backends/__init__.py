"""Backends, one per VMM: make() picks the one the launch plan was computed for (nixlib
decides the backend, the runner follows its plan)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..errors import SetupError
from .console import ConsoleCallback

KNOWN = ("qemu", "firecracker", "cloud-hypervisor")


class Backend(Protocol):
    """What a Machine uses.  A method a backend cannot do raises CapabilityMissing, naming it."""

    name: str
    proc: subprocess.Popen[bytes] | None
    console_log: list[str]
    console_callbacks: list[ConsoleCallback]

    @property
    def capabilities(self) -> frozenset[str]: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def reconnects(self) -> bool: ...
    @property
    def restarts_on_reboot(self) -> bool: ...
    def exited_for_reboot(self) -> bool: ...
    def start(self) -> None: ...
    def connect_backdoor(self, timeout: float) -> socket.socket: ...
    def alive(self) -> bool: ...
    def stderr_tail(self) -> str: ...
    def console_tail(self, n: int = 20) -> str: ...
    def wait_exit(self, timeout: float | None) -> int | None: ...
    def powerdown(self) -> None: ...
    def quit(self) -> None: ...
    def kill(self) -> None: ...
    def release(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def send_key(self, key: str) -> None: ...
    def send_console(self, chars: str) -> None: ...
    def screendump(self, path: Path, fmt: str = "ppm") -> None: ...
    def set_link(self, netdev: str, up: bool) -> None: ...


def make(machine_name: str, plan: dict[str, Any], preexec: Callable[[], None] | None = None,
         keep_disk: bool = False, **options: Any) -> Backend:
    """The backend for plan["backend"]; `options` go to it (e.g. route="api" for Firecracker)."""
    kind = plan.get("backend", "qemu")
    if kind == "qemu":
        from .qemu import QemuBackend

        return QemuBackend(machine_name, plan, preexec, keep_disk, **options)
    if kind == "firecracker":
        from .firecracker import FirecrackerBackend

        return FirecrackerBackend(machine_name, plan, preexec, keep_disk, **options)
    if kind == "cloud-hypervisor":
        from .cloud_hypervisor import CloudHypervisorBackend

        return CloudHypervisorBackend(machine_name, plan, preexec, keep_disk, **options)
    raise SetupError(f"{machine_name}: the launch plan's backend {kind!r} is not one this runner "
                     f"drives (known: {', '.join(KNOWN)})")

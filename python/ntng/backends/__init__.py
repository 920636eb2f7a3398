"""Backends, one per VMM: make() picks the one the launch plan was computed for (nixlib
decides the backend, the runner follows its plan)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..errors import SetupError
from ..plan import NodePlan, SnapshotLayout
from .console import ConsoleCallback

KNOWN = ("qemu", "firecracker", "cloud-hypervisor", "nspawn")
NOUNS = {"nspawn": "container"}  # what a machine of this backend is called in log lines


def noun(backend: str) -> str:
    """"vm", or "container" for nspawn: "starting container"."""
    return NOUNS.get(backend, "vm")


class Backend(Protocol):
    """What a Machine uses.  A method a backend cannot do raises MissingCapability, naming the
    feature of nixlib/capabilities.nix it lacks (the Machine's guard_methods says so first).

    Snapshots: `layout` is nixlib's clone.snapshot result for this node (directory, files, and
    the API calls that save and load it); snapshot_save writes it from the running VM (paused
    for it, running again after unless resume=False) and returns (bytes of VMM state, bytes of
    guest RAM written beside it); snapshot_restore starts the VMM from it instead of booting."""

    name: str
    proc: subprocess.Popen[bytes] | None
    console_callbacks: list[ConsoleCallback]
    console_artifact: Path | None  # console.log: lines appended as they arrive (console.py)

    @property
    def console_log(self) -> list[str]: ...
    @property
    def console_ended(self) -> bool: ...
    def get_console_lines(self) -> list[str]: ...
    def console_since(self, number: int) -> tuple[list[str], int]: ...
    def wait_console(self, number: int, timeout: float) -> bool: ...
    def close_console_artifact(self) -> None: ...

    @property
    def capabilities(self) -> frozenset[str]: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def reconnects(self) -> bool: ...
    @property
    def restarts_on_reboot(self) -> bool: ...
    @property
    def title(self) -> str: ...
    def exited_for_reboot(self) -> bool: ...
    def restart_if_rebooted(self) -> bool: ...
    def start(self) -> None: ...
    def connect_backdoor(self, timeout: float) -> socket.socket: ...
    def alive(self) -> bool: ...
    def stderr_tail(self) -> str: ...
    def console_tail(self, n: int = 20) -> str: ...
    def wait_exit(self, timeout: float | None) -> int | None: ...
    def quit(self) -> None: ...
    def kill(self) -> None: ...
    def release(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def send_key(self, key: str) -> None: ...
    def send_console(self, chars: str) -> None: ...
    def screendump(self, path: Path, fmt: str = "ppm") -> None: ...
    def set_link(self, netdev: str, up: bool) -> None: ...
    def snapshot_save(self, layout: SnapshotLayout, resume: bool = True) -> tuple[int, int]: ...
    def snapshot_restore(self, layout: SnapshotLayout) -> None: ...


def make(machine_name: str, plan: NodePlan, preexec: Callable[[], None] | None = None,
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
    if kind == "nspawn":
        from .nspawn import NspawnBackend

        return NspawnBackend(machine_name, plan, preexec, keep_disk, **options)
    raise SetupError(f"{machine_name}: the launch plan's backend {kind!r} is not one this runner "
                     f"drives (known: {', '.join(KNOWN)})")

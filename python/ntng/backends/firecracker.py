"""Firecracker backend: runs nixlib's Firecracker plan (nixlib/firecracker.nix) and drives the
VMM through its REST API on a unix socket.

Either route the plan offers: "config" (write `writeFiles`, run `argv`: Firecracker boots from
the config file) or "api" (run `apiRoute.argv`, then send `apiRoute.api` in order).  The serial
console is the VMM's stdout (copied to files.consoleLog) and its stdin; the backdoor is hybrid
vsock; logger and metrics write into the state directory.  Request bodies are the plan's or
follow Firecracker's API spec ($NTNG_SPECS/firecracker.yaml; the unit tests' fake Firecracker
enforces it).
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import vsock
from ..errors import SetupError
from ..plan import ApiCall, NodePlan, SnapshotLayout, vsock_port
from . import snapshot
from .vmm import ApiVmm, log_tail

INSTALL_HINT = 'install it or use backend = "qemu" with machineType = "microvm"'
ROUTES = ("config", "api")


class FirecrackerBackend(ApiVmm):
    name = "firecracker"
    ROUTES = ROUTES

    def __init__(self, machine_name: str, plan: NodePlan,
                 preexec: Callable[[], None] | None = None, keep_disk: bool = False,
                 route: str | None = None) -> None:
        super().__init__(machine_name, plan, preexec, keep_disk, route)

    # -- starting -----------------------------------------------------------------------------

    def start(self) -> None:
        if self.route == "config":
            self._launch(self.plan["argv"], self.plan["writeFiles"], self.plan["api"])
        else:
            self._launch(self.plan["apiRoute"]["argv"], {}, self.plan["apiRoute"]["api"])

    def snapshot_restore(self, layout: SnapshotLayout) -> None:
        """Start from a snapshot_save() layout instead of booting: a fresh Firecracker on a copy
        of the snapshot's disk, then nixlib's restore calls (logger, metrics, /snapshot/load with
        this plan's vsock socket and TAP devices; drives keep their paths, so this must be the
        machine the snapshot was taken of)."""
        self._check_binary(self.plan["apiRoute"]["argv"][0], INSTALL_HINT)
        snapshot.restore_disk(self, layout)
        self._launch(self.plan["apiRoute"]["argv"], {}, layout["restore"], keep=True)

    def _launch(self, argv: list[str], write_files: dict[str, Any], calls: list[ApiCall],
                keep: bool | None = None) -> None:
        self._check_binary(argv[0], INSTALL_HINT)
        self._prepare("coreutils", skip_disk_steps=True, keep=keep)
        for path, content in write_files.items():
            Path(path).write_text(json.dumps(content, indent=2) + "\n")
        self._spawn(argv, INSTALL_HINT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._pump_stdout_console()
        try:
            self.api.wait_listening(30, self.alive)
            for call in calls:
                self.api.request(call["method"], call["path"], call.get("body"))
            state = self.call("info")["state"]
        except SetupError as e:
            if self.wait_exit(1) is not None:  # it died (or is dying): say why
                raise SetupError(f"{e}\n{self._exit_report()}") from None
            raise
        self.paused = state == "Paused"

    def _exit_report(self) -> str:
        log = Path(self.plan["files"]["log"])
        return f"firecracker exited: {self.stderr_tail()}\nits log {log}: {log_tail(log)}"

    # -- console: the VMM's stdin (its stdout: VmmProcess._pump_stdout_console) ---------------

    def send_console(self, chars: str) -> None:
        if self.proc is None or self.proc.stdin is None or not self.alive():
            raise SetupError(f"{self.machine_name}: the VM is not running")
        try:
            self.proc.stdin.write(chars.encode())
            self.proc.stdin.flush()
        except OSError as e:  # it exited in the meantime
            raise SetupError(f"{self.machine_name}: the serial console is gone ({e})") from None

    # -- the running VM -----------------------------------------------------------------------

    # A vsock connection ends with the guest's agent (reboot, restart): the next one is new.
    reconnects = True

    def connect_backdoor(self, timeout: float) -> socket.socket:
        bd = self.plan["backdoor"]
        return vsock.connect_hybrid(bd["uds"], vsock_port(bd, self.machine_name), timeout=timeout, alive=self.alive)

    def pause(self) -> None:
        self.call("pause")
        self.paused = True

    def resume(self) -> None:
        self.call("resume")
        self.paused = False

    def snapshot_save(self, layout: SnapshotLayout, resume: bool = True) -> tuple[int, int]:
        """Full snapshot (nixlib's save calls) with a copy of the disk as it is then; Firecracker
        needs the VM paused: a running one is paused for it (and resumed after unless
        resume=False).  (vmstate bytes, guest memory bytes)."""
        Path(layout["directory"]).mkdir(parents=True, exist_ok=True)
        was_running = not self.paused
        if was_running:
            self.pause()
        try:
            for call in layout["save"]:
                self.api.request(call["method"], call["path"], call.get("body"), timeout=600)
            snapshot.save_disk(self, layout)
        finally:
            if was_running and resume:
                self.resume()
        return snapshot.saved_bytes(layout, "vmstate"), snapshot.saved_bytes(layout, "memory")

    def quit(self) -> None:
        """Like pulling the plug (Firecracker has no API call for it)."""
        self.kill()

    def kill(self) -> None:
        super().kill()
        self._remove_sockets()

    def release(self) -> None:
        """Stop the VM and clean up (process, sockets, console); safe to call twice."""
        if self.alive():
            try:  # the metrics file is written every 60 s: get the last numbers in
                self.call("flushMetrics", timeout=1)
            except SetupError:
                pass
        self.kill()
        if self.proc is not None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self._end_stdout_console(2)
        self._remove_sockets()

    # -- what Firecracker has not got ----------------------------------------------------------

    def send_key(self, key: str) -> None:
        raise self._lacks("keys", f"send_key({key!r})")

    def screendump(self, path: Path, fmt: str = "ppm") -> None:
        raise self._lacks("screenshot", "a screenshot")

    def set_link(self, netdev: str, up: bool) -> None:
        """No link switch in the API: block() downs the host's TAP device (the plan's link = "host")."""
        raise SetupError(f"{self.who}: no link switch in the VMM for {netdev}; its links are the host's "
                         "TAP devices (the plan's interfaces say link = \"host\")")

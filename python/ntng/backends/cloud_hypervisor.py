"""Cloud Hypervisor backend: runs nixlib's Cloud Hypervisor plan (nixlib/cloud-hypervisor.nix)
and drives the VMM through its REST API (/api/v1/...) on a unix socket.

Either route the plan offers: "api" (run `argv`, then send `api`: vm.create, vm.boot) or "cli"
(`cliArgv` creates and boots at once).  The serial console is a file the VMM writes
(files.consoleLog), followed here; the backdoor is the virtio-console's pty (its path from
vm.info, as the plan says) or hybrid vsock.  Request bodies are the plan's or follow
Cloud Hypervisor's API spec ($NTNG_SPECS/cloud-hypervisor.yaml; the unit tests' fake enforces it).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import vsock
from ..errors import SetupError
from ..plan import ApiCall, NodePlan, PtyLookup, SnapshotLayout, vsock_port
from ..unixhttp import ApiError
from . import ptyrelay, snapshot
from .console import follow_file
from .vmm import ApiVmm

INSTALL_HINT = ('install it (https://github.com/cloud-hypervisor/cloud-hypervisor/releases) '
                'or use backend = "qemu"')
ROUTES = ("api", "cli")


class CloudHypervisorBackend(ApiVmm):
    name = "cloud-hypervisor"
    ROUTES = ROUTES

    def __init__(self, machine_name: str, plan: NodePlan,
                 preexec: Callable[[], None] | None = None, keep_disk: bool = False,
                 route: str | None = None) -> None:
        super().__init__(machine_name, plan, preexec, keep_disk, route)
        self.pty: str | None = None  # the virtio-console's pseudo-terminal (virtconsole backdoor)
        self._stop_console = threading.Event()
        self._console_thread: threading.Thread | None = None

    # -- starting -----------------------------------------------------------------------------

    def start(self) -> None:
        if self.route == "api":
            self._launch(self.plan["argv"], self.plan["api"])
        else:
            self._launch(self.plan["cliArgv"], [])
        self.paused = False

    def snapshot_restore(self, layout: SnapshotLayout) -> None:
        """Start from a snapshot_save() layout instead of booting: a fresh VMM and nixlib's
        restore call (vm.restore) on a copy of the snapshot's disk (Cloud Hypervisor restores the
        devices at the paths they had, so this must be the machine the snapshot was taken of)."""
        self._check_binary(self.plan["argv"][0], INSTALL_HINT)
        snapshot.restore_disk(self, layout)
        self._launch(self.plan["argv"], layout["restore"], keep=True)
        self.paused = not all((c.get("body") or {}).get("resume", True) for c in layout["restore"])

    def _launch(self, argv: list[str], calls: list[ApiCall], keep: bool | None = None) -> None:
        self._check_binary(argv[0], INSTALL_HINT)
        self._prepare("coreutils", skip_disk_steps=True, keep=keep)
        # The VMM writes the serial console anew: an old file must not pass for this boot's.
        Path(self.plan["files"]["consoleLog"]).unlink(missing_ok=True)
        self._make_share_folders()
        self._start_helpers()  # virtiofsd for each share, listening before the VMM connects
        self._spawn(argv, INSTALL_HINT)
        self._start_console()
        try:
            self.api.wait_listening(30, self.alive)
            self.call("ping")
            for call in calls:
                self.api.request(call["method"], call["path"], call.get("body"))
            if self.plan["backdoor"]["transport"] == "virtconsole":
                self.pty = self._lookup(self.plan["backdoor"]["pty"])
        except SetupError as e:
            if self.wait_exit(1) is not None:  # it died (or is dying): say why
                raise SetupError(f"{e}\ncloud-hypervisor exited: {self.stderr_tail()}") from None
            raise

    def _lookup(self, where: PtyLookup, timeout: float = 10.0) -> str:
        """A string field of an API answer (the pty's path in vm.info).  With the command-line
        route the VM is created by the VMM itself, a moment after the API is up: 404 is retried."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value: Any = self.api.request(where["method"], where["path"])
                break
            except ApiError as e:
                if e.status != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        for key in where["field"]:
            if not isinstance(value, dict) or key not in value:
                raise SetupError(f"{self.who}: {where['method']} {where['path']} has no "
                                 f"{'.'.join(where['field'])} (the virtio-console's pty)")
            value = value[key]
        if not isinstance(value, str):
            raise SetupError(f"{self.who}: {'.'.join(where['field'])} is {value!r}, not a pty path")
        return value

    # -- console: the file the VMM writes -------------------------------------------------------

    def _start_console(self) -> None:
        self._stop_console = threading.Event()
        read = follow_file(Path(self.plan["files"]["consoleLog"]), self._stop_console)
        self._console_thread = threading.Thread(
            target=self._pump_console, args=(read,), name=f"console-{self.machine_name}", daemon=True)
        self._console_thread.start()

    def send_console(self, chars: str) -> None:
        raise self._lacks("consoleInput", "send_console (its serial console is a file: output only)")

    # -- the running VM -----------------------------------------------------------------------

    @property
    def reconnects(self) -> bool:
        """A vsock connection ends with the guest's agent; the virtio-console's pty outlives it."""
        return bool(self.plan["backdoor"]["transport"] == "vsock")

    def connect_backdoor(self, timeout: float) -> socket.socket:
        bd = self.plan["backdoor"]
        if bd["transport"] == "vsock":
            return vsock.connect_hybrid(bd["uds"], vsock_port(bd, self.machine_name), timeout=timeout,
                                        alive=self.alive)
        if self.pty is None:
            raise SetupError(f"{self.who}: the VM is not running (no virtio-console pty)")
        return ptyrelay.open_pty(self.pty, self.who)

    def pause(self) -> None:
        self.call("pause")
        self.paused = True

    def resume(self) -> None:
        self.call("resume")
        self.paused = False

    def send_key(self, key: str) -> None:
        """No keyboard; ctrl-alt-delete (what Machine.reboot sends) is the API's reboot."""
        if key != "ctrl-alt-delete":
            raise self._lacks("keys", f"send_key({key!r})")
        self.call("reboot")

    def snapshot_save(self, layout: SnapshotLayout, resume: bool = True) -> tuple[int, int]:
        """Snapshot (nixlib's vm.snapshot call) with a copy of the disk as it is then; Cloud
        Hypervisor needs the VM paused: a running one is paused for it (and resumed after
        unless resume=False).  (bytes of the VMM's files, 0: guest RAM is among them)."""
        directory = Path(layout["directory"])
        directory.mkdir(parents=True, exist_ok=True)
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
        own = {Path(p) for p in layout["files"].values() if isinstance(p, str)}
        return sum(f.stat().st_size for f in directory.iterdir() if f.is_file() and f not in own), 0

    def quit(self) -> None:
        """Like pulling the plug: the VMM shuts down at once (killed if it does not)."""
        if self.alive():
            try:
                self.call("shutdown", timeout=5)
            except SetupError:
                pass
        if self.wait_exit(10) is None:
            self.kill()

    def kill(self) -> None:
        super().kill()
        self._remove_sockets()

    def release(self) -> None:
        """Stop the VM and clean up (process, sockets, console); safe to call twice."""
        self.kill()
        self._stop_console.set()
        if self._console_thread is not None:
            self._console_thread.join(2)
        self.pty = None
        self._remove_sockets()

    # -- what Cloud Hypervisor has not got ------------------------------------------------------

    def screendump(self, path: Path, fmt: str = "ppm") -> None:
        raise self._lacks("screenshot", "a screenshot")

    def set_link(self, netdev: str, up: bool) -> None:
        """No link switch in the API: block() downs the host's TAP device (the plan's link = "host")."""
        raise SetupError(f"{self.who}: no link switch in the VMM for {netdev}; its links are the host's "
                         "TAP devices (the plan's interfaces say link = \"host\")")

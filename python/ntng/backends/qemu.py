"""QEMU backend: runs the launch plan nixlib computed, talks QMP, streams the serial console.

This module builds no command line: `plan` is nixlib.qemu.launch's output, executed verbatim.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import vsock
from ..client import connect_unix
from ..errors import ConnectionLost, SetupError
from ..plan import NodePlan, SnapshotLayout, vsock_port
from ..qmp import EventFilter, QMPClient
from . import qemu_migrate
from .vmm import VmmProcess

VHOST_VSOCK = "/dev/vhost-vsock"
# A human monitor command may do real work (drive_add, savevm, device_add of a USB disk):
# longer than a QMP command's usual 30 s, still bounded.
MONITOR_COMMAND_TIMEOUT = 300.0


class QemuBackend(VmmProcess):
    name = "qemu"

    def __init__(self, machine_name: str, plan: NodePlan,
                 preexec: Callable[[], None] | None = None, keep_disk: bool = False) -> None:
        super().__init__(machine_name, plan, preexec, keep_disk)
        self.qmp: QMPClient | None = None
        self._console_sock: socket.socket | None = None
        self._console_thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._launch(self.plan["argv"])

    def snapshot_restore(self, layout: SnapshotLayout) -> None:
        """Start from a snapshot instead of booting (the plan is a clone's: nixlib clone.plan)."""
        argv = self.plan.get("restoreArgv")
        if not argv:
            raise SetupError(f"{self.machine_name}: this plan is not a clone's (nixlib gives restoreArgv "
                             "only with `restore`)")
        self._launch(argv)
        ram = self.plan.get("restoreRam")
        qemu_migrate.restore(self.qmp_client(), layout, self.machine_name,
                             Path(ram["path"]) if ram and ram["kind"] == "file" else None)

    def snapshot_save(self, layout: SnapshotLayout, resume: bool = True) -> tuple[int, int]:
        """Freeze this VM into the layout's directory (qemu_migrate.save); the stream's size, RAM copied."""
        ram = self.plan.get("ram")
        memfd_ram = ram is not None and ram["kind"] == "memfd"
        return qemu_migrate.save(self.qmp_client(), layout, Path(self.plan["files"]["disk"]),
                                 self.machine_name, ram_pid=self.pid if memfd_ram else None,
                                 resume=resume)

    def _launch(self, argv: list[str]) -> None:
        if self.plan["backdoor"].get("vhost") and not os.path.exists(VHOST_VSOCK):
            raise SetupError(
                f"{self.machine_name}: backdoor.vhost = true needs {VHOST_VSOCK} (modprobe vhost_vsock; "
                "not available in nested or container setups), or leave backdoor.vhost = false for "
                "hybrid vsock through vhost-device-vsock"
            )
        self._prepare("apt-get install qemu-utils")
        self._make_share_folders()
        self._start_helpers()
        self._spawn(argv, "apt-get install qemu-system-x86 (or run ./setup.sh)")
        try:
            qsock = connect_unix(self.plan["sockets"]["qmp"], timeout=30, alive=self.alive)
            self.qmp = QMPClient(qsock, self.machine_name)
            self.qmp.negotiate()
            csock = connect_unix(self.plan["sockets"]["console"], timeout=30, alive=self.alive)
        except Exception:
            if not self.alive():
                raise SetupError(f"{self.machine_name}: QEMU exited at start: {self.stderr_tail()}") from None
            raise
        self._console_sock = csock
        self._console_thread = threading.Thread(
            target=self._read_console, name=f"console-{self.machine_name}", daemon=True
        )
        self._console_thread.start()

    @property
    def reconnects(self) -> bool:
        """Whether the backdoor connection ends with the guest's agent (vsock): then the next
        command opens a new one.  A virtio-serial port's socket outlives guest reboots."""
        return self.plan["backdoor"]["transport"] == "vsock"

    def connect_backdoor(self, timeout: float) -> socket.socket:
        backdoor = self.plan["backdoor"]
        if backdoor["transport"] == "vsock" and "cid" in backdoor:  # backdoor.vhost: AF_VSOCK
            return vsock.connect_vsock(backdoor["cid"], vsock_port(backdoor, self.machine_name),
                                       timeout=timeout, alive=self.alive)
        if backdoor["transport"] == "vsock":
            return vsock.connect_hybrid(backdoor["uds"], vsock_port(backdoor, self.machine_name),
                                        timeout=timeout, alive=self._vmm_and_helpers_alive)
        return connect_unix(self.plan["sockets"]["backdoor"], timeout=timeout, alive=self.alive)

    def _vmm_and_helpers_alive(self) -> bool:
        """QEMU runs; raises ConnectionLost when a helper failed (it exited or panicked), the
        hybrid vsock's multiplexer above all, which then answers no CONNECT: one would
        otherwise wait out the boot timeout."""
        failure = self.helper_failure()
        if failure is not None:
            raise ConnectionLost(f"{self.machine_name}: the backdoor cannot be reached: a helper failed: {failure}")
        return self.alive()

    def exited_for_reboot(self) -> bool:
        """QEMU with -no-reboot says SHUTDOWN (reason guest-reset) before it exits on a reboot."""
        if self.qmp is None or self.alive():
            return False
        try:
            event = self.qmp.wait_event({"SHUTDOWN"}, timeout=2)
        except Exception:  # no SHUTDOWN event: it died some other way
            return False
        return bool(event.get("data", {}).get("reason") == "guest-reset")

    def quit(self) -> None:
        """Like pulling the plug: QEMU exits at once."""
        try:
            self.qmp_client().command("quit", timeout=10)
        except Exception:
            pass
        if self.wait_exit(10) is None:
            self.kill()

    def release(self) -> None:
        """Stop the VM and close everything; safe to call twice."""
        self.kill()
        if self.qmp is not None:
            self.qmp.close()
        if self._console_sock is not None:
            try:
                self._console_sock.close()
            except OSError:
                pass
        if self._console_thread is not None:
            self._console_thread.join(2)

    # -- QMP conveniences ---------------------------------------------------------------------

    def qmp_client(self) -> QMPClient:
        """The running VM's QMP connection (SetupError when it is not running)."""
        if self.qmp is None:
            raise SetupError(f"{self.machine_name}: the VM is not running")
        return self.qmp

    def send_key(self, key: str) -> None:
        keys = [{"type": "qcode", "data": k} for k in key.split("-")]
        self.qmp_client().command("send-key", keys=keys)

    def screendump(self, path: Path, fmt: str = "ppm") -> None:
        """The display into a file; fmt "png" needs QEMU 7.1 (older ones reject the argument)."""
        extra: dict[str, Any] = {} if fmt == "ppm" else {"format": fmt}
        self.qmp_client().command("screendump", filename=str(path), **extra)

    def set_link(self, netdev: str, up: bool) -> None:
        self.qmp_client().command("set_link", name=netdev, up=up)

    def monitor_command(self, command: str) -> str:
        """A human monitor (HMP) command through QMP's human-monitor-command; its text output
        (HMP reports its errors there too, as text)."""
        out = self.qmp_client().command("human-monitor-command", timeout=MONITOR_COMMAND_TIMEOUT,
                                  **{"command-line": command})
        return str(out or "")

    def wait_for_qmp_event(self, event_filter: EventFilter, timeout: float) -> dict[str, Any]:
        """The first QMP event not yet handed out for which event_filter is true (qmp.wait_for)."""
        return self.qmp_client().wait_for(event_filter, timeout)

    def pause(self) -> None:
        self.qmp_client().command("stop")

    def resume(self) -> None:
        self.qmp_client().command("cont")

    # -- console ------------------------------------------------------------------------------

    def send_console(self, chars: str) -> None:
        if self._console_sock is None:
            raise SetupError(f"{self.machine_name}: the VM is not running")
        self._console_sock.sendall(chars.encode())

    def _read_console(self) -> None:
        sock = self._console_sock
        assert sock is not None
        self._pump_console(lambda: sock.recv(65536))

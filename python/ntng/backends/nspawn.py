"""systemd-nspawn backend: runs nixlib's container plan (nixlib/nspawn.nix); it builds no argv.

The container boots the image's configured tree under an overlay whose upper layer is the
node's "disk" (files.disk): made fresh at a run's first start, kept across crash()/start() and
reboots, and with -K across runs; the cache is never written.  nspawn runs as PID 1 of its own
PID namespace (the plan's `unshare --pid --kill-child`), so its container dies with it, and it
with the runner (PDEATHSIG).  The console is nspawn's stdout (--console=read-only: the
container's /dev/console); the backdoor is the agent's unix socket in the bind-mounted
backdoor folder, where the run's key is too.

A guest reboot ends nspawn (exit status 133, plan["rebootExitStatus"]) and the Machine starts
it again on the same upper layer; ctrl-alt-delete is SIGINT to the container's init, a
poweroff SIGRTMIN+4 (systemd's signals for them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .. import backdoorkey, paths
from ..client import connect_unix
from ..errors import SetupError
from .vmm import VmmProcess

# systemd (PID 1) runs ctrl-alt-del.target on SIGINT and powers off on SIGRTMIN+4.
CTRL_ALT_DEL = signal.SIGINT
POWEROFF = signal.SIGRTMIN + 4
CONSOLE_JOIN_TIMEOUT = 2.0


class NspawnBackend(VmmProcess):
    name = "nspawn"
    # No pause: a container has no VMM to stop (the cgroup freezer needs a unit of its own).
    RUNTIME_CAPABILITIES = frozenset({"powerdown"})
    # The socket's connection ends with the agent (a reboot, a restart): the next one is new.
    reconnects = True

    def __init__(self, machine_name: str, plan: dict[str, Any],
                 preexec: Callable[[], None] | None = None, keep_disk: bool = False) -> None:
        super().__init__(machine_name, plan, preexec, keep_disk)
        # The node's state folder (VmmProcess takes the disk's parent: here the layer folder).
        self.state_dir = Path(plan["files"]["consoleLog"]).parent
        self.stderr_path = self.state_dir / "nspawn.stderr"
        self.layer = Path(plan["files"]["layer"])
        self.upper = Path(plan["files"]["disk"])
        self._console_thread: threading.Thread | None = None
        self._console_copy: IO[bytes] | None = None

    # -- starting -----------------------------------------------------------------------------

    def start(self) -> None:
        for tool in self.plan["checkBinaries"]:
            self._check_binary(tool["path"], tool["missing"])
        tree = Path(self.plan["tree"])
        if not (tree / "sbin" / "init").exists() and not (tree / "usr" / "sbin" / "init").exists():
            raise SetupError(f"{self.machine_name}: no root tree with an init at {tree}: rebuild the "
                             "guest image (`ntng image build`), which keeps the tree for containers")
        self._prepare_folders()
        self._spawn(self.plan["argv"], self.plan["missing"], stdout=subprocess.PIPE)
        self._start_console()

    def _prepare_folders(self) -> None:
        """Private state and backdoor folders, the upper layer fresh unless kept (-K, or a
        restart within the run), no work folder of an earlier nspawn, a fresh key."""
        paths.private_dir(self.state_dir)
        if not (self.keep_disk and self.upper.is_dir()):
            shutil.rmtree(self.layer, ignore_errors=True)
        for folder in self.plan["folders"]:
            paths.private_dir(Path(folder))
        self._remove_work_folders()
        self._remove_sockets()
        backdoorkey.write(self.plan)  # in the bind-mounted folder: root-only in the container

    def _remove_work_folders(self) -> None:
        """overlayfs's work folders (nspawn names them .#<upper><random>) are of no use once
        the container is gone, and a new one is made at every start."""
        if self.layer.is_dir():
            for work in self.layer.glob(".#*"):
                shutil.rmtree(work, ignore_errors=True)

    # -- console: nspawn's stdout -------------------------------------------------------------

    def _start_console(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        copy = self._console_copy = open(self.plan["files"]["consoleLog"], "wb", buffering=0)
        self._console_thread = threading.Thread(
            target=self._pump_console, args=(lambda: os.read(fd, 65536), copy.write),
            name=f"console-{self.machine_name}", daemon=True)
        self._console_thread.start()

    # -- the running container ----------------------------------------------------------------

    def connect_backdoor(self, timeout: float) -> socket.socket:
        return connect_unix(self.plan["backdoor"]["socket"], timeout=timeout, alive=self.alive)

    def exited_for_reboot(self) -> bool:
        return self.proc is not None and self.proc.poll() == self.plan["rebootExitStatus"]

    def container_init(self) -> int | None:
        """The host pid of the container's init: unshare's child is nspawn, nspawn's is init."""
        if not self.alive():
            return None
        assert self.proc is not None
        nspawn = _children(self.proc.pid)
        init = _children(nspawn[0]) if nspawn else []
        return init[0] if init else None

    def _signal_init(self, sig: int, what: str) -> None:
        pid = self.container_init()
        if pid is None:
            raise SetupError(f"{self.machine_name}: {what}: the container is not running")
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            raise SetupError(f"{self.machine_name}: {what}: the container is not running") from None

    def send_key(self, key: str) -> None:
        """Only ctrl-alt-delete, which a container's init gets as SIGINT (Machine.reboot)."""
        if key not in ("ctrl-alt-delete", "ctrl-alt-del"):
            raise self._lacks("keys", f"send_key({key!r})")
        self._signal_init(CTRL_ALT_DEL, "ctrl-alt-delete")

    def powerdown(self) -> None:
        self._signal_init(POWEROFF, "powerdown")

    def quit(self) -> None:
        """Like pulling the plug: the whole PID namespace goes at once."""
        self.kill()

    def kill(self) -> None:
        super().kill()
        self._remove_sockets()

    def release(self) -> None:
        """Stop the container and clean up (processes, sockets, console, overlay work folder);
        the upper layer stays for a restart (the run's state folder goes at the run's end, or
        stays with -K).  Safe to call twice."""
        self.kill()
        if self._console_thread is not None:
            self._console_thread.join(CONSOLE_JOIN_TIMEOUT)
        if self._console_copy is not None:
            self._console_copy.close()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self._remove_work_folders()
        self._remove_sockets()

    # -- what a container has not got ---------------------------------------------------------

    def pause(self) -> None:
        raise self._lacks("pause", "pause()")

    def resume(self) -> None:
        raise self._lacks("pause", "resume()")

    def send_console(self, chars: str) -> None:
        raise self._lacks("console input", "send_console()")

    def screendump(self, path: Path, fmt: str = "ppm") -> None:
        raise self._lacks("screenshot", "a screenshot")

    def set_link(self, netdev: str, up: bool) -> None:
        raise self._lacks("link", f"setting {netdev} {'up' if up else 'down'}")


def _children(pid: int) -> list[int]:
    """A process's children, oldest first (/proc/<pid>/task/<pid>/children)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(w) for w in text.split()]

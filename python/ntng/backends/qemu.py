"""QEMU backend: runs the launch plan nixlib computed, talks QMP, streams the serial console.

This module builds no command line: `plan` is nixlib.qemu.launch's output, executed verbatim.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import pdeathsig
from ..client import connect_unix
from ..errors import SetupError
from ..qmp import QMPClient

CAPABILITIES = frozenset({"console", "screenshot", "keys", "reboot", "powerdown", "pause"})

ConsoleCallback = Callable[[str], None]


class QemuBackend:
    name = "qemu"
    capabilities = CAPABILITIES

    def __init__(self, machine_name: str, plan: dict[str, Any],
                 preexec: Callable[[], None] | None = None, keep_disk: bool = False) -> None:
        self.machine_name = machine_name
        self.plan = plan
        self.preexec = preexec  # runs in the child before exec: enters the test's network namespace
        self.keep_disk = keep_disk
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QMPClient | None = None
        self.console_lines: collections.deque[str] = collections.deque(maxlen=2000)
        self.console_log: list[str] = []
        self.console_callbacks: list[ConsoleCallback] = []
        self._console_sock: socket.socket | None = None
        self._console_thread: threading.Thread | None = None
        self.state_dir = Path(plan["files"]["disk"]).parent

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for sock in self.plan["sockets"].values():
            Path(sock).unlink(missing_ok=True)
        disk = Path(self.plan["files"]["disk"])
        # A kept disk (-K) is booted as it is; the prepare steps would make a fresh overlay.
        keep = self.keep_disk and disk.exists()
        if not keep:
            disk.unlink(missing_ok=True)
        for cmd in [] if keep else self.plan["prepare"]:
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            except FileNotFoundError:
                raise SetupError(f"{self.machine_name}: {cmd[0]} not found (apt-get install qemu-utils)") from None
            if r.returncode != 0:
                raise SetupError(f"{self.machine_name}: `{' '.join(cmd)}` failed: {r.stderr.strip()}")
        argv = self.plan["argv"]
        self.stderr_path = self.state_dir / "qemu.stderr"
        try:
            with open(self.stderr_path, "wb") as err:
                self.proc = pdeathsig.spawn(
                    argv, then=self.preexec, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True
                )
        except FileNotFoundError:
            raise SetupError(
                f"{self.machine_name}: {argv[0]} not found: apt-get install qemu-system-x86 (or run ./setup.sh)"
            ) from None
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

    def connect_backdoor(self, timeout: float) -> socket.socket:
        return connect_unix(self.plan["sockets"]["backdoor"], timeout=timeout, alive=self.alive)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stderr_tail(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace").strip()[-600:] or "(no output)"
        except OSError:
            return "(no output)"

    def wait_exit(self, timeout: float | None) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def powerdown(self) -> None:
        self._qmp().command("system_powerdown")

    def quit(self) -> None:
        """Like pulling the plug: QEMU exits at once."""
        try:
            self._qmp().command("quit", timeout=10)
        except Exception:
            pass
        if self.wait_exit(10) is None:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # exited (and was reaped elsewhere) in the meantime
            self.proc.wait()

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

    def _qmp(self) -> QMPClient:
        if self.qmp is None:
            raise SetupError(f"{self.machine_name}: the VM is not running")
        return self.qmp

    def send_key(self, key: str) -> None:
        keys = [{"type": "qcode", "data": k} for k in key.split("-")]
        self._qmp().command("send-key", keys=keys)

    def screendump(self, path: Path, fmt: str = "ppm") -> None:
        """The display into a file; fmt "png" needs QEMU 7.1 (older ones reject the argument)."""
        extra: dict[str, Any] = {} if fmt == "ppm" else {"format": fmt}
        self._qmp().command("screendump", filename=str(path), **extra)

    def set_link(self, netdev: str, up: bool) -> None:
        self._qmp().command("set_link", name=netdev, up=up)

    def pause(self) -> None:
        self._qmp().command("stop")

    def resume(self) -> None:
        self._qmp().command("cont")

    # -- console ------------------------------------------------------------------------------

    def send_console(self, chars: str) -> None:
        if self._console_sock is None:
            raise SetupError(f"{self.machine_name}: the VM is not running")
        self._console_sock.sendall(chars.encode())

    def _read_console(self) -> None:
        assert self._console_sock is not None
        buf = b""
        try:
            while True:
                data = self._console_sock.recv(65536)
                if not data:
                    break
                buf += data
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    self._console_line(raw.decode(errors="replace").rstrip("\r"))
        except OSError:
            pass
        if buf:
            self._console_line(buf.decode(errors="replace"))

    def _console_line(self, line: str) -> None:
        self.console_lines.append(line)
        self.console_log.append(line)
        for cb in list(self.console_callbacks):
            cb(line)

    def console_tail(self, n: int = 20) -> str:
        return "\n".join(list(self.console_lines)[-n:]) or "(the console printed nothing)"

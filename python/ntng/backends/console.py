"""The serial console as lines: kept for console_tail and the artifact log, handed to callbacks.

Shared by every backend; only where the bytes come from differs (QEMU's console socket,
Firecracker's stdout, the file Cloud Hypervisor writes).
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

ConsoleCallback = Callable[[str], None]
Read = Callable[[], bytes]  # blocks for some bytes; b"" at the end


class ConsoleLines:
    """Mixin: console_lines (recent), console_log (all since start, for the artifact),
    console_callbacks (the driver's watcher); _pump_console feeds them from a byte stream."""

    console_lines: collections.deque[str]
    console_log: list[str]
    console_callbacks: list[ConsoleCallback]

    def _init_console(self) -> None:
        self.console_lines = collections.deque(maxlen=2000)
        self.console_log = []
        self.console_callbacks = []

    def _pump_console(self, read: Read, copy: Callable[[bytes], None] | None = None) -> None:
        """Split `read`'s bytes into lines until it ends; `copy` also gets the raw bytes."""
        buf = b""
        try:
            while True:
                data = read()
                if not data:
                    break
                if copy is not None:
                    copy(data)
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


def follow_file(path: Path, stop: threading.Event, poll: float = 0.05) -> Read:
    """A Read over a file another process writes: waits for it to appear, starts again from
    the top when it shrinks (a new writer truncated it), and ends once `stop` is set and all
    that was written has been read.  Backends unlink the file before each VMM start, so one
    follower sees one writer."""
    state: dict[str, int] = {"pos": 0}

    def read() -> bytes:
        while True:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                fd = -1
            if fd >= 0:
                try:
                    if os.fstat(fd).st_size < state["pos"]:  # truncated: a new writer
                        state["pos"] = 0
                    data = os.pread(fd, 65536, state["pos"])
                finally:
                    os.close(fd)
                if data:
                    state["pos"] += len(data)
                    return data
            if stop.is_set():
                return b""
            time.sleep(poll)

    return read

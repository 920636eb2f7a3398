"""The serial console as lines: a bounded tail kept for console_tail and waiters, streamed to
the console.log artifact, handed to callbacks.

Shared by every backend; only where the bytes come from differs (QEMU's console socket,
Firecracker's stdout, the file Cloud Hypervisor writes).
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

ConsoleCallback = Callable[[str], None]
Read = Callable[[], bytes]  # blocks for some bytes; b"" at the end

# A guest may print without newlines for ever: a longer "line" is cut into pieces of this many
# bytes.  Real console lines are far shorter; 64 KiB keeps a cut rare and each piece cheap.
CONSOLE_MAX_LINE = 64 * 1024
# The console kept in memory (console_tail, get_console_log, wait_for_console_text): the last
# lines of this boot up to about this many characters (each line also counts LINE_COST).  The
# whole console is in the console.log artifact; 4 MiB holds hours of a normal boot's lines.
CONSOLE_TAIL_CHARS = 4 * 1024 * 1024
LINE_COST = 64  # characters each kept line counts for besides its text: its objects
# The console.log artifact: lines are appended as they arrive up to this many bytes, then one
# "truncated" marker, and at the VM's stop the lines still in memory.  256 MiB is far more
# than a test's console; a flooding guest cannot fill the host's disk.  Raise it here.
CONSOLE_ARTIFACT_BYTES = 256 * 1024 * 1024


class ConsoleLines:
    """Mixin: the console of one VMM run as lines.  A bounded tail stays in memory (numbered,
    for waiters), every line goes to console_callbacks (the driver's watcher) and is appended to
    console_artifact (set before start) as it arrives; _pump_console feeds them from a stream."""

    console_callbacks: list[ConsoleCallback]
    console_artifact: Path | None

    def _init_console(self) -> None:
        self.console_callbacks = []
        self.console_artifact = None
        self._tail: collections.deque[tuple[int, str]] = collections.deque()
        self._tail_cost = 0
        self._next_line = 0  # number of the next line (lines since start)
        self._console_ended = False
        self._console_cond = threading.Condition()
        self._artifact_lock = threading.Lock()
        self._artifact_file: BinaryIO | None = None
        self._artifact_room = 0  # bytes the open artifact may still take
        self._unwritten_from: int | None = None  # first line not streamed (the cap was reached)

    def _restart_console(self) -> None:
        """A new run of the same VMM (restart on reboot): its lines replace the kept ones and
        are numbered on from the last run's (a waiter's line count stays valid); callbacks and
        the artifact carry on."""
        with self._console_cond:
            self._tail.clear()
            self._tail_cost = 0
            self._console_ended = False

    # -- reading the stream ---------------------------------------------------------------------

    def _pump_console(self, read: Read, copy: Callable[[bytes], None] | None = None) -> None:
        """Split `read`'s bytes into lines until it ends; `copy` also gets the raw bytes (up to
        CONSOLE_ARTIFACT_BYTES).  Each byte is searched once: cost linear in the input."""
        buf = bytearray()
        copied = 0
        try:
            while True:
                data = read()
                if not data:
                    break
                if copy is not None and copied < CONSOLE_ARTIFACT_BYTES:
                    copy(data[:CONSOLE_ARTIFACT_BYTES - copied])
                    copied += len(data)
                new_from = len(buf)
                buf += data
                lines, used = split_lines(buf, new_from)
                del buf[:used]
                self._console_lines(lines)
        except OSError:
            pass
        finally:
            self._console_lines([bytes(buf)] if buf else [])
            with self._console_cond:
                self._console_ended = True
                self._console_cond.notify_all()

    def _console_lines(self, raws: list[bytes]) -> None:
        """Keep, stream and hand on a batch of lines (one lock and one write for all)."""
        if not raws:
            return
        lines = [raw.decode(errors="replace") for raw in raws]
        with self._console_cond:
            first = self._next_line
            self._next_line += len(lines)
            tail = self._tail
            for number, line in enumerate(lines, first):
                tail.append((number, line))
                self._tail_cost += len(line) + LINE_COST
            while self._tail_cost > CONSOLE_TAIL_CHARS and len(tail) > 1:
                self._tail_cost -= len(tail.popleft()[1]) + LINE_COST
            self._console_cond.notify_all()
        self._stream(first, raws)
        for line in lines:
            for cb in list(self.console_callbacks):
                cb(line)

    # -- what is kept ---------------------------------------------------------------------------

    @property
    def console_log(self) -> list[str]:
        """The lines kept in memory (the last CONSOLE_TAIL_CHARS of this run's console)."""
        return self.get_console_lines()

    def get_console_lines(self) -> list[str]:
        with self._console_cond:
            return [line for _, line in self._tail]

    def console_since(self, number: int) -> tuple[list[str], int]:
        """Kept lines numbered `number` and later (fewer if older ones were dropped), and the
        number of the next line to come."""
        with self._console_cond:
            first = self._tail[0][0] if self._tail else self._next_line
            skip = max(0, number - first)
            lines = [line for _, line in itertools.islice(self._tail, skip, None)]
            return lines, self._next_line

    def wait_console(self, number: int, timeout: float) -> bool:
        """Wait until line `number` exists or the console ended; whether either happened."""
        with self._console_cond:
            return self._console_cond.wait_for(
                lambda: self._next_line > number or self._console_ended, max(0.0, timeout))

    @property
    def console_ended(self) -> bool:
        """The console stream ended (the VMM closed it)."""
        return self._console_ended

    def console_tail(self, n: int = 20) -> str:
        with self._console_cond:
            last = [line for _, line in list(self._tail)[-n:]] if n > 0 else []
        return "\n".join(last) or "(the console printed nothing)"

    # -- the artifact ---------------------------------------------------------------------------

    def _stream(self, first: int, raws: list[bytes]) -> None:
        """Append lines `first`, … to the artifact while it has room; past the cap, one marker."""
        with self._artifact_lock:
            if self.console_artifact is None or self._unwritten_from is not None:
                return
            if self._artifact_file is None:
                self.console_artifact.parent.mkdir(parents=True, exist_ok=True)
                self._artifact_file = open(self.console_artifact, "ab")  # noqa: SIM115 - closed in close_console_artifact
                self._artifact_room = CONSOLE_ARTIFACT_BYTES - self._artifact_file.tell()
            data = b"\n".join(raws) + b"\n"
            if len(data) > self._artifact_room:
                fit = 0  # how many of the lines fit
                for raw in raws:
                    if len(raw) + 1 > self._artifact_room:
                        break
                    self._artifact_room -= len(raw) + 1
                    fit += 1
                data = b"".join(raw + b"\n" for raw in raws[:fit]) + (
                    f"[ntng: console.log truncated here: it reached CONSOLE_ARTIFACT_BYTES = "
                    f"{CONSOLE_ARTIFACT_BYTES} bytes (raise it in ntng/backends/console.py); "
                    "the last lines of this boot follow once the VM stops]\n").encode()
                self._unwritten_from = first + fit
            else:
                self._artifact_room -= len(data)
            self._artifact_file.write(data)
            self._artifact_file.flush()  # once per read: the artifact is current if we die

    def close_console_artifact(self) -> None:
        """Finish console.log: past the cap, the kept lines not yet written (after a count of
        the ones lost).  Lines that arrive later open it again."""
        with self._artifact_lock:
            f, self._artifact_file = self._artifact_file, None
            if f is None:
                return
            with f:
                if self._unwritten_from is not None:
                    lines, _ = self.console_since(self._unwritten_from)
                    lost = self._next_line - self._unwritten_from - len(lines)
                    if lost:
                        f.write(f"[ntng: {lost} lines not kept]\n".encode())
                    f.writelines(line.encode() + b"\n" for line in lines)
            self._unwritten_from = None


def split_lines(buf: bytearray, new_from: int) -> tuple[list[bytes], int]:
    """The complete lines in `buf` (newlines searched from `new_from` on only: the bytes before
    held none), without CR LF, and the pieces of a line longer than CONSOLE_MAX_LINE; and how
    many bytes of `buf` they used."""
    lines: list[bytes] = []
    pos = 0
    while (nl := buf.find(b"\n", new_from)) >= 0:
        while nl - pos > CONSOLE_MAX_LINE:
            lines.append(bytes(buf[pos:pos + CONSOLE_MAX_LINE]))
            pos += CONSOLE_MAX_LINE
        end = nl - 1 if nl > pos and buf[nl - 1] == 0x0D else nl
        lines.append(bytes(buf[pos:end]))
        pos = new_from = nl + 1
    while len(buf) - pos >= CONSOLE_MAX_LINE:
        lines.append(bytes(buf[pos:pos + CONSOLE_MAX_LINE]))
        pos += CONSOLE_MAX_LINE
    return lines, pos


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

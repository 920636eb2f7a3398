#!/usr/bin/env python3
"""The in-guest backdoor agent: serves the ntng protocol on a virtio-serial port (or a socket).

stdlib + construct only; `protocol.py` (python/ntng/protocol.py) is installed beside this file.
One reader thread decodes frames; each request runs in threads of its own so many can be in
flight; all writes go through one lock so frames never interleave.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import functools
import grp
import mmap
import os
import pty
import pwd
import queue
import select
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
import tty
import zlib
from collections.abc import Callable
from typing import Any

try:
    from ntng import protocol as P
except ImportError:  # in the guest: protocol.py sits next to this file
    import protocol as P  # type: ignore[no-redef]

AGENT_VERSION = P.PACKAGE_VERSION
CAPABILITIES = ["exec", "stdin", "pty", "file-put", "file-get", "signal", "ping", "identity", "crc32"]
DEFAULT_PORT_NAME = "org.ntng.backdoor"
# Where QEMU's fw_cfg shows the run's backdoor key (nixlib/qemu.nix: -fw_cfg name=opt/org.ntng/
# backdoor-key); the qemu_fw_cfg module makes it, readable by root only.
FW_CFG_ROOT = "/sys/firmware/qemu_fw_cfg"
FW_CFG_KEY = f"{FW_CFG_ROOT}/by_name/opt/org.ntng/backdoor-key/raw"
FW_CFG_MODULE = "qemu_fw_cfg"
MAX_KEY_BYTES = 4096  # read no more of a key file than this (the runner writes 32 bytes)
# A container (systemd-nspawn) has no kernel command line of its own: /proc/cmdline is the
# host's, and systemd reads its own arguments instead when this file says it runs in one.
CONTAINER_MARKER = "/run/systemd/container"
# The container transport (`ntng.backdoor=unix:<folder>`): the runner bind-mounts a private
# folder of its state directory at <folder>; the agent listens there and finds the run's key.
FOLDER_SOCKET = "backdoor.sock"
FOLDER_KEY = "backdoor-key"


def log(msg: str) -> None:
    print(f"ntng-agent: {msg}", file=sys.stderr, flush=True)


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


class Disconnected(Exception):
    pass


PORT_BUFFER = 4096  # what a virtio-serial port hands out per read when more is queued
PORT_WRITE = 32 * 1024  # the most a virtio-serial port takes per write
UNALIGNED_PIECES = 16  # iovecs built per readv when the buffer is off the 4 KiB grid
READ_BUFFER = P.CHUNK * 16  # 1 MiB: several maximal frames a batch
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # a command's, when the agent has none


class Connection:
    """A byte pipe to the host: read() returns b"" on disconnect; write() sends everything."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd, self.wfd = rfd, wfd
        self._lock = threading.Lock()
        # Reads land in one buffer kept for the connection: os.read(fd, 1 MiB) allocates (mmap)
        # and frees 1 MiB per call, which in a TCG guest cost ~0.6 ms per PING (measured).
        self._rview = memoryview(bytearray(READ_BUFFER))
        # The same buffer as PORT_BUFFER-sized pieces, for a readv that takes many port buffers
        # in one syscall (see read()).
        self._pages = [self._rview[i : i + PORT_BUFFER] for i in range(0, READ_BUFFER, PORT_BUFFER)]

    def read(self, n: int) -> bytes | memoryview:
        """Block for some bytes, then take whatever else is ready (up to n, at most
        READ_BUFFER).  A view into the connection's buffer, valid until the next read: the
        reader feeds it to its decoder (which copies) at once, so no copy is made here.

        A virtio-serial port hands out at most one 4 KiB guest buffer per read() call of its
        driver, which has no read_iter: the kernel runs a readv() as one read() per iovec and
        goes on to the next while each comes back full.  So the batch is a non-blocking readv
        over 4 KiB pieces of the buffer: one syscall takes every buffer that is queued (it ends
        at the first short one or at EAGAIN), where a read() per buffer cost ~25 us of Python
        each under TCG.  A socket fills the pieces in order, as one read would.
        """
        view = self._rview[:n]
        try:
            size = os.readv(self.rfd, [view])
            if size < PORT_BUFFER:
                return view[:size]  # a short read: nothing else was queued
            os.set_blocking(self.rfd, False)  # writers on the same fd wait out EAGAIN (below)
            try:
                while size < n:
                    if size % PORT_BUFFER == 0 and n % PORT_BUFFER == 0:
                        pieces = self._pages[size // PORT_BUFFER : n // PORT_BUFFER]
                    else:  # after a short buffer (a host write ended there): pieces from here
                        end = min(n, size + UNALIGNED_PIECES * PORT_BUFFER)
                        pieces = [view[o : min(o + PORT_BUFFER, end)] for o in range(size, end, PORT_BUFFER)]
                    try:
                        more = os.readv(self.rfd, pieces)
                    except BlockingIOError:
                        break
                    if not more:
                        break
                    size += more
            finally:
                os.set_blocking(self.rfd, True)
            return view[:size]
        except OSError:
            return b""

    def _write_some(self, data: Any) -> int:
        while True:
            try:
                return os.write(self.wfd, data)
            except BlockingIOError:  # the reader's batch made the shared fd non-blocking
                select.select([], [self.wfd], [], 1.0)
            except OSError as e:
                raise Disconnected(str(e)) from None

    def writev(self, parts: list[Any]) -> None:
        """Send the parts in order (a frame's header, payload view, trailer) with gathering
        writes.  A port takes at most 32 KiB a write and the kernel runs a writev as one
        write per iovec while each is taken whole, so large parts are cut into 32 KiB pieces:
        one syscall then moves a whole frame (it was one per 32 KiB)."""
        with self._lock:
            views = []
            for part in parts:
                view = memoryview(part)
                if len(view) <= PORT_WRITE:
                    if len(view):
                        views.append(view)
                    continue
                views += [view[i : i + PORT_WRITE] for i in range(0, len(view), PORT_WRITE)]
            while views:
                try:
                    n = os.writev(self.wfd, views)
                except BlockingIOError:
                    select.select([], [self.wfd], [], 1.0)
                    continue
                except OSError as e:
                    raise Disconnected(str(e)) from None
                while views and n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                if views and n:
                    views[0] = views[0][n:]

    def let_go(self) -> None:
        """Stop using the fds before their owner closes them (accept_forever): a write still
        under way ends first, and a late one from a task of the ended session (a worker
        between its checks) fails as a disconnect, where it would have gone to whatever the
        fd number is next: the next host's connection, accepted as the same number."""
        with self._lock:
            self.rfd = self.wfd = -1

    def write(self, data: bytes) -> None:
        with self._lock:
            try:  # a small frame goes whole: one call, no view (a PONG's, an EXIT's path)
                sent = os.write(self.wfd, data)
            except OSError:  # EAGAIN (the reader's batch), or a port gone: _write_some decides
                sent = 0
            if sent < len(data):
                view = memoryview(data)[sent:]
                while view:
                    view = view[self._write_some(view):]


class Task:
    """One request in flight."""

    def __init__(self, session: Session, rid: int) -> None:
        self.session, self.rid = session, rid
        self.send_window = P.SendWindow(session.window)
        self.recv_window = P.ReceiveWindow(session.window)

    def on_data(self, ftype: int, data: bytes, crc: int | None = None) -> None:
        """A data frame's payload; `crc` is zlib.crc32(data) when the decoder computed it."""
        self.session.error(self.rid, P.ErrorCode.BAD_PAYLOAD, f"unexpected data frame {ftype}")

    def on_signal(self, signum: int) -> None:
        pass

    def cancel(self) -> None:
        self.send_window.close("connection closed")

    def send_data(self, ftype: int, data: bytes | memoryview, deadline: float | None = None) -> None:
        """Send data under flow control, cut into frames that fit the credit (TimeoutError
        when the peer grants none until `deadline`)."""
        view = memoryview(data)
        while view:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            n = self.send_window.take(min(len(view), self.session.max_frame), left)
            self.session.send_payload(ftype, self.rid, view[:n])
            view = view[n:]


class ExecTask(Task):
    # Defaults as class attributes: each assignment in __init__/_watch_pipes is an interpreted
    # line per command, and each costs guest CPU under TCG (docs/benchmarks.md).
    timed_out = False
    aborted = False  # the link failed: no EXIT
    pty = False
    stdin_queue: queue.SimpleQueue[bytes] | None = None
    timeout: float | None = None
    deadline: float | None = None
    outputs: list[Any]  # the output pipes still open: plain fds (Spawned) or files (Popen)
    grown: frozenset[int] = frozenset()  # output pipes grown to 1 MiB
    proc: Any  # a Spawned (posix_spawn) or a subprocess.Popen

    def __init__(self, session: Session, rid: int) -> None:
        # No ReceiveWindow until the command takes stdin (_take_stdin): a Python call fewer per
        # command, and each call costs the guest ~20-30 us under TCG (docs/benchmarks.md).
        self.session, self.rid = session, rid
        self.send_window = P.SendWindow(session.window)

    def _take_stdin(self) -> None:
        self.recv_window = P.ReceiveWindow(self.session.window)
        self.stdin_queue = queue.SimpleQueue()

    def start(self, req: Any, flags: int = 0) -> None:
        """A command that is not served inline (Session.serve_inline): it takes stdin, a
        terminal, another user or cwd, or came in a batch of frames; a worker serves it."""
        self.started = time.monotonic()
        if req.timeout_ms:
            self.timeout = req.timeout_ms / 1000
            self.deadline = self.started + self.timeout
        argv, env = _command(req)
        kwargs: dict[str, Any] = {}
        cwd = req.cwd or None
        if req.user:
            try:
                pw = pwd.getpwnam(req.user)
            except KeyError:
                raise OSError(f"no such user: {req.user}") from None
            groups = [g.gr_gid for g in grp.getgrall() if pw.pw_name in g.gr_mem]
            kwargs.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=groups)
            # The user's own variables, unless the request sets them (its env wins).
            user_env = dict(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name, SHELL=pw.pw_shell)
            requested = {e["key"] for e in req.env}
            env = {**env, **{k: v for k, v in user_env.items() if k not in requested}}
            cwd = cwd or (pw.pw_dir if os.path.isdir(pw.pw_dir) else "/")
        if req.pty:
            self.pty = True
            # One terminal for stdin/stdout/stderr, made the command's controlling tty.
            master, slave = pty.openpty()
            try:
                self.proc = subprocess.Popen(
                    argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd or "/", env=env,
                    start_new_session=True, preexec_fn=_pty_child, **kwargs,
                )
            finally:
                os.close(slave)
            out = os.fdopen(master, "rb", buffering=0)
            if req.stdin:
                self._take_stdin()
                self._spawn(self._feed_stdin, os.fdopen(os.dup(master), "wb", buffering=0))
            self.pumps = [self._spawn(self._pump, out, P.FrameType.STDOUT)]
            self._spawn(self._wait)
            return
        stdin = req.stdin
        if not kwargs and (cwd or "/") == _agent_cwd():
            self.proc = _spawn_fast(argv, env, stdin, req.merge_stderr)
        else:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT if req.merge_stderr else subprocess.PIPE,
                cwd=cwd or "/",
                env=env,
                start_new_session=True,  # own process group, so a timeout kills all of it
                bufsize=0,
                # restore_signals covers Python's own; a preexec_fn (fork, not vfork) only
                # when the agent ignores more
                preexec_fn=_default_signals if _ignored_signals() != _PYTHON_IGNORED else None,
                **kwargs,
            )
        if self.proc.stdin is not None:
            self._take_stdin()
            self._spawn(self._feed_stdin, self.proc.stdin)
        self._spawn(self._serve_pipes)

    def adopt(self, req: Any, started: float, proc: Spawned, inline: InlineState) -> None:
        """Go on with a command Session.serve_inline started and could not finish inline: its
        state becomes this task's, and a worker serves the rest (_serve_pipes)."""
        self.started, self.proc = started, proc
        if req.timeout_ms:
            self.timeout = req.timeout_ms / 1000
            self.deadline = started + self.timeout
        self.poller, self.pipes, self.grown = inline.poller, inline.pipes, inline.grown
        self.outputs = [proc.stdout] if proc.stderr is None else [proc.stdout, proc.stderr]
        if inline.closed:
            self._close_pipes()
        self.send_window = P.SendWindow(inline.credit)
        self._spawn(self._serve_pipes)

    def _spawn(self, fn: Callable[..., None], *args: Any) -> threading.Event:
        return WORKERS.run(fn, *args)

    def _pump(self, pipe: Any, ftype: int) -> None:
        try:
            while True:
                try:
                    chunk = pipe.read(self.session.chunk)
                except OSError:  # EIO: the pty's last writer is gone
                    break
                if not chunk:
                    break
                self.send_data(ftype, chunk)
        except (P.ProtocolError, Disconnected):
            self.kill()
        finally:
            pipe.close()

    def _serve_pipes(self) -> None:
        """Pump stdout and stderr, then reap the command and send EXIT, all in one thread:
        under TCG each thread started costs ~2 ms, a third of a short command's round trip."""
        if not hasattr(self, "pipes"):
            self._watch_pipes()
        _batch_scheduling(True)  # as inline: a producer fills the pipe before the pump wakes
        try:
            self._pump_pipes()
        finally:
            _batch_scheduling(False)
        if not self.aborted:
            self._end_pipes()
        else:
            self.proc.wait()  # killed (_abort): reaped here, not left a zombie of the agent

    def _watch_pipes(self) -> None:
        out: Any = self.proc.stdout  # always a pipe (or the pty)
        err: Any = self.proc.stderr
        self.poller = poller = select.poll()
        self.outputs = [out] if err is None else [out, err]  # plain fds (Spawned) or files (Popen)
        if not isinstance(out, int):
            out = out.fileno()
            err = None if err is None else err.fileno()
        self.pipes = {out: P.FrameType.STDOUT}
        poller.register(out, select.POLLIN)
        if err is not None:
            self.pipes[err] = P.FrameType.STDERR
            poller.register(err, select.POLLIN)

    def _pump_pipes(self) -> None:
        """Move output until both pipes end (`aborted` when the link failed, `timed_out` when
        the deadline passed or the host granted no credit until it), on a worker."""
        pipes, poller = self.pipes, self.poller
        try:
            while pipes:
                left = None if self.deadline is None else self.deadline - time.monotonic()
                if left is not None and left <= 0:
                    if self.timed_out:  # killed 5 s ago, and a child that escaped still holds a pipe
                        self.send_window.close("command timed out")
                        break
                    self.timed_out = True
                    self.kill()
                    self.deadline = time.monotonic() + 5
                    continue
                for fd, revents in poller.poll(None if left is None else max(1, int(left * 1000))):
                    if revents != select.POLLHUP and self._move(fd, self.session.max_frame):
                        continue
                    poller.unregister(fd)
                    del pipes[fd]
        except TimeoutError:  # the host granted no credit until the deadline
            self.timed_out = True
        except (P.ProtocolError, Disconnected):
            self._abort()

    def _move(self, fd: int, size: int) -> bool:
        """Read up to `size` bytes of output from `fd` and send them; False at its end."""
        view = _thread_buffer(self.session.max_frame)[:size]
        try:
            got = os.readv(fd, [view])
        except OSError:
            return False
        if not got:
            return False
        if got == PIPE_DEFAULT and fd not in self.grown:
            self.grown = self.grown | {fd}
            _grow_pipe(fd)
        self.send_data(self.pipes[fd], view[:got], self.deadline)  # copied into the kernel: the view is free again
        return True

    def _abort(self) -> None:
        """The link failed while output moved: no EXIT can be sent."""
        self.kill()
        self._close_pipes()
        self.aborted = True

    def _close_pipes(self) -> None:
        for stream in self.outputs:
            if isinstance(stream, int):
                os.close(stream)
            else:
                stream.close()
        self.outputs = []

    def _end_pipes(self) -> None:
        self._close_pipes()
        try:
            left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            self.proc.wait(left)  # the command may have closed its output and gone on
        except subprocess.TimeoutExpired:
            self.timed_out = True
        if self.timed_out:
            self.kill()
            self.proc.wait()
        self._report(self.timed_out)

    def _wait(self) -> None:
        """The pty path: wait for the command, then for its output pump."""
        timed_out = False
        try:
            self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill()
            self.proc.wait()
        deadline = None if self.timeout is None else self.started + self.timeout + 5
        for done in self.pumps:
            # A background child may keep the pipes open; the timeout still bounds the wait.
            if not done.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                timed_out = True
                self.kill()
                self.send_window.close("command timed out")
                done.wait()
        self._report(timed_out)

    def _report(self, timed_out: bool) -> None:
        rc = self.proc.returncode
        # The EXIT ends the command's output streams (no end-of-stream frames).  Arguments
        # positional: code, signal, timed_out, duration_us (keywords cost under TCG).
        frames = P.exec_end(self.rid, rc if rc >= 0 else -1, -rc if rc < 0 else 0, timed_out,
                            int((time.monotonic() - self.started) * 1e6))
        if self.stdin_queue is not None:
            self.stdin_queue.put(b"")  # later STDIN is dropped: end the feeder thread now
        self.session.finish(self.rid, frames)

    def _feed_stdin(self, pipe: Any) -> None:
        """Write host data to the command; blocking here never stalls the reader thread."""
        broken = False
        queued = self.stdin_queue
        assert queued is not None  # made before this feeder starts
        while True:
            data = queued.get()
            if data and not broken:
                try:
                    pipe.write(data)
                except (BrokenPipeError, ValueError, OSError):
                    broken = True  # the command stopped reading: like a pipe, drop the rest
            if data:
                credit = self.recv_window.consumed(len(data))
                if credit:
                    try:
                        self.session.send(P.credit_frame(self.rid, credit))
                    except Disconnected:
                        return
                continue
            try:
                if self.pty:
                    pipe.write(b"\x04")  # end of input on a terminal is ^D, not a close
                pipe.close()
            except OSError:
                pass
            return

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if getattr(self, "proc", None) is not None:
            _kill_group(self.proc.pid, signum)

    def on_signal(self, signum: int) -> None:
        self.kill(signum)

    def cancel(self) -> None:
        super().cancel()
        self.kill()
        if self.stdin_queue is not None:
            self.stdin_queue.put(b"")

    def on_data(self, ftype: int, data: bytes, crc: int | None = None) -> None:
        if ftype != P.FrameType.STDIN or self.stdin_queue is None:
            return super().on_data(ftype, data)
        self.recv_window.received(len(data))
        self.stdin_queue.put(data)


class PutTask(Task):
    writer: DirectWriter | None = None  # the file's O_DIRECT writer, when it has one

    def start(self, req: Any, flags: int = 0) -> None:
        self.req = req
        self.fd = -1  # cancel() runs when makedirs/open below fail
        directory = os.path.dirname(req.path) or "."
        if req.mkdirs:
            os.makedirs(directory, exist_ok=True)
        self.tmp = os.path.join(directory, f".{os.path.basename(req.path)}.ntng-{self.rid}")
        self.fd, direct = _open_for_put(self.tmp, direct=bool(flags & P.FLAG_DIRECT) and req.size >= DIRECT_FROM)
        if direct:
            self.writer = DirectWriter(self.fd)
        self.hash = P.file_checksum(flags)
        self.size = 0

    def on_data(self, ftype: int, data: bytes, crc: int | None = None) -> None:
        if ftype != P.FrameType.FILE_DATA:
            return super().on_data(ftype, data)
        self.recv_window.received(len(data))
        if data:
            if self.writer is not None:
                self.writer.write(data)
            else:
                _write_all(self.fd, data)
            self.hash.update(data, crc)  # the frame's check computed crc: no second pass
            self.size += len(data)
            credit = self.recv_window.consumed(len(data))
            if credit:
                self.session.send(P.credit_frame(self.rid, credit))
            return
        if self.writer is not None:
            self.writer.finish()
            self.writer = None
        os.close(self.fd)
        self.fd = -1
        digest = self.hash.digest()
        if (self.req.sha256 and digest != self.req.sha256) or self.size != self.req.size:
            os.unlink(self.tmp)
            raise TaskError(
                P.ErrorCode.CHECKSUM,
                f"{self.req.path}: received {self.size} bytes with {self.hash.name} {digest.hex()}, "
                f"expected {self.req.size} bytes with {self.hash.name} {self.req.sha256.hex()}",
            )
        os.chmod(self.tmp, self.req.mode)
        if self.req.owner:
            user, _, group = self.req.owner.partition(":")
            uid = pwd.getpwnam(user).pw_uid if user else -1
            gid = grp.getgrnam(group).gr_gid if group else -1
            os.chown(self.tmp, uid, gid)
        os.rename(self.tmp, self.req.path)
        done = P.FileDone(size=self.size, sha256=digest, mode=self.req.mode)
        self.session.finish(self.rid, done.frame(self.rid))

    def cancel(self) -> None:
        super().cancel()
        if self.writer is not None:
            self.writer.discard()
            self.writer = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            try:
                os.unlink(self.tmp)
            except OSError:
                pass


def _pty_child() -> None:
    _default_signals()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the terminal becomes the command's controlling tty


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# A file put this large, with FLAG_DIRECT, is written with O_DIRECT where its filesystem allows:
# in a TCG guest a buffered write runs the page-cache copy and the writeback in emulated code
# (58-72 MB/s into ext4 on virtio-blk, measured), a direct one hands the pages to the VMM
# (510-1210 MB/s).  Natively (a container, KVM) the page cache is the faster path, so the host
# asks only for an emulated guest.  Smaller files stay buffered: a direct write waits for the
# device, each file once at least.
DIRECT_FROM = 8 << 20
DIRECT_CHUNK = 4 << 20  # staged, then written whole: 1 MiB direct writes ran at 510-565 MB/s
DIRECT_ALIGN = 4096  # offsets, lengths and the buffer: a page covers every block size


def _open_for_put(path: str, direct: bool) -> tuple[int, bool]:
    """(fd, opened with O_DIRECT): `direct` asks for it, the filesystem may refuse."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o600), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this filesystem has no direct I/O
                raise
    return os.open(path, flags, 0o600), False


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))


class DirectWriter:
    """Writes a file opened with O_DIRECT through one page-aligned staging buffer (DIRECT_CHUNK
    of memory per put in flight), in aligned whole chunks; the last one is padded to a page and
    the file cut back to its size.  A filesystem that opens O_DIRECT but refuses a write
    (EINVAL) gets the rest as plain writes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = mmap.mmap(-1, DIRECT_CHUNK)  # anonymous: page-aligned, zeroed
        self.view = memoryview(self.buf)
        self.fill = 0
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        src = memoryview(data)
        while src:
            n = min(len(src), DIRECT_CHUNK - self.fill)
            self.view[self.fill : self.fill + n] = src[:n]
            self.fill += n
            self.size += n
            src = src[n:]
            if self.fill == DIRECT_CHUNK:
                self._flush(DIRECT_CHUNK)

    def finish(self) -> None:
        """Write what is staged and give the file its exact size."""
        if self.fill:
            padded = -(-self.fill // DIRECT_ALIGN) * DIRECT_ALIGN
            self.view[self.fill : padded] = bytes(padded - self.fill)
            self._flush(padded)
            if padded != self.fill:
                os.ftruncate(self.fd, self.size)
        self.discard()

    def discard(self) -> None:
        self.view.release()
        try:
            self.buf.close()
        except BufferError:  # a slice held by an exception being handled: the GC frees it
            pass

    def _flush(self, length: int) -> None:
        view = self.view[:length]
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except OSError as e:
                if e.errno != errno.EINVAL or not _is_direct(self.fd):
                    raise
                # Nothing was written: the same bytes again, buffered (F_SETFL may drop O_DIRECT).
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.fill = 0


class GetTask(Task):
    def start(self, req: Any, flags: int = 0) -> None:
        self.file = open(req.path, "rb", buffering=0)  # errors surface as FILE_FAILED
        self.path = req.path
        self.flags = flags
        WORKERS.run(self._run)

    def _run(self) -> None:
        """Read into one buffer, send each frame with a gathering write: no copy of the data
        in Python besides the read itself (each copy counts at TCG's memcpy speed)."""
        h = P.file_checksum(self.flags)
        size = 0
        buf = memoryview(bytearray(self.session.max_frame))
        try:
            with self.file:
                fd = self.file.fileno()
                mode = os.fstat(fd).st_mode & 0o7777
                while True:
                    n = self.send_window.take(len(buf))
                    got = os.readv(fd, [buf[:n]])
                    if got < n:
                        self.send_window.grant(n - got)  # credit taken but not used
                    if not got:
                        break
                    part = buf[:got]
                    # One CRC-32 pass serves the frame's trailer and the whole-file CRC
                    # (combined); with sha256 the frame CRC is its own pass.
                    crc = zlib.crc32(part) if isinstance(h, P.Crc32) else None
                    h.update(part, crc)
                    size += got
                    self.session.send_payload(P.FrameType.FILE_DATA, self.rid, part, crc)
            self.session.send(P.encode_frame(P.FrameType.FILE_DATA, self.rid))
            done = P.FileDone(size=size, sha256=h.digest(), mode=mode)
            self.session.finish(self.rid, done.frame(self.rid))
        except OSError as e:
            self.session.fail(self.rid, P.ErrorCode.FILE_FAILED, f"{self.path}: {e.strerror}")
        except (P.ProtocolError, Disconnected):
            pass


class Workers:
    """Threads kept for the next request: under TCG starting a thread costs ~3-12 ms (stack
    mmap, clone, the new thread's first run), handing work to an idle one a futex wake-up."""

    MAX_IDLE = 8

    def __init__(self) -> None:
        self._idle: list[queue.SimpleQueue[tuple[Callable[..., object], tuple[Any, ...], threading.Event]]] = []
        self._lock = threading.Lock()

    def run(self, fn: Callable[..., object], *args: Any) -> threading.Event:
        """Run fn(*args) on an idle worker (or a new one); the event is set when it returns
        (what it returns is dropped)."""
        done = threading.Event()
        with self._lock:
            q = self._idle.pop() if self._idle else None
        if q is None:
            q = queue.SimpleQueue()
            threading.Thread(target=self._work, args=(q,), daemon=True).start()
        q.put((fn, args, done))
        return done

    def _work(self, q: queue.SimpleQueue[tuple[Callable[..., object], tuple[Any, ...], threading.Event]]) -> None:
        while True:
            fn, args, done = q.get()
            try:
                fn(*args)
            except Exception as e:  # as an uncaught exception in a thread of its own would be
                log(f"task {fn.__qualname__} failed: {e!r}")
            finally:
                done.set()
            with self._lock:
                if len(self._idle) >= self.MAX_IDLE:
                    return
                self._idle.append(q)


WORKERS = Workers()
# A plain command (no stdin, no pty) is served on the reader's thread for up to INLINE_FOR
# while the host sends nothing; after its output ends it is given INLINE_REAP to exit.
INLINE_FOR = 1.0
INLINE_REAP = 0.05
# A waiting shell (ShellWaiter) starts once the host has sent nothing for this long after the
# `bash -c` command that asked for it (Session.start_shell_when_quiet).
SHELL_QUIET = 0.01


class Spawned:
    """A command started with posix_spawn: the part of Popen's interface the agent uses, with
    stdout/stderr as plain fds (ints)."""

    def __init__(self, pid: int, stdin: Any, stdout: int, stderr: int | None) -> None:
        self.pid, self.stdin, self.stdout, self.stderr = pid, stdin, stdout, stderr
        self.returncode: int | None = None

    def returned_within(self, timeout: float) -> bool:
        """The command has exited (reaped now if it had); else waited for up to `timeout`."""
        if self.returncode is not None:
            return True
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)
            return True
        return self._exited_within(timeout)

    def wait(self, timeout: float | None = None) -> int:
        if timeout is not None and not self.returned_within(timeout):
            raise subprocess.TimeoutExpired(str(self.pid), timeout)
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def _exited_within(self, timeout: float) -> bool:
        """Wait on a pidfd (no polling loop as Popen.wait(timeout) has); False: still running."""
        try:
            fd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # an old kernel: poll the way Popen does
            end = time.monotonic() + timeout
            delay = 0.0005
            while True:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
                    return True
                if time.monotonic() >= end:
                    return False
                time.sleep(min(delay, max(0.0, end - time.monotonic())))
                delay = min(delay * 2, 0.05)
        try:
            if not select.select([fd], [], [], max(0.0, timeout))[0]:
                return False
        finally:
            os.close(fd)
        _, status = os.waitpid(self.pid, 0)  # it has exited: reaped now, as returned_within says
        self.returncode = os.waitstatus_to_exitcode(status)
        return True


def _kill_group(pid: int, signum: int = signal.SIGKILL) -> None:
    """Signal a command's process group (its own session: posix_spawn's setsid, Popen's
    start_new_session); one that is gone already is no error."""
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


_PYTHON_IGNORED = (signal.SIGPIPE, signal.SIGXFSZ)  # what Popen's restore_signals resets


@functools.cache
def _ignored_signals() -> tuple[int, ...]:
    """The signals a command must get back to SIG_DFL: the ones the agent ignores.  Python
    ignores SIGPIPE and SIGXFSZ itself (Popen's restore_signals resets only those); an agent
    started as a background job of a non-interactive shell also ignores SIGINT and SIGQUIT,
    under nohup SIGHUP, and exec keeps an ignored signal ignored: a SIGNAL frame or a
    timeout's SIGINT/SIGTERM would then not stop the command.  Read once (~64 getsignal
    calls; the agent never changes its dispositions), and only these are reset: a sigaction
    per signal in the spawned child is a syscall each under TCG."""
    ignored = {s for s in signal.valid_signals()
               if s not in (signal.SIGKILL, signal.SIGSTOP) and signal.getsignal(s) == signal.SIG_IGN}
    return tuple(sorted(ignored.union(_PYTHON_IGNORED)))


def _default_signals() -> None:
    """Popen's preexec_fn (user, cwd or pty commands): the ignored signals back to SIG_DFL."""
    for s in _ignored_signals():
        signal.signal(s, signal.SIG_DFL)


F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, named in Python 3.10+
PIPE_DEFAULT = 65536  # a pipe's size until F_SETPIPE_SZ


def _grow_pipe(fd: int) -> None:
    """A 1 MiB stdout pipe (64 KiB by default): a command printing much fills larger frames,
    so fewer Python iterations per byte in the agent.  Best effort (pipe-max-size may refuse).
    Done once a read comes back full, not for every command: a syscall costs under TCG."""
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass


_BUFFERS = threading.local()


def _thread_buffer(size: int) -> memoryview:
    """This thread's read buffer of at least `size` bytes, kept: os.read(fd, 256 KiB) allocates
    (mmap) and frees 256 KiB per call, even for the read that finds EOF (costly under TCG)."""
    buf: memoryview | None = getattr(_BUFFERS, "buf", None)
    if buf is None or len(buf) < size:
        buf = _BUFFERS.buf = memoryview(bytearray(size))
    return buf


@functools.cache
def _agent_env() -> dict[str, str]:
    """The agent's environment as a plain dict, read once (callers copy it): copying os.environ
    decodes every variable again (~0.2 ms a command under TCG).  The agent never changes it."""
    return dict(os.environ)


@functools.cache
def _command_env() -> dict[str, str]:
    """A plain command's environment: the agent's with a default PATH, made once (a command
    never changes the dict it is spawned with)."""
    env = dict(_agent_env())
    env.setdefault("PATH", DEFAULT_PATH)
    return env


def _command(req: Any) -> tuple[list[str], dict[str, str]]:
    """An EXEC's argv and environment as the agent's user (the caller must not change the
    environment: a plain command's is the one _command_env made)."""
    if not (req.shell or req.env or req.clear_env):
        return req.argv, _command_env()
    argv = list(req.argv) if not req.shell else ["/bin/sh", "-c", req.shell]
    env = {} if req.clear_env else dict(_agent_env())
    env.setdefault("PATH", DEFAULT_PATH)
    for e in req.env:
        env[e["key"]] = e["value"]
    return argv, env


_SCHED_PARAM = os.sched_param(0)


def _batch_scheduling(on: bool) -> None:
    """SCHED_BATCH for the calling thread (the reader serving a command inline, or a worker
    pumping one's output) while it waits: a waking SCHED_BATCH thread does not preempt the
    running one.  An exiting command closes stdout,
    then stderr, then exits, and a normal (nice -20) agent preempted it at each step: three
    wake-ups, each running the agent's code cold under TCG; batched, one wake-up sees all
    three (measured in a guest: the poll path's cost over spawn+waitpid 1.6 → 0.6 ms).  The
    command was spawned before, under the normal policy, and keeps it; the nice value stays."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH if on else os.SCHED_OTHER, _SCHED_PARAM)
    except (AttributeError, OSError):  # not Linux, or a policy this kernel refuses
        pass


@functools.cache
def _agent_cwd() -> str:
    """The agent's working directory, read once (a syscall and a str per command under TCG):
    the agent never changes it."""
    return os.getcwd()


@functools.cache
def _devnull() -> int:
    """/dev/null for commands without stdin, opened once (close-on-exec; dup'ed onto fd 0)."""
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


# argv[0] found on a PATH, kept: the C library's posix_spawnp tries execve in each directory
# before the one that has it, and under TCG each failed execve costs ~1 ms (it sets up a new
# address space and copies the environment before it looks for the file): `true` on Debian's
# PATH was 1-2 ms a command (bench/backdoor.py --gap).  An entry is (the path found, the paths
# execvp would have tried before it).  A hit is good while none of those exists (one access()
# each, ~10 us under TCG; a stat per directory cost ~100 us with its result object); a spawn
# that fails on a remembered path searches again (_spawn_fast).  Cleared at PATH_CACHE_MAX.
_PATH_CACHE: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}
PATH_CACHE_MAX = 512


def _which(name: str, path: str) -> str:
    """argv[0] resolved on the command's own PATH as execvp would (the first executable file;
    PermissionError when only non-executable ones exist), from _PATH_CACHE when it is current."""
    if "/" in name:
        return name
    hit = _PATH_CACHE.get((name, path))
    if hit is not None:
        for earlier in hit[1]:  # inline: each Python call costs the guest ~20-30 us under TCG
            if os.access(earlier, os.F_OK, follow_symlinks=False):
                break  # something appeared before the remembered one: search again
        else:
            return hit[0]
    return _search_path(name, path)


def _search_path(name: str, path: str) -> str:
    """The first executable `name` on `path`, remembered in _PATH_CACHE when nothing of that
    name exists before it (a non-executable file or a directory there would fail every check)."""
    earlier: list[str] = []
    for d in path.split(os.pathsep):
        candidate = os.path.join(d or ".", name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            if not any(os.path.lexists(e) for e in earlier):
                if len(_PATH_CACHE) >= PATH_CACHE_MAX:
                    _PATH_CACHE.clear()
                _PATH_CACHE[(name, path)] = (candidate, tuple(earlier))
            return candidate
        earlier.append(candidate)
    if any(os.path.lexists(e) for e in earlier):
        raise PermissionError(13, "Permission denied", name)
    raise FileNotFoundError(2, "No such file or directory", name)


def _spawn_fast(argv: list[str], env: dict[str, str], stdin: bool, merge_stderr: bool,
                ready: tuple[int, int, int, int] | None = None) -> Spawned:
    """posix_spawn (vfork + exec in C) in its own session with pipes: in a TCG guest Popen's
    Python-side work costs more than the exec (measured in bench/agent_steps.py).  Only for a
    command in the agent's cwd as the agent's user; our fds are all close-on-exec (PEP 446).
    `ready`: stdout and stderr pipes made beforehand (ReadyPipes), (out_r, out_w, err_r, err_w);
    closed here when the command does not start, as the pipes made here are."""
    fds: list[int] = list(ready) if ready is not None else []
    try:
        if not argv:
            raise OSError("empty argv")
        path = env.get("PATH", os.defpath)
        exe = argv[0] if "/" in argv[0] else _which(argv[0], path)  # a call fewer for a path
        if stdin:
            in_r, in_w = os.pipe()
            fds += [in_r, in_w]
        else:
            in_r = in_w = _devnull()
        if ready is not None:
            out_r, out_w, err_r, err_w = ready
        else:
            out_r, out_w = os.pipe()
            fds += [out_r, out_w]
            if merge_stderr:
                err_r, err_w = -1, out_w
            else:
                err_r, err_w = os.pipe()
                fds += [err_r, err_w]
        # Ignored signals back to SIG_DFL (else `yes | head` prints "Broken pipe" and SIGINT
        # stops nothing), and start with no signal blocked.
        actions = [(os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
        try:
            pid = os.posix_spawn(exe, argv, env, setsid=True, setsigdef=_ignored_signals(), setsigmask=(),
                                 file_actions=actions)
        except OSError:
            if _PATH_CACHE.pop((argv[0], path), None) is None:
                raise
            # A remembered path that no longer runs (removed, chmod -x): search as execvp would.
            exe = _which(argv[0], path)
            pid = os.posix_spawn(exe, argv, env, setsid=True, setsigdef=_ignored_signals(), setsigmask=(),
                                 file_actions=actions)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    os.close(out_w)
    if err_w != out_w:
        os.close(err_w)
    if stdin:
        os.close(in_r)
    # Output pipes stay plain fds: a FileIO around each, opened and closed, was ~0.5 ms of
    # a command under TCG (profiled), and the agent only readv()s them.
    return Spawned(pid, os.fdopen(in_w, "wb", buffering=0) if stdin else None, out_r, err_r if err_r >= 0 else None)


# The frames that start a request, and the task serving each.
STARTERS: dict[int, type[Task]] = {
    P.FrameType.EXEC: ExecTask,
    P.FrameType.FILE_PUT: PutTask,
    P.FrameType.FILE_GET: GetTask,
}


class ReadyPipes:
    """The next inline command's stdout and stderr pipes, and a poll over them and the host
    connection, made after a command's EXIT went out, while the agent waits for the next
    request: two pipe() calls, a poll object and three registrations taken off the command's
    critical path (with the closes and the scheduling policy's restore after the EXIT, 0.59 ms
    of the agent's wait for a command under TCG: docs/benchmarks.md, the tenth round).  Four
    close-on-exec fds, closed with the session (Session.cancel_all)."""

    def __init__(self, host_fd: int) -> None:
        self.host_fd = host_fd
        out_r, out_w = os.pipe()
        try:
            err_r, err_w = os.pipe()
        except OSError:
            os.close(out_r)
            os.close(out_w)
            raise
        self.fds = (out_r, out_w, err_r, err_w)  # as _spawn_fast takes them
        self.poller, self.pipes = _watch_inline(out_r, err_r, host_fd)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def _watch_inline(out: int, err: int | None, host_fd: int) -> tuple[Any, dict[int, int]]:
    """An inline command's poll over its output pipes and the host connection, and its pipes'
    stream types (Session.serve_inline; `err` None: stderr merged into stdout)."""
    poller = select.poll()
    poller.register(out, select.POLLIN)
    pipes = {out: STDOUT_TYPE}
    if err is not None:
        poller.register(err, select.POLLIN)
        pipes[err] = STDERR_TYPE
    poller.register(host_fd, select.POLLIN)
    return poller, pipes


# The script a waiting shell runs: wait for the go byte on fd 4 (EOF: the agent is gone, run
# nothing), take the command's script from fd 3 (a memfd: seekable, so bash reads it whole
# where it reads a pipe a byte per syscall), close both, and eval it.  `bash -c` and eval give
# the same messages (but a syntax error's), line numbers, $0 and errexit behaviour
# (tests/unit/test_agent_local.py); SECONDS restarts with the command, and $_ is what bash
# started with (the environment's _, else argv[0]), as `bash -c` would have it.
SHELL_WAITER = ('printf -v __ntng_ %q "$_"; read -r -n 1 -u 4 __ntng || exit 125; '
                "IFS= read -r -d '' -u 3 __ntng; exec 3<&- 4<&-; SECONDS=0; "
                'eval "unset __ntng __ntng_; : $__ntng_; $__ntng"')


def _fd_above_stdio(fd: int) -> int:
    """`fd` moved to 10 or above (close-on-exec; the original closed): a spawn that dup2s
    fds onto 0-4 in turn cannot overwrite it before its own dup2 (the go pipe's read end as
    3 would be, by the script's)."""
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    finally:
        os.close(fd)


class OpenSpawn:
    """posix_spawn through the C library with the interpreter's lock released (ctypes releases
    it around a foreign call).  os.posix_spawn holds it from vfork until the child's execve has
    loaded the program, and every other agent thread waited that long: under TCG a request sent
    right after a succeed, while the next command's bash was spawned, took 0.1 ms (PING) to
    1.1 ms (run) more (docs/benchmarks.md, the twelfth round).  For ShellStarter's spawns; commands on the
    reader's own thread keep os.posix_spawn (nothing else waits on them there).  The same
    child as os.posix_spawn(exe, argv, env, setsid=True, setsigdef=..., setsigmask=(),
    file_actions=DUP2s) makes; None when this C library has no such calls (the caller then
    uses os.posix_spawn)."""

    # glibc's <spawn.h>
    SETSIGDEF, SETSIGMASK, SETSID = 0x04, 0x08, 0x80

    def __init__(self) -> None:
        import ctypes

        self._c = ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        self._spawn = libc.posix_spawn
        self._actions_init = libc.posix_spawn_file_actions_init
        self._adddup2 = libc.posix_spawn_file_actions_adddup2
        self._actions_destroy = libc.posix_spawn_file_actions_destroy
        attr_init, setflags = libc.posix_spawnattr_init, libc.posix_spawnattr_setflags
        setflags.argtypes = [ctypes.c_void_p, ctypes.c_short]
        # Opaque C types by size, generously: 80, 336 and 128 bytes in glibc on x86-64.
        self._attr = (ctypes.c_uint64 * 128)()
        self._fa_type = ctypes.c_uint64 * 64
        if attr_init(self._attr) or setflags(self._attr, self.SETSIGDEF | self.SETSIGMASK | self.SETSID):
            raise OSError("posix_spawnattr")
        default, empty = (ctypes.c_uint64 * 32)(), (ctypes.c_uint64 * 32)()
        libc.sigemptyset(default)
        libc.sigemptyset(empty)
        for sig in _ignored_signals():
            libc.sigaddset(default, sig)
        if libc.posix_spawnattr_setsigdefault(self._attr, default) or libc.posix_spawnattr_setsigmask(self._attr, empty):
            raise OSError("posix_spawnattr")
        self._envp: tuple[dict[str, str], Any] | None = None

    def __call__(self, exe: str, argv: list[str], env: dict[str, str], dups: list[tuple[int, int]]) -> int:
        """The child's pid; OSError as os.posix_spawn raises it."""
        c = self._c
        if self._envp is None or self._envp[0] is not env:  # the agent's command env: made once
            pairs = [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
            self._envp = (env, (c.c_char_p * (len(pairs) + 1))(*pairs, None))
        args = (c.c_char_p * (len(argv) + 1))(*[os.fsencode(a) for a in argv], None)
        actions = self._fa_type()
        err = self._actions_init(actions)
        if err:
            raise OSError(err, f"posix_spawn_file_actions_init: {os.strerror(err)}")
        try:
            for fd, target in dups:
                err = self._adddup2(actions, fd, target)
                if err:
                    raise OSError(err, os.strerror(err))
            pid = c.c_int()
            err = self._spawn(c.byref(pid), os.fsencode(exe), actions, self._attr, args, self._envp[1])
        finally:
            self._actions_destroy(actions)
        if err:
            raise OSError(err, f"{os.strerror(err)}: {exe!r}")
        return pid.value


@functools.cache
def _open_spawn() -> OpenSpawn | None:
    try:
        return OpenSpawn()
    except (ImportError, OSError, AttributeError) as e:  # no ctypes, or not glibc
        log(f"spawning waiting shells with os.posix_spawn: {e!r}")
        return None


class ShellWaiter:
    """A `bash -c` started before its script is known (ntng's Machine.run and succeed send
    every string command as `bash -c 'set -euo pipefail; …'`): asked for after such a
    command's EXIT and started by SHELLS at SCHED_IDLE, it loads while the guest has nothing
    else to run, and the next such command only hands it its script.  Under TCG bash's start
    is most of a command's time (docs/benchmarks.md, the eleventh round).  Its stdout and
    stderr pipes and their poll are made with it, as ReadyPipes' are.  Guest-side only: the
    host cannot tell; a script can by its shell's command line (the waiter's) and a syntax
    error's message.  Killed with the session (Session.cancel_all)."""

    def __init__(self, host_fd: int, env: dict[str, str]) -> None:
        self.host_fd = host_fd
        exe = _which("bash", env.get("PATH", os.defpath))
        fds: list[int] = []
        try:
            script = _fd_above_stdio(os.memfd_create("ntng-script", os.MFD_CLOEXEC))
            fds.append(script)
            go_r, go_w = os.pipe()
            fds.append(go_w)
            go_r = _fd_above_stdio(go_r)
            fds.append(go_r)
            out_r, out_w = os.pipe()
            fds += [out_r, out_w]
            err_r, err_w = os.pipe()
            fds += [err_r, err_w]
            dups = [(_devnull(), 0), (out_w, 1), (err_w, 2), (script, 3), (go_r, 4)]
            spawn = _open_spawn()
            if spawn is not None:
                pid = spawn(exe, ["bash", "-c", SHELL_WAITER], env, dups)
            else:
                pid = os.posix_spawn(exe, ["bash", "-c", SHELL_WAITER], env, setsid=True,
                                     setsigdef=_ignored_signals(), setsigmask=(),
                                     file_actions=[(os.POSIX_SPAWN_DUP2, fd, to) for fd, to in dups])
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        # SCHED_IDLE while it loads and waits: it takes only CPU nothing else wants, so a
        # command or a service running meanwhile is not slowed by it (measured: a bash -c
        # spawned while a waiter loaded at the normal policy took twice its time).  Set from
        # here: posix_spawn takes no SCHED_IDLE (glibc: EINVAL).
        try:
            os.sched_setscheduler(pid, os.SCHED_IDLE, _SCHED_PARAM)
        except OSError:
            pass  # it died already: deliver() finds out
        for fd in (go_r, out_w, err_w):
            os.close(fd)
        self.script, self.go = script, go_w
        self.proc = Spawned(pid, None, out_r, err_r)
        self.poller, self.pipes = _watch_inline(out_r, err_r, host_fd)

    def deliver(self, script: str) -> bool:
        """Hand the shell its script, back at the policy every command has (the nice value was
        never changed); False: it is gone (killed from outside), discard() it."""
        try:
            os.sched_setscheduler(self.proc.pid, os.SCHED_OTHER, _SCHED_PARAM)
            os.pwrite(self.script, os.fsencode(script), 0)
            os.write(self.go, b"x")
            return True
        except OSError:  # ESRCH, EPIPE: nobody reads the go pipe any more
            return False
        finally:
            os.close(self.script)
            os.close(self.go)
            self.script = self.go = -1

    def discard(self) -> None:
        """Kill the shell (and anything it started), reap it on a worker, close our fds."""
        _kill_group(self.proc.pid)
        WORKERS.run(self.proc.wait)
        for fd in (self.script, self.go, self.proc.stdout, self.proc.stderr):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.script = self.go = -1


class ShellStarter:
    """The thread that starts waiting shells, at SCHED_IDLE for its life: the spawn's own
    work (vfork, the child's exec) and the shell's loading then take only CPU nothing else
    wants, and the reader is free for the host's next request at once.  Measured before it:
    spawned on the reader's thread after the EXIT, a run(["true"]) sent right after a
    succeed waited for that spawn (+ 8 ms under TCG).  Root only (as in a guest): putting the
    shell back at the normal policy for its command needs CAP_SYS_NICE."""

    def __init__(self) -> None:
        self.enabled = os.geteuid() == 0
        self._queue: queue.SimpleQueue[tuple[Session, int, int, dict[str, str]]] | None = None
        self._lock = threading.Lock()

    def start(self, session: Session, epoch: int, host_fd: int, env: dict[str, str]) -> None:
        """Start a ShellWaiter for `session`; it gets it through session.shell_started."""
        with self._lock:
            if self._queue is None:
                self._queue = queue.SimpleQueue()
                threading.Thread(target=self._run, args=(self._queue,), name="ntng-shells",
                                 daemon=True).start()
        self._queue.put((session, epoch, host_fd, env))

    @staticmethod
    def _run(requests: queue.SimpleQueue[tuple[Session, int, int, dict[str, str]]]) -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, _SCHED_PARAM)
        except OSError:
            pass  # each shell is put at SCHED_IDLE after its spawn anyway
        while True:
            session, epoch, host_fd, env = requests.get()
            try:
                shell: ShellWaiter | None = ShellWaiter(host_fd, env)
            except Exception as e:  # no bash, no fds: the next command spawns its own bash
                log(f"no waiting shell: {e!r}")
                shell = None
            session.shell_started(shell, epoch)


SHELLS = ShellStarter()


def _waiter_script(argv: list[str], env: dict[str, str], req: Any) -> str | None:
    """The script of an EXEC a ShellWaiter can run: exactly `bash -c SCRIPT` in the agent's
    own environment, stderr apart (the inline path has checked cwd, user, stdin and pty)."""
    if (len(argv) == 3 and argv[1] == "-c" and argv[0] == "bash" and env is _command_env()
            and not req.merge_stderr and "\0" not in argv[2]):
        return argv[2]
    return None


def _ready_pipes(host_fd: int) -> ReadyPipes | None:
    try:
        return ReadyPipes(host_fd)
    except OSError:  # out of fds: the next command makes its own, and reports what fails
        return None


class InlineState:
    """Where Session.serve_inline left a command it hands to a worker (ExecTask.adopt)."""

    def __init__(self, poller: Any, pipes: dict[int, int], grown: frozenset[int], credit: int,
                 closed: bool) -> None:
        self.poller, self.pipes, self.grown = poller, pipes, grown
        self.credit = credit  # what is left of the host's window: no CREDIT was read meanwhile
        self.closed = closed  # its output ended: the pipes are closed, only its exit is awaited


class TaskError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


EXEC_TYPE = int(P.FrameType.EXEC)
STDOUT_TYPE = int(P.FrameType.STDOUT)
STDERR_TYPE = int(P.FrameType.STDERR)


def read_key(path: str) -> bytes:
    """The run's backdoor key from `path` (read at every HELLO: a restored clone's QEMU hands
    the clone's own key to the agent it restored).  OSError or ValueError saying why not."""
    with open(path, "rb") as f:
        key = f.read(MAX_KEY_BYTES + 1)
    if not P.MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"it has {len(key)} bytes, not {P.MIN_KEY_BYTES} to {MAX_KEY_BYTES}")
    return key


class Session:
    """Protocol state for one host connection.  With `key_file`, a session exists only once
    the host has proved it knows the key (protocol.py, "Authentication")."""

    def __init__(self, conn: Connection, key_file: str | None = None) -> None:
        self.conn = conn
        self.key_file = key_file
        # (hello, version, key, challenge) of the HELLO whose challenge is unanswered
        self.pending_auth: tuple[Any, int, bytes, bytes] | None = None
        self.refused = False  # a wrong proof came on this connection (logged once)
        self.tasks: dict[int, Task] = {}
        self.lock = threading.Lock()
        self.established = False
        self.window = P.DEFAULT_WINDOW
        self.max_frame = P.DEFAULT_MAX_FRAME
        self.max_in_flight = P.DEFAULT_MAX_IN_FLIGHT
        self.chunk = P.CHUNK
        # The host connection's read fd while the frame being handled is the last one read:
        # a command may then be served inline until the host sends more (Session.serve_inline).
        self.inline_fd: int | None = None
        self.ready: ReadyPipes | None = None  # the next inline command's (serve_inline)
        self.shell: ShellWaiter | None = None  # the next inline `bash -c` command's
        self.shell_coming = False  # one is wanted (shell_wanted) or SHELLS is starting it
        self.shell_wanted = False  # by the last `bash -c` command: start_shell_when_quiet starts it
        self.epoch = 0  # a new session's (cancel_all): a shell asked for before is discarded

    def send(self, frame: bytes) -> None:
        self.conn.write(frame)

    def send_payload(self, ftype: int, rid: int, payload: memoryview, crc: int | None = None) -> None:
        """A data frame around `payload` in one gathering write, the payload never copied
        (`crc`: zlib.crc32(payload) when the caller computed it already)."""
        head, trailer = P.frame_parts(ftype, rid, payload, crc)
        self.conn.writev([head, payload, trailer])

    def error(self, rid: int, code: int, message: str) -> None:
        try:
            self.send(P.Error(code=code, message=message).frame(rid))
        except Disconnected:
            pass

    def finish(self, rid: int, final_frame: bytes) -> None:
        with self.lock:
            self.tasks.pop(rid, None)
        self.send_last(rid, final_frame)

    def fail(self, rid: int, code: int, message: str) -> None:
        with self.lock:
            task = self.tasks.pop(rid, None)
        if task is not None:
            task.cancel()
        self.error(rid, code, message)

    def cancel_all(self) -> None:
        with self.lock:
            tasks, self.tasks = list(self.tasks.values()), {}
        for t in tasks:
            t.cancel()
        ready, self.ready = self.ready, None
        if ready is not None:
            ready.close()
        with self.lock:
            self.epoch += 1
            shell, self.shell = self.shell, None
            if self.shell_wanted:  # not started: the next `bash -c` asks again
                self.shell_wanted = self.shell_coming = False
        if shell is not None:
            shell.discard()

    def start_shell_when_quiet(self, host_fd: int) -> None:
        """Start the wanted shell once the host has sent nothing for SHELL_QUIET (the reader,
        before it reads).  A shell that loads while a request runs costs that request its
        context switches (at SCHED_IDLE too: every time the request's processes wait, the
        shell runs and the next switch back flushes TCG's TLB): under TCG a PING sent right
        after a succeed took 3-4.6 ms against 1.2-1.8 after a run, a run(["true"]) 5 ms more
        (docs/benchmarks.md, the twelfth round).  The host's next request usually comes
        within a few ms of an answer, or after much longer.  The shell is for the command
        the waiter serves (_waiter_script): in the agent's environment, on this connection."""
        try:
            if select.select([host_fd], [], [], SHELL_QUIET)[0]:
                return  # a request came: after it
        except (OSError, ValueError):
            pass
        with self.lock:
            wanted, self.shell_wanted = self.shell_wanted, False
            epoch = self.epoch
        if wanted:
            SHELLS.start(self, epoch, host_fd, _command_env())

    def shell_started(self, shell: ShellWaiter | None, epoch: int) -> None:
        """From SHELLS' thread: the shell asked for after a `bash -c` command (None: none
        could start), kept for the next one unless its session has ended since."""
        with self.lock:
            self.shell_coming = False
            if epoch == self.epoch and self.shell is None:
                self.shell, shell = shell, None
        if shell is not None:
            shell.discard()

    def handle(self, frame: P.Frame) -> None:
        ft, rid = frame.type, frame.request_id
        try:  # an EXEC per command: its parser without parse_message's and Exec.parse's calls
            msg: Any = P.parse_exec(frame.payload) if ft == EXEC_TYPE else P.parse_message(frame)
        except P.FrameError as e:
            code = P.ErrorCode.UNKNOWN_TYPE if ft not in P.MESSAGES else P.ErrorCode.BAD_PAYLOAD
            return self.error(rid, code, str(e))
        cls = STARTERS.get(ft) if self.established else None
        if cls is not None:  # a request (first: an EXEC per command)
            with self.lock:
                if rid in self.tasks:
                    return self.error(rid, P.ErrorCode.BAD_PAYLOAD, f"request id {rid} is in use")
                if len(self.tasks) >= self.max_in_flight:
                    return self.error(
                        rid, P.ErrorCode.TOO_MANY_REQUESTS, f"limit of {self.max_in_flight} in flight"
                    )
                host_fd = self.inline_fd
                inline = (ft == EXEC_TYPE and host_fd is not None
                          and not (msg.user or msg.pty or msg.stdin) and (msg.cwd or "/") == _agent_cwd())
                if not inline:
                    new = cls(self, rid)
                    self.tasks[rid] = new
            if inline:
                try:
                    return self.serve_inline(rid, msg, host_fd)  # type: ignore[arg-type]
                except OSError as e:
                    return self.error(rid, P.ErrorCode.EXEC_FAILED, _describe(e))
            return self._guard(rid, new.start, msg, frame.flags)  # type: ignore[attr-defined]
        if ft == P.FrameType.HELLO:
            return self._hello(msg)
        if ft == P.FrameType.AUTH:
            return self._auth(msg)
        if ft == P.FrameType.PING:  # answered before authentication: PONG echoes the peer's bytes
            return self.send(P.Pong(msg.data).frame(rid))
        if not self.established:
            if self.key_file is not None:
                return self.error(rid, P.ErrorCode.AUTH, "not authenticated: this agent serves only a host "
                                  "that proves it has the run's backdoor key (HELLO, then AUTH)")
            return self.error(rid, P.ErrorCode.NO_SESSION, "send HELLO first")
        with self.lock:
            task = self.tasks.get(rid)
        if ft in P.DATA_TYPES:
            if task is not None:
                self._guard(rid, task.on_data, ft, msg, frame.payload_crc)
            return  # data for a finished request: a harmless race
        if ft == P.FrameType.CREDIT:
            if task is not None:
                task.send_window.grant(msg.amount)
            return
        if ft == P.FrameType.SIGNAL:
            if task is not None:
                task.on_signal(msg.signum)
            return
        if ft == P.FrameType.IDENTITY:
            return self._identity(rid, msg)
        return self.error(rid, P.ErrorCode.UNKNOWN_TYPE, f"{P.FrameType(ft).name} is not a request")

    def serve_inline(self, rid: int, req: Any, host_fd: int) -> None:
        """Run a command on the reader's thread (the host sent nothing after its EXEC) while
        the host sends nothing more, its output fits the host's window and it runs under
        INLINE_FOR: a short command then costs no hand-off to a worker (a futex wake-up and a
        context switch each way in a TCG guest), and no task object.  Otherwise a worker goes
        on with it (ExecTask.adopt).  In a TCG guest every interpreted line and Python call
        counts (docs/benchmarks.md, the eighth round): this is one function, its state in
        locals.  OSError: the command did not start."""
        started = time.monotonic()
        argv, env = _command(req)
        script = _waiter_script(argv, env, req)
        shell, ready = self.shell, self.ready
        if script is not None and shell is not None and shell.host_fd == host_fd:
            self.shell = None
            if not shell.deliver(script):  # killed from outside: a bash of its own, below
                shell.discard()
                shell = None
        else:
            shell = None
        if shell is not None:  # the shell started after the last `bash -c` runs this one
            proc, poller, pipes = shell.proc, shell.poller, shell.pipes
        elif ready is not None and not req.merge_stderr and ready.host_fd == host_fd:
            self.ready = None  # _spawn_fast closes its pipes if the command does not start
            proc = _spawn_fast(argv, env, False, False, ready.fds)
            poller, pipes = ready.poller, ready.pipes
        else:
            proc = _spawn_fast(argv, env, False, req.merge_stderr)
            poller, pipes = _watch_inline(proc.stdout, proc.stderr, host_fd)
        out, err = proc.stdout, proc.stderr
        grown: frozenset[int] = frozenset()
        credit = self.window
        end = started + INLINE_FOR
        if req.timeout_ms and req.timeout_ms < INLINE_FOR * 1000:
            end = started + req.timeout_ms / 1000  # the timeout is the worker's to enforce
        returned = lost = False
        try:  # _batch_scheduling(True) without its call: a waking batch thread does not preempt
            os.sched_setscheduler(0, os.SCHED_BATCH, _SCHED_PARAM)
        except OSError:
            pass
        try:
            while pipes:
                wait = end - time.monotonic()
                if wait <= 0:
                    break
                for fd, revents in poller.poll(max(1, int(wait * 1000))):
                    if fd == host_fd:
                        break  # the host sent something: the reader must read it
                    if revents != select.POLLHUP:  # POLLHUP alone: no writer, nothing left
                        size = min(self.max_frame, credit)
                        if size <= 0:
                            break  # the window is used up: credit comes through the reader
                        view = _thread_buffer(self.max_frame)[:size]
                        try:
                            got = os.readv(fd, [view])
                        except OSError:
                            got = 0
                        if got:
                            if got == PIPE_DEFAULT and fd not in grown:
                                grown = grown | {fd}
                                _grow_pipe(fd)
                            self.send_payload(pipes[fd], rid, view[:got])
                            credit -= got
                            continue
                    poller.unregister(fd)
                    del pipes[fd]
                else:
                    continue
                break
            else:  # its output ended: batched, it has usually exited too
                returned = proc.returned_within(INLINE_REAP)
        except (Disconnected, P.ProtocolError):  # the host is gone: no EXIT, nothing to hand over
            _kill_group(proc.pid)
            if not proc.returned_within(INLINE_REAP):
                WORKERS.run(proc.wait)  # reaped there (the reader must not block), no zombie
            returned, lost = True, True
        except OSError:  # not expected: the command must not outlive it (handle reports it)
            _batch_scheduling(False)
            _kill_group(proc.pid)
            WORKERS.run(proc.wait)
            os.close(out)
            if err is not None:
                os.close(err)
            raise
        except BaseException:
            _batch_scheduling(False)
            raise
        if not returned:
            _batch_scheduling(False)
            poller.unregister(host_fd)
            task = ExecTask(self, rid)
            with self.lock:
                self.tasks[rid] = task
            task.adopt(req, started, proc, InlineState(poller, pipes, grown, credit, not pipes))
            return
        if not lost:
            rc = proc.returncode
            assert rc is not None
            self.send_last(rid, P.exec_end(rid, rc if rc >= 0 else -1, -rc if rc < 0 else 0, False,
                                           int((time.monotonic() - started) * 1e6)))
        # After the EXIT, while the host reads it and sends the next request: the scheduling
        # back, the pipes closed, the next command's pipes made (ReadyPipes).
        _batch_scheduling(False)
        os.close(out)
        if err is not None:
            os.close(err)
        if not lost and self.ready is None:
            self.ready = _ready_pipes(host_fd)
        if not lost and script is not None and self.shell is None and not self.shell_coming and SHELLS.enabled:
            self.shell_coming = True
            self.shell_wanted = True  # started by the reader's loop (serve)

    def send_last(self, rid: int, frames: bytes) -> None:
        """A request's last frames (finish(), or Session.serve_inline's, which has no task): a
        host gone meanwhile is no error."""
        try:
            self.conn.write(frames)
        except Disconnected:
            pass

    def _guard(self, rid: int, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except TaskError as e:
            self.fail(rid, e.code, e.message)
        except P.LimitExceeded as e:
            self.fail(rid, P.ErrorCode.WINDOW_EXCEEDED, str(e))
        except (OSError, KeyError, subprocess.SubprocessError) as e:
            code = P.ErrorCode.EXEC_FAILED
            with self.lock:
                task = self.tasks.get(rid)
            if isinstance(task, (PutTask, GetTask)):
                code = P.ErrorCode.FILE_FAILED
            self.fail(rid, code, _describe(e))

    def _identity(self, rid: int, ident: Any) -> None:
        started = time.monotonic()
        try:
            apply_identity(ident)
        except (OSError, ValueError) as e:
            return self.error(rid, P.ErrorCode.EXEC_FAILED, f"setting the clone's identity: {_describe(e)}")
        took = int((time.monotonic() - started) * 1e6)
        self.send(P.Exit(code=0, signal=0, timed_out=False, duration_us=took).frame(rid))

    def _hello(self, hello: Any) -> None:
        try:
            version = P.negotiate_version(hello.min_version, hello.max_version)
        except P.ProtocolError as e:
            return self.error(0, P.ErrorCode.VERSION, str(e))
        self.cancel_all()  # a new HELLO starts a new session
        self.established = False
        self.pending_auth = None
        self.window = min(hello.window, P.DEFAULT_WINDOW * 16)
        self.max_frame = min(hello.max_frame, P.DEFAULT_MAX_FRAME)
        self.chunk = min(P.CHUNK, self.max_frame)
        self.max_in_flight = min(hello.max_in_flight, P.DEFAULT_MAX_IN_FLIGHT)
        if self.key_file is None:
            return self._accept(hello, version, b"")
        try:
            key = read_key(self.key_file)
        except (OSError, ValueError) as e:
            return self.error(0, P.ErrorCode.AUTH, f"cannot read the backdoor key {self.key_file}: {_describe(e)}")
        challenge = os.urandom(P.CHALLENGE_BYTES)
        self.pending_auth = (hello, version, key, challenge)
        self.send(P.AuthChallenge(hello.nonce, challenge).frame(P.HANDSHAKE_REQUEST_ID))

    def _auth(self, auth: Any) -> None:
        pending = self.pending_auth
        if pending is None or auth.nonce != pending[0].nonce:
            return  # no challenge out for this HELLO (stale, or replayed alone): nothing to say
        self.pending_auth = None  # one proof per challenge
        hello, version, key, challenge = pending
        if not P.proof_matches(P.auth_proof(key, P.AUTH_HOST, challenge, hello.nonce), auth.proof):
            if not self.refused:  # once per connection: a peer retrying must not flood the console
                log("refused a host: its proof does not match the backdoor key")
            self.refused = True
            return self.error(0, P.ErrorCode.AUTH, "the proof does not match this agent's key "
                              "(a wrong key, or a host of another run)")
        self._accept(hello, version, P.auth_proof(key, P.AUTH_AGENT, challenge, hello.nonce))

    def _accept(self, hello: Any, version: int, proof: bytes) -> None:
        self.established = True
        ack = P.HelloAck(
            version=version,
            nonce=hello.nonce,
            agent_version=AGENT_VERSION,
            boot_id=boot_id(),
            hostname=socket.gethostname(),
            max_frame=self.max_frame,
            window=self.window,
            max_in_flight=self.max_in_flight,
            capabilities=CAPABILITIES + ["auth"] if proof else CAPABILITIES,
            proof=proof,
        )
        self.send(ack.frame(P.HANDSHAKE_REQUEST_ID))


# Where a clone's identity goes (tests point these elsewhere).
HOSTNAME_FILE = "/etc/hostname"
CLONE_ID_FILE = "/run/ntng/clone-id"
HOSTS_FILE = "/etc/hosts"


def set_clock_ns(epoch_ns: int) -> None:
    time.clock_settime_ns(time.CLOCK_REALTIME, epoch_ns)


def set_hostname(name: str) -> None:
    socket.sethostname(name)


def apply_identity(ident: Any) -> None:
    """A restored clone's identity, without starting a process (see protocol.Identity)."""
    set_clock_ns(ident.epoch_ns)
    set_hostname(ident.hostname)
    with open(HOSTNAME_FILE, "w") as f:
        f.write(ident.hostname + "\n")
    os.makedirs(os.path.dirname(CLONE_ID_FILE), exist_ok=True)
    with open(CLONE_ID_FILE, "w") as f:
        f.write(ident.clone_id + "\n")
    if ident.hosts:
        with open(HOSTS_FILE, "a") as f:
            f.write("".join(line + "\n" for line in ident.hosts))


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.strerror}: {e.filename}"
    return str(e)


PING_TYPE = bytes((P.FrameType.PING,))  # a frame header's type byte (offset 5)
PING = int(P.FrameType.PING)


def serve(conn: Connection, started_ns: int, key_file: str | None = None) -> bool:
    """Serve one connection until the host goes away (only an authenticated one, with a key).
    False when it went away before the ANNOUNCE was written: a socket's host closed early (the
    next one is served), or a port that no longer takes writes (see serve_device)."""
    try:
        conn.write(P.announce_bytes(P.Announce(boot_id(), AGENT_VERSION, started_ns)))
    except Disconnected:
        return False
    session = Session(conn, key_file)
    session.ready = _ready_pipes(conn.rfd)  # the first command's too
    decoder = P.Decoder(P.DEFAULT_MAX_FRAME)
    held = False  # the decoder holds part of a frame (only its branch below changes that)
    # The frame handled last of a read may be served inline (Session.serve_inline); the
    # decoder's branch clears this for the others of its batch and leaves it set.
    session.inline_fd = conn.rfd
    try:
        while True:
            if session.shell_wanted:
                session.start_shell_when_quiet(conn.rfd)
            data = conn.read(READ_BUFFER)
            if not data:
                return True
            # A lone PING is answered from its bytes (the round trip is the measure), a lone
            # frame (an EXEC: the usual read) taken without the decoder.
            pong = P.pong_for_ping(data) if data[5:6] == PING_TYPE and not held else None
            if pong is not None:
                conn.write(pong)
                continue
            frame = None if held else P.lone_frame(data, P.DEFAULT_MAX_FRAME)
            if frame is not None:
                pong = P.pong_frame(frame) if frame.type == PING else None
                if pong is not None:  # answered here: the round trip is the measure
                    conn.write(pong)
                else:
                    session.handle(frame)
                continue
            decoder.feed(data)
            events = list(decoder.events())
            held = decoder.buffered > 0
            for i, ev in enumerate(events):
                session.inline_fd = conn.rfd if i == len(events) - 1 else None
                if isinstance(ev, P.Garbage):
                    if ev.request_id is not None:
                        session.error(ev.request_id, P.ErrorCode.BAD_FRAME, f"dropped frame: {ev.reason}")
                    continue
                if ev.type == P.FrameType.PING:  # answered here: the round trip is the measure
                    pong = P.pong_frame(ev)
                    if pong is not None:
                        conn.write(pong)
                        continue
                session.handle(ev)
    except Disconnected:
        pass
    finally:
        session.cancel_all()
    return True


def find_port(name: str) -> str:
    """/dev path of the virtio-serial port called `name` (udev may not have made the link yet)."""
    link = f"/dev/virtio-ports/{name}"
    if os.path.exists(link):
        return link
    base = "/sys/class/virtio-ports"
    for entry in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            with open(f"{base}/{entry}/name") as f:
                if f.read().strip() == name and os.path.exists(f"/dev/{entry}"):
                    return f"/dev/{entry}"
        except OSError:
            continue
    raise FileNotFoundError(link)


def drain(fd: int) -> None:
    """Throw away bytes queued for a previous agent (a request sent just before a reboot)."""
    while select.select([fd], [], [], 0.05)[0]:
        if not os.read(fd, 1 << 20):
            return


def load_modules(*names: str, fw_cfg: bool = True) -> None:
    """One modprobe for the transport's modules and (`fw_cfg`, unless there already) the one
    that shows QEMU's fw_cfg files, where the run's key is: under TCG each process costs."""
    if fw_cfg and not os.path.isdir(FW_CFG_ROOT):
        names += (FW_CFG_MODULE,)
    subprocess.run(["modprobe", "-q", "-a", *names], check=False)


def guest_key(explicit: str | None) -> str | None:
    """The key file: --key-file, else fw_cfg's when the VMM gave one (QEMU: nixlib always does).
    None: sessions are not authenticated (Firecracker, Cloud Hypervisor: their hybrid vsock is a
    unix socket in the run's private state folder)."""
    key = explicit or (FW_CFG_KEY if os.path.exists(FW_CFG_KEY) else None)
    log(f"backdoor key: {key}" if key else "no backdoor key: sessions are not authenticated")
    return key


def serve_device(path: str, started_ns: int, key_file: str | None = None) -> None:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    if os.isatty(fd):
        tty.setraw(fd)  # a virtconsole (hvc0): no echo, no line discipline, 8-bit clean
    log(f"serving on {path}")
    drain(fd)
    while True:
        if not serve(Connection(fd, fd), started_ns, key_file):
            # A port's writes wait while no host is connected, so one that fails means the
            # port is gone (unplugged): end, and the service's restart finds it again (a loop
            # here would spin on the failing write).
            raise SystemExit(f"ntng-agent: {path} no longer takes writes")
        # The host disconnected: the next ANNOUNCE blocks until one connects again.
        log("host disconnected")


def run_on_port(name: str, key_file: str | None = None) -> None:
    started_ns = time.time_ns()
    load_modules("virtio_console", fw_cfg=key_file is None)
    key = guest_key(key_file)
    while True:
        try:
            path = find_port(name)
            break
        except FileNotFoundError:
            time.sleep(0.05)
    serve_device(path, started_ns, key)


def run_on_device(path: str, key_file: str | None = None) -> None:
    """A console device such as /dev/hvc0 (Cloud Hypervisor's virtio-console)."""
    started_ns = time.time_ns()
    load_modules("virtio_console", fw_cfg=key_file is None)
    key = guest_key(key_file)
    while not os.path.exists(path):
        time.sleep(0.05)
    serve_device(path, started_ns, key)


def accept_forever(srv: socket.socket, started_ns: int, key_file: str | None = None) -> None:
    """One host connection at a time; the next one is accepted when it goes away."""
    srv.listen(1)
    while True:
        c, _ = srv.accept()
        with c:
            conn = Connection(c.fileno(), c.fileno())
            try:
                served = serve(conn, started_ns, key_file)
            finally:
                conn.let_go()
        log("host disconnected" if served else "host disconnected before the ANNOUNCE")


def run_on_socket(path: str, key_file: str | None = None) -> None:
    """Listen on a unix socket (tests on the host, or a vsock-proxied setup)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    accept_forever(srv, time.time_ns(), key_file)


def run_on_folder(folder: str, key_file: str | None = None) -> None:
    """Listen on <folder>/backdoor.sock, the folder bind-mounted from the run's private state
    directory (a container); the key is <folder>/backdoor-key when the runner put one there.
    A restarted agent replaces the socket its predecessor left: the host connects anew."""
    started_ns = time.time_ns()
    while not os.path.isdir(folder):
        time.sleep(0.05)
    in_folder = os.path.join(folder, FOLDER_KEY)
    key = key_file or (in_folder if os.path.exists(in_folder) else None)
    log(f"backdoor key: {key}" if key else "no backdoor key: sessions are not authenticated")
    path = os.path.join(folder, FOLDER_SOCKET)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)  # the folder is private already; the socket is too
    try:
        srv.bind(path)
    finally:
        os.umask(old)
    log(f"serving on {path}")
    accept_forever(srv, started_ns, key)


def run_on_vsock(port: int, key_file: str | None = None) -> None:
    """Listen on AF_VSOCK: the host reaches it through vhost-vsock or a hybrid vsock socket."""
    started_ns = time.time_ns()
    load_modules("vmw_vsock_virtio_transport", fw_cfg=key_file is None)
    key = guest_key(key_file)
    while True:
        try:
            srv = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            srv.bind((socket.VMADDR_CID_ANY, port))
            break
        except OSError:  # the transport is still being probed
            time.sleep(0.05)
    log(f"serving on vsock port {port}")
    accept_forever(srv, started_ns, key)


def from_cmdline(cmdline: str) -> tuple[str, str]:
    """(transport, where) from the kernel's `ntng.backdoor=<transport>:<where>` (nixlib sets
    it); a virtio-serial port by default."""
    for word in cmdline.split():
        if word.startswith("ntng.backdoor="):
            transport, _, where = word.partition("=")[2].partition(":")
            if transport in ("virtio-serial", "vsock", "virtconsole", "unix") and where and (
                transport != "vsock" or where.isdigit()
            ) and (transport != "unix" or where.startswith("/")):
                return transport, where
            log(f"ignoring malformed {word!r}")
    return "virtio-serial", DEFAULT_PORT_NAME


def read_cmdline() -> str:
    """The kernel command line, or in a container init's arguments (as systemd reads them)."""
    if os.path.exists(CONTAINER_MARKER):
        with open("/proc/1/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    with open("/proc/cmdline") as f:
        return f.read()


def run_from_cmdline(key_file: str | None = None) -> None:
    transport, where = from_cmdline(read_cmdline())
    if transport == "unix":
        run_on_folder(where, key_file)
    elif transport == "vsock":
        run_on_vsock(int(where), key_file)
    elif transport == "virtconsole":
        run_on_device(f"/dev/{where}", key_file)
    else:
        run_on_port(where, key_file)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> None:
    """Let glibc keep freed frame-sized blocks in the heap.  By default a freed 1 MiB block goes
    back to the kernel (above the mmap threshold, or trimmed off the heap's top), so the next
    frame's buffer takes 256 page faults, each dear in a TCG guest: a put's decoder steps were
    12.0 -> 9.6 ms per MiB with these settings (measured in the guest).  The heap then stays at
    its peak, a few frames of the bounded buffers.  The agent's own process only: settings of
    malloc are not inherited across exec."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 16 << 20)  # glibc's maximum is 32 MiB on 64-bit
        libc.mallopt(M_TRIM_THRESHOLD, 128 << 20)
    except (ImportError, OSError, AttributeError):  # no ctypes, or not glibc: defaults
        pass


def main(argv: list[str] | None = None) -> None:
    keep_freed_memory()
    ap = argparse.ArgumentParser(description="nixos-test-ng backdoor agent")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--port-name", default=DEFAULT_PORT_NAME, help="virtio-serial port name")
    where.add_argument("--device", help="serve on this console device (e.g. /dev/hvc0)")
    where.add_argument("--vsock-port", type=int, help="listen on this AF_VSOCK port")
    where.add_argument("--unix", help="listen on this unix socket instead of a virtio port")
    where.add_argument("--fd", type=int, help="serve one connection on this inherited fd")
    where.add_argument("--from-cmdline", action="store_true",
                       help="serve where the kernel command line's ntng.backdoor= says")
    ap.add_argument("--key-file", help="serve only hosts that prove they know the key in this file "
                    f"(default in a guest: QEMU's fw_cfg file, {FW_CFG_KEY}, when there is one; "
                    "with --unix and --fd: no key)")
    args = ap.parse_args(argv)
    if args.from_cmdline:
        run_from_cmdline(args.key_file)
    elif args.fd is not None:
        serve(Connection(args.fd, args.fd), time.time_ns(), args.key_file)
    elif args.unix:
        run_on_socket(args.unix, args.key_file)
    elif args.vsock_port is not None:
        run_on_vsock(args.vsock_port, args.key_file)
    elif args.device:
        run_on_device(args.device, args.key_file)
    else:
        run_on_port(args.port_name, args.key_file)


if __name__ == "__main__":
    main()

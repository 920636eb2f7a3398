"""Host side of the backdoor protocol: many requests in flight on one connection.

A reader thread decodes frames and routes them to per-request queues; the caller's thread
consumes its queue and returns flow-control credit as it goes, so a command that prints
gigabytes is held back by the agent instead of filling the runner's memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from . import protocol as P
from .errors import (
    AgentRestarted,
    AuthenticationFailed,
    BackdoorError,
    ConnectionLost,
    RemoteError,
    WaitTimeout,
)

OutputCallback = Callable[[bytes], None]


@dataclasses.dataclass
class ExecResult:
    status: int  # exit code, or 128+signal like a shell
    stdout: bytes
    stderr: bytes
    signal: int = 0
    timed_out: bool = False
    duration: float = 0.0

    @property
    def output(self) -> str:
        return self.stdout.decode(errors="replace")


@dataclasses.dataclass
class _Pending:
    rid: int
    send_window: P.SendWindow
    recv_window: P.ReceiveWindow
    frames: queue.SimpleQueue[P.Frame | BaseException]


class BackdoorClient:
    """One connection to one agent.  Thread-safe; calls block with explicit timeouts.

    `key`: the run's backdoor secret (nixlib's plan names its file).  With it, a session is one
    only when the agent proves it has the key too (protocol.auth_proof); without it, an agent
    that asks for one is refused.
    """

    def __init__(
        self,
        sock: socket.socket,
        name: str = "agent",
        window: int = P.DEFAULT_WINDOW,
        max_frame: int = P.DEFAULT_MAX_FRAME,
        on_garbage: Callable[[P.Garbage], None] | None = None,
        on_restart: Callable[[P.HelloAck, P.HelloAck], None] | None = None,
        key: bytes | None = None,
    ) -> None:
        self.name = name
        self.key = key
        self.sock = sock
        self.window = window
        self.max_frame = max_frame
        self.on_garbage = on_garbage
        self.on_restart = on_restart
        self.agent: P.HelloAck | None = None  # set once the current session is acknowledged
        self._previous_ack: P.HelloAck | None = None  # the session before, to tell restarts
        self.garbage_bytes = 0
        self._write_lock = threading.Lock()
        self._state = threading.Condition()
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._nonce = b""
        self._challenge: bytes | None = None  # the agent's, answered for the current HELLO
        self._refusal: AuthenticationFailed | None = None  # why the current HELLO got no session
        self._closed: BaseException | None = None
        self._pongs: dict[bytes, queue.SimpleQueue[float]] = {}
        self._reader = threading.Thread(target=self._read_loop, name=f"backdoor-{name}", daemon=True)
        self._reader.start()
        # Say hello now, not only when the agent announces itself: an agent whose host went
        # away and came back quickly may never have noticed, and waits for us.  If it did
        # notice (or is just starting), its ANNOUNCE reaches us before any answer to this
        # HELLO, and we say hello again then.
        try:
            self.hello()
        except ConnectionLost:
            pass  # reported by the reader

    # -- connection and session ---------------------------------------------------------------

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._fail_all(ConnectionLost(f"{self.name}: connection closed"))

    @property
    def closed(self) -> bool:
        """The connection is gone (the VM, or on vsock the guest's agent, closed it)."""
        return self._closed is not None

    def _send(self, data: bytes) -> None:
        with self._write_lock:
            try:
                self.sock.sendall(data)
            except OSError as e:
                raise ConnectionLost(f"{self.name}: backdoor connection lost ({e})") from None

    def hello(self) -> None:
        """Start a new session (called on every ANNOUNCE; callable by hand to resync)."""
        with self._state:
            self._nonce = os.urandom(16)
            self._challenge = self._refusal = None
            nonce = self._nonce
        msg = P.Hello(
            P.MIN_SESSION_VERSION, P.VERSION, nonce, self.max_frame, self.window, P.DEFAULT_MAX_IN_FLIGHT
        )
        self._send(msg.frame(P.HANDSHAKE_REQUEST_ID))

    def wait_ready(self, timeout: float, what: str = "the agent's hello") -> P.HelloAck:
        deadline = time.monotonic() + timeout
        with self._state:
            while self.agent is None:
                if self._closed is not None:
                    raise self._closed
                if self._refusal is not None:
                    raise self._refusal
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(f"{self.name}: timed out after {timeout:.0f}s waiting for {what}")
                self._state.wait(min(left, 1.0))
            return self.agent

    # -- reader thread ------------------------------------------------------------------------

    def _read_loop(self) -> None:
        decoder = P.Decoder(self.max_frame)
        try:
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    raise ConnectionLost(f"{self.name}: the VM closed the backdoor connection")
                decoder.feed(data)
                for ev in decoder.events():
                    if isinstance(ev, P.Garbage):
                        self.garbage_bytes += ev.size
                        if self.on_garbage:
                            self.on_garbage(ev)
                    else:
                        self._dispatch(ev)
        except ConnectionLost as e:
            self._fail_all(e)
        except OSError as e:
            self._fail_all(ConnectionLost(f"{self.name}: backdoor connection lost ({e})"))
        except BaseException as e:  # never let the reader die silently
            self._fail_all(BackdoorError(f"{self.name}: backdoor reader crashed: {e!r}"))

    def _dispatch(self, frame: P.Frame) -> None:
        ft = frame.type
        if ft == P.FrameType.PONG:  # first, and without the typed codec: it is a measurement
            received = time.monotonic()
            q = self._pongs.pop(P.pong_data(frame) or b"", None)
            if q is not None:
                q.put(received)
            return
        if frame.request_id == P.HANDSHAKE_REQUEST_ID:
            try:
                msg = P.parse_message(frame)
            except P.ProtocolError:
                return  # a damaged handshake frame: the agent will announce again or we retry
            if ft == P.FrameType.ANNOUNCE:
                self._agent_restarted()
                self.hello()
            elif ft == P.FrameType.AUTH_CHALLENGE:
                self._answer_challenge(msg)
            elif ft == P.FrameType.HELLO_ACK:
                self._acknowledged(msg)
            elif ft == P.FrameType.ERROR and msg.code in (P.ErrorCode.AUTH, P.ErrorCode.VERSION):
                what = "authentication" if msg.code == P.ErrorCode.AUTH else "the session"
                self._refuse(f"the agent refused {what}: {msg.message}")
            return
        with self._state:
            pending = self._pending.get(frame.request_id)
        if pending is None:
            return  # late frame of a request we gave up on
        if ft == P.FrameType.CREDIT:
            try:
                pending.send_window.grant(P.Credit.parse(frame.payload).amount)
            except P.ProtocolError:
                pass
            return
        if ft in (P.FrameType.STDOUT, P.FrameType.STDERR, P.FrameType.FILE_DATA):
            try:
                pending.recv_window.received(len(frame.payload))
            except P.LimitExceeded as e:
                pending.frames.put(BackdoorError(f"{self.name}: agent broke flow control: {e}"))
                return
        pending.frames.put(frame)
        if ft == P.FrameType.ERROR:
            # The agent dropped the request and will grant no more credit: unblock our sender.
            pending.send_window.close("the agent reported an error")

    def _refuse(self, why: str) -> None:
        """No session for the current HELLO: wait_ready (and so every request) raises `why`."""
        with self._state:
            self._refusal = AuthenticationFailed(f"{self.name}: {why}")
            self._state.notify_all()

    def _answer_challenge(self, ch: P.AuthChallenge) -> None:
        with self._state:
            if ch.nonce != self._nonce or self._challenge is not None:
                return  # the challenge of an older HELLO, or a second one (one proof per HELLO)
            nonce = self._nonce
            if self.key is not None:
                self._challenge = ch.challenge
        if self.key is None:
            return self._refuse("the agent refused authentication: it asks for the run's backdoor "
                                "key and this client has no key")
        proof = P.auth_proof(self.key, P.AUTH_HOST, ch.challenge, nonce)
        self._send(P.Auth(nonce, proof).frame(P.HANDSHAKE_REQUEST_ID))

    def _agent_unproven(self, ack: P.HelloAck) -> str | None:
        """Why a HELLO_ACK does not prove the agent has our key (None: it does, or we have no key)."""
        if self.key is None:
            return None
        if self._challenge is None or not ack.proof:
            return ("the agent did not authenticate: it has no backdoor key (the guest reads it "
                    "from QEMU's fw_cfg: does its kernel have qemu_fw_cfg, CONFIG_FW_CFG_SYSFS?)")
        expected = P.auth_proof(self.key, P.AUTH_AGENT, self._challenge, ack.nonce)
        if not P.proof_matches(expected, ack.proof):
            return "the agent did not authenticate: its proof does not match the run's key"
        return None

    def _acknowledged(self, ack: P.HelloAck) -> None:
        with self._state:
            if ack.nonce != self._nonce:
                return  # answer to an older HELLO
            problem = self._agent_unproven(ack)
            if problem is not None:
                self._refusal = AuthenticationFailed(f"{self.name}: {problem}")
                self._state.notify_all()
                return
            self.agent = ack
            previous, self._previous_ack = self._previous_ack, ack
            self._state.notify_all()
        if self.on_restart is not None and previous is not None:
            self.on_restart(ack, previous)

    def _agent_restarted(self) -> None:
        with self._state:
            self.agent = None
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            p.frames.put(AgentRestarted(f"{self.name}: the agent restarted while the request was running"))
            p.send_window.close("the agent restarted")

    def _fail_all(self, exc: BaseException) -> None:
        with self._state:
            if self._closed is None:
                self._closed = exc
            pending, self._pending = list(self._pending.values()), {}
            self._state.notify_all()
        for p in pending:
            p.send_window.close(str(exc))
            p.frames.put(exc)

    # -- requests ------------------------------------------------------------------------------

    def _open(self, first: P.Message, timeout: float) -> _Pending:
        ack = self.wait_ready(timeout)
        with self._state:
            if self._closed is not None:
                raise self._closed
            rid = next(self._ids)
            p = _Pending(rid, P.SendWindow(ack.window), P.ReceiveWindow(ack.window), queue.SimpleQueue())
            self._pending[rid] = p
        self._send(first.frame(rid))
        return p

    def _close(self, p: _Pending) -> None:
        with self._state:
            self._pending.pop(p.rid, None)

    def _next(self, p: _Pending, deadline: float, what: str) -> P.Frame:
        left = deadline - time.monotonic()
        try:
            item = p.frames.get(timeout=max(0.0, left))
        except queue.Empty:
            raise WaitTimeout(f"{self.name}: timed out waiting for {what}") from None
        if isinstance(item, BaseException):
            raise item
        if item.type == P.FrameType.ERROR:
            err = P.Error.parse(item.payload)
            raise RemoteError(err.code, f"{self.name}: {err.message}")
        return item

    def _consumed(self, p: _Pending, n: int) -> None:
        credit = p.recv_window.consumed(n)
        if credit:
            self._send(P.Credit(credit).frame(p.rid))

    def _send_stream(self, p: _Pending, ftype: int, chunks: Iterable[bytes], deadline: float) -> None:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                n = p.send_window.take(min(len(view), P.CHUNK), max(0.0, deadline - time.monotonic()))
                self._send(P.encode_frame(ftype, p.rid, bytes(view[:n])))
                view = view[n:]
        self._send(P.encode_frame(ftype, p.rid))

    def ping(self, data: bytes = b"", timeout: float = 10.0) -> float:
        """Round trip in seconds."""
        self.wait_ready(timeout)
        token = data + os.urandom(8)
        q: queue.SimpleQueue[float] = queue.SimpleQueue()
        self._pongs[token] = q
        frame = P.ping_frame(token)
        t0 = time.monotonic()
        self._send(frame)
        try:
            return q.get(timeout=timeout) - t0
        except queue.Empty:
            raise WaitTimeout(f"{self.name}: no PONG within {timeout}s") from None
        finally:
            self._pongs.pop(token, None)

    def execute(
        self,
        req: P.Exec,
        stdin: bytes | Iterable[bytes] | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        wait: float = 900.0,
    ) -> ExecResult:
        """Run a command; collects output unless callbacks take it.  `wait` bounds the whole call."""
        if stdin is not None and not req.stdin:
            req = dataclasses.replace(req, stdin=True)
        deadline = time.monotonic() + wait
        p = self._open(req, wait)
        writer: threading.Thread | None = None
        writer_error: list[BaseException] = []
        try:
            if stdin is not None:
                chunks = [stdin] if isinstance(stdin, (bytes, bytearray)) else stdin

                def feed() -> None:
                    try:
                        self._send_stream(p, P.FrameType.STDIN, chunks, deadline)
                    except BaseException as e:  # reported unless the command ended first
                        writer_error.append(e)

                writer = threading.Thread(target=feed, daemon=True)
                writer.start()
            out, err = bytearray(), bytearray()
            sinks = {
                P.FrameType.STDOUT: on_stdout or out.extend,
                P.FrameType.STDERR: on_stderr or err.extend,
            }
            while True:
                f = self._next(p, deadline, f"command {_describe(req)} to finish")
                if f.type in sinks:
                    if f.payload:
                        sinks[P.FrameType(f.type)](f.payload)
                        self._consumed(p, len(f.payload))
                elif f.type == P.FrameType.EXIT:
                    ex = P.Exit.parse(f.payload)
                    status = ex.code if ex.code >= 0 else 128 + ex.signal
                    return ExecResult(
                        status, bytes(out), bytes(err), ex.signal, ex.timed_out, ex.duration_us / 1e6
                    )
        finally:
            p.send_window.close("request finished")
            self._close(p)

    def set_identity(self, ident: P.Identity, timeout: float = 60.0) -> float:
        """Give a restored clone its identity (agents with the "identity" capability); returns
        the agent's time for it in seconds."""
        deadline = time.monotonic() + timeout
        p = self._open(ident, timeout)
        try:
            f = self._next(p, deadline, "the clone's identity to be set")
            if f.type != P.FrameType.EXIT:
                raise BackdoorError(f"{self.name}: unexpected frame type {f.type} answering IDENTITY")
            return P.Exit.parse(f.payload).duration_us / 1e6
        finally:
            p.send_window.close("request finished")
            self._close(p)

    def put_file(
        self,
        source: Path | str,
        target: str,
        mode: int | None = None,
        owner: str = "",
        timeout: float = 900.0,
    ) -> P.FileDone:
        """Copy a host file to `target` in the guest, sha256-verified."""
        deadline = time.monotonic() + timeout
        size = os.path.getsize(source)
        digest = _sha256_file(source)
        mode = os.stat(source).st_mode & 0o7777 if mode is None else mode
        fh = open(source, "rb")
        p = self._open(P.FilePut(str(target), mode, owner, size, digest), timeout)
        try:
            with fh:
                chunks = iter(lambda: fh.read(P.CHUNK * 4), b"")
                try:
                    self._send_stream(p, P.FrameType.FILE_DATA, chunks, deadline)
                except P.ProtocolError:
                    pass  # send window closed: the reason (ERROR, restart, lost link) is queued
            f = self._next(p, deadline, f"the copy to {target} to finish")
            return P.FileDone.parse(f.payload)
        finally:
            p.send_window.close("request finished")
            self._close(p)

    def get_file(self, source: str, target: Path | str, timeout: float = 900.0) -> P.FileDone:
        """Copy a guest file to a host path; the sha256 is checked on arrival."""
        deadline = time.monotonic() + timeout
        p = self._open(P.FileGet(source), timeout)
        target = Path(target)
        tmp = target.with_name(f".{target.name}.ntng-partial")
        h = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as out:
                while True:
                    f = self._next(p, deadline, f"{source} to arrive")
                    if f.type == P.FrameType.FILE_DATA:
                        if f.payload:
                            out.write(f.payload)
                            h.update(f.payload)
                            size += len(f.payload)
                            self._consumed(p, len(f.payload))
                    elif f.type == P.FrameType.FILE_DONE:
                        done = P.FileDone.parse(f.payload)
                        break
            if done.size != size or done.sha256 != h.digest():
                raise BackdoorError(
                    f"{self.name}: {source} arrived corrupted: got {size} bytes sha256 "
                    f"{h.hexdigest()}, agent sent {done.size} bytes sha256 {done.sha256.hex()}"
                )
            os.chmod(tmp, done.mode)
            os.replace(tmp, target)
            return done
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            p.send_window.close("request finished")
            self._close(p)


def _sha256_file(path: Path | str) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


def _describe(req: P.Exec) -> str:
    text = req.shell or " ".join(req.argv)
    return repr(text if len(text) < 80 else text[:77] + "...")


def connect_unix(
    path: Path | str, timeout: float, alive: Callable[[], bool] | None = None
) -> socket.socket:
    """Connect to a unix socket that a VMM is about to create (stop early if it died)."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None and not alive():
            raise ConnectionLost(f"the process serving {path} exited")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > deadline:
                raise WaitTimeout(f"timed out after {timeout}s waiting for socket {path}") from None
            time.sleep(0.02)

"""Host side of the backdoor protocol: many requests in flight on one connection.

A reader thread decodes frames and routes them to per-request queues; the caller's thread
consumes its queue and returns flow-control credit as it goes, so a command that prints
gigabytes is held back by the agent instead of filling the runner's memory.

The guest is untrusted: whatever it sends, memory stays bounded (the host's own receive
window, a cap on output kept, on queued control frames and on a copied file's size), every
send has a deadline (past it the connection is closed: half a frame cannot be taken back) and
malformed answers become the project's own errors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import queue
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from . import protocol as P
from .errors import (
    AgentRestarted,
    AuthenticationFailed,
    BackdoorError,
    ConnectionLost,
    FileTooLarge,
    GuestMisbehaved,
    GuestStoppedReading,
    MalformedFrame,
    NtngError,
    OutputLimitExceeded,
    RemoteError,
    SendTimeout,
    WaitTimeout,
)
from .safepath import SAFE_MODE_BITS

OutputCallback = Callable[[bytes], None]

MiB = 1024 * 1024
# Output execute() keeps in memory per call (stdout + stderr, callbacks not counted): far more
# than a test reads from a command's output, small next to a CI runner's RAM.  Raise it per call
# (execute(max_output=...), Machine.run(max_output=...)) or per machine (Machine.max_output).
DEFAULT_MAX_OUTPUT = 128 * MiB
# Largest file get_file() writes: FILE_GET announces no size, so a guest could fill the host's
# disk.  16 GiB is above any disk image or log a test copies out; raise with max_size=.
DEFAULT_MAX_FILE_SIZE = 16 * 1024 * MiB
# Control frames (EXIT, ERROR, FILE_DONE, unknown types...) queued for one request and not yet
# taken by its caller.  An honest agent sends one or two per request; data frames are held by
# the receive window instead.  Past these the link is closed: the agent is broken or hostile.
MAX_QUEUED_CONTROL_FRAMES = 16
MAX_QUEUED_CONTROL_BYTES = 1 * MiB  # per request (4 maximal frames)
MAX_QUEUED_CONTROL_BYTES_TOTAL = 8 * MiB  # over all requests of the connection
# Bytes that failed their payload CRC per connection.  A guest reset mid-frame damages one frame
# (protocol.RESYNC_PADDING); 64 maximal frames (16 MiB, ~5 ms of CRC) allow 64 such resets per
# connection, while fake headers (one 256 KiB CRC per 20 bytes of input) are cut off after 1.3 KB.
MAX_CRC_FAILED_BYTES = 64 * (P.DEFAULT_MAX_FRAME + P.HEADER_SIZE + P.TRAILER_SIZE)
# The least time a send is given, even when its call's deadline is nearer: a healthy but busy
# guest is not cut off by a call with a tiny timeout.  It is the grace past a call's timeout.
SEND_GRACE = 1.0
# Sends the reader thread makes (HELLO answering an ANNOUNCE), the first HELLO and any send
# without a call's deadline: past this the guest is taken to have stopped reading and the
# connection is closed.  10 s: far above a busy TCG guest's pauses, short next to test timeouts.
READER_SEND_TIMEOUT = 10.0
# After a command passed max_output and was sent SIGKILL: how long its remaining output is
# drained (and dropped) waiting for its EXIT, so the agent's task ends cleanly.
OUTPUT_KILL_GRACE = 2.0


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
    control_frames: int = 0  # queued control frames not yet taken by the caller
    control_bytes: int = 0
    done: bool = False  # closed by the caller or failed: nothing more is queued or counted


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
        direct_writes: bool = False,
    ) -> None:
        self.name = name
        # put_file asks for direct I/O (FLAG_DIRECT): for a guest whose kernel runs emulated
        self.direct_writes = direct_writes
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
        self._control_lock = threading.Lock()
        self._control_bytes = 0  # over all requests
        self._reader = threading.Thread(target=self._read_loop, name=f"backdoor-{name}", daemon=True)
        self._reader.start()
        # Say hello now, not only when the agent announces itself: an agent whose host went
        # away and came back quickly may never have noticed, and waits for us.  If it did
        # notice (or is just starting), its ANNOUNCE reaches us before any answer to this
        # HELLO, and we say hello again then.
        try:
            self.hello(unless="started")
        except NtngError:
            pass  # a lost or stuck link is reported by the reader or the next call

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

    def _send(self, data: bytes, deadline: float | None = None, what: str = "a frame",
              still_wanted: Callable[[], bool] | None = None) -> None:
        """Send one frame by `deadline` (at least SEND_GRACE from now; READER_SEND_TIMEOUT
        from now when None).  Waiting for another sender past it raises WaitTimeout; a frame
        not fully written by then closes the link (SendTimeout).  `still_wanted`, checked once
        the connection is ours: False drops the frame (a HELLO a newer one replaced)."""
        start = time.monotonic()
        end = max(start + READER_SEND_TIMEOUT if deadline is None else deadline, start + SEND_GRACE)
        if not self._write_lock.acquire(timeout=end - start):
            raise WaitTimeout(
                f"{self.name}: could not send {what} within {end - start:.1f}s: another send on "
                "the backdoor connection has been blocked that long (the guest is not reading)"
            )
        try:
            if self._closed is not None:
                raise self._closed
            if still_wanted is not None and not still_wanted():
                return
            self._write(memoryview(data), end, what, start)
        finally:
            self._write_lock.release()

    def _write(self, view: memoryview, end: float, what: str, start: float) -> None:
        total = len(view)
        poller: select.poll | None = None
        while view:
            try:
                # MSG_DONTWAIT, not a non-blocking socket: the reader's recv stays one syscall.
                view = view[self.sock.send(view, socket.MSG_DONTWAIT):]
            except BlockingIOError:
                pass
            except OSError as e:
                if self._closed is not None:  # we closed it (e.g. a guest flood): say why
                    raise self._closed from None
                raise ConnectionLost(f"{self.name}: backdoor connection lost ({e})") from None
            if not view:
                return
            left = end - time.monotonic()
            if left > 0:
                if poller is None:
                    fd = self.sock.fileno()
                    if fd < 0:  # closed by close() meanwhile
                        raise ConnectionLost(f"{self.name}: connection closed")
                    poller = select.poll()
                    poller.register(fd, select.POLLOUT)
                poller.poll(left * 1000)
                continue
            msg = (f"{self.name}: the guest stopped reading: {what} could not be sent within "
                   f"{end - start:.1f}s ({len(view)} of {total} bytes left); the backdoor "
                   "connection is closed")
            self._abort(GuestStoppedReading(msg))
            raise SendTimeout(msg)

    def _abort(self, exc: BackdoorError) -> None:
        """Close the link for good: every pending and later call raises `exc`."""
        with self._state:
            if self._closed is None:
                self._closed = exc
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader; close() frees the fd
        except OSError:
            pass
        self._fail_all(exc)

    def hello(self, deadline: float | None = None, unless: Literal["started", "answered"] | None = None) -> None:
        """Start a new session (called on every ANNOUNCE; callable by hand to resync).

        `unless`: checked and acted on under one lock, so that a session the reader thread
        started, or the agent answered, meanwhile is not replaced (the agent would answer both
        HELLOs and the second answer would look like an agent restart): "started" skips when
        any HELLO was sent (the constructor's, racing the reader's answer to an ANNOUNCE),
        "answered" when the current one was acknowledged (a resend after a silent agent)."""
        with self._state:
            if unless == "started" and self._nonce or unless == "answered" and self.agent is not None:
                return
            self._nonce = os.urandom(16)
            self._challenge = self._refusal = None
            nonce = self._nonce
        msg = P.Hello(
            P.MIN_SESSION_VERSION, P.VERSION, nonce, self.max_frame, self.window, P.DEFAULT_MAX_IN_FLIGHT
        )
        if deadline is None:
            deadline = time.monotonic() + READER_SEND_TIMEOUT
        # Only while it is the newest: a HELLO written after a newer one's session was set up
        # would reset that session in the agent, which then refuses our requests (seen in CI:
        # the constructor's HELLO, delayed, went out after the reader's session was accepted).
        self._send(msg.frame(P.HANDSHAKE_REQUEST_ID), deadline, "HELLO",
                   still_wanted=lambda: self._nonce == nonce)

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
        # One receive buffer for the connection (the decoder copies out of it): recv(1 MiB)
        # allocated and freed 1 MiB per call.
        buf = memoryview(bytearray(1 << 20))
        try:
            while self._closed is None:
                n = self.sock.recv_into(buf)  # close() and _abort() wake it with shutdown()
                if not n:
                    raise ConnectionLost(f"{self.name}: the VM closed the backdoor connection")
                # One whole frame (a command's EXIT, a PONG: the usual read) skips the
                # decoder's buffer and generator, which the host pays on a command's critical path.
                frame = None if decoder.buffered else P.lone_frame(buf[:n], self.max_frame)
                if frame is not None:
                    self._dispatch(frame)
                    if self._closed is not None:
                        return
                    continue
                decoder.feed(buf[:n])
                for ev in decoder.events():
                    if isinstance(ev, P.Garbage):
                        self._garbage(ev, decoder)
                    else:
                        self._dispatch(ev)
                    if self._closed is not None:
                        return  # the link was closed on the guest's account (_abort)
        except ConnectionLost as e:
            self._fail_all(e)
        except OSError as e:
            self._fail_all(ConnectionLost(f"{self.name}: backdoor connection lost ({e})"))
        except BaseException as e:  # never let the reader die silently
            self._fail_all(BackdoorError(f"{self.name}: backdoor reader crashed: {e!r}"))

    def _garbage(self, ev: P.Garbage, decoder: P.Decoder) -> None:
        self.garbage_bytes += ev.size
        if self.on_garbage:
            self.on_garbage(ev)
        if decoder.crc_failed_bytes > MAX_CRC_FAILED_BYTES:
            self._abort(GuestMisbehaved(
                f"{self.name}: corrupt frames: {decoder.crc_failed_bytes} bytes failed their CRC, "
                f"the link is closed (limit {MAX_CRC_FAILED_BYTES} bytes per connection, "
                "client.MAX_CRC_FAILED_BYTES)"))

    def _dispatch(self, frame: P.Frame) -> None:
        ft = frame.type
        if ft == P.FrameType.PONG:  # first, and without the typed codec: it is a measurement
            received = time.monotonic()
            q = self._pongs.pop(P.pong_data(frame) or b"", None)
            if q is not None:
                q.put(received)
            return
        if not frame.payload and ft in _DATA_ANSWERS:
            # An end of stream: every reader of these frames skips it (the EXIT or FILE_DONE
            # ends the request), and not queueing it spares the caller's thread a wake-up per
            # stream; before the lock below, as a command's two arrive with its EXIT.
            return
        if frame.request_id == P.HANDSHAKE_REQUEST_ID:
            try:
                msg = P.parse_message(frame)
            except P.ProtocolError:
                return  # a damaged handshake frame: the agent will announce again or we retry
            if ft == P.FrameType.ANNOUNCE:
                self._agent_restarted()
                self._hello_from_reader()
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
        if ft in _DATA_ANSWERS:
            try:
                pending.recv_window.received(len(frame.payload))
            except P.LimitExceeded as e:
                self._fail_request(pending, BackdoorError(
                    f"{self.name}: the agent broke flow control on request {pending.rid}: {e} "
                    f"(the host's window is {self.window} bytes)"))
                return
            pending.frames.put(frame)
            return
        if not self._count_control(pending, len(frame.payload)):
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
        frame = P.Auth(nonce, proof).frame(P.HANDSHAKE_REQUEST_ID)
        self._send_from_reader(lambda: self._send(frame, None, "AUTH"))

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

    def _hello_from_reader(self) -> None:
        """HELLO answering an ANNOUNCE."""
        self._send_from_reader(lambda: self.hello(time.monotonic() + READER_SEND_TIMEOUT))

    def _send_from_reader(self, send: Callable[[], None]) -> None:
        """A send made by the reader thread, bounded: a reader blocked in a send would stop all
        routing, so a guest that does not take it within READER_SEND_TIMEOUT loses the link."""
        try:
            send()
        except SendTimeout:
            pass  # the link is closed already
        except WaitTimeout as e:
            self._abort(ConnectionLost(f"{self.name}: the guest stopped reading: {e}; the backdoor "
                                       "connection is closed"))

    def _count_control(self, p: _Pending, size: int) -> bool:
        """Account a control frame queued for `p`; False (and the link closed) past the limits."""
        with self._control_lock:
            if p.done:
                return False
            p.control_frames += 1
            p.control_bytes += size
            self._control_bytes += size
            over = (p.control_frames > MAX_QUEUED_CONTROL_FRAMES
                    or p.control_bytes > MAX_QUEUED_CONTROL_BYTES
                    or self._control_bytes > MAX_QUEUED_CONTROL_BYTES_TOTAL)
            counts = (p.control_frames, p.control_bytes, self._control_bytes)
        if over:
            self._abort(GuestMisbehaved(
                f"{self.name}: the agent flooded request {p.rid} with control frames: "
                f"{counts[0]} frames / {counts[1]} bytes queued ({counts[2]} bytes on the "
                f"connection); limits {MAX_QUEUED_CONTROL_FRAMES} frames and "
                f"{MAX_QUEUED_CONTROL_BYTES} bytes per request, {MAX_QUEUED_CONTROL_BYTES_TOTAL} "
                "in all; the link is closed"))
        return not over

    def _uncount_control(self, p: _Pending, size: int) -> None:
        with self._control_lock:
            if not p.done:
                p.control_frames -= 1
                p.control_bytes -= size
                self._control_bytes -= size

    def _retire(self, p: _Pending) -> None:
        """No more frames are queued or counted for `p`; its queued control bytes are freed."""
        with self._control_lock:
            if not p.done:
                p.done = True
                self._control_bytes -= p.control_bytes

    def _fail_request(self, p: _Pending, exc: BaseException) -> None:
        with self._state:
            self._pending.pop(p.rid, None)
        self._retire(p)
        p.frames.put(exc)
        p.send_window.close(str(exc))

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
            self._retire(p)
            p.frames.put(AgentRestarted(f"{self.name}: the agent restarted while the request was running"))
            p.send_window.close("the agent restarted")

    def _fail_all(self, exc: BaseException) -> None:
        with self._state:
            if self._closed is None:
                self._closed = exc
            pending, self._pending = list(self._pending.values()), {}
            self._state.notify_all()
        for p in pending:
            self._retire(p)
            p.send_window.close(str(exc))
            p.frames.put(exc)

    # -- requests ------------------------------------------------------------------------------

    def _open(self, first: P.Message, timeout: float, flags: int = 0) -> _Pending:
        deadline = time.monotonic() + timeout
        ack = self.wait_ready(timeout)
        with self._state:
            if self._closed is not None:
                raise self._closed
            rid = next(self._ids)
            # Receive with the host's own window, never the agent's claim; send within both.
            p = _Pending(rid, P.SendWindow(min(ack.window, self.window)), P.ReceiveWindow(self.window),
                         queue.SimpleQueue())
            self._pending[rid] = p
        try:
            self._send(P.encode_frame(first.TYPE, rid, first.payload(), flags), deadline,
                       f"the {first.TYPE.name} request")
        except BaseException:
            self._close(p)
            raise
        return p

    def _close(self, p: _Pending) -> None:
        p.send_window.close("request finished")
        with self._state:
            self._pending.pop(p.rid, None)
        self._retire(p)

    def _next(self, p: _Pending, deadline: float, what: str) -> P.Frame:
        if isinstance(self._closed, GuestMisbehaved):
            raise self._closed  # what is still queued came from the guest we stopped trusting
        left = deadline - time.monotonic()
        try:
            item = p.frames.get(timeout=max(0.0, left))
        except queue.Empty:
            raise WaitTimeout(f"{self.name}: timed out waiting for {what}") from None
        if isinstance(item, BaseException):
            raise item
        if item.type not in _DATA_ANSWERS:
            self._uncount_control(p, len(item.payload))
        if item.type == P.FrameType.ERROR:
            err = self._parse(P.Error, item, p, what)
            raise RemoteError(err.code, f"{self.name}: {err.message}")
        return item

    def _parse(self, cls: type[P.Message], frame: P.Frame, p: _Pending, what: str) -> Any:
        """frame's typed message; a payload that does not parse is the guest's fault."""
        try:
            return cls.parse(frame.payload)
        except P.ProtocolError as e:
            raise MalformedFrame(
                f"{self.name}: malformed {cls.TYPE.name} frame answering request {p.rid} "
                f"(while waiting for {what}): {e}") from None

    def _unexpected(self, frame: P.Frame, p: _Pending, what: str) -> MalformedFrame:
        return MalformedFrame(f"{self.name}: unexpected {_type_name(frame.type)} frame answering "
                              f"request {p.rid} (while waiting for {what})")

    def _consumed(self, p: _Pending, n: int, deadline: float) -> None:
        credit = p.recv_window.consumed(n)
        if credit:
            self._send(P.credit_frame(p.rid, credit), deadline, "CREDIT")

    def _send_stream(self, p: _Pending, ftype: int, chunks: Iterable[bytes], deadline: float,
                     frame_size: int = P.CHUNK) -> None:
        what = f"{_type_name(ftype)} data of request {p.rid}"
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                # SEND_GRACE is for the frame under way, not for each frame after the
                # deadline: else a guest taking bytes slowly stretched a call by one grace
                # per frame its credit allowed (seen in CI: a 6 s put_file took 9.6 s).
                if time.monotonic() >= deadline:
                    raise WaitTimeout(f"{self.name}: {what} was not all sent by the call's deadline: "
                                      "the guest takes the data too slowly or stopped taking it")
                n = self._take(p, min(len(view), frame_size), deadline, what)
                self._send(P.encode_frame(ftype, p.rid, view[:n]), deadline, what)  # type: ignore[arg-type]
                view = view[n:]
        self._send(P.encode_frame(ftype, p.rid), deadline, what)

    def _take(self, p: _Pending, wanted: int, deadline: float, what: str) -> int:
        try:
            return p.send_window.take(wanted, max(0.0, deadline - time.monotonic()))
        except TimeoutError:  # protocol.SendWindow's builtin one
            raise WaitTimeout(f"{self.name}: no flow-control credit from the guest for {what} "
                              "before the deadline: it stopped taking the data") from None

    def ping(self, data: bytes = b"", timeout: float = 10.0) -> float:
        """Round trip in seconds."""
        deadline = time.monotonic() + timeout
        self.wait_ready(timeout)
        token = data + os.urandom(8)
        q: queue.SimpleQueue[float] = queue.SimpleQueue()
        self._pongs[token] = q
        frame = P.ping_frame(token)
        t0 = time.monotonic()
        try:
            self._send(frame, deadline, "PING")
            return q.get(timeout=max(0.0, deadline - time.monotonic())) - t0
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
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> ExecResult:
        """Run a command; collects output unless callbacks take it.  `wait` bounds the whole call.

        At most `max_output` bytes of stdout + stderr are kept in memory (output given to
        callbacks does not count); past it the command is killed and OutputLimitExceeded raised.
        """
        if stdin is not None and not req.stdin:
            req = dataclasses.replace(req, stdin=True)
        deadline = time.monotonic() + wait
        p = self._open(req, wait)
        writer_error: list[BaseException] = []
        what = f"command {_describe(req)} to finish"
        try:
            if stdin is not None:
                self._start_feeder(p, stdin, deadline, writer_error)
            out, err = bytearray(), bytearray()
            callbacks = {P.FrameType.STDOUT: on_stdout, P.FrameType.STDERR: on_stderr}
            while True:
                f = self._next(p, deadline, what)
                if f.type in callbacks:
                    if not f.payload:
                        continue
                    cb = callbacks[P.FrameType(f.type)]
                    if cb is not None:
                        cb(f.payload)
                    elif len(out) + len(err) + len(f.payload) > max_output:
                        self._kill_for_output(p, deadline)
                        raise OutputLimitExceeded(_output_limit_message(self.name, req, max_output))
                    else:
                        (out if f.type == P.FrameType.STDOUT else err).extend(f.payload)
                    self._consumed(p, len(f.payload), deadline)
                elif f.type == P.FrameType.EXIT:
                    ex = self._parse(P.Exit, f, p, what)
                    self._raise_feeder_error(writer_error, req)
                    status = ex.code if ex.code >= 0 else 128 + ex.signal
                    return ExecResult(
                        status, bytes(out), bytes(err), ex.signal, ex.timed_out, ex.duration_us / 1e6
                    )
                else:
                    raise self._unexpected(f, p, what)
        finally:
            self._close(p)

    def _start_feeder(self, p: _Pending, stdin: bytes | Iterable[bytes], deadline: float,
                      errors: list[BaseException]) -> None:
        chunks = [stdin] if isinstance(stdin, (bytes, bytearray)) else stdin

        def feed() -> None:
            try:
                self._send_stream(p, P.FrameType.STDIN, chunks, deadline)
            except BaseException as e:  # reported when the command ends (_raise_feeder_error)
                errors.append(e)

        threading.Thread(target=feed, name=f"stdin-{self.name}-{p.rid}", daemon=True).start()

    def _raise_feeder_error(self, errors: list[BaseException], req: P.Exec) -> None:
        """A stdin feeder that failed before the command's EXIT arrived (the request was still
        open, so it is no 'request finished'): the command did not get all its input."""
        if not errors:
            return
        e = errors[0]
        if isinstance(e, NtngError):
            raise e
        raise BackdoorError(f"{self.name}: feeding stdin to command {_describe(req)} failed: {e!r}") from e

    def _kill_for_output(self, p: _Pending, deadline: float) -> None:
        """SIGKILL the command, then drop its remaining output until its EXIT (bounded), so
        the agent's task ends instead of waiting for credit for ever."""
        end = min(deadline, time.monotonic() + OUTPUT_KILL_GRACE)
        try:
            self._send(P.Signal(int(signal.SIGKILL)).frame(p.rid), end, "SIGNAL")
            while time.monotonic() < end:
                f = self._next(p, end, "the killed command's exit")
                if f.type == P.FrameType.EXIT:
                    return
                if f.type in _DATA_ANSWERS and f.payload:
                    self._consumed(p, len(f.payload), end)
        except NtngError:
            pass  # the limit error is what the caller hears about

    def set_identity(self, ident: P.Identity, timeout: float = 60.0) -> float:
        """Give a restored clone its identity (agents with the "identity" capability); returns
        the agent's time for it in seconds."""
        deadline = time.monotonic() + timeout
        p = self._open(ident, timeout)
        what = "the clone's identity to be set"
        try:
            f = self._next(p, deadline, what)
            if f.type != P.FrameType.EXIT:
                raise self._unexpected(f, p, what)
            exit_msg: P.Exit = self._parse(P.Exit, f, p, what)
            return exit_msg.duration_us / 1e6
        finally:
            self._close(p)

    def _checksum_flags(self, verify: str, timeout: float) -> int:
        """FLAG_CRC32 when `verify` is "crc32" and the agent can (else sha256, as always)."""
        if verify not in P.CHECKSUMS:
            raise ValueError(f"verify={verify!r}: expected one of {', '.join(P.CHECKSUMS)}")
        ack = self.wait_ready(timeout)
        return P.FLAG_CRC32 if verify == "crc32" and "crc32" in ack.capabilities else 0

    def _frame_size(self) -> int:
        """Bulk data frames as large as both sides take: per-frame work is what costs."""
        ack = self.agent
        return min(self.max_frame, ack.max_frame if ack is not None else P.CHUNK)

    def put_file(
        self,
        source: Path | str,
        target: str,
        mode: int | None = None,
        owner: str = "",
        timeout: float = 900.0,
        verify: str = "crc32",
    ) -> P.FileDone:
        """Copy a host file to `target` in the guest, checked end to end: `verify="crc32"`
        (default: CRC-32 of the whole file, catches corruption on the way) or "sha256" (the
        agent hashes what it wrote; also stands against deliberate collisions).  The FileDone
        returned carries the file's sha256 either way (computed on the host, from the bytes
        the check covered)."""
        deadline = time.monotonic() + timeout
        flags = self._checksum_flags(verify, timeout) | (P.FLAG_DIRECT if self.direct_writes else 0)
        size = os.path.getsize(source)
        sha, crc = _digests_of_file(source)
        digest = crc.digest() if flags & P.FLAG_CRC32 else sha.digest()
        mode = os.stat(source).st_mode & 0o7777 if mode is None else mode
        fh = open(source, "rb")
        with fh:
            p = self._open(P.FilePut(str(target), mode, owner, size, digest), timeout, flags)
            what = f"the copy to {target} to finish"
            try:
                chunks = iter(lambda: fh.read(1 << 20), b"")
                try:
                    self._send_stream(p, P.FrameType.FILE_DATA, chunks, deadline, self._frame_size())
                except P.ProtocolError:
                    pass  # send window closed: the reason (ERROR, restart, lost link) is queued
                f = self._next(p, deadline, what)
                if f.type != P.FrameType.FILE_DONE:
                    raise self._unexpected(f, p, what)
                done: P.FileDone = self._parse(P.FileDone, f, p, what)
                if done.sha256 != digest or done.size != size:
                    raise BackdoorError(
                        f"{self.name}: the copy to {target} arrived corrupted: the agent wrote "
                        f"{done.size} bytes with {_check_name(flags)} {done.sha256.hex()}, we sent "
                        f"{size} bytes with {digest.hex()}")
                return dataclasses.replace(done, sha256=sha.digest())
            finally:
                self._close(p)

    def get_file(
        self,
        source: str,
        target: Path | str,
        timeout: float = 900.0,
        max_size: int = DEFAULT_MAX_FILE_SIZE,
        verify: str = "crc32",
    ) -> P.FileDone:
        """Copy a guest file to a host path, checked on arrival (`verify`: see put_file); the
        FileDone returned carries the sha256 of the bytes written, computed on the host.

        The guest's mode is applied without setuid/setgid/sticky and group/world write bits
        (& 0o755); the data goes to a new private file next to `target` (never through a
        symlink) renamed over it.  More than `max_size` bytes raise FileTooLarge."""
        deadline = time.monotonic() + timeout
        target = Path(target)
        flags = self._checksum_flags(verify, timeout)
        p = self._open(P.FileGet(source), timeout, flags)
        what = f"{source} to arrive"
        try:
            fd, tmp = _create_partial(target)
            try:
                with os.fdopen(fd, "wb") as out:
                    done = self._receive_file(p, out, source, deadline, max_size, what, flags)
                    os.fchmod(out.fileno(), done.mode & SAFE_MODE_BITS)
                os.replace(tmp, target)
                return done
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        finally:
            self._close(p)

    def _receive_file(self, p: _Pending, out: Any, source: str, deadline: float,
                      max_size: int, what: str, flags: int = 0) -> P.FileDone:
        h = P.file_checksum(flags)
        sha = hashlib.sha256() if flags & P.FLAG_CRC32 else h
        size = 0
        while True:
            f = self._next(p, deadline, what)
            if f.type == P.FrameType.FILE_DATA:
                if not f.payload:
                    continue
                if size + len(f.payload) > max_size:
                    raise FileTooLarge(
                        f"{self.name}: {source} is larger than {max_size} bytes (get_file's "
                        f"max_size): copying stopped at {size} bytes; pass a larger "
                        "max_size= if the file is meant to be that big")
                out.write(f.payload)
                h.update(f.payload, f.payload_crc)
                if sha is not h:
                    sha.update(f.payload)
                size += len(f.payload)
                self._consumed(p, len(f.payload), deadline)
            elif f.type == P.FrameType.FILE_DONE:
                done: P.FileDone = self._parse(P.FileDone, f, p, what)
                break
            else:
                raise self._unexpected(f, p, what)
        if done.size != size or done.sha256 != h.digest():
            raise BackdoorError(
                f"{self.name}: {source} arrived corrupted: got {size} bytes {_check_name(flags)} "
                f"{h.digest().hex()}, agent sent {done.size} bytes {_check_name(flags)} {done.sha256.hex()}"
            )
        return dataclasses.replace(done, sha256=sha.digest())


_DATA_ANSWERS = frozenset({P.FrameType.STDOUT, P.FrameType.STDERR, P.FrameType.FILE_DATA})


def _type_name(ftype: int) -> str:
    try:
        return P.FrameType(ftype).name
    except ValueError:
        return f"type-{ftype}"


def _output_limit_message(name: str, req: P.Exec, limit: int) -> str:
    return (f"{name}: command {_describe(req)} printed more than {limit} bytes, the most output "
            "kept in memory (max_output); it was killed.  Stream the output with on_stdout= / "
            "on_stderr= callbacks, redirect it to a file in the guest, or raise the limit "
            "(execute(max_output=...), Machine.run(max_output=...) or Machine.max_output)")


def _create_partial(target: Path) -> tuple[int, Path]:
    """A new file only we can read, next to `target`: O_EXCL|O_NOFOLLOW under a fresh name, so
    nothing planted there (a symlink, a file) is followed or reused."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        tmp = target.with_name(f".{target.name}.{os.urandom(6).hex()}.ntng-partial")
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue


def _digests_of_file(path: Path | str) -> tuple[Any, P.Crc32]:
    """(sha256, CRC-32) of a host file, one read."""
    sha, crc = hashlib.sha256(), P.Crc32()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
            crc.update(chunk)
    return sha, crc


def _check_name(flags: int) -> str:
    return "crc32" if flags & P.FLAG_CRC32 else "sha256"


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

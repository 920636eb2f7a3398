"""A small QMP client: greeting, capabilities negotiation, commands, and an event log.

A reader thread splits the JSON lines into replies (matched by id) and events (kept, and
handed to a callback), so waiting for SHUTDOWN never races with a command reply.  The event
log is bounded (MAX_QUEUED_EVENTS); next_event()/wait_for() read it as a queue, as the NixOS
driver's wait_for_qmp_event does: each event is handed out once, in order.
"""

from __future__ import annotations

import itertools
import json
import linecache
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import BackdoorError, WaitTimeout

# Events kept: the newest this many.  QEMU sends few (state changes, devices, jobs), but a
# script that never reads them must not make the runner grow; an unread event pushed out is
# counted and named when a wait for events times out.
MAX_QUEUED_EVENTS = 1000
EVENTS_NAMED_ON_TIMEOUT = 10  # a timed-out wait_for names the last this many events it passed over

EventFilter = Callable[[dict[str, Any]], bool]


class QMPError(BackdoorError):
    pass


def describe_filter(event_filter: EventFilter) -> str:
    """What a wait_for_qmp_event waited for, for its timeout message: the filter's name and,
    when its source can be read (a lambda in the test script), the line it is on."""
    name = getattr(event_filter, "__name__", None) or repr(event_filter)
    code = getattr(event_filter, "__code__", None)
    if code is None:
        return name
    line = linecache.getline(code.co_filename, code.co_firstlineno).strip()
    where = f"{Path(code.co_filename).name}:{code.co_firstlineno}"
    return f"{name} at {where}" + (f" ({line})" if line else "")


class QMPClient:
    def __init__(
        self, sock: socket.socket, name: str, on_event: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.sock = sock
        self.name = name
        self.on_event = on_event
        # The newest MAX_QUEUED_EVENTS events; events[0] is event number received - len(events).
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_QUEUED_EVENTS)
        self.received = 0  # events received in all
        self.unread = 0  # number of the next event next_event() hands out
        self.dropped_unread = 0  # events pushed out of the log before next_event() read them
        self.greeting: dict[str, Any] = {}
        self._replies: dict[int, queue.SimpleQueue[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._events_cond = threading.Condition()
        self._closed = False
        self._greeted: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read_loop, name=f"qmp-{name}", daemon=True)
        self._reader.start()

    def negotiate(self, timeout: float = 30.0) -> None:
        try:
            self.greeting = self._greeted.get(timeout=timeout)
        except queue.Empty:
            raise WaitTimeout(f"{self.name}: no QMP greeting within {timeout}s") from None
        self.command("qmp_capabilities", timeout=timeout)

    def _read_loop(self) -> None:
        buf = b""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        self._handle(json.loads(line))
        except (OSError, ValueError):
            pass
        finally:
            self._closed = True
            with self._lock:
                waiting = list(self._replies.values())
            for q in waiting:
                q.put({"error": {"class": "Closed", "desc": "QMP connection closed"}})
            with self._events_cond:
                self._events_cond.notify_all()

    def _handle(self, msg: dict[str, Any]) -> None:
        if "QMP" in msg:
            self._greeted.put(msg)
        elif "event" in msg:
            with self._events_cond:
                self.events.append(msg)
                self.received += 1
                self._events_cond.notify_all()
            if self.on_event:
                self.on_event(msg)
        elif "id" in msg:
            with self._lock:
                q = self._replies.pop(msg["id"], None)
            if q is not None:
                q.put(msg)

    def command(self, execute: str, timeout: float = 30.0, **arguments: Any) -> Any:
        if self._closed:
            raise QMPError(f"{self.name}: QMP connection is closed (VM gone?)")
        rid = next(self._ids)
        q: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        with self._lock:
            self._replies[rid] = q
        msg: dict[str, Any] = {"execute": execute, "id": rid}
        if arguments:
            msg["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise QMPError(f"{self.name}: QMP send failed: {e}") from None
        try:
            reply = q.get(timeout=timeout)
        except queue.Empty:
            raise WaitTimeout(f"{self.name}: QMP {execute} got no reply within {timeout}s") from None
        if "error" in reply:
            err = reply["error"]
            raise QMPError(f"{self.name}: QMP {execute} failed: {err.get('class')}: {err.get('desc')}")
        return reply.get("return")

    def _first(self) -> int:
        """The number of the oldest event still in the log (hold _events_cond)."""
        return self.received - len(self.events)

    def wait_event(self, names: set[str], timeout: float, since: int = 0) -> dict[str, Any]:
        """The first event named in `names` with number >= since in the event log (it does not
        consume events: next_event() still hands them out)."""
        deadline = time.monotonic() + timeout
        with self._events_cond:
            while True:
                first = self._first()
                for ev in itertools.islice(self.events, max(0, since - first), None):
                    if ev["event"] in names:
                        return ev
                if self._closed:
                    raise QMPError(f"{self.name}: QMP closed while waiting for {sorted(names)}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(f"{self.name}: no {'/'.join(sorted(names))} event within {timeout}s")
                self._events_cond.wait(left)

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The oldest event not handed out yet, waiting up to `timeout` seconds for one; None
        when none came.  Events received before the call count (a script may trigger an event
        and only then wait for it)."""
        deadline = time.monotonic() + timeout
        with self._events_cond:
            while True:
                first = self._first()
                if self.unread < first:  # pushed out of the bounded log unread
                    self.dropped_unread += first - self.unread
                    self.unread = first
                if self.unread < self.received:
                    ev = self.events[self.unread - first]
                    self.unread += 1
                    return ev
                if self._closed:
                    raise QMPError(f"{self.name}: QMP connection closed while waiting for an event (VM gone?)")
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._events_cond.wait(left)

    def wait_for(self, event_filter: EventFilter, timeout: float) -> dict[str, Any]:
        """The first unread event for which event_filter is true; the events before it are read
        and passed over (NixOS semantics).  The filter runs outside the reader's lock."""
        deadline = time.monotonic() + timeout
        passed: deque[str] = deque(maxlen=EVENTS_NAMED_ON_TIMEOUT)
        skipped = 0
        while True:
            try:
                ev = self.next_event(max(0.0, deadline - time.monotonic()))
            except QMPError as e:
                raise QMPError(f"{e} (waiting for a QMP event matching {describe_filter(event_filter)})") from None
            if ev is None:
                raise WaitTimeout(self._wait_for_timeout(event_filter, timeout, skipped, list(passed)))
            if event_filter(ev):
                return ev
            skipped += 1
            passed.append(str(ev.get("event")))

    def _wait_for_timeout(self, event_filter: EventFilter, timeout: float, skipped: int,
                          passed: list[str]) -> str:
        seen = (f"{skipped} other event(s) passed over" + (f", the last: {', '.join(passed)}" if passed else "")
                if skipped else "no events came")
        dropped = (f"; {self.dropped_unread} event(s) were dropped unread (more than "
                   f"{MAX_QUEUED_EVENTS} queued)" if self.dropped_unread else "")
        return (f"{self.name}: no QMP event matching {describe_filter(event_filter)} within "
                f"{timeout:g}s ({seen}{dropped})")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

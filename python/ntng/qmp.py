"""A small QMP client: greeting, capabilities negotiation, commands, and an event log.

A reader thread splits the JSON lines into replies (matched by id) and events (kept, and
handed to a callback), so waiting for SHUTDOWN never races with a command reply.
"""

from __future__ import annotations

import itertools
import json
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import BackdoorError, WaitTimeout


class QMPError(BackdoorError):
    pass


class QMPClient:
    def __init__(
        self, sock: socket.socket, name: str, on_event: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.sock = sock
        self.name = name
        self.on_event = on_event
        self.events: list[dict[str, Any]] = []
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

    def wait_event(self, names: set[str], timeout: float, since: int = 0) -> dict[str, Any]:
        """The first event named in `names` at index >= since in the event log."""
        deadline = time.monotonic() + timeout
        with self._events_cond:
            while True:
                for ev in self.events[since:]:
                    if ev["event"] in names:
                        return ev
                if self._closed:
                    raise QMPError(f"{self.name}: QMP closed while waiting for {sorted(names)}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(f"{self.name}: no {'/'.join(sorted(names))} event within {timeout}s")
                self._events_cond.wait(left)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

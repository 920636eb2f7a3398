"""A HELLO the agent never saw must not cost the boot timeout: a connected agent that has not
answered is sent another HELLO (session.HELLO_AGAIN_AFTER).  The guest is the real agent
(silent_vmm) behind a relay that swallows the host's first two HELLOs."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import silent_vmm

from ntng import backends, session
from ntng import protocol as P
from ntng.machine import Machine

pytestmark = pytest.mark.timeout(60)


class LosesFirstHello(silent_vmm.AgentVmm):
    """The host talks to a relay; host → agent, the first two HELLO frames are dropped (the
    client's first, and the one it sends on the agent's ANNOUNCE)."""

    def connect_backdoor(self, timeout: float) -> socket.socket:
        agent = super().connect_backdoor(timeout)
        host, relay = socket.socketpair()
        threading.Thread(target=self._to_agent, args=(relay, agent), daemon=True).start()
        threading.Thread(target=self._to_host, args=(agent, relay), daemon=True).start()
        return host

    @staticmethod
    def _to_agent(src: socket.socket, dst: socket.socket) -> None:
        decoder, dropped = P.Decoder(), 0
        while data := src.recv(65536):
            decoder.feed(data)
            for ev in decoder.events():
                if isinstance(ev, P.Frame):
                    if ev.type == P.FrameType.HELLO and dropped < 2:
                        dropped += 1  # the client's own and the one answering ANNOUNCE
                        continue
                    dst.sendall(ev.encode())

    @staticmethod
    def _to_host(src: socket.socket, dst: socket.socket) -> None:
        while data := src.recv(65536):
            dst.sendall(data)


def test_a_lost_hello_is_said_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def make(name: str, plan: dict[str, Any], preexec: Callable[[], None] | None = None,
             keep_disk: bool = False, **_options: Any) -> LosesFirstHello:
        return LosesFirstHello(name, plan, preexec, keep_disk)

    monkeypatch.setattr(backends, "make", make)
    monkeypatch.setattr(session, "HELLO_AGAIN_AFTER", 1.0, raising=False)
    m = Machine("m", silent_vmm.plan(tmp_path / "state"), tmp_path / "out", boot_timeout=20,
                log=lambda _line: None)
    try:
        t0 = time.monotonic()
        assert m.succeed("echo up") == "up\n"
        assert time.monotonic() - t0 < 10, "the second HELLO should be answered at once"
    finally:
        m.release()

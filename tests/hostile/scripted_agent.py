"""A hostile guest: the agent's end of a socketpair speaking the real wire protocol
(ntng.protocol frames), but answering from a script instead of the real agent.

It answers the host's HELLO with a HelloAck whose limits the test controls (a window of
4294967295, say), then runs the test's attack.  The client under test is the real
BackdoorClient on the other end of the socketpair.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ntng import protocol as P
from ntng.client import BackdoorClient

MiB = 1024 * 1024


class ScriptedAgent:
    """The guest end: read the host's frames, write whatever the script wants."""

    def __init__(self, sock: socket.socket, **ack: Any) -> None:
        self.sock = sock
        self.ack_fields = ack
        self.decoder = P.Decoder()
        self.received: list[P.Frame] = []  # every frame read, in order (tests inspect it)
        self.error: BaseException | None = None  # what the script raised, if anything
        self.reading = True  # False: the guest has stopped reading (it still writes)
        self._send_lock = threading.Lock()  # the script and the test may both write

    # -- reading ----------------------------------------------------------------------------

    def recv_frame(self, timeout: float = 10.0) -> P.Frame:
        """The next frame the host sent (Garbage is skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.decoder.events():
                if isinstance(ev, P.Frame):
                    self.received.append(ev)
                    return ev
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError("the host sent no frame")
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("the host closed the connection")
            self.decoder.feed(data)

    def expect(self, ftype: int, timeout: float = 10.0) -> P.Frame:
        """The next frame of type `ftype` (others are kept in `received` and skipped)."""
        while True:
            f = self.recv_frame(timeout)
            if f.type == ftype:
                return f

    def drain_forever(self) -> None:
        """Read and drop everything the host sends (in a thread), so it never blocks."""
        def run() -> None:
            try:
                while self.sock.recv(1 << 20):
                    pass
            except OSError:
                pass
        threading.Thread(target=run, daemon=True).start()

    # -- writing ----------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def send_frame(self, ftype: int, rid: int, payload: bytes = b"") -> None:
        self.send(P.encode_frame(ftype, rid, payload))

    def handshake(self) -> P.Hello:
        """Answer the host's HELLO with a HelloAck built from the test's fields."""
        hello = P.Hello.parse(self.expect(P.FrameType.HELLO).payload)
        fields: dict[str, Any] = {
            "version": P.VERSION, "nonce": hello.nonce, "agent_version": "scripted",
            "boot_id": "b00t", "hostname": "hostile", "max_frame": P.DEFAULT_MAX_FRAME,
            "window": P.DEFAULT_WINDOW, "max_in_flight": P.DEFAULT_MAX_IN_FLIGHT,
            "capabilities": ["identity"],
        }
        fields.update(self.ack_fields)
        self.send(P.HelloAck(**fields).frame(P.HANDSHAKE_REQUEST_ID))
        return hello


Script = Callable[[ScriptedAgent], None]


def pong_forever(agent: ScriptedAgent) -> None:
    """An idle but live guest: answers PINGs, ignores the rest."""
    while True:
        f = agent.recv_frame(3600)
        if f.type == P.FrameType.PING:
            agent.send(P.pong_frame(f) or b"")


@contextmanager
def hostile(script: Script, sndbuf: int | None = None, **ack: Any) -> Iterator[tuple[BackdoorClient, ScriptedAgent]]:
    """A BackdoorClient connected to a ScriptedAgent that shakes hands, then runs `script`
    in its own thread.  `sndbuf` shrinks the host's socket send buffer (a guest that stops
    reading then blocks the host after a few KiB instead of a few hundred)."""
    host, guest = socket.socketpair()
    if sndbuf is not None:
        host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        guest.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    agent = ScriptedAgent(guest, **ack)

    def run() -> None:
        try:
            agent.handshake()
            script(agent)
        except (OSError, EOFError):
            pass  # the host closed the link: the attack is over
        except BaseException as e:  # noqa: BLE001 - reported by the test
            agent.error = e

    thread = threading.Thread(target=run, name="scripted-agent", daemon=True)
    thread.start()
    client = BackdoorClient(host, name="hostile")
    try:
        client.wait_ready(10)
        yield client, agent
    finally:
        client.close()
        guest.close()


def reader_alive(client: BackdoorClient) -> bool:
    return client._reader.is_alive()


def request_id(agent: ScriptedAgent, ftype: int, timeout: float = 10.0) -> int:
    """The request id of the host's next request of type `ftype`."""
    return agent.expect(ftype, timeout).request_id

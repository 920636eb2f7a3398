"""forward_port (python/ntng/portforward.py) with a local echo server as the "guest" port:
finished connections give their fds back, concurrent connections are capped, and other local
users cannot use the forward."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from ntng import portforward
from ntng.portforward import PortForward


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    srv = socket.create_server(("127.0.0.1", 0), backlog=128)

    def serve(c: socket.socket) -> None:
        with c:
            while data := c.recv(65536):
                c.sendall(data)

    def accept() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield srv.getsockname()
    srv.close()


def until(cond: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return bool(cond())  # type: ignore[operator]


def roundtrip(port: int, payload: bytes = b"ping") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(payload)
        return c.recv(100)


def try_roundtrip(port: int) -> bytes:
    try:
        return roundtrip(port)
    except ConnectionError:
        return b""  # refused while the freed slot is not yet seen free


def test_2000_connections_leave_no_fds_behind(echo: tuple[str, int]) -> None:
    log: list[str] = []
    fwd = PortForward(0, lambda: socket.create_connection(echo), "echo", log.append)
    try:
        assert roundtrip(fwd.port) == b"ping"  # warm up (lazily opened fds, threads)
        time.sleep(0.2)
        before = fd_count()
        for i in range(2000):
            assert roundtrip(fwd.port, b"%d" % i) == b"%d" % i, log
        assert until(lambda: fd_count() <= before), f"{fd_count() - before} fds leaked"
    finally:
        fwd.close()
    assert log == []


def test_concurrent_connections_are_capped(echo: tuple[str, int]) -> None:
    cap = getattr(portforward, "MAX_CONNECTIONS", 64)
    log: list[str] = []
    fwd = PortForward(0, lambda: socket.create_connection(echo), "echo", log.append)
    held = []
    try:
        for _ in range(cap):
            c = socket.create_connection(("127.0.0.1", fwd.port), timeout=5)
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            held.append(c)
        extra = socket.create_connection(("127.0.0.1", fwd.port), timeout=5)
        extra.sendall(b"x")
        try:
            assert extra.recv(1) == b"", "a connection past the cap was relayed"
        except ConnectionResetError:
            pass
        extra.close()
        assert any("MAX_CONNECTIONS" in line for line in log), log
        held.pop().close()  # a slot frees up: new connections work again
        assert until(lambda: try_roundtrip(fwd.port) == b"ping")
    finally:
        for c in held:
            c.close()
        fwd.close()


NOBODY = 65534
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable  # nobody may run it
CLIENT = """
import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
c.sendall(b"hello")
try:
    print(repr(c.recv(100)))
except ConnectionResetError:
    print("reset")
"""


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become another user")
def test_other_local_users_are_refused(echo: tuple[str, int]) -> None:
    log: list[str] = []
    upstreams = []

    def connect() -> socket.socket:
        upstreams.append(1)
        return socket.create_connection(echo)

    fwd = PortForward(0, connect, "echo", log.append)
    try:
        def run(uid: int) -> str:
            return subprocess.run([PYTHON, "-c", CLIENT, str(fwd.port)], capture_output=True, text=True,
                                  timeout=30, check=True, preexec_fn=lambda: os.setuid(uid)).stdout.strip()

        assert run(NOBODY) in ("b''", "reset")
        assert upstreams == []  # the guest port was never reached
        assert any("refused" in line and f"uid {NOBODY}" in line for line in log), log
        assert run(0) == "b'hello'"  # the runner's own uid (root here) is served
    finally:
        fwd.close()


def test_the_owner_lookup_finds_this_process(echo: tuple[str, int]) -> None:
    with socket.create_connection(echo) as c:
        assert portforward.tcp_owner(c.getsockname(), c.getpeername()) == os.getuid()
        assert portforward.tcp_owner(("127.0.0.1", 1), c.getpeername()) is None

"""Host side of hybrid vsock (Firecracker's, Cloud Hypervisor's): a unix socket the VMM
listens on; the host writes "CONNECT <port>\\n" and reads "OK <host port>\\n", then the
connection is a stream to the guest's vsock port.

Until the guest listens on the port, the VMM closes the connection instead of answering OK:
that is retried until the timeout, anything else is an error.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable

from ..errors import BackdoorError, ConnectionLost, WaitTimeout

_OK = re.compile(rb"OK (\d+)\n")
_MAX_LINE = 64


class _NotYet(Exception):
    """Nothing listens on the guest port yet (or the VMM's socket is not up): try again."""


def connect(uds: str, port: int, timeout: float, alive: Callable[[], bool], who: str) -> socket.socket:
    """A stream to guest vsock `port` through the VMM's hybrid vsock socket `uds`."""
    deadline = time.monotonic() + timeout
    why = "not tried"
    while True:
        if not alive():
            raise ConnectionLost(f"{who}: the VMM exited while connecting to vsock port {port} ({why})")
        try:
            return _attempt(uds, port, max(0.1, min(5.0, deadline - time.monotonic())), who)
        except _NotYet as e:
            why = str(e)
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"{who}: vsock port {port} through {uds} did not answer within "
                              f"{timeout:.0f}s (last: {why})")
        time.sleep(0.05)


def _attempt(uds: str, port: int, timeout: float, who: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(uds)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise _NotYet(f"{uds}: {e.strerror}") from None
        line = b""
        try:
            sock.sendall(f"CONNECT {port}\n".encode())
            # Byte by byte: what follows the line is the guest's, and must stay in the socket.
            while not line.endswith(b"\n") and len(line) < _MAX_LINE:
                b = sock.recv(1)
                if not b:
                    raise _NotYet(f"the VMM closed the connection after CONNECT {port} (no listener in the guest yet)")
                line += b
        except TimeoutError:
            raise _NotYet(f"no answer to CONNECT {port} within {timeout:.1f}s") from None
        except (ConnectionResetError, BrokenPipeError) as e:
            raise _NotYet(f"CONNECT {port}: {e.strerror}") from None
        if not _OK.fullmatch(line):
            raise BackdoorError(f"{who}: {uds} answered CONNECT {port} with {line!r}, expected b'OK <port>\\n'")
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise

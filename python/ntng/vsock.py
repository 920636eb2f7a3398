"""Host ends of a vsock backdoor: hybrid vsock over a unix socket, or AF_VSOCK.

Hybrid vsock (Firecracker, Cloud Hypervisor, and QEMU through vhost-device-vsock) puts the
host side of the guest's vsock on a unix socket: the host connects, writes `CONNECT <port>\\n`
and reads `OK <host port>\\n` once a guest process listens on that port.  Until then the
multiplexer closes the connection (or says nothing), so connecting is a retry loop bounded by
the caller's timeout.  Unlike a virtio-serial port, a vsock connection ends with the guest
process that accepted it: after a reboot or an agent restart the host connects again.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

from .client import connect_unix
from .errors import BackdoorError, ConnectionLost, WaitTimeout

ATTEMPT_TIMEOUT = 2.0  # one AF_VSOCK connect; a listening guest answers in milliseconds
RETRY_DELAY = 0.1
MAX_REPLY = 64  # "OK 4294967295\n" fits many times over
ALIVE_EVERY = 1.0  # how often a CONNECT waiting for its answer checks that the VMM still runs


class HandshakeRefused(BackdoorError):
    """The multiplexer answered CONNECT with something other than OK."""


def _read_line(sock: socket.socket, deadline: float, alive: Callable[[], bool] | None) -> bytes:
    """Read up to a newline (or EOF) byte by byte: nothing after it may be consumed, since the
    guest's first bytes follow the OK line on the same stream.  Returns what came by `deadline`;
    raises ConnectionLost when `alive` says the VMM is gone."""
    line = b""
    while not line.endswith(b"\n") and len(line) < MAX_REPLY:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(min(left, ALIVE_EVERY))
        try:
            byte = sock.recv(1)
        except TimeoutError:
            if alive is not None and not alive():
                raise ConnectionLost("the VMM exited while a vsock CONNECT waited for its answer") from None
            continue
        if not byte:
            break
        line += byte
    return line


def hybrid_handshake(sock: socket.socket, port: int, deadline: float,
                     alive: Callable[[], bool] | None = None) -> bool:
    """Ask for guest `port` on a connected hybrid vsock socket and wait for the answer, until
    `deadline`.  True when the guest accepted; False when nobody listens there yet (the
    multiplexer closed the connection, or said nothing by the deadline); HandshakeRefused for
    anything else."""
    sock.sendall(f"CONNECT {port}\n".encode())
    line = _read_line(sock, deadline, alive)
    if line.startswith(b"OK ") and line.endswith(b"\n"):
        sock.settimeout(None)
        return True
    if not line or not line.endswith(b"\n"):
        return False
    raise HandshakeRefused(f"CONNECT {port} was answered {line!r}, expected 'OK <port>'")


def connect_hybrid(
    uds: Path | str, port: int, timeout: float, alive: Callable[[], bool] | None = None
) -> socket.socket:
    """A stream to the guest process listening on vsock `port`, through hybrid socket `uds`.

    A CONNECT is never given up while it may still be answered, only when the multiplexer
    closes it (nobody listens yet: try again), the VMM is gone, or `timeout` has passed.
    vhost-device-vsock 0.3 panics when a guest accepts a connection whose host end was closed
    meanwhile (it writes the OK to that socket and unwraps the EPIPE): its vsock thread dies and
    no later CONNECT is ever answered.  Measured: a host that closed its attempt 2 s after
    CONNECT, while a loaded TCG guest was still accepting, lost the backdoor for the rest of
    the VM's life.  A queued CONNECT does reach the guest once its driver is up: the multiplexer
    then answers it, or closes it when the guest resets it."""
    deadline = time.monotonic() + timeout
    while True:
        sock = connect_unix(uds, timeout=max(0.1, deadline - time.monotonic()), alive=alive)
        try:
            if hybrid_handshake(sock, port, deadline, alive):
                return sock
        except OSError:
            pass  # reset while the multiplexer found nobody listening: try again
        except BaseException:
            sock.close()
            raise
        sock.close()
        if alive is not None and not alive():
            raise ConnectionLost(f"the process serving {uds} exited")
        if time.monotonic() >= deadline:
            raise WaitTimeout(
                f"timed out after {timeout:.0f}s waiting for a guest listener on vsock port {port} "
                f"(hybrid socket {uds})"
            )
        time.sleep(RETRY_DELAY)


def connect_vsock(cid: int, port: int, timeout: float, alive: Callable[[], bool] | None = None) -> socket.socket:
    """A stream to (cid, port) over AF_VSOCK (needs /dev/vhost-vsock on the host)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.settimeout(min(ATTEMPT_TIMEOUT, max(0.1, deadline - time.monotonic())))
        try:
            sock.connect((cid, port))
            sock.settimeout(None)
            return sock
        except (ConnectionResetError, ConnectionRefusedError, TimeoutError):
            sock.close()
        if alive is not None and not alive():
            raise ConnectionLost(f"the VM with vsock CID {cid} exited")
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for a guest listener on vsock {cid}:{port}")
        time.sleep(RETRY_DELAY)

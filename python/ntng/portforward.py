"""forward_port: a TCP listener on the host's loopback relaying each connection to a guest port.

The guests sit in the runner's network namespace, unreachable from the host's; the upstream
socket is made inside the namespace (Network.connect) and bytes are copied both ways.  Only
local users with the runner's uid (or root) may use a forward: other users of the host must not
reach the VM through it.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
import threading
from collections.abc import Callable

Connect = Callable[[], socket.socket]
Log = Callable[[str], None]
Owner = Callable[[tuple[str, int], tuple[str, int]], "int | None"]

# Concurrent relayed connections per forward: each holds two sockets and two threads, and a test
# needs a handful.  Past it a new connection is closed at once (with a log line).  Raise it here.
MAX_CONNECTIONS = 64

# sock_diag (linux/sock_diag.h, linux/inet_diag.h): the exact lookup of one TCP socket.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_TCP_TIME_WAIT = 6  # a closed socket's leftover: its uid reads 0, so it proves nothing
_NO_COOKIE = 0xFFFFFFFF
_UID_OFFSET = 16 + 4 + 48 + 12  # nlmsghdr, inet_diag_msg's four u8s, sockid, expires/rqueue/wqueue


def _sockid(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    return (struct.pack("!HH", src[1], dst[1]) + socket.inet_aton(src[0]) + bytes(12)
            + socket.inet_aton(dst[0]) + bytes(12) + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE))


def tcp_owner(peer: tuple[str, int], local: tuple[str, int]) -> int | None:
    """The uid owning the IPv4 socket at `peer` that is connected to `local` (so the process
    that connected to us), or None if the kernel knows no such live socket."""
    req = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + _sockid(peer, local)
    hdr = struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as s:
        s.settimeout(2)
        s.send(hdr + req)
        data = s.recv(65536)
    if len(data) < _UID_OFFSET + 4 or struct.unpack_from("=H", data, 4)[0] == _NLMSG_ERROR:
        return None
    if data[17] == _TCP_TIME_WAIT:
        return None
    return int(struct.unpack_from("=I", data, _UID_OFFSET)[0])


def _pump(src: socket.socket, dst: socket.socket, done: Callable[[], None]) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        # Half-close: the other direction may still be sending.
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        done()


class _Conn:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.socks = (client, upstream)
        self.pumps = 2  # directions still running; at 0 both sockets are closed

    def close(self) -> None:
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class PortForward:
    def __init__(self, host_port: int, connect: Connect, what: str, log: Log,
                 owner: Owner = tcp_owner, max_connections: int = MAX_CONNECTIONS) -> None:
        self.what = what
        self._connect = connect
        self._log = log
        self._owner = owner
        self._max = max_connections
        self._closed = False
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()
        self._refusing = False  # at the cap: log once per episode, not once per connection
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind(("127.0.0.1", host_port))
        except OSError as e:
            self.listener.close()
            raise OSError(e.errno, f"forward_port: cannot listen on 127.0.0.1:{host_port}: {e.strerror}") from None
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, name=f"forward-{self.port}", daemon=True).start()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def _allowed(self, client: socket.socket, peer: tuple[str, int]) -> bool:
        try:
            uid = self._owner(peer, client.getsockname())
        except OSError as e:
            self._log(f"forward_port {self.port}: cannot tell who connected from {peer[0]}:{peer[1]} ({e}); refused")
            return False
        if uid is None or uid not in (0, os.getuid()):
            self._log(f"forward_port {self.port}: refused a connection from {peer[0]}:{peer[1]} "
                      f"(uid {uid}; only uid {os.getuid()} and root may use it)")
            return False
        return True

    def _at_cap(self) -> bool:
        with self._lock:
            full = len(self._conns) >= self._max
            if full and not self._refusing:
                self._log(f"forward_port {self.port} → {self.what}: {self._max} connections open "
                          "(portforward.MAX_CONNECTIONS); closing new ones until one ends")
            self._refusing = full
            return full

    def _accept(self) -> None:
        while True:
            try:
                client, peer = self.listener.accept()
            except OSError:
                return  # closed
            if self._at_cap() or not self._allowed(client, peer):
                client.close()
                continue
            try:
                upstream = self._connect()
            except (OSError, ConnectionError) as e:
                self._log(f"forward_port {self.port} → {self.what}: {e}")
                client.close()
                continue
            conn = _Conn(client, upstream)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            done = functools.partial(self._pump_done, conn)  # bound now: `conn` is rebound next loop
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b, done), daemon=True).start()

    def _pump_done(self, conn: _Conn) -> None:
        with self._lock:
            conn.pumps -= 1
            if conn.pumps:
                return
            self._conns.discard(conn)
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for c in conns:
            c.close()

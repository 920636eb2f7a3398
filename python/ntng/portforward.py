"""forward_port: a TCP listener on the host's loopback relaying each connection to a guest port.

The guests sit in the runner's network namespace, unreachable from the host's; the upstream
socket is made inside the namespace (Network.connect) and bytes are copied both ways.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

Connect = Callable[[], socket.socket]
Log = Callable[[str], None]


def _pump(src: socket.socket, dst: socket.socket) -> None:
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


class PortForward:
    def __init__(self, host_port: int, connect: Connect, what: str, log: Log) -> None:
        self.what = what
        self._connect = connect
        self._log = log
        self._closed = False
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
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

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = self._connect()
            except (OSError, ConnectionError) as e:
                self._log(f"forward_port {self.port} → {self.what}: {e}")
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

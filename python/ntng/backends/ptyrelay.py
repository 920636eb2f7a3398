"""A pseudo-terminal as a socket: Cloud Hypervisor's virtio-console (hvc0) appears on the host
as a pty, while the backdoor client speaks to sockets.  A thread copies bytes both ways."""

from __future__ import annotations

import os
import select
import socket
import termios
import threading
import tty

from ..errors import SetupError


def open_pty(path: str, who: str) -> socket.socket:
    """The host end of the pty at `path`, raw (no echo, no line editing, 8-bit clean), behind a
    socket.  Closing the socket closes the pty; the VMM closing the pty closes the socket."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    except OSError as e:
        raise SetupError(f"{who}: cannot open the virtio-console's pty {path}: {e.strerror}") from None
    try:
        # TCSANOW: keep what the guest already sent (its agent's announcement).
        tty.setraw(fd, termios.TCSANOW)
    except BaseException:
        os.close(fd)
        raise
    ours, theirs = socket.socketpair()
    threading.Thread(target=_relay, args=(fd, theirs), name=f"pty-{path}", daemon=True).start()
    return ours


def _relay(fd: int, sock: socket.socket) -> None:
    sfd = sock.fileno()
    try:
        while True:
            ready, _, _ = select.select([fd, sfd], [], [])
            if fd in ready:
                data = os.read(fd, 65536)  # EIO once the VMM closed its end
                if not data:
                    break
                sock.sendall(data)
            if sfd in ready:
                data = sock.recv(65536)
                if not data:
                    break
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
    except OSError:
        pass
    finally:
        os.close(fd)
        sock.close()

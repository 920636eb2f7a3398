"""The runner's own network namespace, anonymous and held by a file descriptor.

Bridges and TAP devices live in it, so the host's network is never touched.  It has no name
in /run/netns: the kernel frees it (with every device in it) once the runner's descriptor is
closed and the VMMs inside it are gone, which PDEATHSIG guarantees even after kill -9 of the
runner.  Nothing can be left behind for a later run to reap.

The stdlib has no setns/unshare before Python 3.12: cffi.  Both act on the calling *thread*,
so the namespace is entered on short-lived threads and in forked children, never on the
runner's main thread.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from cffi import FFI

from .errors import SetupError

CLONE_NEWNET = 0x40000000
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21

_ffi = FFI()
_ffi.cdef("int setns(int fd, int nstype); int unshare(int flags);")
_libc = _ffi.dlopen(None)

T = TypeVar("T")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = _ffi.errno
        raise OSError(err, f"{what}: {os.strerror(err)}")


def has_capability(cap: int) -> bool:
    """Whether the runner holds `cap` in its effective set (from /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def _on_thread(fn: Callable[[], T]) -> T:
    box: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            box.append(fn())
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=target, name="ntng-netns", daemon=True)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return box[0]


class NetNamespace:
    def __init__(self) -> None:
        def create() -> int:
            # The thread dies right after: no need to switch it back.
            _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

        try:
            self.fd: int | None = _on_thread(create)
        except OSError as e:
            raise SetupError(f"cannot create the test's network namespace ({e}); "
                             "run as root or with CAP_SYS_ADMIN + CAP_NET_ADMIN, or use --network vde") from None
        self.inode = os.fstat(self.fd).st_ino

    def _fd(self) -> int:
        if self.fd is None:
            raise SetupError("the test's network namespace is already closed")
        return self.fd

    def enter(self) -> None:
        """Move the calling thread into the namespace (for a child's preexec_fn)."""
        _check(_libc.setns(self._fd(), CLONE_NEWNET), "setns")

    def run(self, fn: Callable[[], T]) -> T:
        """fn() on a thread inside the namespace: sockets it makes stay in the namespace."""
        fd = self._fd()

        def inside() -> T:
            _check(_libc.setns(fd, CLONE_NEWNET), "setns")
            return fn()

        return _on_thread(inside)

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        return self.run(lambda: socket.socket(family, kind))

    def iproute(self) -> NamespacedIPRoute:
        """pyroute2's IPRoute, working inside the namespace (see NamespacedIPRoute)."""
        return NamespacedIPRoute(self._fd())

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class NamespacedIPRoute:
    """A pyroute2 IPRoute whose every call runs on one worker thread inside the namespace.

    Not IPRoute(netns=...): pyroute2 keeps a netlink socket per calling *thread* and makes each
    one in a forked child, and a fork of a process with threads can deadlock in the child (a
    lock another thread held at the fork): seen as runners hung in their network setup, and as
    unit tests hanging after tests that left threads behind.  One thread that entered the
    namespace has one socket made there, no fork; tap devices, which pyroute2 makes with
    ioctls on /dev/net/tun, land in the namespace too."""

    def __init__(self, ns_fd: int) -> None:
        from pyroute2 import IPRoute

        def enter() -> None:
            _check(_libc.setns(ns_fd, CLONE_NEWNET), "setns")

        self._worker = ThreadPoolExecutor(1, thread_name_prefix="ntng-netlink", initializer=enter)
        try:
            self._ipr = self._worker.submit(IPRoute).result()
        except BaseException:
            self._worker.shutdown(wait=False)
            raise

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._ipr, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._worker.submit(method, *args, **kwargs).result()

        return call

    def close(self) -> None:
        try:
            self._worker.submit(self._ipr.close).result()
        finally:
            self._worker.shutdown(wait=True)

    def __enter__(self) -> NamespacedIPRoute:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

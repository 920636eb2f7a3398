"""Make a child process die with its parent: prctl(PR_SET_PDEATHSIG) via cffi.

The stdlib has no prctl.  The signal fires when the *thread* that forked the child exits, so
VMMs are spawned from the runner's main thread.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable

from cffi import FFI

PR_SET_PDEATHSIG = 1

_ffi = FFI()
_ffi.cdef("int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4, unsigned long arg5);")
_libc = _ffi.dlopen(None)


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    if _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(_ffi.errno, os.strerror(_ffi.errno))


def preexec(parent_pid: int, sig: int = signal.SIGKILL,
            then: Callable[[], None] | None = None) -> Callable[[], None]:
    """A Popen preexec_fn: set the death signal, then close the race with an early parent exit;
    `then` runs last (e.g. entering the test's network namespace)."""

    def fn() -> None:
        set_pdeathsig(sig)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), sig)
        if then is not None:
            then()

    return fn


class _Spawner:
    """Runs Popen on one thread that lives as long as the runner, so PDEATHSIG (which follows
    the forking *thread*) fires only when the runner itself dies."""

    def __init__(self) -> None:
        import queue
        import threading

        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="ntng-spawner", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, box, done = self._jobs.get()
            try:
                box.append(fn())
            except BaseException as e:  # handed back to the caller
                box.append(e)
            done.set()

    def run(self, fn: Callable[[], object]) -> object:
        import threading

        box: list[object] = []
        done = threading.Event()
        self._jobs.put((fn, box, done))
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]


_spawner: _Spawner | None = None


def spawn(argv: list[str], then: Callable[[], None] | None = None, **kwargs: object) -> subprocess.Popen[bytes]:
    """Popen(argv) as a child that is SIGKILLed when the runner process dies (`then`: see preexec)."""
    global _spawner
    if _spawner is None:
        _spawner = _Spawner()
    pid = os.getpid()
    return _spawner.run(  # type: ignore[return-value]
        lambda: subprocess.Popen(argv, preexec_fn=preexec(pid, then=then), **kwargs)  # type: ignore[call-overload]
    )

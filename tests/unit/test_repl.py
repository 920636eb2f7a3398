"""`ntng run -i`: Tab completion over the script's globals, and a history that survives
between sessions (driven through a pty as a user types; no VM boots: the machine is not used)."""

from __future__ import annotations

import os
import pty
import rlcompleter
import select
import signal
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from ntng import repl, testspec
from ntng.driver import Driver

NODES = "#: nodes.server = { };\n#: nodes.client = { };\npass\n"
DEFAULTS = {"kernel": "/k", "vmlinux": "/v", "initrd": "/i", "image": "/img", "imageFormat": "raw",
            "accel": "kvm", "stateRoot": "/nonexistent/state"}
PROMPT = b">>> "
SESSION_TIMEOUT = 60.0  # a session's prompts come within seconds (nix eval of the nodes)


@pytest.fixture
def namespace(tmp_path: Path) -> dict[str, Any]:
    """The REPL's namespace as `ntng run -i` makes it (Driver.test_symbols)."""
    p = tmp_path / "t.py"
    p.write_text(NODES)
    spec = testspec.load(p, DEFAULTS)
    return Driver(spec, tmp_path / "out", boot_timeout=1).test_symbols()


def completions(namespace: dict[str, Any], text: str) -> list[str]:
    c = rlcompleter.Completer(namespace)
    found: list[str] = []
    while (m := c.complete(text, len(found))) is not None:
        found.append(m)
    return found


def test_completer_completes_machine_names_and_methods(namespace: dict[str, Any]) -> None:
    assert completions(namespace, "serv") == ["server"]
    assert set(completions(namespace, "mac")) == {"machines", "machines_qemu"}
    assert "client.wait_for_unit(" in completions(namespace, "client.wait_for_u")
    assert completions(namespace, "server.send_monitor_c") == ["server.send_monitor_command("]
    assert "start_all()" in completions(namespace, "start_")


def test_setup_readline_installs_the_completer_and_a_private_history(
        namespace: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import readline

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    path = repl.setup_readline(namespace)
    assert path == tmp_path / "state" / "ntng" / "history"
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    completer = readline.get_completer()
    assert completer is not None and completer("cli", 0) == "client"
    assert readline.get_history_length() == repl.HISTORY_LENGTH


def test_history_path_defaults_to_local_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert repl.history_path() == tmp_path / ".local" / "state" / "ntng" / "history"


def test_ptpython_is_used_when_importable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """ptpython is not installed here: a stand-in module records the call."""
    calls: list[dict[str, Any]] = []
    fake = types.ModuleType("ptpython")
    fake_repl = types.ModuleType("ptpython.repl")
    fake_repl.embed = lambda **kw: calls.append(kw)  # type: ignore[attr-defined]
    fake.__spec__ = fake_repl.__spec__ = None
    monkeypatch.setitem(sys.modules, "ptpython", fake)
    monkeypatch.setitem(sys.modules, "ptpython.repl", fake_repl)
    monkeypatch.setattr(repl.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    ns = {"machine": object()}
    repl.interact(ns, "banner")
    assert calls == [{"globals": ns, "locals": ns, "history_filename": str(tmp_path / "ntng" / "ptpython-history")}]
    monkeypatch.setenv("NTNG_REPL", "plain")
    assert not repl._use_ptpython()


def test_ptpython_history_is_trimmed(tmp_path: Path) -> None:
    path = tmp_path / "h"
    path.write_text("".join(f"\n# 2026-12-03 13:00:{n:02d}\n+line {n}\n" for n in range(10)))
    repl.trim_ptpython_history(path, keep=3)
    assert path.read_text() == "".join(f"\n# 2026-12-03 13:00:{n:02d}\n+line {n}\n" for n in (7, 8, 9))


# -- through a pty, as typed ----------------------------------------------------------------------

class Session:
    """`ntng run -i t.py` on a pty."""

    def __init__(self, script: Path, state: Path) -> None:
        env = {**os.environ, "XDG_STATE_HOME": str(state), "TERM": "xterm", "INPUTRC": "/dev/null",
               "NTNG_REPL": "plain"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: nothing of pytest's may run here
            try:
                os.chdir(script.parent)
                os.execve(sys.executable, [sys.executable, "-m", "ntng.cli", "run", "-i", str(script),
                                           "-o", str(script.parent / "out")], env)
            finally:
                os._exit(127)
        self.seen = b""
        self.pos = 0  # where the next expect() looks from: after the last match

    def expect(self, want: bytes, timeout: float = SESSION_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while (at := self.seen.find(want, self.pos)) < 0:
            left = deadline - time.monotonic()
            assert left > 0, f"no {want!r} within {timeout}s; the pty showed: {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # EIO: the child has gone
                    data = b""
                assert data, f"the session ended before {want!r}: {self.seen[-2000:]!r}"
                self.seen += data
        self.pos = at + len(want)

    def type(self, text: bytes) -> None:
        os.write(self.fd, text)

    def close(self) -> int:
        """Ctrl-D, then the exit status."""
        self.type(b"\x04")
        deadline = time.monotonic() + SESSION_TIMEOUT
        while time.monotonic() < deadline:
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.2)
                if ready:
                    self.seen += os.read(self.fd, 4096)
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"the session did not end on Ctrl-D: {self.seen[-2000:]!r}")


def test_history_survives_between_sessions_and_tab_completes(tmp_path: Path) -> None:
    script = tmp_path / "t.py"
    script.write_text(NODES)
    state = tmp_path / "state"
    history = state / "ntng" / "history"

    first = Session(script, state)
    first.expect(PROMPT)
    first.type(b"hist_value = 6 * 7\r")
    first.expect(PROMPT)
    assert first.close() == 0
    assert history.read_text().splitlines()[-1] == "hist_value = 6 * 7"
    assert (history.stat().st_mode & 0o777) == 0o600

    second = Session(script, state)
    second.expect(PROMPT)
    second.type(b"\x1b[A\r")  # arrow up: the last session's line, run again
    second.expect(PROMPT)
    second.type(b"print(hist_val\t + 1, len(machi\t))\r")  # Tab completes both names
    second.expect(b"43 2")
    second.expect(PROMPT)
    assert second.close() == 0
    # The recalled line is not stored twice (Python's readline skips a repeat of the last line).
    assert history.read_text().splitlines() == ["hist_value = 6 * 7", "print(hist_value + 1, len(machines))"]

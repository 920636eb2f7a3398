"""A guest that stops reading must not hang the runner: the real runner, Driver, Machine, client
and agent, the VM replaced by the agent in a host process (silent_vmm.AgentVmm) that the test
SIGSTOPs.  Promises checked: `ntng run` exits within driver.GLOBAL_TIMEOUT_EXIT of the global
timeout (even when the script swallows the interrupt), Driver.release is bounded, a command
without a timeout is not waited for for days, wait_for_console_text is bounded and notices the
VM exiting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import silent_vmm

from ntng import backends, testspec
from ntng import driver as driver_mod
from ntng import machine as machine_mod
from ntng.driver import Driver
from ntng.errors import EXIT_TIMEOUT, BackdoorError, MachineExited, WaitTimeout
from ntng.machine import Machine

pytestmark = pytest.mark.timeout(120)

HERE = Path(__file__).resolve().parent
MiB = 1024 * 1024


@pytest.fixture
def fake_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "make", silent_vmm.make)


@pytest.fixture
def deadline() -> list[float | None]:
    """The global deadline the machine sees (as a driver's): [None], or set by a test."""
    return [None]


@pytest.fixture
def machine(tmp_path: Path, fake_backends: None, deadline: list[float | None]) -> Iterator[Machine]:
    m = Machine("machine", silent_vmm.plan(tmp_path / "state"), tmp_path / "out", boot_timeout=20,
                global_deadline=lambda: deadline[0])
    m.connect()
    yield m
    m.release()


def big_file(tmp_path: Path) -> Path:
    path = tmp_path / "big"
    path.write_bytes(os.urandom(8 * MiB))
    return path


def stop_guest(m: Machine) -> None:
    assert m.backend.pid is not None
    os.kill(m.backend.pid, signal.SIGSTOP)


def block_in_send(m: Machine, source: Path) -> threading.Thread:
    """A thread whose copy to the stopped guest fills the socket and blocks in send."""
    def copy() -> None:
        try:
            m.copy_to_machine(source, "/nonexistent/never")
        except BackdoorError:
            pass

    t = threading.Thread(target=copy, daemon=True)
    t.start()
    time.sleep(0.5)
    assert t.is_alive()
    return t


# -- commands without a timeout ------------------------------------------------------------------

def test_a_command_without_timeout_is_not_waited_for_for_days(machine: Machine,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine_mod, "COMMAND_WAIT_NO_TIMEOUT", 1.0)
    assert machine.succeed("echo up").strip() == "up"
    stop_guest(machine)
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout, match="timed out waiting for command"):
        machine.succeed("true")  # timeout=None, as in the NixOS driver
    assert time.monotonic() - t0 < 3


def test_without_timeout_the_host_waits_for_the_global_deadline(machine: Machine, deadline: list[float | None],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine_mod, "COMMAND_WAIT_GRACE", 0.5)
    deadline[0] = time.monotonic() + 1.0
    stop_guest(machine)
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout):
        machine.execute("true", timeout=None)
    assert 1.3 < time.monotonic() - t0 < 3


# -- the console -----------------------------------------------------------------------------------

def say(m: Machine, text: bytes) -> None:
    console = m.backend.console_in  # type: ignore[attr-defined]
    console.sendall(text)


def test_wait_for_console_text_has_a_bounded_default(machine: Machine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine_mod, "CONSOLE_WAIT_TIMEOUT", 0.5)
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"console did not match /never/ within 0.5s"):
        machine.wait_for_console_text("never")
    assert time.monotonic() - t0 < 3


def test_wait_for_console_text_notices_the_vm_exiting(machine: Machine) -> None:
    say(machine, b"kernel panic - not syncing\n")
    pid = machine.backend.pid
    assert pid is not None
    threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
    t0 = time.monotonic()
    with pytest.raises(MachineExited, match=r"machine: the VM exited .* while waiting for /never/ on the console"):
        machine.wait_for_console_text("never", timeout=60)
    assert time.monotonic() - t0 < 5


def test_wait_for_console_text_matches_old_new_and_multiline_text(machine: Machine) -> None:
    say(machine, b"early line\n")
    deadline = time.monotonic() + 5
    while "early line" not in machine.get_console_log():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    machine.wait_for_console_text("early", timeout=5)  # already there: since the VM started
    threading.Timer(0.3, say, (machine, b"first half\nsecond half\n")).start()
    machine.wait_for_console_text(r"first half\nsecond", timeout=5)


def test_wait_for_console_text_scans_only_new_text(machine: Machine) -> None:
    """32 MiB of lines arrive over a few seconds while it waits; the match is the last line.
    Rescanning all text since the start at every check costs seconds of CPU (and keeps it all
    in memory); scanning the new text costs a fraction."""
    lines = b"".join(b"boot message %06d of a chatty guest\n" % i for i in range(20_000))  # 0.7 MiB

    def chatter() -> None:
        for _ in range(48):
            say(machine, lines)
            time.sleep(0.05)
        say(machine, b"the  end\n")

    feeder = threading.Thread(target=chatter)
    feeder.start()
    cpu0 = time.thread_time()  # the waiting thread's own CPU (not the console reader's)
    machine.wait_for_console_text(r"(?m)^the\s+end$", timeout=60)
    took = time.thread_time() - cpu0
    feeder.join()
    print(f"measured: wait_for_console_text while 32 MiB of lines arrive: {took:.2f}s CPU")
    assert took < 1.5


# -- release -------------------------------------------------------------------------------------

def spec_for(tmp_path: Path, global_timeout: float = 3600) -> testspec.TestSpec:
    script = tmp_path / "t.py"
    script.write_text("pass\n")
    return testspec.TestSpec(script, "pass\n", "t", global_timeout, ["machine"],
                             {"machine": silent_vmm.plan(tmp_path / "state")})


def test_driver_release_is_bounded_with_a_silent_guest(tmp_path: Path, fake_backends: None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal is asked for (the guest never answers), a thread is blocked in send under
    the client's write lock: release still ends within its bounds and unblocks the thread."""
    monkeypatch.setattr(driver_mod, "ARTIFACTS_TIMEOUT", 1.0)
    d = Driver(spec_for(tmp_path), tmp_path / "out", boot_timeout=20, log=lambda _m: None)
    m = d.machines[0]
    m.connect()
    stop_guest(m)
    sender = block_in_send(m, big_file(tmp_path))
    done = threading.Event()
    t0 = time.monotonic()
    threading.Thread(target=lambda: (d.release(), done.set()), daemon=True).start()
    assert done.wait(driver_mod.ARTIFACTS_TIMEOUT + driver_mod.RELEASE_TIMEOUT + 2), "release hung"
    took = time.monotonic() - t0
    sender.join(2)
    assert not sender.is_alive(), "the blocked sender was not released"
    assert not m.backend.alive()
    print(f"measured: Driver.release with a silent guest: {took:.2f}s")


# -- the runner ----------------------------------------------------------------------------------

WRAPPER = """\
import sys
sys.path.insert(0, {hostile!r})
import silent_vmm
silent_vmm.install()
from ntng import cli
sys.exit(cli.main(["run", {script!r}, "-g", {timeout!r}, "-o", {out!r}]))
"""

# The main thread blocks in send: the copy fills the socket of a guest that stopped reading.
BLOCKED_IN_SEND = """\
import os, signal
machine.succeed("true")
os.kill(machine.backend.pid, signal.SIGSTOP)
print("guest stopped", flush=True)
machine.copy_to_machine({big!r}, "/nonexistent/never")
"""

# A script that swallows every interrupt: only the runner's own deadline ends it.
SWALLOWS_INTERRUPTS = """\
import os, signal, time
machine.succeed("true")
os.kill(machine.backend.pid, signal.SIGSTOP)
print("guest stopped", flush=True)
while True:
    try:
        machine.succeed("sleep 600")
    except BaseException as e:
        print("swallowed", type(e).__name__, flush=True)
        time.sleep(0.5)
"""


def run_until_exit(tmp_path: Path, script: str, global_timeout: float, limit: float) -> tuple[int, float, str]:
    """`ntng run` of `script` in a subprocess: exit code, seconds from the global timeout's log
    line to the exit, and the output."""
    (tmp_path / "t.py").write_text(script)
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(hostile=str(HERE), script=str(tmp_path / "t.py"),
                                      timeout=str(global_timeout), out=str(tmp_path / "out")))
    proc = subprocess.Popen([sys.executable, str(wrapper)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path)
    assert proc.stdout is not None
    seen: list[str] = []
    fired: list[float] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "global timeout of" in line and not fired:
                fired.append(time.monotonic())
            seen.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(global_timeout + limit + 30)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(5)
        pytest.fail("the runner did not exit after the global timeout:\n" + "".join(seen)[-3000:])
    exited = time.monotonic()
    reader.join(5)
    out = "".join(seen)
    assert fired, out[-3000:]
    return proc.returncode, exited - fired[0], out


def test_runner_exits_after_the_global_timeout_while_blocked_sending_to_a_silent_guest(tmp_path: Path) -> None:
    big = big_file(tmp_path)
    code, took, out = run_until_exit(tmp_path, BLOCKED_IN_SEND.format(big=str(big)), 3,
                                     driver_mod.GLOBAL_TIMEOUT_EXIT)
    print(f"measured: global timeout → exit, main thread blocked in send to a silent guest: {took:.2f}s")
    assert "guest stopped" in out
    assert code == EXIT_TIMEOUT, out[-3000:]
    assert "TIMEOUT" in out and "global timeout of 3s reached" in out
    assert took <= driver_mod.GLOBAL_TIMEOUT_EXIT, out[-3000:]


def test_runner_exits_after_the_global_timeout_when_the_script_swallows_it(tmp_path: Path) -> None:
    code, took, out = run_until_exit(tmp_path, SWALLOWS_INTERRUPTS, 3, driver_mod.GLOBAL_TIMEOUT_EXIT)
    print(f"measured: global timeout → exit, script swallowing the interrupt: {took:.2f}s")
    assert "swallowed" in out
    assert code == EXIT_TIMEOUT, out[-3000:]
    assert took <= driver_mod.GLOBAL_TIMEOUT_EXIT + 1, out[-3000:]


# -- the pytest plugin ---------------------------------------------------------------------------

PYTEST_CONFTEST = """\
import sys
sys.path.insert(0, {hostile!r})
import silent_vmm
silent_vmm.install()
"""

PYTEST_MODULE = """\
import os, signal


def test_blocked_on_a_silent_guest(ntng):
    ntng.machine.succeed("true")
    os.kill(ntng.machine.backend.pid, signal.SIGSTOP)
    ntng.machine.succeed("sleep 600")


def test_the_next_test_fails_at_once(ntng):
    ntng.machine.succeed("true")
"""


def test_pytest_plugin_has_a_global_timer_per_module(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(PYTEST_CONFTEST.format(hostile=str(HERE)))
    (tmp_path / "test_silent.py").write_text(PYTEST_MODULE)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--ntng-global-timeout", "3",
                        "test_silent.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    out = r.stdout + r.stderr
    print(f"measured: pytest module with a silent guest and --ntng-global-timeout 3: {took:.1f}s")
    assert r.returncode == 1, out[-3000:]  # tests failed; the session was not interrupted
    assert "2 failed" in out, out[-3000:]
    assert out.count("GlobalTimeout: ") >= 2 and "global timeout of 3s reached" in out, out[-3000:]
    assert took < 3 + driver_mod.GLOBAL_TIMEOUT_EXIT + 10, out[-3000:]

"""pytest plugin: VM tests as pytest tests.

A test module declares its nodes with the same `#:` lines as a test script; the fixtures boot
them once per module (on first use, as the NixOS driver does) and clean up after the module:

    #: nodes.server = { vlans = [ 1 ]; };
    #: nodes.client = { vlans = [ 1 ]; };

    def test_ssh(ntng):
        ntng.start_all()
        ntng.server.wait_for_unit("ssh.service")
        ntng.client.succeed("ping -c 1 server")

Fixtures: `ntng` (the script's globals: machines by name, start_all, subtest, driver, …),
`ntng_driver`, `ntng_machines` (name → Machine).  Options: --ntng-accel, --ntng-network,
--ntng-global-timeout (per module, from the fixture's setup: when it passes, the machines are
released and the test that waits fails with GlobalTimeout, as do the module's later tests).
Registered through the `pytest11` entry point, so installing nixos-test-ng is enough.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from . import runner
from .driver import Driver
from .errors import GlobalTimeout, NtngError
from .machine import Machine


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ntng", "nixos-test-ng VM tests")
    group.addoption("--ntng-accel", default="auto", choices=["auto", "kvm", "tcg"],
                    help="accelerator for the VMs (default: probe KVM, else TCG)")
    group.addoption("--ntng-network", default="auto", choices=["auto", "tap", "vde"],
                    help="network mode for nodes with vlans")
    group.addoption("--ntng-global-timeout", type=float, default=None,
                    help="seconds for each test module's VMs, from their setup on (default: the "
                         "module's `#: globalTimeout`, 3600 unless set)")


@pytest.fixture(scope="module")
def ntng_driver(request: pytest.FixtureRequest) -> Iterator[Driver]:
    module_file = Path(str(request.module.__file__))
    state = runner.fresh_state_dir()
    (state / "runner.pid").write_text(str(os.getpid()))  # a dead run's dir is reaped later
    out = Path(request.config.rootpath) / "ntng-out" / module_file.stem
    out.parent.mkdir(exist_ok=True, mode=0o700)  # private, as the run folders inside
    out.mkdir(exist_ok=True, mode=0o700)
    opts = runner.RunOptions(script=module_file, accel=request.config.getoption("--ntng-accel"),
                             network=request.config.getoption("--ntng-network"))
    driver: Driver | None = None
    try:
        try:
            spec, choice = runner.prepare(opts, state)
            driver = Driver(spec, out, runner.DEFAULT_BOOT_TIMEOUT * choice.timeout_scale,
                            global_timeout=request.config.getoption("--ntng-global-timeout"), log=runner.log)
        except NtngError as e:
            pytest.fail(f"ntng: cannot set up the nodes of {module_file.name}: {e}", pytrace=False)
        with _global_timeout_raised_in_tests(driver):
            yield driver
    finally:
        if driver is not None:
            driver.release()
        shutil.rmtree(state, ignore_errors=True)


@contextlib.contextmanager
def _global_timeout_raised_in_tests(driver: Driver) -> Iterator[None]:
    """The driver's global timer, running while the module's tests do.  It interrupts the main
    thread with SIGINT; here that interrupt becomes GlobalTimeout in the test that waits (a real
    Ctrl-C still stops the session)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only: no global timer here
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        if driver.timed_out:
            raise GlobalTimeout(driver.timeout_message())
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    driver.start_global_timer()
    try:
        yield
    finally:
        driver.cancel_global_timer()
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def ntng_machines(ntng_driver: Driver) -> dict[str, Machine]:
    return {m.name: m for m in ntng_driver.machines}


@pytest.fixture(scope="module")
def ntng(ntng_driver: Driver) -> types.SimpleNamespace:
    return types.SimpleNamespace(**ntng_driver.test_symbols())

"""Streaming failure detection on real guests: a failed unit or a kernel panic ends the test
at once with the console lines, instead of a command waiting for its timeout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers import run_cli
from ntng import errors

pytestmark = pytest.mark.e2e


def run_script(tmp_path: Path, body: str) -> tuple[int, str, float]:
    script = tmp_path / "detect.py"
    script.write_text(body)
    t0 = time.monotonic()
    r = run_cli("run", str(script), "-o", str(tmp_path / "out"), cwd=tmp_path)
    return r.returncode, r.stderr, time.monotonic() - t0


def test_failed_unit_and_kernel_panic_fail_at_once(tmp_path: Path, guest_image: object) -> None:
    # A unit fails while the script waits on something unrelated for up to 10 minutes; then,
    # with that rule lifted, a kernel panic while a command is running.
    rc, err, took = run_script(tmp_path, """\
machine.wait_for_unit("multi-user.target")
machine.wait_for_console_text("ROOT LOGIN", timeout=120)  # the serial autologin must not cut it off
machine.succeed("systemd-run --no-block --unit=ntng-doomed.service -p Type=oneshot sh -c 'sleep 3; false'")
machine.succeed("sleep 600")
""")
    assert rc == errors.EXIT_TEST_FAILED, err[-3000:]
    assert "failure detected: machine: failed unit on the console" in err
    assert "ntng-doomed.service" in err.split("failure detected:")[1]
    assert took < 300, f"the failure was noticed only after {took:.0f}s"

    rc, err, took = run_script(tmp_path, """\
machine.wait_for_unit("multi-user.target")
machine.watch(r"ntng-marker-\\d+", severity="warn", name="marker")
machine.succeed("echo ntng-marker-42 > /dev/console")
machine.succeed("echo c > /proc/sysrq-trigger")
""")
    assert rc == errors.EXIT_TEST_FAILED, err[-3000:]
    assert "warning: machine: marker on the console" in err
    assert "machine: kernel panic on the console" in err and "Kernel panic - not syncing" in err
    assert took < 300

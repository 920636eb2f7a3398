"""The pytest plugin as a user runs it: `#:` node lines in a test module, the `ntng` fixture,
one boot shared by the module's tests, failures reported as test failures, VMs gone after."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

MODULE = '''\
#: nodes.web = { backend = "nspawn"; };
import pytest
from ntng.machine import RequestedAssertionFailed


def test_the_node_answers(ntng):
    ntng.start_all()
    assert ntng.web.succeed("hostname").strip() == "web"
    ntng.web.succeed("echo kept > /tmp/state")


def test_same_vm_for_the_module(ntng, ntng_machines):
    assert ntng_machines["web"] is ntng.web
    assert ntng.web.succeed("cat /tmp/state").strip() == "kept"


def test_a_failing_command_fails_the_test(ntng):
    ntng.web.succeed("echo oops >&2; exit 7")
'''


def test_plugin_runs_vm_tests_as_pytest_tests(tmp_path: Path, guest_image: object) -> None:
    (tmp_path / "test_vm.py").write_text(MODULE)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--ntng-accel", "auto",
                        "test_vm.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "1 failed, 2 passed" in out, out[-3000:]
    assert "command `echo oops >&2; exit 7` failed (exit code 7)" in out
    assert (tmp_path / "ntng-out" / "test_vm" / "latest" / "events.jsonl").exists()
    # The node is a container (issue 17: the plugin needs no VM): none may outlive the run.
    left = subprocess.run(["pgrep", "-f", "systemd-nspawn.*--machine=web "], capture_output=True, text=True)
    assert left.stdout == "", "the module's container outlived the test run"

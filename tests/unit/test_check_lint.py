"""The quick check's lint: pyflakes with the driver's globals, one prefix per report line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ntng import check
from ntng.errors import TestScriptError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "t.py"
    p.write_text(text)
    return p


def test_a_name_undefined_in_one_scope_only(tmp_path: Path) -> None:
    """Bound inside a function, used outside it: the old whole-file scan took it as defined."""
    p = write(tmp_path, "def setup():\n    status = machine.succeed('true')\n    return status\n"
                        "setup()\nprint(status)\n")
    with pytest.raises(TestScriptError) as e:
        check.check(p, type_check=False)
    assert str(e.value) == f"{p}:5: error: undefined name 'status'"


def test_names_pyflakes_knows_from_the_driver_are_not_undefined(tmp_path: Path) -> None:
    p = write(tmp_path, "#: nodes.a = { };\n#: nodes.b-2 = { };\n"
                        "def go() -> None:\n    start_all(); b_2.succeed('x')\n    log.log(str(machines))\n"
                        "go()\nwith subtest('s'):\n    retry(lambda last: True)\n")
    assert check.check(p, type_check=False) == []


def test_every_line_of_a_report_with_several_errors_has_the_same_prefix(tmp_path: Path) -> None:
    write(tmp_path, """\
#: nodes.a = { };
#: nodes.fc = { backend = "firecracker"; };
import os
start_al()
a.wait_for_unti("x")
fc.screenshot("s")
def f():
    return undefined_here
""")
    r = subprocess.run([sys.executable, "-m", "ntng.cli", "check", "--no-type-check", "t.py"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ": note: " not in ln]  # the note depends on this host's KVM
    assert lines == [
        "t.py:3: warning: 'os' imported but unused",
        "t.py:4: error: undefined name 'start_al' (did you mean start_all?)",
        "t.py:5: error: a.wait_for_unti: no such Machine method (did you mean wait_for_unit?)",
        't.py:6: error: fc.screenshot(): backend firecracker lacks capability "screenshot" '
        "(it has: snapshot, networks, block, console, consoleInput)",
        "t.py:8: error: undefined name 'undefined_here'",
    ]
    assert all(ln.startswith("t.py:") for ln in r.stderr.splitlines())


def test_machine_attributes_read_from_source_are_the_real_ones() -> None:
    from ntng.machine import Machine

    attrs = check.machine_attributes()
    assert attrs is not None
    # copyreg caches __slotnames__ on the class once a Machine has been copied or pickled.
    assert set(dir(Machine)) - {"__slotnames__"} <= attrs
    assert {"name", "plan", "booted", "succeed", "wait_for_unit"} <= attrs and "succed" not in attrs


def test_impairments_are_checked_as_the_runner_checks_them(tmp_path: Path) -> None:
    """check.declared_impairments (netem only) rejects what network.declared_impairments does."""
    from ntng import netem, network

    good = {"nodes": {"a": [{"vlan": 1, "impairment": {"delay": 50, "loss": 5, "direction": "in"}}]}}
    check.declared_impairments(good, "t.py")
    assert list(network.declared_impairments(good, "t.py")) == [("a", 1)]
    for bad in ({"loss": 150}, {"direction": "up"}, {"delay": -1}, {"jitter": "x"}):
        plan = {"nodes": {"a": [{"vlan": 1, "impairment": bad}]}}
        with pytest.raises(netem.ImpairmentError) as runner:
            network.declared_impairments(plan, "t.py")
        with pytest.raises(netem.ImpairmentError) as checker:
            check.declared_impairments(plan, "t.py")
        assert str(checker.value) == str(runner.value)


def test_without_pyflakes_the_check_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ntng.errors import SetupError

    monkeypatch.setitem(sys.modules, "pyflakes", None)  # import pyflakes → ImportError
    p = write(tmp_path, "start_all()\n")
    with pytest.raises(SetupError, match=r"pyflakes is not installed: pip install pyflakes"):
        check.check(p, type_check=False)

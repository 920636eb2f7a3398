"""`ntng check`: parse, validate nodes through nixlib, lint against the driver's globals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ntng import check
from ntng.errors import NixEvalError
from ntng.errors import TestScriptError as ScriptError


def script(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "t.py"
    p.write_text(text)
    return p


def test_clean_script_passes_and_warns_about_unused_imports(tmp_path: Path) -> None:
    p = script(tmp_path, "#: nodes.a = {};\n#: nodes.b-2 = {};\nimport os\nimport re\n"
                         "start_all()\nb_2.succeed(re.escape('x'))\nwith subtest('s'):\n"
                         "    for m in machines:\n        m.succeed('true')\n")
    findings = check.check(p)
    assert [(f.line, f.message, f.error) for f in findings] == [(3, "'os' imported but unused", False)]


def test_undefined_names_with_lines(tmp_path: Path) -> None:
    p = script(tmp_path, "#: nodes.server = {};\nserver.succeed('x')\nclient.succeed('y')\nprnt('z')\n")
    with pytest.raises(ScriptError) as e:
        check.check(p)
    assert str(e.value) == f"{p}:3: undefined name 'client'\n{p}:4: undefined name 'prnt'"


def test_single_node_is_also_machine(tmp_path: Path) -> None:
    check.check(script(tmp_path, "machine.succeed('true')\n"))
    with pytest.raises(ScriptError, match="undefined name 'machine'"):
        check.check(script(tmp_path, "#: nodes.a = {};\n#: nodes.b = {};\nmachine.succeed('true')\n"))


def test_syntax_error_and_bad_node(tmp_path: Path) -> None:
    with pytest.raises(ScriptError, match=r"t.py:2: syntax error"):
        check.check(script(tmp_path, "start_all()\nif x\n"))
    with pytest.raises(NixEvalError, match=r"t.py:1: .*memory must be an integer"):
        check.check(script(tmp_path, '#: nodes.a = { memory = "1G"; };\nstart_all()\n'))


def test_cli_exit_codes(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "ntng.cli", "check", str(script(tmp_path, "start_all()\n"))],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "ok" in ok.stderr
    bad = subprocess.run([sys.executable, "-m", "ntng.cli", "check", str(script(tmp_path, "strat_all()\n"))],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "undefined name 'strat_all'" in bad.stderr


@pytest.mark.parametrize("example", sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.py")),
                         ids=lambda p: p.name)
def test_examples_pass_the_quick_check(example: Path) -> None:
    from ntng import check as check_mod

    errors = [f for f in check_mod.check(example) if f.error]
    assert errors == []

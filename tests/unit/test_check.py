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


TYPO_SCRIPT = """\
#: nodes.server = { vlans = [ 1 ]; };
#: nodes.client = { vlans = [ 1 ]; };
start_all()
out: int = client.succeed("echo hi")
client.succed("true")
with subtest("ports"):
    server.wait_for_open_port("22")
status, text = server.execute("true")
assert status == 0 and text.strip() == ""
"""


def test_type_check_finds_wrong_calls_with_their_lines(tmp_path: Path) -> None:
    script = tmp_path / "typo.py"
    script.write_text(TYPO_SCRIPT)
    with pytest.raises(ScriptError) as e:
        check.check(script)
    msg = str(e.value)
    assert f'{script}:4: type: Incompatible types in assignment (expression has type "str", variable has type "int")' in msg
    assert f'{script}:5: type: "Machine" has no attribute "succed"; maybe "succeed"?' in msg
    assert f'{script}:7: type: Argument 1 to "wait_for_open_port" of "Machine" has incompatible type "str"; expected "int"' in msg
    assert ":8:" not in msg and ":9:" not in msg  # (status, stdout) is typed right
    # Skipped on request (mkTest's skipTypeCheck): then the script passes.
    assert [f for f in check.check(script, type_check=False) if f.error] == []


def test_type_check_knows_every_driver_global(tmp_path: Path) -> None:
    script = tmp_path / "globals.py"
    script.write_text("""\
start_all(); join_all(); serial_stdout_on(); serial_stdout_off()
for m in machines + machines_qemu:
    assert isinstance(m, Machine) and isinstance(m, BaseMachine)
machine.succeed("true")
driver.log("x"); log.log("y")
retry(lambda last: True, timeout_seconds=5)
@polling_condition
def ok() -> bool:
    return True
try:
    machine.fail("true")
except RequestedAssertionFailed:
    pass
""")
    assert [f for f in check.check(script) if f.error] == []

"""`ntng check`: parse, validate nodes through nixlib, lint against the driver's globals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ntng import check
from ntng.errors import NixEvalError
from ntng.errors import TestScriptError as ScriptError


def script(tmp_path: Path, text: str, name: str = "t.py") -> Path:
    p = tmp_path / name
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
    assert str(e.value) == f"{p}:3: error: undefined name 'client'\n{p}:4: error: undefined name 'prnt' (did you mean print?)"


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
    assert bad.returncode == 2 and bad.stderr == f"{tmp_path / 't.py'}:1: error: undefined name 'strat_all' (did you mean start_all?)\n"


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_cli_checks_many_scripts_and_directories(tmp_path: Path) -> None:
    script(tmp_path, "#: nodes = { };\nassert True\n", "a.py")
    script(tmp_path, "#: nodes = { };\nstrat_all()\n", "b.py")
    script(tmp_path, "x = 1\n", "helper.py")  # no header: not a test in a directory
    r = subprocess.run([sys.executable, "-m", "ntng.cli", "check", "--no-type-check", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"ntng check: {tmp_path / 'a.py'}: ok" in r.stderr and "b.py:2: error: undefined name 'strat_all'" in r.stderr
    assert "helper.py" not in r.stderr and "2 scripts, some failed" in r.stderr


@pytest.mark.parametrize("example", sorted(EXAMPLES.rglob("*.py")), ids=lambda p: str(p.relative_to(EXAMPLES)))
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
    assert f'{script}:4: error: type: Incompatible types in assignment (expression has type "str", variable has type "int")' in msg
    # The method check names it (mypy's own message for that line is dropped as a duplicate).
    assert f"{script}:5: error: client.succed: no such Machine method (did you mean succeed?)" in msg
    assert msg.count(":5:") == 1
    assert f'{script}:7: error: type: Argument 1 to "wait_for_open_port" of "Machine" has incompatible type "str"; expected "int"' in msg
    assert ":8:" not in msg and ":9:" not in msg  # (status, stdout) is typed right
    # Skipped on request (mkTest's skipTypeCheck): then only the method check (a lint) is left.
    with pytest.raises(ScriptError) as e:
        check.check(script, type_check=False)
    assert str(e.value) == f"{script}:5: error: client.succed: no such Machine method (did you mean succeed?)"


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


# -- Machine methods: unknown ones, and ones the node's backend lacks (ntng.caps) ---------------

BACKENDS = """\
#: nodes.a = { };
#: nodes.b = { backend = "firecracker"; accel = "kvm"; };
#: nodes.c = { backend = "cloud-hypervisor"; accel = "kvm"; };
"""
FC_HAS = "(it has: snapshot, networks, block, console, consoleInput)"
CH_HAS = "(it has: snapshot, sharedDirs, networks, block, reboot, console)"


def check_errors(path: Path, **kw: bool) -> list[str]:
    try:
        check.check(path, type_check=kw.get("type_check", False))
    except ScriptError as e:
        return str(e).splitlines()
    return []


def test_method_a_backend_lacks_is_an_error_naming_node_backend_and_capability(tmp_path: Path) -> None:
    p = script(tmp_path, BACKENDS + """\
start_all()
a.screenshot("a"); a.send_key("ret"); a.reboot()
b.screenshot("b")
c.send_chars("hi")
c.reboot()
f = b.wait_for_text
b.succeed("true"); b.wait_for_console_text("x"); b.block()
""")
    assert check_errors(p) == [
        f'{p}:6: error: b.screenshot(): backend firecracker lacks capability "screenshot" {FC_HAS}',
        f'{p}:7: error: c.send_chars(): backend cloud-hypervisor lacks capability "keys" {CH_HAS}',
        f'{p}:9: error: b.wait_for_text: backend firecracker lacks capability "screenshot" {FC_HAS}',
    ]


def test_lone_node_as_machine(tmp_path: Path) -> None:
    p = script(tmp_path, '#: nodes.vm = { backend = "firecracker"; accel = "kvm"; };\nmachine.reboot()\nvm.send_key("a")\n')
    assert check_errors(p) == [
        f'{p}:2: error: machine.reboot(): backend firecracker lacks capability "reboot" {FC_HAS}',
        f'{p}:3: error: vm.send_key(): backend firecracker lacks capability "keys" {FC_HAS}',
    ]


def test_unknown_method_names_the_closest(tmp_path: Path) -> None:
    p = script(tmp_path, BACKENDS + """\
a.wait_for_unti("sshd")
print(a.name, b.plan, c.booted, a.backend, a.copy_from_vm, b.boot_ids)
for m in machines:
    m.scrrenshot("x")
c.xyzzy()
a._private_is_not_checked
""")
    assert check_errors(p) == [
        f"{p}:4: error: a.wait_for_unti: no such Machine method (did you mean wait_for_unit?)",
        f"{p}:7: error: m.scrrenshot: no such Machine method (did you mean screenshot?)",
        f"{p}:8: error: c.xyzzy: no such Machine method",
    ]


def test_loops_over_machines_and_node_lists(tmp_path: Path) -> None:
    p = script(tmp_path, BACKENDS + """\
for m in machines:
    m.reboot()
[x.send_key("a") for x in (a, c) if x.send_chars("b") is None]
machines[1].get_screen_text()
machines_qemu[0].screenshot("ok")
for m in [a, b]:
    for n in [c]:
        n.reboot()
        m.send_console("x")
""")
    assert check_errors(p) == [
        f'{p}:5: error: m.reboot() on node b: backend firecracker lacks capability "reboot" {FC_HAS}',
        f'{p}:6: error: x.send_key() on node c: backend cloud-hypervisor lacks capability "keys" {CH_HAS}',
        f'{p}:6: error: x.send_chars() on node c: backend cloud-hypervisor lacks capability "keys" {CH_HAS}',
        f'{p}:7: error: machines[1].get_screen_text() on node b: backend firecracker lacks capability "screenshot" {FC_HAS}',
    ]


def test_names_the_script_rebinds_are_not_judged(tmp_path: Path) -> None:
    p = script(tmp_path, BACKENDS + """\
for m in machines:
    m = a
    m.screenshot("x")
b = a
b.screenshot("x")
c.note = "set by the script"
print(c.note)
""")
    assert check_errors(p) == []


def test_methods_checked_against_a_prebuilt_spec(tmp_path: Path) -> None:
    """mkTest's driver: the plans come from the spec nixlib wrote at build time."""
    import json

    from ntng import testspec

    p = script(tmp_path, BACKENDS + "b.send_key('a')\n")
    spec = testspec.load(p, {"kernel": "/k", "vmlinux": "/v", "image": "/i", "imageFormat": "raw",
                             "accel": "kvm", "stateRoot": "/s"})
    spec_dir = tmp_path / "share"
    spec_dir.mkdir()
    (spec_dir / "spec-kvm.json").write_text(json.dumps(
        {"name": "t", "globalTimeout": 60, "nodeNames": spec.node_names, "nodes": spec.plans,
         "network": spec.network}))
    with pytest.raises(ScriptError) as e:
        check.check(p, spec_dir, type_check=False)
    assert str(e.value) == f'{p}:4: error: b.send_key(): backend firecracker lacks capability "keys" {FC_HAS}'


def test_type_check_still_finds_attributes_on_machines_it_cannot_place(tmp_path: Path) -> None:
    """Machine.__getattr__ is hidden from mypy: with it mypy would accept any attribute."""
    p = script(tmp_path, "#: nodes.a = { };\ndriver.machines[0].succed('x')\na.succed('y')\n")
    assert check_errors(p, type_check=True) == [
        f'{p}:2: error: type: "Machine" has no attribute "succed"; maybe "succeed"?  [attr-defined]',
        f"{p}:3: error: a.succed: no such Machine method (did you mean succeed?)",
    ]

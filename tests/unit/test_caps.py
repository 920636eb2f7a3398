"""Run time: a Machine method its backend lacks fails before anything happens, naming machine,
backend and capability; an unknown method names the closest real one.  Nothing boots: the
guard runs before a method touches the VM."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ntng import caps, nixeval, paths, testspec
from ntng.driver import DRIVER_GLOBALS, Driver, script_error
from ntng.errors import TestScriptError as ScriptError
from ntng.machine import Machine

HEADER = """\
#: nodes.a = { };
#: nodes.b = { backend = "firecracker"; accel = "kvm"; };
#: nodes.c = { backend = "cloud-hypervisor"; accel = "kvm"; };
"""
DEFAULTS = {"kernel": "/k", "vmlinux": "/v", "initrd": "/i", "image": "/img", "imageFormat": "raw",
            "accel": "kvm", "stateRoot": "/nonexistent/state"}


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> testspec.TestSpec:
    """Real launch plans from nixlib: the capabilities come from capabilities.nix."""
    p = tmp_path_factory.mktemp("caps") / "t.py"
    p.write_text(HEADER + "start_all()\n")
    return testspec.load(p, DEFAULTS)


def machine(spec: testspec.TestSpec, name: str, tmp_path: Path) -> Machine:
    return Machine(name, spec.plans[name], tmp_path, boot_timeout=1)


def test_table_names_real_methods_and_capabilities() -> None:
    nix = subprocess.run([nixeval.nix_instantiate(), "--eval", "--strict", "--json",
                          str(paths.nixlib_dir() / "capabilities.nix"), "-A", "backends"],
                         capture_output=True, text=True, check=True, timeout=60)
    features = {f for backend in json.loads(nix.stdout).values() for f in backend["features"]}
    assert set(caps.METHOD_CAPABILITY.values()) <= features
    for method in caps.METHOD_CAPABILITY:
        assert callable(getattr(Machine, method)) and getattr(Machine, method).__wrapped__


@pytest.mark.parametrize(("node", "call", "capability", "has"), [
    ("b", lambda m: m.screenshot("x"), "screenshot", "snapshot, networks, block, console, consoleInput"),
    ("b", lambda m: m.get_screen_text(), "screenshot", "snapshot, networks, block, console, consoleInput"),
    ("b", lambda m: m.send_key("ret"), "keys", "snapshot, networks, block, console, consoleInput"),
    ("b", lambda m: m.reboot(), "reboot", "snapshot, networks, block, console, consoleInput"),
    ("c", lambda m: m.send_chars("hi"), "keys", "snapshot, sharedDirs, networks, block, reboot, console"),
    ("c", lambda m: m.wait_for_text("x"), "screenshot", "snapshot, sharedDirs, networks, block, reboot, console"),
])
def test_missing_capability_raises_before_touching_the_vm(
        spec: testspec.TestSpec, tmp_path: Path, node: str, call: Any, capability: str, has: str) -> None:
    m = machine(spec, node, tmp_path)
    with pytest.raises(caps.MissingCapability) as e:
        call(m)
    backend = spec.plans[node]["backend"]
    method = str(e.value).split(": ")[1]
    assert str(e.value) == f'machine {node}: {method}: backend {backend} lacks capability "{capability}" (it has: {has})'
    assert isinstance(e.value, ScriptError) and not m.booted and m.backend.proc is None


def test_methods_the_backend_has_run(spec: testspec.TestSpec, tmp_path: Path) -> None:
    for name in "abc":
        assert machine(spec, name, tmp_path).get_console_log() == ""  # console: every backend


def test_only_the_outermost_call_on_a_machine_is_checked(tmp_path: Path) -> None:
    """reboot() may press ctrl-alt-delete itself on a backend with reboot but no keys; another
    machine's methods called meanwhile are still checked."""
    class Fake:
        name = "c"
        plan = {"backend": "cloud-hypervisor", "capabilities": {"features": ["reboot"]}}
        pressed: list[str] = []
        other: Fake | None = None

        def send_key(self, key: str) -> None:
            self.pressed.append(key)

        def reboot(self) -> None:
            self.send_key("ctrl-alt-delete")
            if self.other is not None:
                self.other.send_key("a")

    Fake.send_key = caps._guarded("send_key", Fake.send_key)  # type: ignore[method-assign]
    Fake.reboot = caps._guarded("reboot", Fake.reboot)  # type: ignore[method-assign]
    f = Fake()
    f.reboot()
    assert f.pressed == ["ctrl-alt-delete"]
    with pytest.raises(caps.MissingCapability, match='machine c: send_key.*lacks capability "keys"'):
        f.send_key("a")
    f.other = Fake()
    with pytest.raises(caps.MissingCapability, match="machine c: send_key"):
        f.reboot()
    assert f.pressed == ["ctrl-alt-delete"] * 2


def test_hand_made_plan_without_capabilities_is_not_judged(tmp_path: Path) -> None:
    m = Machine("x", {"files": {"disk": str(tmp_path / "disk")}, "stateDir": str(tmp_path)}, tmp_path, boot_timeout=1)
    assert m.get_console_log() == ""


def test_unknown_method_names_the_closest(spec: testspec.TestSpec, tmp_path: Path) -> None:
    m = machine(spec, "a", tmp_path)
    with pytest.raises(AttributeError, match=r"^'Machine' object has no attribute 'succed' \(did you mean succeed\?\)$"):
        m.succed("true")  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match=r"no attribute 'xyzzy'$"):
        m.xyzzy  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(AttributeError, match=r"no attribute '_privat'$"):
        m._privat  # type: ignore[attr-defined]  # noqa: B018


def test_getattr_leaves_attribute_access_alone(spec: testspec.TestSpec, tmp_path: Path) -> None:
    m = machine(spec, "a", tmp_path)
    assert m.name == "a" and hasattr(m, "plan") and not hasattr(m, "nope")
    assert getattr(m, "nope", 42) == 42
    assert copy.copy(m).name == "a"
    bare = Machine.__new__(Machine)  # as unpickling makes it: no instance attributes yet
    assert not hasattr(bare, "name") and not hasattr(bare, "__setstate_x__")
    bare.__dict__.update(m.__dict__)
    assert bare.name == "a"


def test_run_time_errors_name_the_script_line(spec: testspec.TestSpec, tmp_path: Path) -> None:
    """Through the driver, as `ntng run` reports them (no vlans: nothing is set up)."""
    p = tmp_path / "t.py"
    for body, expected in [
        ("b.send_key('a')\n",
         f"{p}:4 (b.send_key('a')): machine b: send_key(): backend firecracker lacks capability \"keys\""),
        ("a.wait_for_unti('x')\n",
         f"{p}:4 (a.wait_for_unti('x')): AttributeError: 'Machine' object has no attribute "
         "'wait_for_unti' (did you mean wait_for_unit?)"),
        ("strat_all()\n",
         f"{p}:4 (strat_all()): NameError: name 'strat_all' is not defined (did you mean start_all?)"),
    ]:
        p.write_text(HEADER + body)
        s = testspec.TestSpec(p, p.read_text(), "t", 60, spec.node_names, spec.plans, spec.network)
        with Driver(s, tmp_path / "out", boot_timeout=1, log=lambda _: None) as d:
            with pytest.raises(ScriptError) as e:
                d.run_tests()
        assert str(e.value).startswith(expected), str(e.value)
        assert not any(m.booted for m in d.machines)


def test_name_error_hint_without_a_driver() -> None:
    e = NameError("name 'retyr' is not defined", name="retyr")
    assert str(script_error(Path("t.py"), e, DRIVER_GLOBALS)).endswith("(did you mean retry?)")
    assert str(script_error(Path("t.py"), NameError("x", name="qqqqq"))).endswith(": x")


def test_backends_name_only_capabilities_nixlib_defines() -> None:
    """Every `self._lacks("<capability>", …)` in the backends is a feature of capabilities.nix."""
    import re

    nix = subprocess.run([nixeval.nix_instantiate(), "--eval", "--strict", "--json",
                          str(paths.nixlib_dir() / "capabilities.nix"), "-A", "backends"],
                         capture_output=True, text=True, check=True, timeout=60)
    features = {f for backend in json.loads(nix.stdout).values() for f in backend["features"]}
    named = {m.group(1) for src in (Path(caps.__file__).parent / "backends").glob("*.py")
             for m in re.finditer(r'_lacks\(\s*"([^"]+)"', src.read_text())}
    assert named and named <= features, named - features

"""The quick check's type check: mypy on the test script against the real, typed driver API.

The script is checked as if it were a module whose globals are what the driver gives it (every
node a `Machine`, `start_all` the driver's method, …), so `machine.succed(…)`, a wrong
argument type or `start_all(5)` are found without booting anything.  The types come from the
driver's own annotations, so they cannot drift from what runs.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .api_names import DRIVER_GLOBALS, node_globals

# How each driver global is typed: an expression over `driver: Driver` (or a type).
_GLOBAL_TYPES = {
    "start_all": "driver.start_all",
    "join_all": "driver.join_all",
    "subtest": "driver.subtest",
    "retry": "_retry",
    "polling_condition": "_polling_condition_factory(driver)",
    "serial_stdout_on": "driver.serial_stdout_on",
    "serial_stdout_off": "driver.serial_stdout_off",
    "run_tests": "driver.run_tests",
    "machines": "driver.machines",
    "machines_qemu": "driver.machines",
    "driver": None,  # declared below
    "log": "driver",
    "Machine": "_Machine",
    "BaseMachine": "_Machine",
    "RequestedAssertionFailed": "_RequestedAssertionFailed",
    "create_machine": "driver.create_machine",
    "start_from_snapshot": "driver.start_from_snapshot",
}
assert set(_GLOBAL_TYPES) == set(DRIVER_GLOBALS), "a driver global has no type for the check"

_ERROR = re.compile(r"^(?P<file>.*?):(?P<line>\d+):(?:\d+:)? (?P<kind>error|note): (?P<msg>.*)$")


def prelude(node_names: list[str]) -> str:
    lines = [
        "from ntng.driver import Driver as _Driver",
        "from ntng.machine import Machine as _Machine, RequestedAssertionFailed as _RequestedAssertionFailed",
        "from ntng.machine import retry as _retry",
        "from ntng.polling import polling_condition_factory as _polling_condition_factory",
        "driver: _Driver",
    ]
    lines += [f"{name} = {expr}" for name, expr in _GLOBAL_TYPES.items() if expr is not None]
    lines += [f"{n}: _Machine" for n in node_globals(node_names) if n not in _GLOBAL_TYPES]
    # One line, so the script's line numbers only shift by a constant.
    return "; ".join(lines) + "\n"


def type_check(path: Path, script: str, node_names: list[str]) -> list[tuple[int, str]] | None:
    """(line, message) for each type error in the script; None when mypy is not installed."""
    try:
        from mypy import api
    except ImportError:
        return None
    import ntng

    head = prelude(node_names)
    package_root = str(Path(ntng.__file__).resolve().parent.parent)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ntng" / "mypy"
    with tempfile.TemporaryDirectory(prefix="ntng-check-") as tmp:
        target = Path(tmp) / "ntng_test_script.py"
        target.write_text(head + script)
        env_path = os.environ.get("MYPYPATH")
        os.environ["MYPYPATH"] = package_root
        try:
            out, err, _status = api.run([
                str(target), "--python-version", "3.11", "--check-untyped-defs",
                "--ignore-missing-imports", "--follow-imports=silent", "--no-error-summary",
                # Scripts are not annotated: only what would go wrong at run time counts.
                "--disable-error-code=var-annotated", "--allow-redefinition",
                "--show-column-numbers", "--hide-error-context", "--no-color-output",
                "--cache-dir", str(cache),
            ])
        finally:
            if env_path is None:
                os.environ.pop("MYPYPATH", None)
            else:
                os.environ["MYPYPATH"] = env_path
    found = []
    for line in out.splitlines():
        m = _ERROR.match(line)
        if m is None or m["kind"] != "error" or Path(m["file"]).name != target.name:
            continue
        lineno = int(m["line"]) - 1  # the prelude is one line
        if lineno >= 1:
            found.append((lineno, m["msg"].replace("_Machine", "Machine").replace("_Driver", "Driver")))
    if not found and err.strip():
        found.append((1, f"type check could not run: {err.strip().splitlines()[-1]}"))
    return found

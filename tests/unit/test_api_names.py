"""api_names (what `ntng check` lints against) agrees with what driver.py binds at run time."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap

from ntng import api_names, driver


def test_driver_globals_are_the_ones_driver_binds() -> None:
    assert api_names.DRIVER_GLOBALS == driver.DRIVER_GLOBALS
    # The keys of Driver.test_symbols' dict literal, as written.
    tree = ast.parse(textwrap.dedent(inspect.getsource(driver.Driver.test_symbols)))
    literal = next(n for n in ast.walk(tree) if isinstance(n, ast.Dict))
    keys = tuple(k.value for k in literal.keys if isinstance(k, ast.Constant))
    assert keys == api_names.DRIVER_GLOBALS


def test_node_globals_are_named_as_driver_names_them() -> None:
    for name in ("server", "b-2", "2fast", "x.y", "machine"):
        assert api_names.pythonize_name(name) == driver.pythonize_name(name)
    assert api_names.node_globals(["vm"]) == ["vm", "machine"]
    assert api_names.node_globals(["a", "b-2"]) == ["a", "b_2"]


def test_the_quick_check_does_not_import_the_runtime() -> None:
    code = ("import sys, ntng.check, ntng.typecheck, ntng.cli\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('ntng.', 'cffi', 'pyroute2')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    loaded = set(out.split())
    assert not loaded & {"ntng.driver", "ntng.machine", "ntng.netns", "ntng.network", "ntng.runner", "cffi",
                         "pyroute2", "ntng.backends"}, loaded

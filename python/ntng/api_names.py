"""The names a test script sees, without importing the runtime.

`ntng check` lints and type-checks against these; importing python/ntng/driver.py for them
would pull in machines, backends and the network namespace code (cffi) for a check that boots
nothing.  tests/unit/test_api_names.py checks them against what driver.py really binds.
"""

from __future__ import annotations

import re

# Besides one global per node (and `machine` for a lone node): the NixOS driver's, plus `driver`.
DRIVER_GLOBALS = (
    "start_all", "join_all", "subtest", "retry", "polling_condition", "serial_stdout_on",
    "serial_stdout_off", "run_tests", "machines", "machines_qemu", "driver", "log", "Machine",
    "BaseMachine", "RequestedAssertionFailed", "create_machine", "start_from_snapshot",
)


def pythonize_name(name: str) -> str:
    """A node's global: its name with what Python does not allow in a name made `_`."""
    return re.sub(r"^[^A-Za-z_]|[^A-Za-z0-9_]", "_", name)


def node_globals(node_names: list[str]) -> list[str]:
    """The globals the nodes add: one per node, `machine` too when there is exactly one."""
    return [pythonize_name(n) for n in node_names] + (["machine"] if len(node_names) == 1 else [])

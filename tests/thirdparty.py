"""Third-party files the tests read but the repository does not hold: nixpkgs' lib and the
Firecracker / Cloud Hypervisor API specifications.  Each is found through one environment
variable, defaulting to ../shared next to the checkout (where their licences and provenance are).

Where one is absent, the tests that need it skip with a reason that names the variable; under
CI=true they fail instead.  This module is also a pytest plugin (tests/conftest.py registers it):
the run ends with one line counting those skips, so a clone without them never looks greener
than it is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABSENT = "third-party files absent"  # the marker every such skip reason starts with
ABSENT_RE = re.compile(re.escape(ABSENT) + r" \((\w+)\)")


@dataclass(frozen=True)
class ThirdParty:
    variable: str
    default: Path
    what: str  # what the tests need, for the skip reason
    probe: str  # a file that must be inside

    @property
    def path(self) -> Path:
        return Path(os.environ.get(self.variable) or self.default)

    def present(self) -> bool:
        return (self.path / self.probe).is_file()

    def reason(self) -> str:
        where = "set to" if os.environ.get(self.variable) else "default"
        return (f"{ABSENT} ({self.variable}): needs {self.what}: set {self.variable} "
                f"({where} {self.path}, which has no {self.probe})")

    def marks(self) -> list[pytest.MarkDecorator]:
        """For a module's `pytestmark`: skip every test when the files are absent."""
        return [pytest.mark.skipif(not self.present(), reason=self.reason())]

    def require(self) -> Path:
        """In a test: the folder, or skip."""
        if not self.present():
            pytest.skip(self.reason())
        return self.path


NIXPKGS_LIB = ThirdParty("NIXPKGS_LIB", ROOT.parent / "shared" / "vendor" / "nixpkgs-lib" / "lib",
                         "nixpkgs' lib (lib.evalModules)", "default.nix")
SPECS = ThirdParty("NTNG_SPECS", ROOT.parent / "shared" / "specs",
                   "the Firecracker and Cloud Hypervisor API specifications", "firecracker.yaml")


def skip_reason(report: Any) -> str:
    """A skip report's reason: longrepr is (path, line, reason), a list once it crossed from an
    xdist worker, or text."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple | list) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def absent_variables(reports: Iterable[Any]) -> Iterator[str]:
    """The variable named by each skip that third-party files caused."""
    for report in reports:
        m = ABSENT_RE.search(skip_reason(report))
        if m:
            yield m.group(1)


def summary_line(reports: Iterable[Any]) -> str | None:
    variables = list(absent_variables(reports))
    if not variables:
        return None
    tests = "test" if len(variables) == 1 else "tests"
    return (f"{len(variables)} {tests} skipped: third-party files absent ({', '.join(sorted(set(variables)))}); "
            "see README, Running the tests")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under CI=true such a skip is a failure: CI has the files, and must run every test."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and os.environ.get("CI") and ABSENT_RE.search(skip_reason(report)):
        report.outcome = "failed"
        report.longrepr = f"{skip_reason(report)} [CI=true: these files must be present]"


def pytest_unconfigure(config: pytest.Config) -> None:
    """Last in the output, after pytest's own summary line (on the xdist controller only)."""
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    if terminal is None or hasattr(config, "workerinput"):
        return
    line = summary_line(terminal.stats.get("skipped", []))
    if line:
        terminal.write_line(line, yellow=True, bold=True)

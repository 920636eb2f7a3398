"""Shared fixtures: e2e tests boot real guests under QEMU (TCG here)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "backdoor"))
sys.path.insert(0, str(ROOT / "tests"))

import thirdparty  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # Skips for absent third-party files: counted in the run's last line, failures under CI=true.
    if not config.pluginmanager.has_plugin("thirdparty"):
        config.pluginmanager.register(thirdparty, "thirdparty")


# Minutes each e2e module took under TCG here.  Test files run on parallel workers (xdist,
# --dist loadfile) in collection order, so the longest start first and the quick unit files
# fill the gaps at the end; a module not listed counts as one minute.
E2E_MINUTES = {"test_file_sync.py": 7, "test_machine.py": 4, "test_network.py": 4, "test_transports.py": 4,
               "test_cleanup.py": 3, "test_snapshot.py": 2, "test_compat.py": 2, "test_shared_dirs.py": 2}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)

    def weight(item: pytest.Item) -> float:
        path = Path(str(item.fspath))
        return E2E_MINUTES.get(path.name, 1) if "/e2e/" in str(path) else 0

    items.sort(key=weight, reverse=True)  # stable: a module's tests keep their order


@pytest.fixture(scope="session")
def guest_image() -> Iterator[object]:
    from ntng import image
    from ntng.errors import SetupError

    try:
        yield image.find_image()
    except SetupError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no guest image ({e}); run ./setup.sh")


# Measurements a test prints as "measured: …" lines (peak RSS under a guest flood, time from the
# global timeout to exit, …) are listed at the end of the run, so ./test.sh states them without
# -s.  They travel as user_properties, which pytest-xdist carries from its workers.
MEASURED = "measured: "


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call":
        for line in report.capstdout.splitlines():
            if line.startswith(MEASURED):
                report.user_properties.append(("measured", line[len(MEASURED):]))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = [f"{r.nodeid.split('::')[-1]}: {value}"
             for reports in terminalreporter.stats.values() for r in reports
             if getattr(r, "when", None) == "call"
             for key, value in getattr(r, "user_properties", []) if key == "measured"]
    if lines:
        terminalreporter.section("measured")
        for line in sorted(lines):
            terminalreporter.write_line(line)

"""Which files are tests.

The rule: a file named on the command line is a test, whatever its name.  In a directory
(searched recursively, hidden folders and __pycache__ skipped) a test is a `*.py` file with a
`#:` header line (its node declaration; `#: nodes = { };` for no VM), except pytest's own
files (`conftest.py`, `test_*.py`, `*_test.py`: the pytest plugin's modules carry `#:` lines
too and are run by pytest).  A script without `#:` lines (one default `machine`) is run when
named explicitly.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from ..errors import UsageError

_HEADER = re.compile(r"^\s*#:", re.MULTILINE)


@dataclasses.dataclass(frozen=True, order=True)
class TestFile:
    id: str  # the path relative to the working directory (absolute outside it): stable across CI jobs
    path: Path

    @property
    def slug(self) -> str:
        """A folder name for the test's artifacts, unique per id."""
        return re.sub(r"[^\w.-]", "_", self.id.removesuffix(".py").lstrip("/").replace("/", "__")).lstrip(".") or "test"


def test_id(path: Path, cwd: Path) -> str:
    resolved = path.resolve()
    try:
        return resolved.relative_to(cwd.resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


def is_test_file(path: Path) -> bool:
    name = path.name
    if not name.endswith(".py") or name == "conftest.py" or name.startswith("test_") or name.endswith("_test.py"):
        return False
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return _HEADER.search(f.read(1 << 20)) is not None
    except OSError:
        return False


def discover(paths: list[Path], cwd: Path | None = None) -> list[TestFile]:
    """The tests under `paths`, each once, sorted by id (the order never depends on the
    command line's)."""
    cwd = cwd or Path.cwd()
    found: dict[str, TestFile] = {}
    for p in paths:
        if p.is_file():
            candidates = [p]
        elif p.is_dir():
            candidates = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
                candidates += [Path(root) / f for f in sorted(files) if is_test_file(Path(root) / f)]
        else:
            raise UsageError(f"{p}: no such file or directory")
        for c in candidates:
            t = TestFile(test_id(c, cwd), c)
            found.setdefault(t.id, t)
    if not found:
        raise UsageError("no tests found under " + ", ".join(map(str, paths))
                         + " (a test is a *.py file with a `#:` header line, or a file named explicitly)")
    return sorted(found.values())

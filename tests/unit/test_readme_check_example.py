"""The README's `ntng check` example (a capability error) is what `ntng check` prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
EXAMPLE = re.compile(r"For this script, `(?P<name>[\w.]+)`:\n\n```python\n(?P<script>.*?)```\n\n"
                     r"`ntng check (?P=name)` prints \(exit code (?P<code>\d+)\):\n\n(?P<out>(?:    [^\n]*\n)+)", re.S)


def test_readme_capability_example_reproduces_verbatim(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="the README shows `ntng check` with its type check (mypy)")
    m = EXAMPLE.search(README.read_text())
    assert m is not None, "README.md no longer has the `ntng check` example this test runs"
    (tmp_path / m["name"]).write_text(m["script"])
    r = subprocess.run([sys.executable, "-m", "ntng.cli", "check", m["name"]], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    expected = [line.removeprefix("    ") for line in m["out"].splitlines()]
    # The README says in words that a note follows where KVM is unusable: that depends on the host.
    got = [line for line in r.stderr.splitlines() if ": note: " not in line]
    assert (r.returncode, got) == (int(m["code"]), expected), r.stderr
    assert "screenshot" in m["out"] and "firecracker" in m["script"]

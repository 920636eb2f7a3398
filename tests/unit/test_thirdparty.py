"""Tests that need third-party files (tests/thirdparty.py) say so: a skip names the variable, the
run ends with a line counting such skips (also on xdist workers), and under CI=true they fail."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import thirdparty

TESTS = Path(__file__).resolve().parents[1]

NEEDS_LIB = """
import thirdparty
pytestmark = thirdparty.NIXPKGS_LIB.marks()
def test_one(): pass
def test_two(): pass
"""
NEEDS_SPECS = """
import thirdparty
def test_specs(): thirdparty.SPECS.require()
def test_plain(): pass
"""


def run(tmp_path: Path, *args: str, ci: bool = False) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_lib.py").write_text(NEEDS_LIB)
    (tmp_path / "test_specs.py").write_text(NEEDS_SPECS)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER")}
    env |= {"PYTHONPATH": str(TESTS), "NIXPKGS_LIB": str(tmp_path / "no-lib"), "NTNG_SPECS": str(tmp_path / "no-specs")}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "thirdparty", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), "-c", os.devnull, *args, str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_skips_name_the_variable_and_the_last_line_counts_them(tmp_path: Path) -> None:
    r = run(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"set NIXPKGS_LIB (set to {tmp_path / 'no-lib'}, which has no default.nix)" in r.stdout
    assert "set NTNG_SPECS" in r.stdout
    assert r.stdout.rstrip().splitlines()[-1] == \
        "3 tests skipped: third-party files absent (NIXPKGS_LIB, NTNG_SPECS); see README, Running the tests"


def test_the_count_survives_xdist_workers(tmp_path: Path) -> None:
    r = run(tmp_path, "-n", "2", "--dist", "loadfile")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^1 passed, 3 skipped", r.stdout, re.M), r.stdout
    assert r.stdout.rstrip().splitlines()[-1].startswith("3 tests skipped: third-party files absent"), r.stdout


def test_under_ci_such_a_skip_fails(tmp_path: Path) -> None:
    r = run(tmp_path, ci=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "CI=true: these files must be present" in r.stdout
    assert "skipped" not in r.stdout.splitlines()[-1]


def test_the_default_is_shared_next_to_the_checkout() -> None:
    assert thirdparty.NIXPKGS_LIB.default == TESTS.parent.parent / "shared/vendor/nixpkgs-lib/lib"
    assert thirdparty.SPECS.default == TESTS.parent.parent / "shared/specs"


def test_no_test_reads_shared_but_through_thirdparty() -> None:
    """One documented variable each: no other test file builds a path to ../shared."""
    offenders = [str(p.relative_to(TESTS)) for p in TESTS.rglob("*.py")
                 if p.name != "thirdparty.py" and re.search(r"""["']shared["']\s*/|/shared/(specs|vendor)""", p.read_text())]
    assert offenders == []

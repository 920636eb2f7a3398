"""A NixOS-driver-style test script using the API broadly (examples/nixos_compat.py) runs
unchanged and passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import ROOT, run_cli

pytestmark = pytest.mark.e2e


def test_nixos_style_script_passes_unchanged(tmp_path: Path, guest_image: object) -> None:
    r = run_cli("run", str(ROOT / "examples/nixos_compat.py"), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stderr.count("subtest: ") == 8

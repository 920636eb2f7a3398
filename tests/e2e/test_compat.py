"""A NixOS-driver-style test script using the API broadly (examples/nixos_compat.py) runs
unchanged and passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import ROOT, run_cli

pytestmark = pytest.mark.e2e


def test_nixos_style_script_passes_unchanged(tmp_path: Path, guest_image: object) -> None:
    # The client as a container (issue 17): block, crash and start need no VM; the server stays
    # a VM (it writes to /dev/ttyS0, a serial line a container lacks).
    script = tmp_path / "nixos_compat.py"
    script.write_text((ROOT / "examples/nixos_compat.py").read_text()
                      .replace("#: nodes.client = {", '#: nodes.client = { backend = "nspawn";'))
    assert 'backend = "nspawn"' in script.read_text()
    r = run_cli("run", str(script), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stderr.count("subtest: ") == 8

"""-K / --keep-machine-state: the next -K run of the same script boots from the disks the last
one left; without -K every run starts from the image."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import run_cli
from ntng import runner

pytestmark = pytest.mark.e2e

SCRIPT = """\
import os
first = os.environ.get("NTNG_TEST_PHASE") == "write"
if first:
    machine.succeed("echo from-the-last-run > /root/kept && sync")
else:
    print("KEPT:", machine.execute("cat /root/kept")[1].strip() or "nothing")
machine.shutdown()
"""


def test_keep_state_reuses_disks_across_runs(tmp_path: Path, guest_image: object,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "kept.py"
    script.write_text(SCRIPT)
    state = runner.kept_state_dir(script)
    try:
        monkeypatch.setenv("NTNG_TEST_PHASE", "write")
        r = run_cli("run", str(script), "-K", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert (state / "machine" / "disk.qcow2").exists()
        monkeypatch.setenv("NTNG_TEST_PHASE", "read")
        r = run_cli("run", str(script), "-K", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "(reused from the last -K run)" in r.stderr and "KEPT: from-the-last-run" in r.stdout + r.stderr
        r = run_cli("run", str(script), cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "KEPT: nothing" in r.stdout + r.stderr
    finally:
        shutil.rmtree(state, ignore_errors=True)

"""Boot machines for e2e tests through the same path as `ntng run` (nixlib plan, accel probe)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ntng import runner
from ntng.driver import Driver

ROOT = Path(__file__).resolve().parents[2]


def make_driver(tmp: Path, script: str = "", boot_timeout: float | None = None) -> Driver:
    path = tmp / "test_script.py"
    path.write_text(script)
    opts = runner.RunOptions(script=path, accel=os.environ.get("NTNG_ACCEL", "auto"))
    state = tmp / "state"
    state.mkdir(exist_ok=True)
    spec, choice = runner.prepare(opts, state)
    timeout = boot_timeout or runner.DEFAULT_BOOT_TIMEOUT * choice.timeout_scale
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    return Driver(spec, out, timeout)


def ntng_run(script: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ntng.cli", "run", str(script), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=script.parent,
    )


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`ntng <args>` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "ntng.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)

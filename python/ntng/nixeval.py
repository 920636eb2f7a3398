"""Evaluate nixlib functions with `nix-instantiate --eval --strict --json`.

The runner asks nixlib for every launch detail; a `throw` in nixlib becomes a NixEvalError whose
message is the throw's own text (the full Nix trace is kept for `--show-trace` users).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from typing import Any

from . import paths
from .errors import NixEvalError, SetupError


def nix_instantiate() -> str:
    exe = os.environ.get("NTNG_NIX_INSTANTIATE") or shutil.which("nix-instantiate")
    if not exe:
        raise SetupError("nix-instantiate not found: apt-get install nix-bin (or run ./setup.sh); "
                         "nixlib computes every VM command line")
    return exe


def evaluate(entry: str, args: list[str], show_trace: bool = False) -> tuple[Any, str | None]:
    """Evaluate nixlib/<entry> with `args` (--arg/--argstr pairs): (JSON value, None) on
    success, (None, Nix's stderr) on an evaluation error."""
    cmd = [
        nix_instantiate(), "--eval", "--strict", "--json",
        "--option", "build-users-group", "",
        str(paths.nixlib_dir() / entry), *args,
    ]
    if show_trace:
        cmd.append("--show-trace")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return None, r.stderr
    return json.loads(r.stdout), None


def call(fn: str, arg: Any, show_trace: bool = False) -> Any:
    """Apply nixlib function `fn` (dotted, e.g. "qemu.launch") to the JSON value `arg`."""
    value, stderr = evaluate("eval.nix", ["--argstr", "fn", fn, "--argstr", "arg", json.dumps(arg)],
                             show_trace)
    if stderr is not None:
        raise NixEvalError(nix_message(stderr) + (f"\n{stderr}" if show_trace else ""))
    return value


def nix_message(stderr: str) -> str:
    """The one line a user needs: the `throw` text (Nix prints `error: <message>` last)."""
    lines = [ln for ln in stderr.splitlines() if not ln.startswith("warning:")]
    for ln in reversed(lines):
        m = re.match(r"\s*error:\s*(.*)", ln)
        if m and m.group(1).strip():
            return f"nixlib: {m.group(1).strip()}"
    return "nixlib evaluation failed: " + " | ".join(lines[-5:])

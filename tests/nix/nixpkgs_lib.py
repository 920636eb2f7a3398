"""nixpkgs' lib for the tests that need lib.evalModules ($NIXPKGS_LIB; ../shared/vendor in CI)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

NIXPKGS_LIB = os.environ.get("NIXPKGS_LIB", "")

# A test module's `pytestmark`: skip, with the reason, where nixpkgs' lib or Nix is missing.
requires_nixpkgs_lib = [
    pytest.mark.skipif(not NIXPKGS_LIB or not (Path(NIXPKGS_LIB) / "default.nix").is_file(),
                       reason="NIXPKGS_LIB does not point to nixpkgs' lib (needed for evalModules)"),
    pytest.mark.skipif(not shutil.which("nix-instantiate"), reason="nix-instantiate not found"),
]

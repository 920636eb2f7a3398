"""nixpkgs' lib for the tests that need lib.evalModules ($NIXPKGS_LIB: tests/thirdparty.py)."""

from __future__ import annotations

import shutil

import pytest
import thirdparty

NIXPKGS_LIB = str(thirdparty.NIXPKGS_LIB.path)

# A test module's `pytestmark`: skip, with the reason, where nixpkgs' lib or Nix is missing.
requires_nixpkgs_lib = [
    *thirdparty.NIXPKGS_LIB.marks(),
    pytest.mark.skipif(not shutil.which("nix-instantiate"), reason="nix-instantiate not found"),
]

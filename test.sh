#!/usr/bin/env bash
# The test command: lint, type-check, the flake's offline checks, then unit + property + Nix eval
# + e2e tests (boots VMs).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${NTNG_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
export NIXPKGS_LIB=${NIXPKGS_LIB:-$(cd .. && pwd)/shared/vendor/nixpkgs-lib/lib}
ruff check python backdoor tests bench
mypy
# Debian's Nix: flakes are experimental, there is no nixbld group, and nothing may be fetched.
nix --extra-experimental-features 'nix-command flakes' --option substituters '' \
  --option build-users-group '' flake check --no-write-lock-file
# Test files run on as many workers as there are cores (at most 4): a TCG guest keeps one core
# busy, so two e2e modules side by side take little longer than one.  A file's tests stay on
# one worker (its module fixture boots its VMs once).
jobs=${NTNG_TEST_JOBS:-$(nproc)}
[ "$jobs" -gt 4 ] && jobs=4
pytest -q -ra -n "$jobs" --dist loadfile "$@"

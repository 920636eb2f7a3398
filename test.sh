#!/usr/bin/env bash
# The test command: lint, type-check, the flake's offline checks, then unit + property + Nix eval
# + e2e tests (boots VMs).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${NTNG_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
# Third-party files some tests read: $NIXPKGS_LIB, $NTNG_SPECS (defaults in ../shared, see
# tests/thirdparty.py); pytest's last line counts the tests skipped because they are absent.
ruff check python backdoor tests bench
mypy
# Debian's Nix: flakes are experimental, there is no nixbld group, and nothing may be fetched.
nix --extra-experimental-features 'nix-command flakes' --option substituters '' \
  --option build-users-group '' flake check --no-write-lock-file
# Test files run on parallel workers (a module's VM is booted once, on one worker), one per
# core by default.  Two runners' network setups once hung side by side: pyroute2 forked a
# threaded process for every netlink socket; the runner no longer lets it (netns.py).
pytest -q -ra -n "${NTNG_TEST_WORKERS:-$(nproc)}" --dist loadfile "$@"

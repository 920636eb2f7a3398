#!/usr/bin/env bash
# The test command: lint, type-check, unit + property + Nix eval + e2e tests (boots VMs).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${NTNG_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
export NIXPKGS_LIB=${NIXPKGS_LIB:-$(cd .. && pwd)/shared/vendor/nixpkgs-lib/lib}
ruff check python backdoor tests bench
mypy
pytest -q -ra "$@"

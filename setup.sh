#!/usr/bin/env bash
# One-time setup on a fresh Debian machine (idempotent, cached): system packages, a venv with
# the Python dependencies, and the Debian guest image.  Run as root (debootstrap, TAP).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${NTNG_VENV:-.venv}
# The system packages come from nixlib/tools.nix (every program the runner starts), read with
# nix-instantiate: so nix-bin (and python3-venv, for the venv below) are installed first.
BOOTSTRAP=(nix-bin python3-venv)
apt_updated=
apt_install() {  # the packages of "$@" that are not installed yet
  local need=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg"); done
  [ ${#need[@]} -gt 0 ] || return 0
  echo "setup: apt-get install ${need[*]}"
  [ -n "$apt_updated" ] || { apt-get update -q; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
}
tool_packages() {  # the Debian packages of nixlib/tools.nix from suite $1 (own or sid)
  nix-instantiate --eval --strict --json --option build-users-group "" nixlib/debian-packages.nix -A "$1" \
    | python3 -c 'import json, sys; print(" ".join(json.load(sys.stdin)))'
}
apt_install "${BOOTSTRAP[@]}"
own=$(tool_packages own)  # (a failed evaluation stops setup here: set -e, pipefail)
read -ra own_pkgs <<<"$own"
apt_install "${own_pkgs[@]}"
# Some tools (vhost-device-vsock, QEMU's hybrid vsock backdoor) are packaged in Debian sid only:
# install those through a temporary sid entry copied from this machine's own apt sources.
sid_need=()
sid_list=$(tool_packages sid)
read -ra sid_pkgs <<<"$sid_list"
for pkg in "${sid_pkgs[@]}"; do dpkg -s "$pkg" >/dev/null 2>&1 || sid_need+=("$pkg"); done
if [ ${#sid_need[@]} -gt 0 ]; then
  sid=/etc/apt/sources.list.d/ntng-sid.sources
  trap 'rm -f "$sid" /etc/apt/sources.list.d/ntng-sid.list' EXIT
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    awk 'BEGIN { RS = ""; ORS = "\n\n" } !/debian-security/' /etc/apt/sources.list.d/debian.sources \
      | sed 's/^Suites: .*/Suites: sid/' > "$sid"
  else
    grep -E '^deb ' /etc/apt/sources.list | grep -v security | head -1 \
      | awk '{ print $1, $2, "sid", "main" }' > /etc/apt/sources.list.d/ntng-sid.list
  fi
  echo "setup: apt-get install ${sid_need[*]} (from sid)"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${sid_need[@]}"
  rm -f "$sid" /etc/apt/sources.list.d/ntng-sid.list
  apt-get update -q
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
stamp="$VENV/.ntng-deps-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e '.[dev]'
  touch "$stamp"
fi
"$VENV/bin/ntng" image build
echo "setup: done. Tests: ./test.sh   Demo: $VENV/bin/ntng run examples/two_nodes.py"

#!/usr/bin/env bash
# One-time setup on a fresh Debian machine (idempotent, cached): system packages, a venv with
# the Python dependencies, and the Debian guest image.  Run as root (debootstrap, TAP).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${NTNG_VENV:-.venv}
need_apt=()
for pkg in qemu-system-x86 qemu-utils debootstrap e2fsprogs nix-bin python3-venv vde2 tesseract-ocr tesseract-ocr-eng; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi
# vhost-device-vsock (QEMU's hybrid vsock backdoor) is packaged in Debian sid only: install that
# one package through a temporary sid entry copied from this machine's own apt sources.
if ! command -v vhost-device-vsock >/dev/null; then
  sid=/etc/apt/sources.list.d/ntng-sid.sources
  trap 'rm -f "$sid" /etc/apt/sources.list.d/ntng-sid.list' EXIT
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    awk 'BEGIN { RS = ""; ORS = "\n\n" } !/debian-security/' /etc/apt/sources.list.d/debian.sources \
      | sed 's/^Suites: .*/Suites: sid/' > "$sid"
  else
    grep -E '^deb ' /etc/apt/sources.list | grep -v security | head -1 \
      | awk '{ print $1, $2, "sid", "main" }' > /etc/apt/sources.list.d/ntng-sid.list
  fi
  echo "setup: apt-get install vhost-device-vsock (from sid)"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends vhost-device-vsock
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

#!/bin/bash
# Prepares a fresh Debian/Ubuntu machine: Python, the project's venv, and the host tools
# (mmdebstrap, qemu-utils, qemu-system, ovmf, e2fsprogs, dosfstools, mtools, ...).
# Run as root or with sudo. Idempotent. Usage: setup-host.sh [--with-tests]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" -eq 0 ] || { echo "run as root: sudo $0" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
if ! command -v python3 >/dev/null || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends python3 python3-venv python3-pip
fi
python3 - <<'PY' || { echo "Python 3.11 or newer is needed" >&2; exit 1; }
import sys
raise SystemExit(sys.version_info < (3, 11))
PY
if [ ! -x "$repo/.venv/bin/python" ]; then
  python3 -m venv "$repo/.venv"
fi
"$repo/.venv/bin/pip" install --quiet --disable-pip-version-check -e "$repo[dev]"
# --with-tests: also what the test suite needs (caddy, the SSH client).
"$repo/.venv/bin/rockpool" host setup "$@"

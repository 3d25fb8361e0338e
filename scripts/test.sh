#!/bin/bash
# One command on a fresh Debian/Ubuntu machine: install what the tests need, then run
# the whole suite (unit tests, then the end-to-end build and QEMU boots).
# Extra arguments go to pytest (e.g. -m "not vm" for the fast tests only).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/scripts/setup-host.sh" --with-tests
cd "$repo"
"$repo/.venv/bin/ruff" check src tests bench
"$repo/.venv/bin/mypy"
exec "$repo/.venv/bin/pytest" "$@"

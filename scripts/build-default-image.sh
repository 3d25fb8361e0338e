#!/bin/bash
# One command on a fresh Debian/Ubuntu machine: install what the build needs, then build
# the default workspace image (images/workspace.toml) into the local store.
# Extra arguments go to `rockpool image build` (e.g. --force, --json).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/scripts/setup-host.sh"
cd "$repo"
exec "$repo/.venv/bin/rockpool" image build "$@"

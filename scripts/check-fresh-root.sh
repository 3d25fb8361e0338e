#!/bin/bash
# Proves the host set-up on a clean machine: bootstraps a minimal Debian root of this
# host's release, and inside it, in private namespaces, runs scripts/setup-host.sh
# --with-tests from this checkout, then `rockpool host check --with-tests`, the
# preflight and bootstrap of the small amd64 test spec and the preflight of the arm64
# one (arch-test runs an arm64 program through qemu-user there). A package missing
# from the set-up fails it, whatever this host has installed by hand. The arm64
# bootstrap, all of it under emulation, is left to the suite, which builds that image
# beside its other tests.
#
# Usage: sudo scripts/check-fresh-root.sh [STORE]
#   STORE  the store (ROCKPOOL_HOME) the root's builds use; default: a scratch one.
#          CI passes the test suite's store, so the suite starts from the amd64 bootstrap.
# The root's set-up downloads from the same Debian mirror and PyPI as the host's; behind
# a TLS-intercepting proxy the host's CA bundle ($SSL_CERT_FILE) is handed in, as a
# user behind one would configure it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" -eq 0 ] || { echo "run as root: sudo $0" >&2; exit 1; }
command -v mmdebstrap >/dev/null || { echo "needs mmdebstrap: run sudo scripts/setup-host.sh" >&2; exit 4; }
# shellcheck source=/dev/null
. /etc/os-release
release=${VERSION_CODENAME:?/etc/os-release names no release}
[ "${ID:-}" = debian ] || { echo "this check bootstraps Debian; this host is ${ID:-unknown}" >&2; exit 2; }
mirror=${ROCKPOOL_FRESH_ROOT_MIRROR:-http://deb.debian.org/debian}
security=${ROCKPOOL_FRESH_ROOT_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

work=$(mktemp -d /var/tmp/rockpool-fresh-root.XXXXXX)
# The root's mounts live in its private mount namespace and are gone before this runs.
trap 'rm -rf --one-file-system "$work"' EXIT
root=$work/root
store=${1:-$work/store}
mkdir -p "$store"
store=$(cd "$store" && pwd)

step() { printf '==> %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }
started=$(date +%s)

step "bootstrapping a minimal Debian $release root"
mmdebstrap --quiet --mode=root --variant=minbase "$release" "$root" \
  "deb $mirror $release main" \
  "deb $mirror $release-updates main" \
  "deb $security $release-security main"

step "copying the checkout into the root"
mkdir -p "$root/src/rockpool"
tar -C "$repo" -c \
  --exclude=./.git --exclude=./.venv --exclude='*.egg-info' --exclude=__pycache__ \
  --exclude=.mypy_cache --exclude=.pytest_cache --exclude=.ruff_cache . |
  tar -C "$root/src/rockpool" -x
ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
[ -f "$ca" ] && install -m 0644 "$ca" "$root/etc/rockpool-host-ca.pem"

inside=$(cat <<'INSIDE'
set -euo pipefail
cd /src/rockpool
echo "==> scripts/setup-host.sh --with-tests, in the fresh root"
scripts/setup-host.sh --with-tests
echo "==> rockpool host check --with-tests"
.venv/bin/rockpool host check --with-tests
for spec_until in tests/specs/small.toml:bootstrap tests/specs/arm64.toml:preflight; do
  spec=${spec_until%:*} until=${spec_until#*:}
  echo "==> $spec until its $until ($(date -u +%H:%M:%S))"
  .venv/bin/rockpool -q image build "$spec" --until "$until" --json >"/tmp/$(basename "$spec").json"
  cat "/tmp/$(basename "$spec").json"
done
INSIDE
)
ca_env=()
if [ -f "$root/etc/rockpool-host-ca.pem" ]; then
  for name in SSL_CERT_FILE REQUESTS_CA_BUNDLE PIP_CERT CURL_CA_BUNDLE NODE_EXTRA_CA_CERTS; do
    ca_env+=("$name=/etc/rockpool-host-ca.pem")
  done
fi
proxy_env=()
for name in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
  [ -n "${!name:-}" ] && proxy_env+=("$name=${!name}")
done

step "entering the root (private mount and PID namespaces)"
unshare --mount --propagation private --pid --fork --kill-child bash -euo pipefail -c '
  root=$1 store=$2; shift 2
  # A root that is a mount point, as on a real machine: the builds make their own
  # private mount namespaces, which needs "/" to be one.
  mount --bind "$root" "$root"
  mount -t proc proc "$root/proc"
  mount -t sysfs sysfs "$root/sys"
  mount --rbind /dev "$root/dev"
  mount -t tmpfs -o mode=0755 tmpfs "$root/run"
  mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
  mkdir -p "$root$store"
  mount --bind "$store" "$root$store"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  exec chroot "$root" /usr/bin/env -i "$@"
' fresh-root "$root" "$store" \
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
  ROCKPOOL_HOME="$store" "${ca_env[@]}" "${proxy_env[@]}" \
  /bin/bash -c "$inside"

step "the fresh root set itself up and checked both test specs in $(( $(date +%s) - started ))s"

#!/bin/bash
# Rockpool workspace provisioning: the one script that installs everything in the image.
#
# It runs unchanged in two places:
#   - inside the build root of `rockpool image build` (a chroot: no running systemd,
#     so units are enabled, never started);
#   - on a live, booted Debian VM over SSH, as Packer's shell provisioner runs it.
# It is idempotent: running it again changes nothing that is already in place.
#
# Standalone (Packer's shell provisioner, or by hand on a live VM): pass the spec's
# package list in SETUP_PACKAGES, then run /usr/local/sbin/rockpool-seal last, just
# before the VM is shut down and captured.
#
# Inputs (environment variables; the builder sets them from the image spec):
#   SETUP_USER                 workspace user (default: coder)
#   SETUP_NODE_MAJOR           Node.js major version (default: 24)
#   SETUP_CODE_SERVER_VERSION  exact code-server version (default: 4.139.1); "none" leaves
#                              code-server and its build tools out (test images only)
#   SETUP_NPM_MAJOR            npm major version installed beside Node (default: 11)
#   SETUP_PACKAGES             space-separated Debian packages to install
#   SETUP_NPM_REGISTRY         npm registry (default: https://registry.npmjs.org)
# From a lock (rockpool image lock), exact versions and their sha512 integrity; each
# download is checked against the locked integrity instead of the registry's:
#   SETUP_NODE_VERSION, SETUP_NODE_INTEGRITY, SETUP_NPM_VERSION, SETUP_NPM_INTEGRITY,
#   SETUP_CODE_SERVER_INTEGRITY
#   SETUP_NPM_LOCKFILES        a directory of complete npm lockfiles, one per npm project
#                              of code-server (code-server.json, lib-vscode.json,
#                              lib-vscode-extensions.json): each project is then installed
#                              with `npm ci` from it, exactly, instead of `npm install`
# `setup.sh --print-packages` prints the Debian packages it would install, and exits.
# Registry access through a TLS-intercepting proxy: set SSL_CERT_FILE (and the usual
# proxy variables) for this run only; nothing of them is written into the system.
set -euo pipefail
shopt -s nullglob

SETUP_USER=${SETUP_USER:-coder}
SETUP_NODE_MAJOR=${SETUP_NODE_MAJOR:-24}
SETUP_CODE_SERVER_VERSION=${SETUP_CODE_SERVER_VERSION:-4.139.1}
SETUP_NPM_MAJOR=${SETUP_NPM_MAJOR:-11}
SETUP_PACKAGES=${SETUP_PACKAGES:-}
SETUP_NPM_REGISTRY=${SETUP_NPM_REGISTRY:-https://registry.npmjs.org}
SETUP_NPM_REGISTRY=${SETUP_NPM_REGISTRY%/}
SETUP_NODE_VERSION=${SETUP_NODE_VERSION:-}
SETUP_NODE_INTEGRITY=${SETUP_NODE_INTEGRITY:-}
SETUP_NPM_VERSION=${SETUP_NPM_VERSION:-}
SETUP_NPM_INTEGRITY=${SETUP_NPM_INTEGRITY:-}
SETUP_CODE_SERVER_INTEGRITY=${SETUP_CODE_SERVER_INTEGRITY:-}
SETUP_NPM_LOCKFILES=${SETUP_NPM_LOCKFILES:-}
export DEBIAN_FRONTEND=noninteractive

# What the init contract and this script themselves need, whatever the spec says.
# qemu-guest-agent (and hwclock, which its guest-set-time runs) sets the clock after a
# resume from a saved state.
CONTRACT_PACKAGES="systemd systemd-sysv systemd-resolved udev dbus openssh-server sudo
  ca-certificates curl jq cloud-guest-utils e2fsprogs fdisk zstd qemu-guest-agent
  util-linux-extra"
# What `npm install code-server` compiles its native modules with.
CODE_SERVER_BUILD_PACKAGES="build-essential pkg-config python3 libkrb5-dev"
WITH_CODE_SERVER=yes
if [ "$SETUP_CODE_SERVER_VERSION" = none ]; then
  WITH_CODE_SERVER=""
else
  CONTRACT_PACKAGES="$CONTRACT_PACKAGES $CODE_SERVER_BUILD_PACKAGES"
fi

if [ "${1:-}" = --print-packages ]; then
  # The builder installs these in its bootstrap, in the same apt run as the rest.
  echo $CONTRACT_PACKAGES $SETUP_PACKAGES
  exit 0
fi

say() { printf 'setup.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo bash setup.sh)"
[ -r /etc/debian_version ] || die "this script provisions Debian systems only"
case "$(dpkg --print-architecture)" in
  amd64) NODE_ARCH=x64 ;;
  arm64) NODE_ARCH=arm64 ;;
  *) die "unsupported architecture $(dpkg --print-architecture)" ;;
esac

set -o errtrace
trap 'say "error: line $LINENO: \"$BASH_COMMAND\" failed"' ERR

WORK=$(mktemp -d /var/tmp/rockpool-setup.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# ---- Debian packages ----------------------------------------------------------------
install_packages() {
  local missing=() pkg
  for pkg in $CONTRACT_PACKAGES $SETUP_PACKAGES; do
    dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null | grep -qx installed || missing+=("$pkg")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    say "Debian packages: all present"
    return
  fi
  say "Debian packages: installing ${missing[*]}"
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# ---- Node.js and npm from the npm registry ------------------------------------------
# Downloads go to files and are checked against the registry's sha512 integrity before
# anything is unpacked; nothing is ever piped into a shell.
fetch_verified() { # name version-jq-filter output [locked-integrity] -> prints the version
  local name=$1 filter=$2 out=$3 locked=${4:-} meta version tarball integrity expected actual
  meta="$WORK/$name.json"
  curl -fsSL --retry 3 -H 'Accept: application/vnd.npm.install-v1+json' \
    -o "$meta" "$SETUP_NPM_REGISTRY/$name"
  version=$(jq -r "$filter" "$meta")
  [ -n "$version" ] && [ "$version" != null ] || die "no matching version of $name in $SETUP_NPM_REGISTRY"
  tarball=$(jq -r --arg v "$version" '.versions[$v].dist.tarball' "$meta")
  integrity=$(jq -r --arg v "$version" '.versions[$v].dist.integrity' "$meta")
  if [ -n "$locked" ]; then
    [ "$integrity" = "$locked" ] || die "$name@$version: the registry's integrity differs from the lock's"
    integrity=$locked
  fi
  [[ $integrity == sha512-* ]] || die "$name@$version has no sha512 integrity in the registry"
  curl -fsSL --retry 3 -o "$out" "$tarball"
  expected=$(printf '%s' "${integrity#sha512-}" | base64 -d | od -An -v -tx1 | tr -d ' \n')
  actual=$(sha512sum "$out" | cut -d' ' -f1)
  [ "$expected" = "$actual" ] || die "$name@$version: download does not match its sha512 integrity"
  printf '%s\n' "$version"
}

newest_of_major() { # jq filter: newest plain release with the given major
  printf '[.versions | keys[] | select(test("^%s\\\\.[0-9]+\\\\.[0-9]+$"))] | sort_by(split(".") | map(tonumber)) | last' "$1"
}

version_filter() { # locked-version major -> jq filter: the locked version, else the newest of major
  if [ -n "$1" ]; then printf '"%s"' "$1"; else newest_of_major "$2"; fi
}

install_node() {
  local want_node="v${SETUP_NODE_VERSION:-$SETUP_NODE_MAJOR.}"
  if command -v node >/dev/null && [[ $(node --version) == "$want_node"* ]]; then
    say "Node.js: $(node --version) present"
  else
    local version
    version=$(fetch_verified "node-linux-$NODE_ARCH" "$(version_filter "$SETUP_NODE_VERSION" "$SETUP_NODE_MAJOR")" \
      "$WORK/node.tgz" "$SETUP_NODE_INTEGRITY")
    say "Node.js: installing $version"
    tar -xzf "$WORK/node.tgz" -C "$WORK"
    install -m 0755 "$WORK/package/bin/node" /usr/local/bin/node
    rm -rf /usr/local/include/node
    mkdir -p /usr/local/include
    cp -a "$WORK/package/include/node" /usr/local/include/node
  fi
  local want_npm="${SETUP_NPM_VERSION:-$SETUP_NPM_MAJOR.}"
  if command -v npm >/dev/null && [[ $(npm --version) == "$want_npm"* ]]; then
    say "npm: $(npm --version) present"
  else
    local version
    version=$(fetch_verified npm "$(version_filter "$SETUP_NPM_VERSION" "$SETUP_NPM_MAJOR")" \
      "$WORK/npm.tgz" "$SETUP_NPM_INTEGRITY")
    say "npm: installing $version"
    rm -rf /usr/local/lib/node_modules/npm "$WORK/package"
    mkdir -p /usr/local/lib/node_modules
    tar -xzf "$WORK/npm.tgz" -C "$WORK"
    mv "$WORK/package" /usr/local/lib/node_modules/npm
    ln -sfn ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm
    ln -sfn ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx
  fi
}

# ---- code-server --------------------------------------------------------------------
# Read from package.json: running `code-server --version` would write a config file
# with a generated password into root's home.
code_server_version() {
  local manifest=/usr/local/lib/node_modules/code-server/package.json
  [ -f "$manifest" ] && command -v node >/dev/null && node -p "require('$manifest').version" || true
}

npm_project() { # directory lockfile-name [npm options...]
  local dir=$1 name=$2
  shift 2
  local options=(--omit=dev --no-audit --no-fund --loglevel=warn --registry "$SETUP_NPM_REGISTRY/" "$@")
  if [ -n "$SETUP_NPM_LOCKFILES" ]; then
    [ -f "$SETUP_NPM_LOCKFILES/$name.json" ] ||
      die "SETUP_NPM_LOCKFILES has no $name.json (the lockfile of code-server's $dir)"
    install -m 0644 "$SETUP_NPM_LOCKFILES/$name.json" "$dir/npm-shrinkwrap.json"
    (cd "$dir" && npm ci "${options[@]}")
  else
    # Resolves what the shipped lockfile leaves open against today's registry, and
    # writes the complete result back to npm-shrinkwrap.json (rockpool image lock keeps it).
    (cd "$dir" && npm install "${options[@]}")
  fi
}

install_code_server() {
  if [ -z "$WITH_CODE_SERVER" ]; then
    say "code-server: left out (SETUP_CODE_SERVER_VERSION=none)"
    return
  fi
  if [ "$(code_server_version)" = "$SETUP_CODE_SERVER_VERSION" ]; then
    say "code-server: $SETUP_CODE_SERVER_VERSION present"
    return
  fi
  say "code-server: installing $SETUP_CODE_SERVER_VERSION (compiles native modules; takes minutes)"
  # The package itself is checked like Node.js.
  fetch_verified code-server "\"$SETUP_CODE_SERVER_VERSION\"" "$WORK/code-server.tgz" \
    "$SETUP_CODE_SERVER_INTEGRITY" >/dev/null
  # Not `npm install -g code-server.tgz`: a global install ignores the package's
  # npm-shrinkwrap.json, and its postinstall's `npm install` re-resolves what the shipped
  # lockfiles leave out, so the tree would follow the registry of the day. Each project
  # is installed in place instead, and its postinstall's links are made here.
  local dir=/usr/local/lib/node_modules/code-server
  rm -rf "$dir"
  mkdir -p "$dir"
  tar -xzf "$WORK/code-server.tgz" -C "$dir" --strip-components=1 --no-same-owner
  # nodedir makes node-gyp use the headers installed above instead of downloading them.
  # A fixed cache path: node-gyp writes it into every module's build/config.gypi, so a
  # random one would make each build's bytes differ. rockpool-seal removes it.
  export npm_config_nodedir=/usr/local npm_config_cache=/root/.npm \
    npm_config_update_notifier=false npm_config_fund=false
  # code-server's npm projects, each with its own npm-shrinkwrap.json, and their
  # lockfiles' names in SETUP_NPM_LOCKFILES. The package's only install scripts are its
  # own postinstall (the two projects after it) and argon2's, which finds its prebuilt
  # binary.
  npm_project "$dir" code-server --ignore-scripts
  npm_project "$dir/lib/vscode" lib-vscode
  npm_project "$dir/lib/vscode/extensions" lib-vscode-extensions
  # What node-gyp leaves beside each compiled module: its Makefiles and object files,
  # which name the compiler's path (a builder's CC, say a cross compiler's). Only the
  # .node files and config.gypi are used at run time.
  local build
  find "$dir" -type f -path '*/node_modules/*/build/config.gypi' -printf '%h\n' |
    while IFS= read -r build; do
      rm -rf "$build/Release/.deps" "$build/Release/obj.target" "$build/Release/obj" \
        "$build/Makefile" "$build"/*.mk
    done
  ln -sfn code-linux.sh "$dir/lib/vscode/bin/remote-cli/code-server"
  ln -sfn browser-linux.sh "$dir/lib/vscode/bin/helpers/browser.sh"
  ln -sfn ../lib/node_modules/code-server/out/node/entry.js /usr/local/bin/code-server
  [ "$(code_server_version)" = "$SETUP_CODE_SERVER_VERSION" ] ||
    die "code-server $SETUP_CODE_SERVER_VERSION did not install"
}

# ---- workspace user -----------------------------------------------------------------
create_user() {
  if ! id "$SETUP_USER" >/dev/null 2>&1; then
    say "user: creating $SETUP_USER"
    useradd --create-home --shell /bin/bash --user-group "$SETUP_USER"
  fi
  # No password at all ('*'): SSH is key-only and sudo needs none.
  usermod --password '*' "$SETUP_USER"
  usermod --append --groups sudo "$SETUP_USER"
  printf '%s ALL=(ALL:ALL) NOPASSWD: ALL\n' "$SETUP_USER" >/etc/sudoers.d/50-rockpool-user
  chmod 0440 /etc/sudoers.d/50-rockpool-user
  install -d -m 0700 -o "$SETUP_USER" -g "$SETUP_USER" "/home/$SETUP_USER/.ssh"
}

# ---- the init contract and system configuration --------------------------------------
write_file() { # path mode: content on stdin
  install -d "$(dirname "$1")"
  cat >"$1.rockpool-new"
  chmod "$2" "$1.rockpool-new"
  mv "$1.rockpool-new" "$1"
}

other_network_manager() {
  [ -d /run/systemd/system ] || return 1
  local unit
  for unit in NetworkManager.service networking.service; do
    if systemctl is-enabled --quiet "$unit" 2>/dev/null; then
      echo "$unit"
      return 0
    fi
  done
  return 1
}

configure_system() {
  say "system: writing units and configuration"
  write_file /usr/local/lib/rockpool/rockpool-init 0755 <<'INIT'
#!/bin/bash
# Reads the Rockpool config disk (label ROCKPOOL) at every boot and applies it:
# ROCKPOOL_* variables for code-server, SSH keys for the workspace user, the hostname.
# A system container has no disks: its runtime writes the same two files into CARRIER.
# See docs/init-contract.md in the rockpool repository.
set -euo pipefail
LABEL=ROCKPOOL
DEVICE=/dev/disk/by-label/$LABEL
MOUNT=/run/rockpool/config
CARRIER=/etc/rockpool/carrier
ENV_OUT=/run/rockpool/env
WORKSPACE_USER=$(cat /usr/local/lib/rockpool/workspace-user)
NAME_RULE='1 to 63 characters of a-z, 0-9 and -, not starting or ending with -'
# The host's caps too (rockpool.config_disk ENV_LIMIT, VALUE_LIMIT), checked again here: a
# config disk written by another tool must not stall this service, and the boot.
ENV_LIMIT=$((64 << 10))  # bytes of the whole env file
VALUE_LIMIT=4096         # bytes of one value

fail() { echo "rockpool-init: $*" >&2; exit 1; }
warn() { echo "rockpool-init: $*" >&2; }

# read_env FILE: its ROCKPOOL_* variables into the array values, which the caller declares.
# It takes time linear in the file: its size is checked before any of it is read, so no
# line is longer than ENV_LIMIT, and nothing here is worse than one pass over a line
# (${line%$'\r'} is not used: bash takes quadratic time for it, 100 s on a 1.5 MB line).
# A too long value is left out, with a message, and the boot goes on with the rest.
# A too large file is left out whole, as if it had no variables: a part of it cut off at
# the limit could end in a half line, read as a wrong value. Without
# ROCKPOOL_WORKSPACE_NAME this service then fails as for any env that lacks it (SSH keys
# are in place already), while the boot goes on.
read_env() {
  local LC_ALL=C  # lengths in bytes, and [[:print:]] is printable ASCII, as on the host
  local size line key value lineno=0
  size=$(wc -c <"$1")
  if [ "$size" -gt "$ENV_LIMIT" ]; then
    warn "the config disk's env file is $size bytes, over the limit of $ENV_LIMIT; none of it is used (pass large data another way)"
    return 0
  fi
  while IFS= read -r line || [ -n "$line" ]; do
    lineno=$((lineno + 1))
    [[ ${line: -1} == $'\r' ]] && line=${line:0:-1}
    [[ -z $line || $line == \#* ]] && continue
    [[ $line =~ ^(ROCKPOOL_[A-Z0-9_]+)=(.*)$ ]] ||
      fail "env line $lineno is not ROCKPOOL_NAME=value: ${line:0:80}"
    key=${BASH_REMATCH[1]} value=${BASH_REMATCH[2]}
    if [ "${#value}" -gt "$VALUE_LIMIT" ]; then
      warn "env line $lineno: $key is ${#value} bytes, over the limit of $VALUE_LIMIT; it is left out (pass large data another way)"
      continue
    fi
    [[ $value =~ ^[[:print:]]*$ ]] || fail "env line $lineno: $key has non-printable characters"
    values[$key]=$value
  done <"$1"
}

mkdir -p /run/rockpool
rm -f "$ENV_OUT"
home=$(getent passwd "$WORKSPACE_USER" | cut -d: -f6)
keys=$home/.ssh/authorized_keys

if systemd-detect-virt --container --quiet; then
  if [ ! -f "$CARRIER/env" ]; then
    rm -f "$keys"
    fail "no $CARRIER/env in this container, so ROCKPOOL_WORKSPACE_NAME is unset; code-server will not start (its runtime writes it at each start: see docs/init-contract.md)"
  fi
  MOUNT=$CARRIER
else
  # The kernel has probed its disks before userspace starts, while udev's coldplug makes
  # the by-label link seconds later under emulation: read the labels from the disks
  # themselves first (blkid without its cache), and wait for udev only for a disk that
  # comes late. The wait is for this one device, not a full `udevadm settle`, and long,
  # as coldplug can take 20 s under emulation.
  found=$(blkid -c /dev/null -o device -t "LABEL=$LABEL" 2>/dev/null | head -n 1) || true
  if [ -n "$found" ]; then
    DEVICE=$found
  elif ! udevadm wait --timeout=45 "$DEVICE" 2>/dev/null && [ ! -e "$DEVICE" ]; then
    rm -f "$keys"  # keys come from the config disk of this boot, or there are none
    fail "no config disk with label $LABEL is attached, so ROCKPOOL_WORKSPACE_NAME is unset; code-server will not start (attach one: see docs/init-contract.md)"
  fi
  mkdir -p "$MOUNT"
  mountpoint -q "$MOUNT" && umount "$MOUNT"
  mount -o ro,nosuid,nodev,noexec "$DEVICE" "$MOUNT"
  trap 'umount "$MOUNT" 2>/dev/null || true' EXIT
fi

# An empty file is no keys (a container's runtime writes one when it has none).
if [ -s "$MOUNT/authorized_keys" ]; then
  install -d -m 0700 -o "$WORKSPACE_USER" -g "$WORKSPACE_USER" "$home/.ssh"
  install -m 0600 -o "$WORKSPACE_USER" -g "$WORKSPACE_USER" "$MOUNT/authorized_keys" "$keys"
  echo "rockpool-init: installed SSH authorized keys for $WORKSPACE_USER"
else
  rm -f "$keys"
  echo "rockpool-init: the config disk has no authorized_keys; SSH login is closed"
fi

[ -f "$MOUNT/env" ] || fail "the config disk has no env file, so ROCKPOOL_WORKSPACE_NAME is unset; code-server will not start"
declare -A values=()
read_env "$MOUNT/env"

name=${values[ROCKPOOL_WORKSPACE_NAME]:-}
[ -n "$name" ] || fail "ROCKPOOL_WORKSPACE_NAME is missing from the config disk; code-server will not start"
[[ $name =~ ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$ ]] ||
  fail "invalid ROCKPOOL_WORKSPACE_NAME '${name:0:80}': use $NAME_RULE; code-server will not start"

tmp=$(mktemp /run/rockpool/env.XXXXXX)
for key in "${!values[@]}"; do
  escaped=${values[$key]//\\/\\\\}
  printf '%s="%s"\n' "$key" "${escaped//\"/\\\"}" >>"$tmp"
done
chmod 0644 "$tmp"
mv "$tmp" "$ENV_OUT"

hostname "$name"
printf '%s\n' "$name" >/etc/hostname
if grep -q '^127\.0\.1\.1' /etc/hosts; then
  sed -i "s/^127\.0\.1\.1.*/127.0.1.1\t$name/" /etc/hosts
else
  printf '127.0.1.1\t%s\n' "$name" >>/etc/hosts
fi
echo "rockpool-init: workspace '$name' ready; code-server serves /workspace/$name/"
INIT

  printf '%s\n' "$SETUP_USER" | write_file /usr/local/lib/rockpool/workspace-user 0644

  write_file /etc/systemd/system/rockpool-init.service 0644 <<'UNIT'
[Unit]
Description=Apply the Rockpool config disk (workspace name, SSH keys)
Documentation=https://github.com/rockpool/images/blob/main/docs/init-contract.md
After=systemd-udev-trigger.service local-fs.target
Before=code-server.service ssh.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/lib/rockpool/rockpool-init

[Install]
WantedBy=multi-user.target
UNIT

  write_file /etc/systemd/system/code-server.service 0644 <<UNIT
[Unit]
Description=code-server for the Rockpool workspace
Requires=rockpool-init.service
After=rockpool-init.service network.target

[Service]
Type=exec
User=$SETUP_USER
WorkingDirectory=~
EnvironmentFile=/run/rockpool/env
ExecStart=/usr/local/bin/code-server --bind-addr 0.0.0.0:8080 --auth none \\
  --disable-telemetry --disable-update-check --disable-workspace-trust \\
  --abs-proxy-base-path /workspace/\${ROCKPOOL_WORKSPACE_NAME}
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
UNIT

  # First boot of every machine, and of every clone once its keys are removed:
  # fresh SSH host keys (machine-id is systemd's own first-boot job).
  write_file /etc/systemd/system/rockpool-hostkeys.service 0644 <<'UNIT'
[Unit]
Description=Generate this machine's own SSH host keys
Before=ssh.service

[Service]
Type=oneshot
# Ed25519 and ECDSA only: RSA key generation costs ~10 s under emulation. Each key is
# made only if missing, so a half-finished first boot completes on the next.
ExecStart=/bin/sh -c 'for type in ed25519 ecdsa; do key=/etc/ssh/ssh_host_$${type}_key; [ -s "$$key" ] || { rm -f "$$key" "$$key.pub"; ssh-keygen -q -t "$$type" -N "" -f "$$key"; }; done'
UNIT
  write_file /etc/systemd/system/ssh.service.d/50-rockpool.conf 0644 <<'UNIT'
[Unit]
Wants=rockpool-hostkeys.service
After=rockpool-hostkeys.service
UNIT
  # A copied system container (Incus) has no initramfs to forget its source's identity
  # in: the image's template for `incus copy` leaves this marker, and an empty
  # machine-id, which systemd fills anew.
  write_file /etc/systemd/system/rockpool-identity.service 0644 <<'UNIT'
[Unit]
Description=Forget the SSH host keys of the container this one was copied from
ConditionVirtualization=container
ConditionPathExists=/var/lib/rockpool/new-identity
Before=rockpool-hostkeys.service ssh.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub /var/lib/rockpool/new-identity'

[Install]
WantedBy=multi-user.target
UNIT
  # A container's root is its runtime's to mount: fstab's disk entries do not apply.
  write_file /etc/systemd/system/systemd-remount-fs.service.d/50-rockpool.conf 0644 <<'UNIT'
[Unit]
ConditionVirtualization=!container
UNIT
  write_file /etc/ssh/sshd_config.d/50-rockpool.conf 0644 <<'CONF'
# Rockpool workspaces: key-only SSH; keys come from the config disk.
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
HostKey /etc/ssh/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_ecdsa_key
CONF

  # Runtimes (Tart, Incus) resize the disk file; the root fills it at the next boot.
  write_file /usr/local/lib/rockpool/rockpool-growroot 0755 <<'GROW'
#!/bin/bash
set -euo pipefail
source=$(findmnt -n -o SOURCE /)
parent=$(lsblk -n -o PKNAME "$source" | head -n1)
disk=/dev/$parent
sys_part=/sys/class/block/$(basename "$source")
part=$(cat "$sys_part/partition")
# Nothing to do unless the disk has grown past the partition (and the backup GPT's MiB).
end=$(($(cat "$sys_part/start") + $(cat "$sys_part/size")))
if [ $(($(cat "/sys/class/block/$parent/size") - end)) -le 4096 ]; then
  exit 0
fi
# growpart exits 1 when there is nothing to grow, 2 on a real failure.
status=0
growpart "$disk" "$part" || status=$?
case $status in
  0) echo "rockpool-growroot: grew partition $part of $disk" ;;
  1) ;;
  *) echo "rockpool-growroot: growpart failed ($status)" >&2; exit "$status" ;;
esac
resize2fs "$source"
GROW
  write_file /etc/systemd/system/rockpool-growroot.service 0644 <<'UNIT'
[Unit]
Description=Grow the root partition and filesystem to fill the disk
After=local-fs.target
ConditionVirtualization=!container

[Service]
Type=oneshot
ExecStart=/usr/local/lib/rockpool/rockpool-growroot

[Install]
WantedBy=multi-user.target
UNIT

  # Any virtio NIC, whatever its name; a MAC-based DHCP client id so that Tart
  # (macOS bootpd) can find the guest's address by its MAC.
  write_file /etc/systemd/network/80-rockpool-ethernet.network 0644 <<'NET'
[Match]
Type=ether
Kind=!*

[Network]
DHCP=yes

[DHCPv4]
ClientIdentifier=mac
NET
  write_file /etc/systemd/journald.conf.d/50-rockpool.conf 0644 <<'CONF'
[Journal]
SystemMaxUse=100M
CONF
  # The host only ever sets the clock through the agent (after a resume): nothing else it
  # could ask for (guest-exec, guest-file-*, passwords, keys) is served. Debian's unit
  # starts the agent only where the runtime gives the guest its virtio port.
  write_file /etc/qemu/qemu-ga.conf 0644 <<'CONF'
[general]
allow-rpcs=guest-sync-delimited,guest-sync,guest-ping,guest-info,guest-get-time,guest-set-time
CONF

  systemctl enable ssh.service rockpool-init.service rockpool-growroot.service \
    rockpool-identity.service
  if [ -n "$WITH_CODE_SERVER" ]; then
    systemctl enable code-server.service
  else
    systemctl disable code-server.service
  fi
  # A live VM whose network another manager runs keeps it; two DHCP clients on one NIC
  # would fight. Build roots and networkd-managed VMs get networkd + resolved.
  if other_network_manager; then
    say "system: leaving the network to $(other_network_manager)"
  else
    systemctl enable systemd-networkd.service systemd-resolved.service
  fi
  # Nothing here waits for the network; waiting would only slow the boot. A workspace
  # changes its packages when its user says so, not on a timer.
  systemctl mask systemd-networkd-wait-online.service e2scrub_reap.service \
    e2scrub_all.timer apt-daily.timer apt-daily-upgrade.timer
  # In a build root, DNS is systemd-resolved's from the first boot on; a live VM keeps
  # its working resolver until it reboots.
  if [ ! -d /run/systemd/system ]; then
    ln -sfn ../run/systemd/resolve/stub-resolv.conf /etc/resolv.conf
  fi

  # Clones: before systemd starts, a disk that the config disk says belongs to another
  # instance forgets the identity it carries, so the machine makes its own.
  local initramfs_inputs="/etc/initramfs-tools/scripts/local-bottom/rockpool-identity
    /etc/initramfs-tools/modules" initramfs_before
  # shellcheck disable=SC2086
  initramfs_before=$( (cat $initramfs_inputs 2>/dev/null || true) | md5sum)
  write_file /etc/initramfs-tools/scripts/local-bottom/rockpool-identity 0755 <<'HOOK'
#!/bin/sh
# Runs in the initramfs (klibc tools only), with the root mounted read-only at $rootmnt.
PREREQ=""
prereqs() { echo "$PREREQ"; }
case "$1" in prereqs) prereqs; exit 0 ;; esac

say() { echo "rockpool-identity: $*" >/dev/kmsg; }
device=/dev/disk/by-label/ROCKPOOL
tries=0
while [ ! -e "$device" ] && [ "$tries" -lt 20 ]; do
  sleep 1
  tries=$((tries + 1))
done
[ -e "$device" ] || { say "no config disk; identity unchanged"; exit 0; }
# The kernel's FAT defaults need code page 437 and the ascii I/O charset.
for module in vfat nls_cp437 nls_ascii nls_utf8; do modprobe -q "$module"; done
mkdir -p /run/rockpool-config
if ! error=$(mount -t vfat -o ro "$device" /run/rockpool-config 2>&1); then
  say "cannot mount the config disk ($error); identity unchanged"
  exit 0
fi
instance=""
if [ -f /run/rockpool-config/env ]; then
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in ROCKPOOL_INSTANCE_ID=*) instance=${line#ROCKPOOL_INSTANCE_ID=} ;; esac
  done </run/rockpool-config/env
fi
umount /run/rockpool-config
[ -n "$instance" ] || { say "no ROCKPOOL_INSTANCE_ID; identity unchanged"; exit 0; }
# The host's rule (rockpool.names.INSTANCE_ID_PATTERN), checked again here.
case "$instance" in
  [A-Za-z0-9]*) ;;
  *) say "invalid ROCKPOOL_INSTANCE_ID; identity unchanged"; exit 0 ;;
esac
case "$instance" in
  *[!A-Za-z0-9_-]*) say "invalid ROCKPOOL_INSTANCE_ID; identity unchanged"; exit 0 ;;
esac
[ "${#instance}" -le 64 ] || { say "ROCKPOOL_INSTANCE_ID too long; identity unchanged"; exit 0; }
record="${rootmnt}/var/lib/rockpool/instance-id"
current=""
[ -f "$record" ] && read -r current <"$record"
[ "$current" = "$instance" ] && exit 0
# klibc's mount wants a device and a directory, even to remount.
if ! mount -o remount,rw "${rootmnt}" "${rootmnt}"; then
  say "cannot write the root; identity unchanged"
  exit 0
fi
chroot "${rootmnt}" /bin/sh -c 'rm -f /etc/ssh/ssh_host_* /var/lib/systemd/random-seed \
  /var/lib/dbus/machine-id && : >/etc/machine-id && mkdir -p /var/lib/rockpool'
printf '%s\n' "$instance" >"$record"  # echo would expand backslashes (klibc's sh)
sync
mount -o remount,ro "${rootmnt}" "${rootmnt}"
say "instance $instance is new to this disk: SSH host keys and machine-id are made anew"
HOOK
  for module in vfat nls_cp437 nls_ascii nls_utf8; do
    grep -qx "$module" /etc/initramfs-tools/modules 2>/dev/null || echo "$module" >>/etc/initramfs-tools/modules
  done
  # One initramfs per kernel, made once. A build root's bootstrap leaves making it to
  # this step (INITRD=No): the kernel's postinst, the initramfs-tools trigger and this
  # hook would make it three times, minutes each under emulation. A live VM has one
  # already and remakes it only when the hook changed.
  local kernel version inputs_changed=""
  # shellcheck disable=SC2086
  [ "$(cat $initramfs_inputs | md5sum)" != "$initramfs_before" ] && inputs_changed=yes
  for kernel in /boot/vmlinuz-*; do
    version=${kernel#/boot/vmlinuz-}
    if [ ! -e "/boot/initrd.img-$version" ]; then
      update-initramfs -c -k "$version"
    elif [ -n "$inputs_changed" ]; then
      update-initramfs -u -k "$version"
    fi
  done

  write_file /usr/local/sbin/rockpool-seal 0755 <<'SEAL'
#!/bin/bash
# Removes everything that must not be shared between machines made from this image,
# and every cache and log of the build. Run last, before the image is captured.
set -euo pipefail
shopt -s nullglob dotglob
rm -f /etc/ssh/ssh_host_*
: >/etc/machine-id
rm -f /var/lib/dbus/machine-id /var/lib/systemd/random-seed /var/lib/systemd/credential.secret
echo localhost >/etc/hostname
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/lib/dpkg/*-old
rm -rf /root/.npm /root/.cache /root/.node-gyp /root/.bash_history /home/*/.npm /home/*/.cache
rm -rf /root/.config/code-server /root/.local/share/code-server
rm -rf /tmp/* /var/tmp/*
rm -rf /var/log/journal/*
find /var/log -type f -exec truncate -s 0 {} +
# What every first boot would otherwise do, the same on every machine: the ld.so cache,
# udev's hwdb, the journal's catalog. Then /etc/.updated and /var/.updated, as
# systemd-update-done writes them, so that no ConditionNeedsUpdate= unit (ldconfig,
# systemd-hwdb-update, systemd-journal-catalog-update, systemd-sysusers,
# systemd-update-done) runs at boot.
ldconfig
rm -f /var/cache/ldconfig/aux-cache  # inode numbers and times of this build's files
command -v systemd-hwdb >/dev/null && systemd-hwdb update
command -v journalctl >/dev/null && journalctl --update-catalog
systemd-sysusers
/usr/lib/systemd/systemd-update-done
SEAL
}

install_packages
install_node
install_code_server
create_user
configure_system
say "done"

"""Stage: run the shared setup.sh inside the bootstrapped root, then seal the root.

The root gets /proc, /sys, /dev and a private /run only inside a private mount
namespace: they vanish with it, whatever happens to the build. Build-time material
(the host's CA bundle, resolv.conf) lives in that /run or is replaced before sealing,
so none of it reaches the image.

The node layer is the slowest part of setup.sh, installing Node.js, npm and
code-server (whose native modules compile): its result is cached apart, keyed by that
section of setup.sh alone, and restored into the root before setup.sh runs, which finds
it in place and skips it. A change elsewhere in setup.sh then costs minutes, not tens.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rockpool.build.cross import MOUNT_POINT, CrossToolchain, unpack_cross_toolchain
from rockpool.build.rootfs import restore, snapshot
from rockpool.command import PROXY_VARIABLES, contained, run
from rockpool.errors import InvalidInput
from rockpool.lock import lockfile_text, mismatches
from rockpool.spec import ImageSpec
from rockpool.tools import CLEAN_PATH

if TYPE_CHECKING:
    from rockpool.build.context import BuildContext  # stages are called with one

BUILD_RUN = "/run/rockpool-build"
# Runs on the host, inside the private namespaces, with the root as $1. setup.sh's
# environment (registry proxies, whose URLs may carry credentials) is this runner's own:
# never an argument, so never in a log or in another user's `ps`.
CHROOT_RUNNER = r"""
set -euo pipefail
root=$1 setup=$2 ca=$3 lockfiles=$4 cross=$5 triplet=$6
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$root/run"
mkdir -p "$root$BUILD_RUN"
install -m 0755 "$setup" "$root$BUILD_RUN/setup.sh"
[ -n "$ca" ] && install -m 0644 "$ca" "$root$BUILD_RUN/ca.pem"
[ -n "$lockfiles" ] && cp -r "$lockfiles" "$root$BUILD_RUN/npm-lockfiles"
# DNS for the build only; setup.sh points resolv.conf at systemd-resolved for the image.
rm -f "$root/etc/resolv.conf"
cp /etc/resolv.conf "$root/etc/resolv.conf"
links=()
unlink_cross() {
  [ -n "$cross" ] || return 0
  local link
  for link in "${links[@]}"; do rm -f "$root$link"; done
  rmdir "$root/usr/lib64" 2>/dev/null || true
  links=()
}
if [ -n "$cross" ]; then
  # The cross compiler (build/cross.py), read-only below the root's private /run. Its
  # programs need the x86_64 loader and libraries at their usual paths, and the cross
  # libc's linker scripts name /usr/$triplet: links for the build only, none of them a
  # path the root has (a root that has one is refused), all removed before the seal.
  mkdir -p "$root$CROSS_MOUNT"
  mount --bind -o ro "$cross" "$root$CROSS_MOUNT"
  for path in /usr/lib/x86_64-linux-gnu /usr/lib64 "/usr/$triplet"; do
    if [ -e "$root$path" ] || [ -L "$root$path" ]; then
      echo "the root already has $path: cannot mount the cross compiler" >&2
      exit 1
    fi
  done
  trap unlink_cross EXIT
  mkdir "$root/usr/lib64"
  ln -s "$CROSS_MOUNT/usr/lib/x86_64-linux-gnu" "$root/usr/lib/x86_64-linux-gnu"
  ln -s "$CROSS_MOUNT/usr/lib64/ld-linux-x86-64.so.2" "$root/usr/lib64/ld-linux-x86-64.so.2"
  ln -s "$CROSS_MOUNT/usr/$triplet" "$root/usr/$triplet"
  links=(/usr/lib/x86_64-linux-gnu /usr/lib64/ld-linux-x86-64.so.2 "/usr/$triplet")
  # /lib64 as base-files makes it (usr/lib64), or its upgrades refuse the root.
  if [ ! -e "$root/lib64" ] && [ ! -L "$root/lib64" ]; then
    ln -s usr/lib64 "$root/lib64"
    links+=(/lib64)
  fi
fi
chroot "$root" /bin/bash "$BUILD_RUN/setup.sh"
unlink_cross
chroot "$root" /usr/bin/env -i "PATH=$CHROOT_PATH" /usr/local/sbin/rockpool-seal
"""


def _ca_variables(ca_in_root: str) -> dict[str, str]:
    return {
        name: ca_in_root
        for name in (
            "SSL_CERT_FILE",
            "CURL_CA_BUNDLE",
            "NODE_EXTRA_CA_CERTS",
            "npm_config_cafile",
            "REQUESTS_CA_BUNDLE",
            "PIP_CERT",
            "GIT_SSL_CAINFO",
        )
    }


def setup_variables(spec: ImageSpec) -> dict[str, str]:
    """The spec's settings as setup.sh reads them, whichever builder runs it."""
    return {
        "SETUP_USER": spec.user,
        "SETUP_NODE_MAJOR": str(spec.node_major),
        "SETUP_CODE_SERVER_VERSION": spec.code_server_version or "none",
        "SETUP_PACKAGES": " ".join(spec.packages),
        "SETUP_NPM_REGISTRY": spec.npm_registry,
    }


def setup_environment(ctx: BuildContext) -> dict[str, str]:
    """What setup.sh sees in the root: its settings, plus registry access for this run only."""
    env = {
        "PATH": CLEAN_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        # useradd's password-change date, the initramfs and npm's builds honour it.
        "SOURCE_DATE_EPOCH": str(ctx.source_date_epoch),
        **ctx.plan.setup.variables,
        **(ctx.lock.setup_variables() if ctx.lock is not None else {}),
    }
    if ctx.lock is not None and ctx.lock.npm_lockfiles:
        env["SETUP_NPM_LOCKFILES"] = NPM_LOCKFILES_DIR
    if ctx.ca_bundle is not None:
        env.update(_ca_variables(f"{BUILD_RUN}/ca.pem"))
    env.update({name: os.environ[name] for name in PROXY_VARIABLES if name in os.environ})
    return env


def _write_lockfiles(ctx: BuildContext) -> Path | None:
    """The lock's npm lockfiles as files, for setup.sh's SETUP_NPM_LOCKFILES."""
    if ctx.lock is None or not ctx.lock.npm_lockfiles:
        return None
    directory = ctx.work / "npm-lockfiles"
    directory.mkdir(exist_ok=True)
    for name, lockfile in ctx.lock.npm_lockfiles.items():
        (directory / f"{name}.json").write_text(lockfile_text(lockfile))
    return directory


def provision_argv(ctx: BuildContext, cross: CrossToolchain | None = None) -> list[str | Path]:
    runner = (
        f"BUILD_RUN={BUILD_RUN}\nCHROOT_PATH={CLEAN_PATH}\nCROSS_MOUNT={MOUNT_POINT}\n"
        + CHROOT_RUNNER
    )
    lockfiles = _write_lockfiles(ctx)
    return [
        "bash",
        "-c",
        runner,
        "provision",
        ctx.root,
        ctx.plan.setup.path,
        str(ctx.ca_bundle or ""),
        str(lockfiles or ""),
        str(cross.tree) if cross is not None else "",
        cross.triplet if cross is not None else "",
    ]


# setup.sh's section that installs Node.js, npm and code-server, and what it installs.
NODE_LAYER_MARKERS = ("# ---- Node.js and npm from the npm registry", "# ---- workspace user")
NODE_LAYER_PATHS = (
    "usr/local/bin/node",
    "usr/local/bin/npm",
    "usr/local/bin/npx",
    "usr/local/bin/code-server",
    "usr/local/include/node",
    "usr/local/lib/node_modules",
)
NODE_LAYER_TARBALL = "node.tar"


@dataclass(frozen=True)
class NodeLayerScript:
    """What makes the node layer: setup.sh's settings and helpers (all before its first
    section) and its Node.js-to-code-server section."""

    preamble: str
    section: str

    @classmethod
    def of(cls, text: str) -> NodeLayerScript | None:
        """None when the script has no such marked section."""
        start, end = (text.find(marker) for marker in NODE_LAYER_MARKERS)
        first_section = text.find("# ---- ")
        if min(start, end, first_section) < 0 or end < start:
            return None
        return cls(text[:first_section], text[start:end])

    def digests(self) -> list[str]:
        return [hashlib.sha256(part.encode()).hexdigest() for part in (self.preamble, self.section)]


def provision_with_node_layer(ctx: BuildContext) -> None:
    """setup.sh on a root that already holds the node layer when an earlier build made
    it from the same inputs."""
    plan = ctx.require_cache_plan()
    key = plan.keys.node_layer
    with plan.cache.locked(exclusive=False):  # no prune between the check and the restore
        entry = plan.cache.get("node", key) if plan.read and key else None
        if entry is not None:
            restore(entry.file(NODE_LAYER_TARBALL), ctx.root)
    provision(ctx, compiles=entry is None)
    if key is None:
        return
    ctx.record("provision/node", "cached" if entry else "built")
    if entry is None:
        present = [path for path in NODE_LAYER_PATHS if os.path.lexists(ctx.root / path)]
        if present:
            tarball = ctx.work / NODE_LAYER_TARBALL
            snapshot(ctx.root, tarball, present)
            plan.cache.put("node", key, {NODE_LAYER_TARBALL: tarball}, {}, scratch=ctx.work)
            tarball.unlink()


def provision(ctx: BuildContext, compiles: bool = True) -> None:
    """setup.sh and the seal in the root. Only code-server's native modules compile: no
    cross compiler is unpacked for an image without code-server, nor when the node
    layer is in place already (compiles=False)."""
    compiles = compiles and ctx.spec.code_server_version is not None
    cross = unpack_cross_toolchain(ctx) if compiles else None
    env = setup_environment(ctx)
    if cross is not None:
        env.update(cross.environment())
        ctx.facts["cross_compiler"] = cross.versions
    run(contained(provision_argv(ctx, cross)), env=env, on_line=ctx.reporter.status)
    ctx.facts["packages"] = installed_versions(ctx.root)
    if ctx.lock is not None:
        differences = mismatches(ctx.lock, ctx.facts["packages"])
        if differences:
            shown = "\n  ".join(differences[:10])
            more = f"\n  ... and {len(differences) - 10} more" if len(differences) > 10 else ""
            raise InvalidInput(
                f"the build did not install what {ctx.lock.path.name} locks:\n  {shown}{more}",
                hint="if setup.sh or the spec changed on purpose, update the lock with: "
                f"rockpool image lock {ctx.spec.path}",
            )


def installed_versions(root: Path) -> dict[str, Any]:
    """Exact versions of what went into the root: every .deb, Node.js, npm, code-server."""
    debian: dict[str, str] = {}
    status = (root / "var/lib/dpkg/status").read_text(encoding="utf-8")
    for paragraph in status.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", paragraph, re.MULTILINE))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            debian[fields["Package"]] = fields["Version"]
    npm: dict[str, str] = {}
    header = root / "usr/local/include/node/node_version.h"
    if header.is_file():
        text = header.read_text(encoding="utf-8")
        parts = [
            re.search(rf"#define NODE_{p}_VERSION (\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")
        ]
        if all(parts):
            npm["node"] = ".".join(m.group(1) for m in parts if m)
    for package in ("npm", "code-server"):
        manifest = root / "usr/local/lib/node_modules" / package / "package.json"
        if manifest.is_file():
            npm[package] = json.loads(manifest.read_text(encoding="utf-8"))["version"]
    package_dir = root / CODE_SERVER_DIR
    return {
        "debian": dict(sorted(debian.items())),
        "npm": npm,
        "npm_tree": installed_npm_tree(package_dir),
        "npm_lockfiles": npm_lockfiles(package_dir),
    }


# code-server's npm projects, as setup.sh installs them, and the names of their
# lockfiles in a lock (and in SETUP_NPM_LOCKFILES).
CODE_SERVER_DIR = "usr/local/lib/node_modules/code-server"
CODE_SERVER_PROJECTS = {
    ".": "code-server",
    "lib/vscode": "lib-vscode",
    "lib/vscode/extensions": "lib-vscode-extensions",
}
NPM_LOCKFILES_DIR = f"{BUILD_RUN}/npm-lockfiles"


def installed_npm_tree(package_dir: Path) -> dict[str, dict[str, str]]:
    """Every package npm put below code-server, from the lockfile npm keeps of each
    project's actual node_modules, keyed by its path below code-server. Packages bundled
    inside another's tarball are left out: that tarball's integrity covers them."""
    tree: dict[str, dict[str, str]] = {}
    for project in CODE_SERVER_PROJECTS:
        actual = package_dir / project / "node_modules" / ".package-lock.json"
        if not actual.is_file():
            continue
        packages = json.loads(actual.read_text(encoding="utf-8")).get("packages", {})
        for path, record in packages.items():
            if not path or record.get("link") or record.get("inBundle"):
                continue
            key = (Path(project) / path).as_posix()
            tree[key] = {
                "version": record.get("version", ""),
                "integrity": record.get("integrity", ""),
            }
    return dict(sorted(tree.items()))


def npm_lockfiles(package_dir: Path) -> dict[str, Any]:
    """Each project's complete lockfile as npm left it: what a lock replays with npm ci."""
    found: dict[str, Any] = {}
    for project, name in CODE_SERVER_PROJECTS.items():
        lockfile = package_dir / project / "npm-shrinkwrap.json"
        if lockfile.is_file():
            found[name] = json.loads(lockfile.read_text(encoding="utf-8"))
    return found

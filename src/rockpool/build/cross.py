"""A native cross compiler for a foreign-architecture build.

An arm64 root on an x86_64 host runs every program under qemu-user, gcc included:
code-server's native modules (@vscode/sqlite3, spdlog, ...) then cost about twenty
times their native time. Debian's x86_64 cross gcc for the target, unpacked on the host
(mmdebstrap's extract variant: no maintainer scripts, nothing emulated), is mounted into
the root for setup.sh, which compiles with it through CC, CXX and AR (node-gyp writes
them into each module's Makefile). node, npm and make stay the root's own, so every
package still picks its binaries for the root's architecture.

Nothing of it stays in the image: the mount is gone with provision's mount namespace, and
the runner removes the few links it made. setup.sh is the same on every builder; a
native host and Packer pass no compiler and use the root's gcc.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rockpool.arch import host_architecture
from rockpool.build.bootstrap import snapshot_options
from rockpool.command import clean_environment, contained, run

if TYPE_CHECKING:
    from rockpool.build.context import BuildContext

# The Debian packages of each target's cross compiler, and its GNU triplet. The gcc
# major is the suite's default gcc (trixie: 14), so that the modules are built by the
# compiler the root's own g++ is.
CROSS_COMPILERS: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {
    ("amd64", "arm64"): (
        "aarch64-linux-gnu",
        ("gcc-14-aarch64-linux-gnu", "g++-14-aarch64-linux-gnu", "binutils-aarch64-linux-gnu"),
    ),
}
GCC_MAJOR = "14"
# Where the root sees the toolchain: below its private /run, so never in the image.
MOUNT_POINT = "/run/rockpool-xtc"


@dataclass(frozen=True)
class CrossToolchain:
    tree: Path  # the unpacked amd64 toolchain on the host
    triplet: str
    versions: dict[str, str]  # Debian package -> version, as unpacked

    def environment(self) -> dict[str, str]:
        """What setup.sh's compilers are, as paths in the root."""
        bin_dir = f"{MOUNT_POINT}/usr/bin/{self.triplet}"
        return {
            "CC": f"{bin_dir}-gcc-{GCC_MAJOR}",
            "CXX": f"{bin_dir}-g++-{GCC_MAJOR}",
            "AR": f"{bin_dir}-ar",
        }


def cross_recipe(target: str) -> list[str] | None:
    """What a build for target compiles with on this host, for the stage keys: the
    cross compiler's packages, or None for the root's own gcc."""
    compiler = CROSS_COMPILERS.get((host_architecture(), target))
    return [compiler[0], *compiler[1]] if compiler is not None else None


def unpack_cross_toolchain(ctx: BuildContext) -> CrossToolchain | None:
    """The cross toolchain for ctx's target, unpacked into the build's scratch
    directory; None when the host runs the target's code natively."""
    compiler = CROSS_COMPILERS.get((host_architecture(), ctx.spec.architecture))
    if compiler is None:
        return None
    triplet, packages = compiler
    spec = ctx.spec
    tree = ctx.work / "cross-toolchain"
    ctx.reporter.status(f"unpacking the {triplet} cross compiler (runs natively)")
    run(
        contained(
            [
                "mmdebstrap",
                "--mode=root",
                "--variant=extract",
                f"--architectures={host_architecture()}",
                f"--include={','.join(packages)}",
                "--skip=cleanup/apt/cache",  # the .deb names tell the versions
                *snapshot_options(spec),
                spec.suite,
                tree,
                f"deb {spec.mirror} {spec.suite} main",
                f"deb {spec.mirror} {spec.suite}-updates main",
                f"deb {spec.security_mirror} {spec.suite}-security main",
            ]
        ),
        env=clean_environment(),
    )
    return CrossToolchain(tree, triplet, unpacked_versions(tree / "var/cache/apt/archives"))


_DEB = re.compile(r"^([^_]+)_([^_]+)_[^_]+\.deb$")


def unpacked_versions(archives: Path) -> dict[str, str]:
    """Package -> version of the .debs apt left in archives (epochs are %3a there)."""
    versions = {}
    for deb in sorted(archives.glob("*.deb")):
        if match := _DEB.match(deb.name):
            versions[match.group(1)] = urllib.parse.unquote(match.group(2))
    return versions

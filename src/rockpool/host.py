"""The host tools each job needs, the Debian packages that provide them, and their check."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rockpool.command import CLEAN_PATH, clean_environment, run
from rockpool.errors import MissingTool
from rockpool.spec import host_architecture

# tool -> Debian package
BUILD_TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "qemu-img": "qemu-utils",
    "mke2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "faketime": "faketime",
    "tar": "tar",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "sfdisk": "fdisk",
    "unshare": "util-linux",
}
FOREIGN_BUILD_TOOLS = {
    "qemu-aarch64-static": "qemu-user-static",
    "update-binfmts": "binfmt-support",
}
RUN_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
}
RUN_TOOLS_ARM64 = {"qemu-system-aarch64": "qemu-system-arm"}
PUSH_TOOLS = {"skopeo": "skopeo"}
FIRMWARE_PACKAGES = {"amd64": "ovmf", "arm64": "qemu-efi-aarch64"}
# caddy: the real reverse proxy; docker-registry: a real registry on 127.0.0.1;
# lz4: an LZ4 decoder independent of python-lz4.
TEST_PACKAGES = ("openssh-client", "caddy", "docker-registry", "lz4")
# What `rockpool host setup` installs, for building and running both architectures.
RUNTIME_PACKAGES = sorted(
    {
        *BUILD_TOOLS.values(),
        *FOREIGN_BUILD_TOOLS.values(),
        *RUN_TOOLS.values(),
        *RUN_TOOLS_ARM64.values(),
        *FIRMWARE_PACKAGES.values(),
        *PUSH_TOOLS.values(),
        "ca-certificates",
    }
)


def packages(*, with_tests: bool = False) -> list[str]:
    return sorted({*RUNTIME_PACKAGES, *(TEST_PACKAGES if with_tests else ())})


def missing_tools(tools: dict[str, str]) -> dict[str, str]:
    return {tool: pkg for tool, pkg in tools.items() if shutil.which(tool, path=CLEAN_PATH) is None}


def require(tools: dict[str, str], purpose: str) -> None:
    missing = missing_tools(tools)
    if missing:
        packages = " ".join(sorted(set(missing.values())))
        raise MissingTool(
            f"{purpose} needs {', '.join(sorted(missing))}, which the host lacks",
            hint=f"run: sudo rockpool host setup   (or: sudo apt-get install {packages})",
        )


def require_root(purpose: str) -> None:
    if os.geteuid() != 0:
        raise MissingTool(
            f"{purpose} needs root (it bootstraps Debian into a directory with real ownership)",
            hint="run it with sudo",
        )


# binfmt_misc entries that run another architecture's binaries under qemu-user.
BINFMT = {"arm64": "qemu-aarch64", "amd64": "qemu-x86_64"}
BINFMT_MISC = Path("/proc/sys/fs/binfmt_misc")


def require_foreign_architecture(arch: str) -> None:
    """A root for another architecture runs its maintainer scripts under qemu-user."""
    if arch == host_architecture():
        return
    require(FOREIGN_BUILD_TOOLS, f"building an {arch} image on this host")
    if not (BINFMT_MISC / BINFMT[arch]).exists():
        raise MissingTool(
            f"building an {arch} image needs binfmt_misc support for {BINFMT[arch]}",
            hint="run: sudo rockpool host setup   (it mounts binfmt_misc and enables qemu-user)",
        )


def enable_foreign_architectures() -> list[str]:
    """Mount binfmt_misc if needed and enable qemu-user for the other architecture."""
    if not (BINFMT_MISC / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_MISC)])
    foreign = [arch for arch in BINFMT if arch != host_architecture()]
    for arch in foreign:
        if not (BINFMT_MISC / BINFMT[arch]).exists():
            run(["update-binfmts", "--enable", BINFMT[arch]])
    return foreign


def install_packages(packages: list[str]) -> None:
    require_root("installing host packages")
    if shutil.which("apt-get", path=CLEAN_PATH) is None:
        raise MissingTool(
            "this host has no apt-get; install these packages by hand: " + " ".join(packages)
        )
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-q"], env=clean_environment(env))
    run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        env=clean_environment(env),
    )

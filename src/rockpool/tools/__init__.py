"""Every external program rockpool runs, the Debian package that provides it, and the
jobs that need it.

This is the one list the host set-up installs from, the preflight checks against and
the command wrapper names a package from; tests/unit/test_tools.py checks that every
program the code runs is in it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable

from rockpool.arch import ARCHITECTURES
from rockpool.errors import MissingTool

# The PATH every command runs with (command.clean_environment) and programs are found on.
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# program -> the Debian package that provides it
PACKAGES: dict[str, str] = {
    "apt-get": "apt",
    "arch-test": "arch-test",  # mmdebstrap runs it for a foreign architecture
    "bash": "bash",
    "chroot": "coreutils",
    "cp": "coreutils",
    "dd": "coreutils",
    "install": "coreutils",
    "mkdir": "coreutils",
    "rm": "coreutils",
    "rmdir": "coreutils",
    "ln": "coreutils",
    "debugfs": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "mke2fs": "e2fsprogs",
    "faketime": "faketime",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "mmdebstrap": "mmdebstrap",
    "nft": "nftables",  # the filter around workspaces (runtime/network.py)
    "useradd": "passwd",  # makes the user QEMU runs workspaces as
    "mount": "mount",  # mmdebstrap's root mode mounts /proc, /sys and /dev with it
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-system-aarch64": "qemu-system-arm",
    "qemu-aarch64-static": "qemu-user-static",
    "qemu-x86_64-static": "qemu-user-static",
    "sfdisk": "fdisk",
    "skopeo": "skopeo",
    "mksquashfs": "squashfs-tools",  # the incus-container format's root
    "incus": "incus-client",  # the Incus runtime's one interface to Incus (tools/incus.py)
    "tar": "tar",
    "unshare": "util-linux",
    "update-binfmts": "binfmt-support",
    # what the test suite runs beside rockpool, to check its work independently
    "blkid": "util-linux",
    "caddy": "caddy",
    "curl": "curl",
    "docker-registry": "docker-registry",
    "dpkg": "dpkg",
    "dpkg-query": "dpkg",  # the versions of the host tools that write image bytes
    "ldd": "libc-bin",  # ... and of the libraries they load
    "e2fsck": "e2fsprogs",
    "echo": "coreutils",
    "ip": "iproute2",  # the isolation test's stand-in internet, in a network namespace
    "env": "coreutils",
    "kill": "procps",
    "ps": "procps",  # the isolation test names who each QEMU runs as
    "pkill": "procps",  # ends containers that outlived an incusd the tests killed
    "losetup": "mount",
    "lz4": "lz4",
    "mkfs.btrfs": "btrfs-progs",  # incusd formats the tests' copy-on-write pool with it
    "mdir": "mtools",
    "mtype": "mtools",
    "qemu-io": "qemu-utils",
    "setpriv": "util-linux",  # runs the isolation test's checks as an unprivileged user
    "taskset": "util-linux",  # gives a build one CPU, a host property its bytes must ignore
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "umount": "mount",
}
# Packages Debian 12 (bookworm) has only in its backports: installed from there, each
# with only the dependencies it needs from there (not a newer QEMU, say). Debian 13
# has them in main.
BACKPORTED = ("incus-client", "incus-base")
BACKPORTS_SUITES = {"bookworm": "bookworm-backports"}
# The daemons the tests start themselves, by package: not programs on PATH.
TEST_DAEMONS = {"incusd": ("incus-base", "/usr/libexec/incus/incusd")}
# Packages whose files, not programs, rockpool uses: UEFI firmware for each guest
# architecture, and the CA bundle behind registry downloads.
FIRMWARE_PACKAGES = {"amd64": "ovmf", "arm64": "qemu-efi-aarch64"}
# (code, vars template) of each architecture's firmware, in the order they are tried.
FIRMWARE_FILES = {
    "amd64": [
        ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
        ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ],
    "arm64": [("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd")],
}
DATA_PACKAGES = ("ca-certificates", *FIRMWARE_PACKAGES.values())
# Programs that only macOS has (the Packer path and the Tart runtime): not from Debian.
MACOS_PROGRAMS = {
    "packer": "brew install hashicorp/tap/packer",
    "tart": "brew install cirruslabs/cli/tart",
    "softnet": "brew install cirruslabs/cli/softnet",  # Tart's isolated network
}

# What each job runs. A build also runs what its formats need (FORMAT_PROGRAMS) and,
# for another architecture, FOREIGN_BUILD.
BUILD = (
    "mmdebstrap",
    "mount",
    "unshare",
    "bash",
    "chroot",
    "install",
    "mkdir",
    "rm",
    "cp",
    "dd",
    "tar",
    "mke2fs",
    "debugfs",
    "dumpe2fs",
    "faketime",
    "mkfs.vfat",
    "mmd",
    "mcopy",
    "sfdisk",
)
# The qemu-user interpreter that runs an architecture's programs on another host.
QEMU_USER = {name: f"qemu-{arch.qemu}-static" for name, arch in ARCHITECTURES.items()}
FOREIGN_BUILD = ("arch-test", "update-binfmts")
FORMAT_PROGRAMS: dict[str, tuple[str, ...]] = {
    "raw": ("cp",),
    "qcow2": ("qemu-img",),
    "tart": ("cp",),
    "tart-oci": (),
    "incus": (),
    "incus-container": ("mksquashfs",),
}
# The host programs whose own output reaches an image's bytes, by the stage that runs
# them. Their packages' versions are build inputs: part of each stage's key and of the
# manifest and the lock (build/plan.py), so a difference between two hosts is named
# before any byte is compared.
BYTE_WRITERS: dict[str, tuple[str, ...]] = {
    "bootstrap": ("mmdebstrap", "apt-get", "dpkg"),
    "disk": ("mke2fs", "debugfs", "faketime", "mkfs.vfat", "mcopy", "sfdisk"),
    "formats": ("qemu-img", "mksquashfs"),
}
QEMU_SYSTEM = {name: f"qemu-system-{arch.qemu}" for name, arch in ARCHITECTURES.items()}
CONFIG_DISK = ("mkfs.vfat", "mcopy")
WORKSPACES = ("qemu-img", *CONFIG_DISK, "nft", "useradd")
PUSH = ("skopeo",)
INCUS_RUNTIME = ("incus",)
HOST_SETUP = ("apt-get", "mount", "update-binfmts")
TESTS = (
    "blkid",
    "caddy",
    "curl",
    "docker-registry",
    "dpkg",
    "e2fsck",
    "echo",
    "env",
    "ip",
    "kill",
    "losetup",
    "lz4",
    "mdir",
    "mkfs.btrfs",
    "mtype",
    "pkill",
    "ps",
    "qemu-io",
    "setpriv",
    "ssh",
    "ssh-keygen",
    "taskset",
    "umount",
)


def install_hint(programs: list[str] | tuple[str, ...]) -> str:
    """The command that installs programs: apt for Debian's, Homebrew for macOS's."""
    debian = sorted({PACKAGES[p] for p in programs if p in PACKAGES})
    brew = sorted({MACOS_PROGRAMS[p] for p in programs if p in MACOS_PROGRAMS})
    hints = []
    if debian:
        hints.append(
            "run: sudo rockpool host setup   (or: sudo apt-get install " + " ".join(debian) + ")"
        )
    hints += [f"run: {command}" for command in brew]
    return "; ".join(hints) or "install it and make sure it is on PATH"


def all_packages(*, with_tests: bool = False) -> list[str]:
    """What the host set-up installs: every job's packages, and with_tests the suite's."""
    programs = [program for program in PACKAGES if with_tests or program not in TESTS]
    daemons = {package for package, _ in TEST_DAEMONS.values()} if with_tests else set()
    return sorted({PACKAGES[program] for program in programs} | set(DATA_PACKAGES) | daemons)


def missing(programs: Iterable[str]) -> list[str]:
    """The programs, of those given, that this host's clean PATH lacks."""
    return sorted({p for p in programs if shutil.which(p, path=CLEAN_PATH) is None})


def require(programs: Iterable[str], purpose: str) -> None:
    absent = missing(programs)
    if absent:
        raise MissingTool(
            f"{purpose} needs {', '.join(absent)}, which the host lacks",
            hint=install_hint(absent),
        )

"""Stage: bootstrap a minimal Debian with systemd, a kernel and the image's packages."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from rockpool.command import clean_environment, contained, run
from rockpool.progress import Task
from rockpool.spec import ImageSpec

if TYPE_CHECKING:
    from rockpool.build.context import BuildContext  # stages are called with one

# What makes the root bootable; the spec's packages and setup.sh's own come on top.
BOOT_PACKAGES = ("systemd-sysv", "udev", "dbus", "kmod", "initramfs-tools", "systemd-boot-efi")
KERNEL_PACKAGE = {"amd64": "linux-image-cloud-amd64", "arm64": "linux-image-cloud-arm64"}
# Docs, man pages and translations: ~120 MB nobody reads in a workspace VM.
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)


_UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}
_NEED = re.compile(r"^Need to get ([\d.,]+) (B|kB|MB|GB)")
_GET = re.compile(r"^Get:\d+ .* \[([\d.,]+) (B|kB|MB|GB)\]$")


class AptDownloadProgress:
    """Turns apt's "Need to get" / "Get:" lines into a download bar."""

    def __init__(self, ctx: BuildContext) -> None:
        self.reporter = ctx.reporter
        self.task: Task | None = None
        self.done = 0.0

    def __call__(self, line: str) -> None:
        text = line.strip()
        if text.startswith("I: "):
            self.reporter.status(text)
        if need := _NEED.match(text):
            if self.task is not None:
                self.task.done()
            self.task = self.reporter.task("downloading packages", total=_bytes(*need.groups()))
            self.done = 0.0
        elif (get := _GET.match(text)) and self.task is not None:
            self.done += _bytes(*get.groups())
            self.task.update(self.done)

    def close(self) -> None:
        if self.task is not None:
            self.task.done()


def _bytes(number: str, unit: str) -> float:
    return float(number.replace(",", "")) * _UNITS[unit]


LOCK_PREFERENCES = "/etc/apt/preferences.d/rockpool-lock.pref"


def lock_hooks(ctx: BuildContext) -> list[str]:
    """With a lock, apt may pick only the locked versions, from the first package on;
    the pins are gone before the root is provisioned."""
    if ctx.lock is None:
        return []
    preferences = ctx.work / "rockpool-lock.pref"
    preferences.write_text(ctx.lock.apt_preferences())
    return [
        f'--setup-hook=mkdir -p "$1/etc/apt/preferences.d" && '
        f'cp {shlex.quote(str(preferences))} "$1{LOCK_PREFERENCES}"',
        f'--customize-hook=rm -f "$1{LOCK_PREFERENCES}"',
    ]


def snapshot_options(spec: ImageSpec) -> list[str]:
    """snapshot.debian.org serves old Release files whose Valid-Until has passed; apt
    would refuse them. Only such mirrors get the check turned off."""
    if any("snapshot." in mirror for mirror in (spec.mirror, spec.security_mirror)):
        return ['--aptopt=Acquire::Check-Valid-Until "false"']
    return []


def bootstrap(ctx: BuildContext) -> None:
    spec = ctx.spec
    packages = ctx.plan.bootstrap_packages
    argv: list[str | Path] = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--verbose",  # apt's "Get:" lines feed the download bar
        f"--architectures={spec.architecture}",
        f"--include={','.join(packages)}",
        *(f"--dpkgopt={option}" for option in DPKG_EXCLUDES),
        *lock_hooks(ctx),
        *snapshot_options(spec),
        spec.suite,
        ctx.root,
        # Security fixes and point updates from the start, and for `apt upgrade` later.
        f"deb {spec.mirror} {spec.suite} main",
        f"deb {spec.mirror} {spec.suite}-updates main",
        f"deb {spec.security_mirror} {spec.suite}-security main",
    ]
    # INITRD=No: the kernel's postinst makes no initramfs (nor, with none to update,
    # does the initramfs-tools trigger); setup.sh makes it once, with its own hook in.
    env = clean_environment({"SOURCE_DATE_EPOCH": str(ctx.source_date_epoch), "INITRD": "No"})
    progress = AptDownloadProgress(ctx)
    try:
        run(contained(argv), env=env, on_line=progress)
    finally:
        progress.close()

"""Stage: bootstrap a minimal Debian with systemd, a kernel and the image's packages."""

from __future__ import annotations

import re
from pathlib import Path

from rockpool import host
from rockpool.command import clean_environment, contained, run
from rockpool.context import BuildContext
from rockpool.progress import Task
from rockpool.provision import setup_variables

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


def setup_script_packages(ctx: BuildContext) -> list[str]:
    """The packages setup.sh itself insists on; installed here in one apt run."""
    result = run(
        ["bash", ctx.spec.setup_script, "--print-packages"],
        env=clean_environment(setup_variables(ctx.spec)),
        capture=True,
    )
    return result.stdout.split()


def bootstrap_packages(ctx: BuildContext) -> list[str]:
    """Everything the bootstrap installs, in one apt run."""
    spec = ctx.spec
    return list(
        dict.fromkeys(
            [
                *BOOT_PACKAGES,
                KERNEL_PACKAGE[spec.architecture],
                *setup_script_packages(ctx),
                *spec.packages,
            ]
        )
    )


def bootstrap(ctx: BuildContext) -> None:
    host.require(host.BUILD_TOOLS, "building an image")
    spec = ctx.spec
    host.require_foreign_architecture(spec.architecture)
    packages = bootstrap_packages(ctx)
    argv: list[str | Path] = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--verbose",  # apt's "Get:" lines feed the download bar
        f"--architectures={spec.architecture}",
        f"--include={','.join(packages)}",
        *(f"--dpkgopt={option}" for option in DPKG_EXCLUDES),
        spec.suite,
        ctx.root,
        # Security fixes and point updates from the start, and for `apt upgrade` later.
        f"deb {spec.mirror} {spec.suite} main",
        f"deb {spec.mirror} {spec.suite}-updates main",
        f"deb {spec.security_mirror} {spec.suite}-security main",
    ]
    env = clean_environment({"SOURCE_DATE_EPOCH": str(ctx.source_date_epoch)})
    progress = AptDownloadProgress(ctx)
    try:
        run(contained(argv), env=env, on_line=progress)
    finally:
        progress.close()

"""This host's readiness for each job: the programs it needs (tools.py), root, firmware,
and foreign-architecture support; and the set-up that installs them."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rockpool import tools
from rockpool.arch import ARCHITECTURES, host_architecture
from rockpool.command import clean_environment, run
from rockpool.errors import MissingTool
from rockpool.tools import CLEAN_PATH

if TYPE_CHECKING:
    from rockpool.spec import ImageSpec

# binfmt_misc entries that run another architecture's binaries under qemu-user.
BINFMT = {name: f"qemu-{arch.qemu}" for name, arch in ARCHITECTURES.items()}
BINFMT_MISC = Path("/proc/sys/fs/binfmt_misc")


def require_root(purpose: str) -> None:
    if os.geteuid() != 0:
        raise MissingTool(
            f"{purpose} needs root (it bootstraps Debian into a directory with real ownership)",
            hint="run it with sudo",
        )


def foreign_programs(arch: str) -> tuple[str, ...]:
    return (*tools.FOREIGN_BUILD, tools.QEMU_USER[arch])


def foreign_support_problem(arch: str) -> str | None:
    """Why this host cannot run arch's programs, or None when it can.

    mmdebstrap asks arch-test the same question; asking it here answers in a second,
    before any slow work."""
    if arch == host_architecture():
        return None
    if tools.missing(foreign_programs(arch)):
        return None  # reported with the packages by tools.require()
    if not (BINFMT_MISC / BINFMT[arch]).exists():
        return f"binfmt_misc has no {BINFMT[arch]} entry"
    result = run(["arch-test", arch], capture=True, check=False)
    if result.returncode != 0:
        return f"arch-test {arch} says: {(result.stdout or result.stderr).strip()}"
    return None


def require_foreign_architecture(arch: str) -> None:
    """A root for another architecture runs its maintainer scripts under qemu-user."""
    if arch == host_architecture():
        return
    purpose = f"building an {arch} image on this {host_architecture()} host"
    tools.require(foreign_programs(arch), purpose)
    problem = foreign_support_problem(arch)
    if problem:
        raise MissingTool(
            f"{purpose} needs qemu-user through binfmt_misc: {problem}",
            hint="run: sudo rockpool host setup   (it mounts binfmt_misc and enables qemu-user)",
        )


def build_programs(spec: ImageSpec, *, verify: bool = True) -> list[str]:
    """Every program a build of spec runs: its formats', qemu-user's for another
    architecture, and QEMU's for the boot that verifies it."""
    programs = [*tools.BUILD, *(p for f in spec.formats for p in tools.FORMAT_PROGRAMS[f])]
    if spec.architecture != host_architecture():
        programs += foreign_programs(spec.architecture)
    if verify:
        programs += [tools.QEMU_SYSTEM[spec.architecture], *tools.WORKSPACES]
    return sorted(set(programs))


def require_build_host(spec: ImageSpec, *, verify: bool = True) -> None:
    """The host part of a build's preflight: root, every program the build will run,
    firmware for its verifying boot, and foreign-architecture support; before the
    network checks and any slow work."""
    require_root("building an image")
    purpose = f"building {spec.name} ({spec.architecture})"
    tools.require(build_programs(spec, verify=verify), purpose)
    if verify and missing_firmware(spec.architecture):
        package = tools.FIRMWARE_PACKAGES[spec.architecture]
        raise MissingTool(
            f"{purpose} boots the new image to verify it, and needs UEFI firmware "
            f"for {spec.architecture} guests (package {package})",
            hint=f"run: sudo apt-get install {package}   (or build with --no-verify)",
        )
    require_foreign_architecture(spec.architecture)


def _linked_libraries(path: str) -> list[str]:
    """The shared libraries an ELF program loads (none for a script)."""
    listed = run(["ldd", path], capture=True, check=False)
    return [
        words[2]
        for words in (line.split() for line in listed.stdout.splitlines())
        if len(words) >= 3 and words[1] == "=>" and words[2].startswith("/")
    ]


def package_versions(programs: Iterable[str]) -> dict[str, str]:
    """The installed version of every Debian package whose code the programs run: their
    own packages and those of the libraries they load (zlib for qemu-img's deflate, say).
    Nothing at all on a host without dpkg (macOS, for the Packer path)."""
    if shutil.which("dpkg-query", path=CLEAN_PATH) is None:
        return {}
    found = [shutil.which(program, path=CLEAN_PATH) for program in programs]
    paths = sorted({path for path in found if path is not None})
    files = set(paths)
    for path in paths:
        files.update(_linked_libraries(path))
    # dpkg knows a file by the path its package ships it at: on a merged /usr, either.
    for file in list(files):
        files.add(os.path.realpath(file))
        if file.startswith("/usr/"):
            files.add(file.removeprefix("/usr"))
        else:
            files.add("/usr" + file)
    owners = run(["dpkg-query", "--search", *sorted(files)], capture=True, check=False)
    packages = {
        name.strip().split(":")[0]  # "zlib1g:amd64: /lib/..."
        for line in owners.stdout.splitlines()
        if ": /" in line
        for name in line.split(": /")[0].split(",")
    }
    listed = run(
        ["dpkg-query", "--show", "--showformat", "${Package}\t${Version}\n", *sorted(packages)],
        capture=True,
        check=False,
    )
    versions = {}
    for line in listed.stdout.splitlines():
        name, _, version = line.partition("\t")
        if version:
            versions[name.split(":")[0]] = version
    return dict(sorted(versions.items()))


def usable_cpus() -> int:
    """The CPUs this process may run on, as nproc and make -j see them."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # macOS (the Packer path) has no affinity


def build_host_facts() -> dict[str, Any]:
    """What a manifest notes of the machine that built it. None of it is an input:
    the image's bytes must not depend on it (docs/reproducible.md)."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith(("model name", "CPU part")):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": usable_cpus(),
        "python": platform.python_version(),
    }


def missing_firmware(arch: str) -> bool:
    return not any(
        Path(code).is_file() and Path(variables).is_file()
        for code, variables in tools.FIRMWARE_FILES[arch]
    )


def check(*, with_tests: bool = False) -> dict[str, dict[str, Any]]:
    """Each documented job and what this host lacks for it: programs (with their
    packages), firmware, foreign-architecture support."""
    all_formats = [p for programs in tools.FORMAT_PROGRAMS.values() for p in programs]
    jobs: dict[str, dict[str, Any]] = {}

    def job(name: str, programs: Iterable[str], **problems: str | None) -> None:
        absent = tools.missing(programs)
        found = {key: value for key, value in problems.items() if value}
        jobs[name] = {
            "missing": {program: tools.PACKAGES.get(program) for program in absent},
            **found,
            "ok": not absent and not found,
        }

    for arch in ARCHITECTURES:
        programs = [*tools.BUILD, *all_formats]
        if arch != host_architecture():
            programs += foreign_programs(arch)
        job(f"build-{arch}", programs, foreign_architecture=foreign_support_problem(arch))
        firmware = tools.FIRMWARE_PACKAGES[arch]
        job(
            f"workspaces-{arch}",
            [tools.QEMU_SYSTEM[arch], *tools.WORKSPACES],
            firmware=f"no UEFI firmware (package {firmware})" if missing_firmware(arch) else None,
        )
    job("push", tools.PUSH)
    if with_tests:
        job("tests", tools.TESTS)
    return jobs


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
    suite = tools.BACKPORTS_SUITES.get(os_codename() or "")
    if suite is not None and any(p in tools.BACKPORTED for p in packages):
        add_backports(suite)
        packages = [f"{p}/{suite}" if p in tools.BACKPORTED else p for p in packages]
    run(["apt-get", "update", "-q"], env=clean_environment(env))
    # No Recommends: every package a job needs is in the list (tools.py), by name.
    run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        env=clean_environment(env),
    )


def os_codename(os_release: Path = Path("/etc/os-release")) -> str | None:
    """VERSION_CODENAME of /etc/os-release (bookworm, trixie), if it says."""
    try:
        lines = os_release.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME":
            return value.strip().strip('"') or None
    return None


BACKPORTS_SOURCE = Path("/etc/apt/sources.list.d/rockpool-backports.sources")


def add_backports(suite: str) -> None:
    """An apt source for Debian's backports suite. Backports never replace a package by
    themselves (apt prefers the release): only a package asked for as PACKAGE/SUITE
    comes from there."""
    BACKPORTS_SOURCE.write_text(
        "# Written by `rockpool host setup`: Incus is in Debian 12's backports only.\n"
        "Types: deb\n"
        "URIs: http://deb.debian.org/debian\n"
        f"Suites: {suite}\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )

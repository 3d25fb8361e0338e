"""The build plan: what one build is computed from, resolved once at its start.

The spec, its lock, setup.sh (read and hashed once, its --print-packages asked once),
the packages the bootstrap installs, the CA bundle and SOURCE_DATE_EPOCH. Every stage
and every stage key reads them from here, so no two parts of a build can disagree.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rockpool import host
from rockpool.build.bootstrap import BOOT_PACKAGES, KERNEL_PACKAGE
from rockpool.build.preflight import archive_epoch
from rockpool.build.provision import NodeLayerScript, setup_variables
from rockpool.command import clean_environment, run
from rockpool.errors import InvalidInput
from rockpool.lock import Lock, check_inputs, lock_path, locked_inputs, read_lock
from rockpool.spec import ImageSpec
from rockpool.tools import BYTE_WRITERS


@dataclass(frozen=True)
class SetupScript:
    """setup.sh as this build runs it."""

    path: Path
    text: str
    sha256: str
    variables: dict[str, str]  # the spec's settings, as setup.sh reads them
    packages: tuple[str, ...]  # what setup.sh --print-packages asks the bootstrap for

    @classmethod
    def read(cls, spec: ImageSpec) -> SetupScript:
        data = spec.setup_script.read_bytes()
        variables = setup_variables(spec)
        printed = run(
            ["bash", spec.setup_script, "--print-packages"],
            env=clean_environment(variables),
            capture=True,
        )
        return cls(
            path=spec.setup_script,
            text=data.decode("utf-8"),
            sha256=hashlib.sha256(data).hexdigest(),
            variables=variables,
            packages=tuple(printed.stdout.split()),
        )

    @functools.cached_property
    def node_layer(self) -> NodeLayerScript | None:
        return NodeLayerScript.of(self.text)


def version_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """One "name: old -> new" line for each name whose version differs ("(none)": absent)."""
    return [
        f"{name}: {before.get(name, '(none)')} -> {after.get(name, '(none)')}"
        for name in sorted(before.keys() | after.keys())
        if before.get(name) != after.get(name)
    ]


def default_ca_bundle() -> Path | None:
    """The host's CA bundle, so a build works behind a TLS-intercepting proxy."""
    for candidate in (os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def checked_ca_bundle(path: Path) -> Path:
    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInput(
            f"--ca-bundle {path}: not a readable PEM bundle of CA certificates ({exc})"
        ) from None
    return path


def source_date_epoch_override() -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return None
    if not value.isdigit():
        raise InvalidInput(f"SOURCE_DATE_EPOCH must be a Unix time in seconds, not '{value}'")
    return int(value)


@dataclass(frozen=True)
class BuildPlan:
    spec: ImageSpec
    lock: Lock | None
    setup: SetupScript
    bootstrap_packages: tuple[str, ...]  # everything the bootstrap installs, in one apt run
    ca_bundle: Path | None
    epoch_override: int | None = None  # SOURCE_DATE_EPOCH from the environment
    # By stage, the Debian versions of the host packages whose code writes its bytes:
    # the programs it runs and the libraries they load.
    stage_tools: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)

    @classmethod
    def resolve(
        cls, spec: ImageSpec, *, use_lock: bool = True, ca_bundle: Path | None = None
    ) -> BuildPlan:
        """The plan of a build of spec: from its lock when it has one and use_lock is
        set, the lock checked against what the spec asks for now."""
        epoch = source_date_epoch_override()  # a bad value is named before anything is read
        lock = read_lock(spec) if use_lock else None
        return cls.of(spec, lock, ca_bundle=ca_bundle, epoch=epoch)

    @classmethod
    def of(
        cls, spec: ImageSpec, lock: Lock | None, *, ca_bundle: Path | None, epoch: int | None
    ) -> BuildPlan:
        """The plan of a build of spec from lock (or none), at epoch (or the lock's)."""
        setup = SetupScript.read(spec)
        packages = tuple(
            dict.fromkeys(
                [
                    *BOOT_PACKAGES,
                    KERNEL_PACKAGE[spec.architecture],
                    *setup.packages,
                    *spec.packages,
                ]
            )
        )
        if lock is not None:
            check_inputs(lock, locked_inputs(spec, list(packages)))
        bundle = checked_ca_bundle(ca_bundle) if ca_bundle else default_ca_bundle()
        tools = {stage: host.package_versions(programs) for stage, programs in BYTE_WRITERS.items()}
        return cls(spec, lock, setup, packages, bundle, epoch, tools)

    @functools.cached_property
    def host_tools(self) -> dict[str, str]:
        """Every stage's image-writing host packages, by package: what a manifest and a
        lock record."""
        merged = {name: v for tools in self.stage_tools.values() for name, v in tools.items()}
        return dict(sorted(merged.items()))

    def tool_differences(self) -> list[str]:
        """How this host's byte-writing tools differ from those the lock was made with."""
        if self.lock is None or not self.lock.tools:
            return []
        return version_changes(self.lock.tools, self.host_tools)

    @property
    def lock_file(self) -> Path:
        return lock_path(self.spec)

    @property
    def lock_inputs(self) -> dict[str, Any]:
        """What a lock of this plan is resolved from."""
        return locked_inputs(self.spec, list(self.bootstrap_packages))

    @property
    def unlocked_but_lockable(self) -> bool:
        """A lock file is there but has no entry for this architecture."""
        return self.lock is None and self.lock_file.is_file()

    def locked(self, lock: Lock) -> BuildPlan:
        return dataclasses.replace(self, lock=lock)

    def epoch_or(self, fallback: Callable[[], int] | None) -> int:
        """SOURCE_DATE_EPOCH: the environment's, else fallback's where a builder gives
        one, else the lock's, else the archive's Release date (asked only when a build
        runs, not when its version is reused)."""
        if self.epoch_override is not None:
            return self.epoch_override
        if fallback is not None:
            return fallback()
        if self.lock is not None:
            return self.lock.source_date_epoch
        return archive_epoch(self.spec, self.ca_bundle)

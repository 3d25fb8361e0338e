"""Stage keys: the digest of each stage's exact inputs, under which the stage cache
keeps its result, and the input digest under which the store indexes a version.

Each stage declares its inputs: the source files whose code shapes its result (as
patterns below the package; one that matches no file is an error, so a moved module
cannot silently drop out of every key) and the values it reads from the build plan.
Keys are chained: a change reaches the stage it affects and every stage after it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lz4.version

import rockpool
from rockpool.build.cache import StageKeys
from rockpool.build.cross import cross_recipe
from rockpool.build.plan import BuildPlan
from rockpool.errors import RockpoolError
from rockpool.lock import Lock, lockfile_text
from rockpool.spec import spec_digest

PACKAGE_DIR = Path(rockpool.__file__).parent
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "bootstrap": ("build/bootstrap.py",),
    "provision": ("build/provision.py", "build/cross.py"),
    "disk": ("build/disk.py", "build/rootfs.py", "build/context.py", "arch.py"),
    "formats": ("formats/*.py", "tools/qemu_img.py", "tools/tart.py"),
}


def code_files(patterns: Sequence[str]) -> dict[str, str]:
    """sha256 of each source file the patterns match, by its path below the package."""
    modules: set[Path] = set()
    for pattern in patterns:
        matched = sorted(PACKAGE_DIR.glob(pattern))
        if not matched:
            raise RockpoolError(
                f"stage key: the source pattern {pattern!r} matches no file below {PACKAGE_DIR}",
                hint="a module was moved or renamed: update STAGE_CODE in build/keys.py",
            )
        modules.update(matched)
    return {
        m.relative_to(PACKAGE_DIR).as_posix(): hashlib.sha256(m.read_bytes()).hexdigest()
        for m in sorted(modules)
    }


def code_digests(patterns: Sequence[str]) -> list[str]:
    """sha256 of each source file the patterns match, in path order."""
    return list(code_files(patterns).values())


def all_stage_code() -> tuple[str, ...]:
    return tuple(pattern for patterns in STAGE_CODE.values() for pattern in patterns)


def input_digest(plan: BuildPlan) -> str:
    """What a stored version is found by: the spec, setup.sh, the code of every stage
    and the lock."""
    locked = [json.dumps(plan.lock.to_json(), sort_keys=True)] if plan.lock is not None else []
    tools = json.dumps(plan.host_tools, sort_keys=True)
    return spec_digest(
        plan.spec, plan.setup.sha256, *code_digests(all_stage_code()), *locked, tools
    )


def _key(stage: str, **inputs: Any) -> str:
    payload = {"stage": stage, "code": code_digests(STAGE_CODE[stage]), **inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _lockfile_digests(lock: Lock) -> dict[str, str]:
    """The bytes setup.sh gets of each npm lockfile: their key order matters to them."""
    return {
        name: hashlib.sha256(lockfile_text(content).encode()).hexdigest()
        for name, content in lock.npm_lockfiles.items()
    }


def stage_keys(plan: BuildPlan, epoch: int) -> StageKeys:
    """Each stage's key. Mirrors count only without a lock: a locked build installs the
    same versions from any mirror that has them."""
    spec, lock, setup = plan.spec, plan.lock, plan.setup
    lockfiles = _lockfile_digests(lock) if lock else None
    bootstrap = _key(
        "bootstrap",
        architecture=spec.architecture,
        suite=spec.suite,
        mirrors=None if lock else [spec.mirror, spec.security_mirror],
        packages=list(plan.bootstrap_packages),
        locked=lock.debian if lock else None,
        source_date_epoch=epoch,
        tools=plan.stage_tools.get("bootstrap", {}),
    )
    provision = _key(
        "provision",
        after=bootstrap,
        setup_script=setup.sha256,
        variables=setup.variables,
        locked=[lock.npm, lock.npm_tree, lockfiles] if lock else None,
        compiler=cross_recipe(spec.architecture),
    )
    disk = _key(
        "disk",
        after=provision,
        name=spec.name,
        suite=spec.suite,
        size=spec.disk_size,
        tools=plan.stage_tools.get("disk", {}),
    )
    layer = setup.node_layer
    node_layer = (
        _key(
            "provision",
            after=bootstrap,
            layer="node",
            script=layer.digests(),
            variables=setup.variables,
            locked=[lock.npm, lockfiles] if lock else None,
            compiler=cross_recipe(spec.architecture),
        )
        if layer is not None
        else None
    )
    formats = {
        name: _key(
            "formats",
            after=disk,
            format=name,
            cpus=spec.cpus,
            memory=spec.memory,
            tools=plan.stage_tools.get("formats", {}),
            lz4=lz4.version.version,
        )
        for name in spec.formats
    }
    return StageKeys(bootstrap, provision, disk, formats, node_layer)

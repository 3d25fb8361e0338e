"""`rockpool image verify NAME:VERSION`: rebuild a stored version from the inputs it
recorded, on this host, and report identical or exactly what differs.

This is what a second operator runs on a first operator's image. The version carries
its inputs (build/outputs.py: setup.sh and the lock entry beside the manifest; the spec,
SOURCE_DATE_EPOCH, the build code's digests and the host's image-writing tools in the
manifest). What could explain a difference is named before any byte is compared: other
build code, other host tools, or a version built without a lock.
"""

from __future__ import annotations

import time
from typing import Any

from rockpool import host
from rockpool.build.keys import all_stage_code, code_files
from rockpool.build.outputs import INPUTS_DIR, RECORDED_LOCK, RECORDED_SETUP
from rockpool.build.plan import BuildPlan, version_changes
from rockpool.build.runner import build_plan
from rockpool.diff import diff_versions, render
from rockpool.errors import NotFound
from rockpool.lock import read_recorded_lock
from rockpool.progress import Reporter
from rockpool.spec import ImageSpec
from rockpool.store import Store, Version


def recorded_plan(version: Version) -> BuildPlan:
    """The build plan of version, from what it recorded."""
    inputs = version.path / INPUTS_DIR
    manifest = version.manifest
    if not (inputs / RECORDED_SETUP).is_file() or "inputs" not in manifest:
        raise NotFound(
            f"{version.ref} records no build inputs: it was built by an older rockpool",
            hint="rebuild it with this rockpool (rockpool image build --force) to verify it",
        )
    spec = ImageSpec.from_json(manifest["spec"], setup_script=inputs / RECORDED_SETUP)
    lock_file = inputs / RECORDED_LOCK
    lock = read_recorded_lock(lock_file) if lock_file.is_file() else None
    return BuildPlan.of(spec, lock, ca_bundle=None, epoch=int(manifest["source_date_epoch"]))


def explanations(version: Version, plan: BuildPlan) -> list[str]:
    """What differs between the version's build and a rebuild here, before any byte."""
    manifest = version.manifest
    found = []
    code = version_changes(manifest["inputs"].get("code", {}), code_files(all_stage_code()))
    if code:
        found.append(
            f"the build code differs (built by rockpool {manifest.get('rockpool_version')}): "
            + "; ".join(code)
        )
    tools = version_changes(manifest.get("build_host", {}).get("tools", {}), plan.host_tools)
    if tools:
        found.append("the host's image-writing tools differ: " + "; ".join(tools))
    if plan.lock is None:
        found.append(
            "it was built without a lock: the rebuild installs what the archive and the "
            "npm registry serve today"
        )
    return found


def verify_version(store: Store, ref: str, reporter: Reporter) -> dict[str, Any]:
    """Rebuild ref cold in a scratch store (no cache, no boot), compare, forget the rebuild."""
    version = store.resolve(ref)
    plan = recorded_plan(version)
    host.require_build_host(plan.spec, verify=False)
    explained = explanations(version, plan)
    for line in explained:
        reporter.info(f"note: {line}")
    started = time.monotonic()
    with store.staging() as work:
        scratch = Store(work / "store")
        rebuilt = build_plan(plan, scratch, reporter, force=True, verify=False).landed
        diff = diff_versions(version, rebuilt, bytes_of_disks=rebuilt.id != version.id)
    diff["a"], diff["b"] = version.ref, f"{rebuilt.name}:{rebuilt.id} (rebuilt here)"
    return {
        "image": version.ref,
        "rebuilt": rebuilt.id,
        "identical": rebuilt.id == version.id,
        "explained": explained,
        "diff": diff,
        "seconds": round(time.monotonic() - started, 1),
        "host": host.build_host_facts(),
        "built_on": version.manifest.get("build_host", {}),
    }


def render_verification(result: dict[str, Any]) -> str:
    if result["identical"]:
        return f"{result['image']}: identical (rebuilt here in {result['seconds']:.0f}s)"
    lines = [f"{result['image']}: NOT identical: the rebuild here is {result['rebuilt']}"]
    lines += [f"  note: {line}" for line in result["explained"]]
    lines.append(render(result["diff"]))
    return "\n".join(lines)

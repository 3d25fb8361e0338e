"""`rockpool image lock`: resolve a spec against today's archive and registry, and
write what it resolved to as its lock."""

from __future__ import annotations

from pathlib import Path

from rockpool import host
from rockpool.build.cache import CACHED_STAGES, StageCache
from rockpool.build.keys import stage_keys
from rockpool.build.outputs import resolved_lockfiles
from rockpool.build.plan import BuildPlan
from rockpool.build.preflight import registry_integrity
from rockpool.build.runner import BuildResult, build_plan
from rockpool.lock import Lock, check_lock_target, write_lock
from rockpool.progress import Reporter
from rockpool.spec import ImageSpec
from rockpool.store import Store


def lock_spec(
    spec: ImageSpec, store: Store, reporter: Reporter, *, ca_bundle: Path | None = None
) -> tuple[Path, BuildResult]:
    """The resolving build runs unlocked, through the stage cache; its cached results are
    filed under the locked build's keys too, so the first locked build starts from them.
    """
    check_lock_target(spec)
    host.require_build_host(spec)
    plan = BuildPlan.resolve(spec, use_lock=False, ca_bundle=ca_bundle)
    result = build_plan(plan, store, reporter)
    manifest = result.landed.manifest
    installed = manifest["packages"]
    npm = {
        name: {
            "version": version,
            "integrity": registry_integrity(spec, name, version, plan.ca_bundle),
        }
        for name, version in installed.get("npm", {}).items()
    }
    epoch = int(manifest["source_date_epoch"])
    lock = Lock(
        path=plan.lock_file,
        architecture=spec.architecture,
        source_date_epoch=epoch,
        inputs=plan.lock_inputs,
        debian=installed["debian"],
        npm=npm,
        npm_tree=installed.get("npm_tree", {}),
        npm_lockfiles=resolved_lockfiles(result.landed),
        tools=plan.host_tools,
    )
    path = write_lock(spec, lock)
    cache = StageCache.of_store(store.root)
    unlocked, locked = stage_keys(plan, epoch), stage_keys(plan.locked(lock), epoch)
    with store.staging() as scratch:
        for stage in CACHED_STAGES:
            cache.alias(stage, unlocked.of(stage), locked.of(stage), scratch=scratch)
        for name, key in unlocked.formats.items():
            cache.alias("formats", key, locked.formats[name], scratch=scratch)
        if unlocked.node_layer and locked.node_layer:
            cache.alias("node", unlocked.node_layer, locked.node_layer, scratch=scratch)
    return path, result
